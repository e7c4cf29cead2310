"""Quantized layers kept on disk, so a switch back to a level reads them instead of quantizing again.

Why: on a CPU the cost of a switch is the quantization arithmetic itself (rounding, scales, int4
packing), the very work a cold reload does too. A model under changing pressure goes back and forth
between the same two or three levels, so each layer is quantized once per level and written here;
later switches to that level read it back (a few ms per layer instead of ~10-20 ms).

Safety and cleanliness:

* Files are written by this process into a private folder (mode 0700, named after its pid) and read
  back with ``torch.load(weights_only=False)``: quantized layers are modules of tensor subclasses,
  which safe loading does not cover, so only files this process wrote itself are ever unpickled.
  The folder goes when the model leaves the loader's cache and at exit; folders of dead processes
  are removed when the next cache starts.
* Memory-backed file systems (tmpfs, ramfs) are refused: the cache would spend RAM to save RAM.
* Writes are bounded by a byte budget and skip when the disk is nearly full; a layer that cannot be
  read back is dropped and quantized from the source as before. Nothing here can fail a switch.
* Layers of a switch are written by one background thread at low priority, after the switch (it
  would compete for the CPU), holding only weak references: a layer swapped out again before it
  was written is simply not written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.control.resources import validate_budget_gb

logger = logging.getLogger(__name__)

#: File systems whose files live in RAM: a layer cache there would cost the memory it saves.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})
#: Share of the free disk (measured when the cache starts) an automatic budget may use.
AUTO_BUDGET_SHARE = 0.5
#: Writes stop while less than this is free on the cache's disk.
MIN_FREE_DISK_BYTES = 1 << 30


def validate_layer_cache_gb(value: Optional[float]) -> Optional[float]:
    """None (automatic: half the free disk), 0 (off) or a finite positive number of GiB."""
    return validate_budget_gb(value, name="layer_cache_gb", zero_means="off")


def filesystem_type(path: Path) -> str:
    """The type of the file system holding ``path`` ('' when unknown), from the longest mount prefix."""
    import psutil

    resolved = str(path.resolve())
    best, kind = "", ""
    try:
        partitions = psutil.disk_partitions(all=True)
    except (OSError, RuntimeError):
        return ""
    for part in partitions:
        mount = part.mountpoint.rstrip("/") or "/"
        inside = resolved == mount or resolved.startswith(mount + "/") or mount == "/"
        if inside and len(mount) > len(best):
            best, kind = mount, part.fstype
    return kind


@dataclass(frozen=True)
class _Entry:
    path: Path
    backend: str
    nbytes: int


class LayerCache:
    """Per-process store of quantized Linear modules, keyed by (model, level, layer name)."""

    def __init__(self, root: str | Path, budget_gb: Optional[float] = None) -> None:
        budget_gb = validate_layer_cache_gb(budget_gb)
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.skipped_writes = 0
        self.disabled_reason: Optional[str] = None
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._lock = threading.Lock()
        self._queue: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._threads: dict[str, threading.Thread] = {}  # the writer, once started (shared with the finalizer)
        self._holds = 0  # switches in progress: the writer waits for them
        self._idle = threading.Condition()
        self._folder: Optional[Path] = None
        self.budget_bytes = 0
        if budget_gb == 0:
            self.disabled_reason = "turned off (layer_cache_gb=0)"
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self.disabled_reason = f"cannot create {str(self.root)!r}: {error}"
            return
        fstype = filesystem_type(self.root)
        if fstype in MEMORY_FILESYSTEMS:
            self.disabled_reason = f"{str(self.root)!r} is on {fstype}, which is memory: the cache would cost RAM"
            return
        free = shutil.disk_usage(self.root).free
        self.budget_bytes = int(budget_gb * 2**30) if budget_gb is not None else int(free * AUTO_BUDGET_SHARE)
        self._remove_dead_folders()
        self._folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self.root))  # mode 0700
        # Runs on close(), on garbage collection and at interpreter exit (weakref.finalize does all three).
        self._finalizer = weakref.finalize(self, _shutdown, self._queue, self._threads, self._folder)

    # -- state ----------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._folder is not None

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def levels(self, model_key: str) -> dict[str, int]:
        """Layers cached per level for one model."""
        counts: dict[str, int] = {}
        with self._lock:
            for key, level, _ in self._entries:
                if key == model_key:
                    counts[level] = counts.get(level, 0) + 1
        return counts

    def has(self, model_key: str, level: QuantizationLevel | str, layer: str) -> bool:
        with self._lock:
            return (model_key, QuantizationLevel.parse(level).value, layer) in self._entries

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "disabled_reason": self.disabled_reason,
            "folder": str(self._folder) if self._folder else None,
            "layers": len(self._entries),
            "mb": round(self.used_bytes / 2**20, 2),
            "budget_mb": round(self.budget_bytes / 2**20, 1),
            "hits": self.hits,
            "misses": self.misses,
            "writes": self.writes,
            "skipped_writes": self.skipped_writes,
        }

    # -- reading --------------------------------------------------------------------------------
    def load(self, model_key: str, level: QuantizationLevel, layer: str, device: str) -> Optional[tuple[nn.Module, str]]:
        """The cached module and its backend, or None (not cached, or unreadable: then forgotten)."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get((model_key, level.value, layer))
        if entry is None:
            self.misses += 1
            return None
        try:
            module = torch.load(entry.path, map_location=device, weights_only=False)
            if not isinstance(module, nn.Module):
                raise TypeError(f"expected a module, found {type(module).__name__}")
        except Exception as error:  # noqa: BLE001 - a bad file only means "quantize it again"
            logger.warning("layer cache: %s at %s unreadable, quantizing it again: %s", layer, level.value, error)
            self._drop(model_key, level.value, layer)
            self.misses += 1
            return None
        self.hits += 1
        return module, entry.backend

    # -- writing --------------------------------------------------------------------------------
    def store(self, model_key: str, level: QuantizationLevel, layer: str, backend: str, module: nn.Module) -> bool:
        """Write one layer now (True when it was written)."""
        if not self.enabled or level is QuantizationLevel.FP16:
            return False
        if self.has(model_key, level, layer):
            return True
        return self._write(module, model_key, level.value, layer, backend)

    def store_later(self, model_key: str, level: QuantizationLevel, layer: str, backend: str, module: nn.Module) -> None:
        """Queue one layer for the background writer; it is skipped if swapped out before its turn."""
        if not self.enabled or level is QuantizationLevel.FP16 or self.has(model_key, level, layer):
            return
        self._ensure_writer()
        self._queue.put(("layer", (weakref.ref(module), model_key, level.value, layer, backend)))

    @contextmanager
    def writes_held(self) -> Iterator[None]:
        """Hold background writes while a switch runs, so they do not slow it down."""
        with self._idle:
            self._holds += 1
        try:
            yield
        finally:
            with self._idle:
                self._holds -= 1
                self._idle.notify_all()

    def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait until queued layers are written (True) or ``timeout`` seconds passed (False)."""
        if "writer" not in self._threads:
            return True
        done = threading.Event()
        self._queue.put(("flush", done))
        return done.wait(timeout)

    def forget(self, model_key: str) -> int:
        """Delete every layer of one model (it left the loader's cache); returns the bytes freed."""
        with self._lock:
            keys = [key for key in self._entries if key[0] == model_key]
        return sum(self._drop(*key) for key in keys)

    def close(self) -> None:
        """Stop the writer and delete the folder (also done at exit)."""
        if self.enabled:
            self._finalizer()
            with self._lock:
                self._entries.clear()
            self._folder = None
            self.disabled_reason = "closed"

    # -- internals ------------------------------------------------------------------------------
    def _path(self, model_key: str, level: str, layer: str) -> Path:
        model = hashlib.sha1(model_key.encode()).hexdigest()[:12]
        return self._folder / model / level / f"{layer}.pt"  # type: ignore[operator]

    def _write(self, module: nn.Module, model_key: str, level: str, layer: str, backend: str) -> bool:
        from langchain_adaptquant.runtime.accounting import stored_bytes

        nbytes = stored_bytes(module)
        folder = self._folder
        if folder is None:
            return False
        if self.used_bytes + nbytes > self.budget_bytes or shutil.disk_usage(folder).free - nbytes < MIN_FREE_DISK_BYTES:
            self.skipped_writes += 1
            return False
        path = self._path(model_key, level, layer)
        partial = path.with_suffix(".partial")
        try:
            if not folder.is_dir():
                return False  # closed meanwhile: never recreate a deleted folder
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(module, partial)
            os.replace(partial, path)
        except Exception as error:  # noqa: BLE001 - an unwritable layer is just not cached
            logger.warning("layer cache: could not write %s at %s: %s", layer, level, error)
            partial.unlink(missing_ok=True)
            self.skipped_writes += 1
            return False
        with self._lock:
            self._entries[(model_key, level, layer)] = _Entry(path, backend, path.stat().st_size)
        self.writes += 1
        return True

    def _drop(self, model_key: str, level: str, layer: str) -> int:
        with self._lock:
            entry = self._entries.pop((model_key, level, layer), None)
        if entry is None:
            return 0
        entry.path.unlink(missing_ok=True)
        return entry.nbytes

    def _ensure_writer(self) -> None:
        with self._lock:
            writer = self._threads.get("writer")
            if writer is None or not writer.is_alive():
                writer = threading.Thread(target=self._write_loop, name="adaptquant-layer-cache", daemon=True)
                self._threads["writer"] = writer
                writer.start()

    def _write_loop(self) -> None:
        try:  # Linux: lower this thread only, so serving and switching go first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while True:
            kind, payload = self._queue.get()
            if kind == "stop":
                return
            if kind == "flush":
                payload.set()
                continue
            with self._idle:
                while self._holds and self._folder is not None:
                    self._idle.wait(0.5)
            ref, model_key, level, layer, backend = payload
            module = ref()
            if module is None or self._folder is None:
                continue  # swapped out again before its turn: nothing to keep
            with torch.no_grad():
                self._write(module, model_key, level, layer, backend)
            del module

    def _remove_dead_folders(self) -> None:
        import psutil

        for folder in self.root.glob("*-*"):
            pid = folder.name.split("-", 1)[0]
            if folder.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


def _shutdown(pending: "queue.Queue[tuple[str, Any]]", threads: dict[str, threading.Thread], folder: Path) -> None:
    """Stop the writer (letting a write in progress finish), then delete this process's folder."""
    pending.put(("stop", None))
    writer = threads.get("writer")
    if writer is not None and writer is not threading.current_thread():
        writer.join(timeout=5)
    shutil.rmtree(folder, ignore_errors=True)
