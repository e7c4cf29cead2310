"""What the process asks of the operating system to keep memory honest during switches.

glibc keeps freed heap pages (so RSS would not fall after a switch) and a memory-mapped weights
file stays resident after its layers were quantized; these calls give both back. Linux/glibc only
where it says so; elsewhere they do nothing, and the loader works the same, with a higher RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import mmap
from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = ["TRIM_EVERY_BYTES", "drop_file_pages", "file_backed_bytes", "mapped_ranges", "release_memory", "trim_heap"]


#: Bytes of source weights requantized between two ``malloc_trim`` calls during a switch. glibc
#: keeps freed per-layer temporaries in its heap; on a 150M model a switch without trimming peaked
#: at 2.1x the anonymous memory it ended with. Every 12 MB kept INT8/INT4 within 1.13x but INT2,
#: whose quantization makes the most float temporaries, reached 1.16-1.17x peak RSS; every 6 MB
#: keeps all levels within 1.13x at no time cost we could measure (benchmarks/switch.py).
#: Trimming after every layer cost 1.5x the switch time for little more.
TRIM_EVERY_BYTES = 6 * 2**20


@functools.lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (malloc_trim, madvise), looked up once: find_library costs ~2 ms."""
    name = ctypes.util.find_library("c")
    if not name or "libc.so" not in name:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def trim_heap() -> None:
    """Return free heap pages to the OS now (glibc only; a no-op elsewhere)."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_memory(full: bool = False) -> None:
    """Give freed memory back to the OS: without malloc_trim, glibc keeps it and RSS does not fall.

    Swapped-out modules are freed by reference counting; collecting the young generations catches
    cycles made during the switch. A full collection walks every object of transformers and torch
    (~0.4 s with 450k objects here), so only eviction asks for it.
    """
    gc.collect() if full else gc.collect(1)
    trim_heap()


def mapped_ranges(folder: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps the safetensors files under ``folder`` (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    prefix = str(folder.resolve())
    ranges = []
    for line in maps:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith(prefix) and parts[5].endswith(".safetensors"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


_MADV_DONTNEED = 4


def drop_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Let the kernel drop the resident pages of a memory-mapped source tensor we no longer need.

    After a layer is quantized its 16-bit source pages would otherwise stay in RSS until memory
    pressure reclaims them. Only whole pages inside the tensor and inside a mapping of the weights
    file are dropped; the mapping is read-only, so a later read simply faults them in again.
    """
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in ranges):
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return
    libc = _glibc()
    if libc is not None:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def file_backed_bytes(model: nn.Module, folder: Path) -> int:
    """Bytes of parameters whose storage is still the memory-mapped weights file under ``folder``.

    Those pages are file-backed: they count in RSS once touched but the kernel can drop and re-read
    them, unlike anonymous memory. Linux only (reads /proc/self/maps); 0 elsewhere.
    """
    ranges = mapped_ranges(folder)
    if not ranges:
        return 0
    total, seen = 0, set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        try:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
        except (RuntimeError, NotImplementedError):
            continue  # a quantized tensor subclass: its data was computed, so it is anonymous memory
        if pointer in seen:
            continue
        seen.add(pointer)
        if any(start <= pointer < end for start, end in ranges):
            total += storage.nbytes()
    return total
