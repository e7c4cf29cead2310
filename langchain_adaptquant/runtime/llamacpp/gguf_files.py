"""GGUF files per level: which GGUF type serves a level, what it will weigh, and making it once.

Levels map to llama.cpp's own types (measured on this CPU with llama-cpp-python 0.3.36, SmolLM2-135M,
2 threads: F16 66.8 tok/s, Q8_0 100.5, Q4_0 about Q4_K_M's 100.9 at 87 MB instead of 101 MB, Q2_K 130.5):

=======  ========  ====================================================================
level    GGUF      note
=======  ========  ====================================================================
fp16     F16       the 16-bit file every other level is quantized from
int8     Q8_0
int4     Q4_0      simple blocks of 32; on rows not divisible by 256 Q4_K_M falls back
                   to Q5_0 anyway (SmolLM2's 576 columns), so Q4_0 is smaller and as fast
int2     Q2_K      rows not divisible by 256 fall back to Q4_0 (llama.cpp's rule): on
                   SmolLM2 most of "int2" is really 4.5 bits per weight — reported as it is
=======  ========  ====================================================================

Each file is written once by ``llama_model_quantize`` into a temporary name and renamed into
place, so a file interrupted mid-write is never taken for a level; a file whose tensor table
does not read back is removed and made again. A source GGUF that is already quantized (a pulled
Q4_1) is first expanded to F16: the 16-bit level then is that file made dense, and every lower
level keeps the source's error on top of its own (the torch runtime says the same of its bf16).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional

from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.errors import AdaptQuantError, InvalidValueError
from langchain_adaptquant.runtime.llamacpp.bindings import lib

logger = logging.getLogger(__name__)

#: The GGUF type (llama.cpp's ``LLAMA_FTYPE_MOSTLY_<name>``) that stores each level.
LEVEL_TYPES: dict[QuantizationLevel, str] = {
    QuantizationLevel.FP16: "F16",
    QuantizationLevel.INT8: "Q8_0",
    QuantizationLevel.INT4: "Q4_0",
    QuantizationLevel.INT2: "Q2_K",
}

#: The type llama.cpp's quantizer uses for a K-quant tensor whose rows are not a multiple of 256.
_K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


class GGUFError(AdaptQuantError):
    """A GGUF file is missing, unreadable or could not be quantized."""


@dataclass(frozen=True)
class TensorEntry:
    """One row of a GGUF tensor table."""

    name: str
    columns: int  # elements per row (the first dimension in GGUF order)
    elements: int
    type_name: str
    nbytes: int


@dataclass(frozen=True)
class GGUFTable:
    """What a GGUF file holds: its tensors and the numbers the runtime needs before loading it."""

    path: Path
    tensors: tuple[TensorEntry, ...]
    context_length: Optional[int]
    file_type: Optional[int]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def type_summary(self) -> dict[str, int]:
        """Tensors per GGUF type (``{"Q4_0": 180, "Q8_0": 1, ...}``): what a level really stores."""
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            counts[tensor.type_name] = counts.get(tensor.type_name, 0) + 1
        return counts

    def estimated_bytes(self, level: QuantizationLevel) -> int:
        """Tensor bytes of this model at ``level``, from this table (see :func:`estimate_tensor`)."""
        return sum(estimate_tensor(tensor, LEVEL_TYPES[level]) for tensor in self.tensors)


# GGUF value types (gguf.GGUFValueType): fixed sizes in bytes; 8 is a string, 9 an array
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads a GGUF header from a memory map: only what the table needs, skipping token arrays fast."""

    def __init__(self, data: Any) -> None:
        self.data, self.at = data, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise ValueError(f"the header ends early at byte {self.at}")
        value = struct.unpack_from(fmt, self.data, self.at)[0]
        self.at += size
        return value

    def string(self) -> str:
        size = self.take("<Q")
        if self.at + size > len(self.data):
            raise ValueError(f"a string runs past the end of the file at byte {self.at}")
        text = bytes(self.data[self.at:self.at + size]).decode("utf-8", "replace")
        self.at += size
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALAR:
            return self.take("<" + _SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("<I"), self.take("<Q")
            if item in _SCALAR:
                self.at += count * struct.calcsize(_SCALAR[item])  # skipped: no table field is an array
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"unknown GGUF value type {kind}")


@lru_cache(maxsize=64)
def _read_table(path: str, size: int, mtime: float) -> GGUFTable:
    """Parse the header: key-value fields (keeping three), then the tensor infos; check the data fits."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _Cursor(data)
            if bytes(data[:4]) != b"GGUF":
                raise ValueError("no GGUF magic at its start")
            cursor.at = 4
            version, n_tensors, n_fields = cursor.take("<I"), cursor.take("<Q"), cursor.take("<Q")
            if version < 2:
                raise ValueError(f"GGUF version {version} (llama.cpp reads 2 and 3)")
            fields: dict[str, Any] = {}
            for _ in range(n_fields):
                key = cursor.string()
                fields[key] = cursor.value(cursor.take("<I"))
            infos = []
            for _ in range(n_tensors):
                name = cursor.string()
                dims = [cursor.take("<Q") for _ in range(cursor.take("<I"))]
                kind, offset = cursor.take("<I"), cursor.take("<Q")
                infos.append((name, dims, GGMLQuantizationType(kind), offset))
            alignment = int(fields.get("general.alignment") or 32)
            start = -(-cursor.at // alignment) * alignment
            tensors = []
            for name, dims, kind, offset in infos:
                elements = math.prod(dims) if dims else 1
                block, block_bytes = GGML_QUANT_SIZES[kind]
                nbytes = elements // block * block_bytes
                if start + offset + nbytes > len(data):
                    raise ValueError(f"tensor {name} runs past the end of the file (cut short?)")
                tensors.append(TensorEntry(name, int(dims[0]) if dims else 1, int(elements), kind.name, int(nbytes)))
    except (OSError, ValueError, KeyError, struct.error) as error:
        raise GGUFError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error})") from None
    arch = str(fields.get("general.architecture") or "llama")
    context = fields.get(f"{arch}.context_length")
    file_type = fields.get("general.file_type")
    return GGUFTable(Path(path), tuple(tensors), int(context) if context is not None else None,
                     int(file_type) if file_type is not None else None)


def read_table(path: Path) -> GGUFTable:
    """The tensor table of ``path`` (cached per file version); GGUFError when it does not parse."""
    try:
        stat = path.stat()
    except OSError:
        raise GGUFError(f"GGUF file {path} does not exist") from None
    return _read_table(str(path), stat.st_size, stat.st_mtime)


def _bytes_as(elements: int, type_name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return -(-elements // block) * size


def estimate_tensor(tensor: TensorEntry, target: str) -> int:
    """Bytes llama.cpp's quantizer will give ``tensor`` for a ``target`` file.

    The rules that move the size, from llama.cpp's quantizer: 1-D tensors (norms) stay F32; below
    16-bit the token embedding / output head is kept at Q8_0 (the tied head decides the answer);
    a K-quant needs rows of 256 and otherwise takes its fallback type; the Q2_K mix stores
    ``ffn_down`` one K-type up (Q3_K). Tested within 5% of the written files on every level.
    """
    if tensor.name.endswith("norm.weight") or tensor.columns == tensor.elements:
        return _bytes_as(tensor.elements, "F32") if tensor.type_name == "F32" else tensor.nbytes
    if target in ("F16", "BF16"):
        return _bytes_as(tensor.elements, target)
    if tensor.name in ("token_embd.weight", "output.weight"):
        return _bytes_as(tensor.elements, "Q8_0" if target != "Q8_0" else target)
    kind = "Q3_K" if target == "Q2_K" and "ffn_down" in tensor.name else target
    if kind.endswith("_K") and tensor.columns % 256:
        kind = _K_FALLBACK[kind]
    return _bytes_as(tensor.elements, kind)


def find_gguf(folder: Path) -> Optional[Path]:
    """The GGUF a model folder serves from: its pulled source record's file, else the one ``*.gguf``."""
    from langchain_adaptquant.pretrained.store import read_source

    source = read_source(folder)
    if source is not None and source.gguf_file:
        path = folder / source.gguf_file
        return path if path.is_file() else None
    found = sorted(folder.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _ftype(name: str) -> int:
    value = getattr(lib(), f"LLAMA_FTYPE_MOSTLY_{name}", None)
    if value is None:
        raise GGUFError(f"this llama-cpp-python has no LLAMA_FTYPE_MOSTLY_{name}")
    return int(value)


class LevelFiles:
    """The GGUF file of each level of one source GGUF, made on first use under ``cache_dir``."""

    def __init__(self, source: Path, cache_dir: Path, threads: Optional[int] = None) -> None:
        self.source = Path(source)
        self.source_table = read_table(self.source)  # GGUFError now, before anything is written
        self.folder = Path(cache_dir) / "gguf" / _fingerprint(self.source)
        self.threads = threads or max(1, (os.cpu_count() or 1))
        self._lock = threading.Lock()

    def path(self, level: QuantizationLevel) -> Path:
        return self.folder / f"{self.source.stem}.{LEVEL_TYPES[level]}.gguf"

    def is_made(self, level: QuantizationLevel) -> bool:
        return self.path(level).is_file()

    def estimated_bytes(self, level: QuantizationLevel) -> int:
        """The level's tensor bytes: read from its file once made, else estimated from the source's table."""
        if self.is_made(level):
            try:
                return read_table(self.path(level)).tensor_bytes
            except GGUFError:
                pass
        return self.source_table.estimated_bytes(level)

    def ensure(self, level: QuantizationLevel, say: Callable[[str], None] = logger.info) -> Path:
        """The level's file, quantized now if it is not on disk (thread-safe, atomic)."""
        with self._lock:
            target = self.path(level)
            if target.is_file():
                try:
                    read_table(target)
                    return target
                except GGUFError as error:
                    logger.warning("%s; making it again", error)
                    target.unlink(missing_ok=True)
            sixteen = self._make(QuantizationLevel.FP16, self.source, say)  # every level from the 16-bit file
            return sixteen if level is QuantizationLevel.FP16 else self._make(level, sixteen, say)

    def _make(self, level: QuantizationLevel, base: Path, say: Callable[[str], None]) -> Path:
        target = self.path(level)
        if target.is_file():
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
        llama = lib()
        params = llama.llama_model_quantize_default_params()
        params.nthread = self.threads
        params.ftype = _ftype(LEVEL_TYPES[level])
        params.allow_requantize = True  # a quantized source (Q4_1) is expanded to F16 first
        say(f"making the {level.value} level ({LEVEL_TYPES[level]}) of {self.source.name} with llama.cpp's quantizer")
        started = time.perf_counter()
        try:
            code = llama.llama_model_quantize(str(base).encode(), str(partial).encode(), ctypes.byref(params))
            if code != 0:
                raise GGUFError(f"llama_model_quantize returned {code} for {base} -> {LEVEL_TYPES[level]}")
            read_table(partial)  # a complete table, or this raises and nothing is kept
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        say(f"{level.value} level ready: {target.name}, {target.stat().st_size / 2**20:.1f} MB in "
            f"{time.perf_counter() - started:.2f} s")
        return target


def check_level(level: Any) -> QuantizationLevel:
    """A level this runtime stores (all four), parsed; a clear error otherwise."""
    parsed = QuantizationLevel.parse(level)
    if parsed not in LEVEL_TYPES:
        raise InvalidValueError("quantization level", level, ", ".join(lv.value for lv in LEVEL_TYPES))
    return parsed
