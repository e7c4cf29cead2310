"""Memory snapshots and the probes that take them.

A snapshot is a plain immutable record (like psutil's named tuples): no hidden state, cheap to pass
around and to log. Probes are callables returning one, so tests inject a scripted probe and
production uses :class:`SystemMemoryProbe`, wrapped in :class:`CachedProbe` so a burst of calls
costs one probe.

Which "total" the policy sees is the tightest of: the host's RAM, the container's cgroup limit
(v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) and the configured ``memory_budget_gb``. A
budget behaves like a cgroup limit: the machine's current use is measured against it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol

import psutil

from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.units import GIB

DEVICES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class MemorySnapshot:
    """Memory as the policy sees it at one instant. Bytes everywhere; ``*_gb`` helpers give GiB."""

    total_bytes: int  # the effective limit: min(host RAM, cgroup limit, budget)
    available_bytes: int  # what can still be allocated under that limit
    used_percent: float  # 100 * (total - available) / total
    process_rss_bytes: int
    process_anon_bytes: int  # RSS minus file-backed pages (mmapped weights are cheaper than heap)
    device: str = "cpu"
    device_total_bytes: Optional[int] = None  # CUDA / MPS memory, None on CPU
    device_free_bytes: Optional[int] = None
    host_total_bytes: int = 0
    limit_source: str = "host"  # which limit is tightest: "host", "cgroup" or "budget"
    taken_at: float = 0.0  # time.monotonic() when probed

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.available_bytes

    @property
    def pressure_percent(self) -> float:
        """Used percent of the memory the model lives in: the accelerator's on CUDA/MPS, else RAM."""
        if self.device != "cpu" and self.device_total_bytes and self.device_free_bytes is not None:
            return 100.0 * (self.device_total_bytes - self.device_free_bytes) / self.device_total_bytes
        return self.used_percent

    @property
    def model_total_bytes(self) -> int:
        """Capacity of the memory the model lives in."""
        if self.device != "cpu" and self.device_total_bytes:
            return self.device_total_bytes
        return self.total_bytes

    @property
    def model_available_bytes(self) -> int:
        if self.device != "cpu" and self.device_free_bytes is not None:
            return self.device_free_bytes
        return self.available_bytes

    def to_dict(self) -> dict:
        """The ``memory`` JSON shape plus the details behind it (GiB, rounded; ``used_percent`` a number
        of percent, e.g. 57.5, so no consumer has to parse it back)."""

        def gb(value: Optional[int]) -> Optional[float]:
            return None if value is None else round(value / GIB, 3)

        return {
            "total_gb": gb(self.total_bytes),
            "available_gb": gb(self.available_bytes),
            "used_percent": round(self.used_percent, 1),
            "process_gb": gb(self.process_rss_bytes),
            "process_anon_gb": gb(self.process_anon_bytes),
            "host_total_gb": gb(self.host_total_bytes),
            "limit_source": self.limit_source,
            "device": self.device,
            "device_total_gb": gb(self.device_total_bytes),
            "device_free_gb": gb(self.device_free_bytes),
        }


class MemoryProbe(Protocol):
    """Anything that returns a fresh :class:`MemorySnapshot` when called."""

    def __call__(self) -> MemorySnapshot: ...


def validate_budget_gb(
    value: Optional[float], name: str = "memory_budget_gb", zero_means: Optional[str] = None
) -> Optional[float]:
    """A budget is None (no cap) or a finite positive number of GiB; the error names ``name``.

    With ``zero_means`` (e.g. "off"), 0 is allowed too and the error says what it means.
    """
    if value is None:
        return None
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if number and (value > 0 or (value == 0 and zero_means is not None)):
        return float(value)
    allowed = "None or a finite number of GiB greater than 0"
    if zero_means is not None:
        allowed = f"None, 0 ({zero_means}) or a finite number of GiB greater than 0"
    raise InvalidValueError(name, value, allowed)


def detect_device() -> str:
    """The best device torch can use here: cuda, then mps, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def validate_device(value: object) -> str:
    """'cuda:1' -> 'cuda': the device type, from a string or a ``torch.device``.

    The one check of a device argument (the backends use it as ``device_type``); anything we do not
    serve on, or an index that is not a number, is a clear error. No torch import: probes stay light.
    """
    text = value if isinstance(value, str) else str(value) if type(value).__name__ == "device" else None
    kind, colon, index = (text or "").partition(":")
    if text is None or kind not in DEVICES or (colon and not index.isdigit()):
        raise InvalidValueError("device", value, "'cpu', 'cuda', 'cuda:N' or 'mps'")
    return kind


@dataclass(frozen=True)
class CgroupLimit:
    limit_bytes: int
    usage_bytes: int
    version: int


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _inactive_file_bytes(stat_path: Path, key: str) -> int:
    try:
        for line in stat_path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def read_cgroup_limit(root: Path | str = "/sys/fs/cgroup") -> Optional[CgroupLimit]:
    """The container's memory limit and usage, v2 first then v1; None when unlimited or absent.

    Usage excludes inactive page cache, as ``docker stats`` does: the kernel reclaims it before OOM.
    """
    root = Path(root)
    limit = _read_int(root / "memory.max")
    if limit is not None:
        usage = _read_int(root / "memory.current") or 0
        usage -= _inactive_file_bytes(root / "memory.stat", "inactive_file")
        return CgroupLimit(limit, max(usage, 0), 2)
    v1 = root / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    # v1 reports "no limit" as a huge page-aligned number rather than "max".
    if limit is not None and limit < 2**60:
        usage = _read_int(v1 / "memory.usage_in_bytes") or 0
        usage -= _inactive_file_bytes(v1 / "memory.stat", "total_inactive_file")
        return CgroupLimit(limit, max(usage, 0), 1)
    return None


@dataclass(frozen=True)
class ProcessStatus:
    """This process's memory as the kernel counts it, in bytes: resident now, its peak since start
    (or the last :func:`reset_peak_rss`), and the anonymous and file-backed parts of the resident set."""

    rss: int
    peak_rss: int
    anon: int
    file: int


_STATUS_KEYS = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "anon", "RssFile": "file"}


def process_status() -> ProcessStatus:
    """Linux: the exact figures of /proc/self/status. Elsewhere psutil's RSS, with peak = RSS and
    anonymous = RSS - shared (the best a portable API offers)."""
    try:
        values: dict[str, int] = {}
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in _STATUS_KEYS:
                    values[_STATUS_KEYS[key]] = int(rest.split()[0]) * 1024
        if len(values) == len(_STATUS_KEYS):
            return ProcessStatus(**values)
    except (OSError, ValueError, IndexError):
        pass
    info = psutil.Process().memory_info()
    shared = getattr(info, "shared", 0)
    return ProcessStatus(rss=info.rss, peak_rss=info.rss, anon=max(info.rss - shared, 0), file=shared)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS, so a peak measures one operation
    (Linux: writing 5 to /proc/self/clear_refs). False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_memory(process: Optional[psutil.Process] = None) -> tuple[int, int]:
    """(RSS, anonymous RSS). For this process on Linux, /proc/self/status's RssAnon is exact;
    elsewhere RSS - shared."""
    if process is None or process.pid == os.getpid():
        status = process_status()
        return status.rss, status.anon
    info = process.memory_info()
    shared = getattr(info, "shared", 0)
    return info.rss, max(info.rss - shared, 0)


def _device_memory(device: str) -> tuple[Optional[int], Optional[int]]:
    if device == "cpu":
        return None, None
    import torch

    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return int(total), int(free)
    if device == "mps":
        total = int(torch.mps.recommended_max_memory())
        used = int(torch.mps.driver_allocated_memory())
        return total, max(total - used, 0)
    return None, None


class SystemMemoryProbe:
    """Probes the real machine: psutil for RAM and the process, cgroup files, torch for the device."""

    def __init__(
        self,
        device: Optional[str] = None,
        memory_budget_gb: Optional[float] = None,
        cgroup_root: Path | str = "/sys/fs/cgroup",
    ) -> None:
        self.device = validate_device(device) if device else detect_device()
        self.memory_budget_gb = validate_budget_gb(memory_budget_gb)
        self.cgroup_root = Path(cgroup_root)
        self._process = psutil.Process()

    def __call__(self) -> MemorySnapshot:
        vm = psutil.virtual_memory()
        total, available, source = vm.total, vm.available, "host"
        cgroup = read_cgroup_limit(self.cgroup_root)
        if cgroup is not None and cgroup.limit_bytes < total:
            total = cgroup.limit_bytes
            available = max(min(available, cgroup.limit_bytes - cgroup.usage_bytes), 0)
            source = "cgroup"
        snapshot_total, snapshot_available = apply_budget(total, available, self.memory_budget_gb)
        if snapshot_total < total:
            source = "budget"
        rss, anon = process_memory(self._process)
        device_total, device_free = _device_memory(self.device)
        return MemorySnapshot(
            total_bytes=snapshot_total,
            available_bytes=snapshot_available,
            used_percent=100.0 * (snapshot_total - snapshot_available) / snapshot_total,
            process_rss_bytes=rss,
            process_anon_bytes=anon,
            device=self.device,
            device_total_bytes=device_total,
            device_free_bytes=device_free,
            host_total_bytes=vm.total,
            limit_source=source,
            taken_at=time.monotonic(),
        )


def apply_budget(total: int, available: int, budget_gb: Optional[float]) -> tuple[int, int]:
    """Shrink (total, available) to a budget, keeping the bytes in use: a budget acts like memory.max."""
    if budget_gb is None:
        return total, available
    budget = int(budget_gb * GIB)
    if budget >= total:
        return total, available
    used = total - available
    return budget, max(budget - used, 0)


class CachedProbe:
    """Reuses a snapshot for ``ttl_s`` seconds, so a burst of invocations costs one probe. Thread-safe."""

    def __init__(
        self,
        probe: MemoryProbe,
        ttl_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not math.isfinite(ttl_s) or ttl_s < 0:
            raise InvalidValueError("snapshot ttl_s", ttl_s, "a finite number of seconds >= 0")
        self.probe = probe
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: Optional[MemorySnapshot] = None
        self._taken: float = -math.inf
        self.probes = 0  # how many real probes ran; lets tests and benchmarks see the cache work

    def __call__(self) -> MemorySnapshot:
        now = self._clock()
        snapshot = self._snapshot
        if snapshot is not None and now - self._taken < self.ttl_s:
            return snapshot
        with self._lock:
            if self._snapshot is not None and now - self._taken < self.ttl_s:
                return self._snapshot
            self._snapshot = self.probe()
            self._taken = now
            self.probes += 1
            return self._snapshot

    def invalidate(self) -> None:
        """Forget the cached snapshot, e.g. right after a switch changed memory use."""
        with self._lock:
            self._snapshot = None
            self._taken = -math.inf


class ScriptedProbe:
    """A probe that reports what a test or a replay tells it to, for deterministic decisions.

    Memory is set as used percent of ``total_gb``; :meth:`set` changes it between calls, and a
    ``script`` of (used_percent, ...) values is consumed one per call when given.
    """

    def __init__(
        self,
        total_gb: float = 16.0,
        used_percent: float = 30.0,
        device: str = "cpu",
        process_gb: float = 0.5,
        memory_budget_gb: Optional[float] = None,
        script: Optional[list[float]] = None,
    ) -> None:
        self.total_bytes = int(total_gb * GIB)
        self.device = validate_device(device)
        self.process_bytes = int(process_gb * GIB)
        self.memory_budget_gb = validate_budget_gb(memory_budget_gb)
        self._lock = threading.Lock()
        self._script = list(script or [])
        self.calls = 0
        self.set(used_percent)

    def set(self, used_percent: float) -> None:
        if isinstance(used_percent, bool) or not isinstance(used_percent, (int, float)) or not 0 <= used_percent <= 100:
            raise InvalidValueError("used_percent", used_percent, "a number from 0 to 100")
        with self._lock:
            self._used_percent = float(used_percent)

    @property
    def used_percent(self) -> float:
        return self._used_percent

    def __call__(self) -> MemorySnapshot:
        with self._lock:
            self.calls += 1
            if self._script:
                self._used_percent = float(self._script.pop(0))
            used = int(self.total_bytes * self._used_percent / 100.0)
            total, available = apply_budget(self.total_bytes, self.total_bytes - used, self.memory_budget_gb)
        return MemorySnapshot(
            total_bytes=total,
            available_bytes=available,
            used_percent=100.0 * (total - available) / total,
            process_rss_bytes=self.process_bytes,
            process_anon_bytes=self.process_bytes,
            device=self.device,
            device_total_bytes=total if self.device != "cpu" else None,
            device_free_bytes=available if self.device != "cpu" else None,
            host_total_bytes=self.total_bytes,
            limit_source="budget" if total < self.total_bytes else "host",
            taken_at=time.monotonic(),
        )

