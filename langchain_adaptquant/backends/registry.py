"""Which backend stores which level on which device, best first, and per-layer fallback.

The CPU order below was chosen from ``benchmarks/backends_probe.py`` on the development machine
(2-core x86-64, AVX2 without AVX512-BF16, torch 2.13 CPU); numbers in ``MEASURED_PREFERENCE`` comments
are from ``benchmarks/results/backends_probe.json``. Re-run the probe on a new machine type
before trusting the order there. The CUDA order was measured on an H100 with
``benchmarks/cuda_check.py``; the MPS order follows the libraries' documentation (not measured).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Optional

from torch import nn

from langchain_adaptquant.backends.base import (
    BackendError,
    DeviceLike,
    LevelLike,
    QuantizationBackend,
    UnsupportedLevelError,
    describe_linear,
    device_type,
)
from langchain_adaptquant.backends.bitsandbytes import BitsAndBytesBackend
from langchain_adaptquant.backends.cast import CastBackend
from langchain_adaptquant.backends.int2pack import Int2PackBackend
from langchain_adaptquant.backends.quanto import QuantoBackend
from langchain_adaptquant.backends.torchao import TorchAOBackend
from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION, QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError, choices

logger = logging.getLogger(__name__)

_FP16, _INT8, _INT4, _INT2 = (
    QuantizationLevel.FP16,
    QuantizationLevel.INT8,
    QuantizationLevel.INT4,
    QuantizationLevel.INT2,
)

#: The measured order, best first, per device type and level (read-only: the numbers behind it are in
#: the comments). Backends missing here but registered come last.
MEASURED_PREFERENCE: Mapping[str, Mapping[QuantizationLevel, tuple[str, ...]]] = MappingProxyType({
    "cpu": MappingProxyType({
        _FP16: ("cast",),
        # Sums over 768x768, 768x3072, 3072x768, 768x1000, 1 thread (decode ms / 64-token prefill ms /
        # quantize ms / max rel. error): quanto 0.86 / 30 / 37 / 0.009, torchao 2.9 / 121 / 92 / 0.009,
        # bitsandbytes 5.3 / 32 / 122 / 0.012 (it also quantizes activations). quanto wins both;
        # torchao next for decode, which dominates generation. All ~0.50x bf16 bytes.
        _INT8: ("quanto", "torchao", "bitsandbytes"),
        # torchao and quanto run the same tinygemm kernel: on the 3 shapes torchao takes, decode
        # 0.94 vs 0.93 ms, prefill 21 vs 25 ms, but torchao quantizes 2-3x faster (38 vs 82 ms),
        # which is what a switch costs. torchao rejects out_features % 16 != 0 (768x1000); quanto
        # takes it at 1.28 ms decode vs bitsandbytes nf4 1.53 ms. nf4 is slowest here (decode sum
        # 19.8 ms) as this CPU lacks AVX512-BF16; ~0.26-0.27x bf16 bytes for all three.
        _INT4: ("torchao", "quanto", "bitsandbytes"),
        # int2pack stores 2 bits per weight and runs torch's int4 kernel (decode 0.157 ms on
        # 1024x2816 vs bf16 0.244 ms, 1 thread); quanto dequantizes every weight per forward
        # (~5x slower than bf16) and takes the layers int2pack cannot (out_features % 16 != 0).
        _INT2: ("int2pack", "quanto"),
    }),
    # CUDA, measured with benchmarks/cuda_check.py on an H100 (torch 2.11 cu130, fp16 activations;
    # decode-size forward in ms over 1024x1024 / 1024x2816 / 2816x1024 / 1024x1000, max rel. error):
    # INT8 torchao 0.07-0.10 / 0.004, quanto 0.08-0.13 / 0.004, bitsandbytes LLM.int8() 0.17-0.39 /
    # 0.009 (it also quantizes activations). INT4: bitsandbytes NF4 0.05 / 0.09; torchao's int4
    # layout takes bf16 only, and quanto int4/int2 need their JIT-compiled CUDA kernels.
    "cuda": MappingProxyType({
        _FP16: ("cast",),
        _INT8: ("torchao", "quanto", "bitsandbytes"),
        _INT4: ("bitsandbytes", "quanto", "torchao"),
        _INT2: ("quanto",),
    }),
    # MPS: quanto is the library that targets it; 16-bit is a cast.
    "mps": MappingProxyType({
        _FP16: ("cast",),
        _INT8: ("quanto",),
        _INT4: ("quanto",),
        _INT2: ("quanto",),
    }),
})


def _measured_order() -> dict[str, dict[QuantizationLevel, list[str]]]:
    return {kind: {level: list(names) for level, names in orders.items()} for kind, orders in MEASURED_PREFERENCE.items()}


#: The order in use: the measured one until ``register_backend``/``unregister_backend`` change it
#: (mutable module state, hence the lower-case name; tests and benchmarks may edit it and restore it).
preference: dict[str, dict[QuantizationLevel, list[str]]] = _measured_order()

_BACKENDS: dict[str, QuantizationBackend] = {
    backend.name: backend
    for backend in (CastBackend(), BitsAndBytesBackend(), TorchAOBackend(), QuantoBackend(), Int2PackBackend())
}


# -- the registry ------------------------------------------------------------------------------


def get_backend(name: str) -> QuantizationBackend:
    """The registered backend called ``name`` (a clear error names the known ones)."""
    try:
        return _BACKENDS[name]
    except (KeyError, TypeError):
        raise InvalidValueError("backend", name, choices(_BACKENDS)) from None


def all_backends() -> list[QuantizationBackend]:
    """Every registered backend, available here or not."""
    return list(_BACKENDS.values())


def available_backends() -> list[QuantizationBackend]:
    """Registered backends whose library imports in this environment."""
    return [backend for backend in _BACKENDS.values() if backend.available()]


def register_backend(backend: QuantizationBackend, *, first: bool = False) -> None:
    """Add (or replace) a backend. ``first`` puts it ahead of the others wherever it supports a level.

    Meant for plug-ins and tests; the built-in order comes from measurement.
    """
    if not isinstance(backend, QuantizationBackend):
        raise TypeError(f"register_backend needs a QuantizationBackend, got {type(backend).__name__}")
    _BACKENDS[backend.name] = backend
    for orders in preference.values():
        for order in orders.values():
            if backend.name in order:
                order.remove(backend.name)
            if first:
                order.insert(0, backend.name)
            else:
                order.append(backend.name)


@contextmanager
def replaced_backend(backend: QuantizationBackend) -> Iterator[QuantizationBackend]:
    """Serve with ``backend`` in place of the registered one of the same name (its position kept),
    then put the original back. For benchmarks comparing configurations of one library."""
    if backend.name not in _BACKENDS:
        raise InvalidValueError("backend", backend.name, choices(_BACKENDS))
    original = _BACKENDS[backend.name]
    _BACKENDS[backend.name] = backend
    try:
        yield backend
    finally:
        _BACKENDS[backend.name] = original


def unregister_backend(name: str) -> None:
    """Remove a backend added with :func:`register_backend` (no error if it is not there)."""
    _BACKENDS.pop(name, None)
    for orders in preference.values():
        for order in orders.values():
            if name in order:
                order.remove(name)


# -- choosing ----------------------------------------------------------------------------------


def backend_preference(level: LevelLike, device: DeviceLike = "cpu") -> list[QuantizationBackend]:
    """Available backends that support ``level`` on ``device``, best first for that device."""
    level = QuantizationLevel.parse(level)
    kind = device_type(device)
    order = preference.get(kind, {}).get(level, [])
    names = [n for n in order if n in _BACKENDS] + [n for n in _BACKENDS if n not in order]
    return [
        backend
        for backend in (_BACKENDS[n] for n in names)
        if backend.supports(level, kind) and backend.available()
    ]


def recipe(device: DeviceLike = "cpu") -> str:
    """What decides the stored weights on ``device``: each level's backend order and the backends'
    settings. Measurements made under one recipe (the quality profile) are not reused under another."""
    kind = device_type(device)
    parts = [f"{level.value}:" + ",".join(repr(b) for b in backend_preference(level, kind)) for level in LEVELS_BY_PRECISION]
    return f"{kind}|" + "|".join(parts)


def available_levels(device: DeviceLike = "cpu") -> list[QuantizationLevel]:
    """Levels with at least one available backend on ``device``, most precise first."""
    return [level for level in LEVELS_BY_PRECISION if backend_preference(level, device)]


class BackendCatalog:
    """The registry as the manager's :class:`~langchain_adaptquant.control.capabilities.LevelCatalog`:
    levels some installed backend stores, and the first choice's settings. Asked live, so a backend
    registered or replaced later shows in the next answer."""

    def levels(self, device: str) -> list[QuantizationLevel]:
        return available_levels(device)

    def settings(self, level: QuantizationLevel, device: str) -> dict[str, Any]:
        backends = backend_preference(level, device)
        return backends[0].settings(level, device) if backends else {}

    def __repr__(self) -> str:
        return "BackendCatalog()"


_CATALOG = BackendCatalog()


def backend_catalog() -> BackendCatalog:
    """The installed backends' catalog: what a manager serving real weights is built with."""
    return _CATALOG


def quantize_linear_with_fallback(
    linear: nn.Linear, level: LevelLike, device: DeviceLike = "cpu", *, layer: Optional[str] = None
) -> tuple[nn.Module, str]:
    """Quantize one Linear with the best backend that takes it; return the module and its backend.

    Backends whose kernels cannot take this shape are skipped; one that fails is logged and the
    next one tried (the input Linear is left intact by a failing backend). Raises
    :class:`UnsupportedLevelError` when no backend supports the level on the device at all, and
    :class:`BackendError` naming the layer, level and every backend's reason when all fail.
    """
    level = QuantizationLevel.parse(level)
    kind = device_type(device)
    candidates = backend_preference(level, kind)
    if not candidates:
        raise UnsupportedLevelError(level, device, available_levels(device))
    where = f"{layer} " if layer else ""
    reasons: list[str] = []
    for backend in candidates:
        problem = backend.shape_problem(linear, level, kind)
        if problem is not None:
            logger.debug("%s%s: %s skipped: %s", where, describe_linear(linear), backend.name, problem)
            reasons.append(f"{backend.name}: skipped, {problem}")
            continue
        try:
            module = backend.quantize_linear(linear, level, device)
        except Exception as exc:  # BackendError normally; anything else from a plug-in as well
            logger.warning(
                "%s%s at %s on %s: %s failed, trying the next backend: %s",
                where, describe_linear(linear), level.value, kind, backend.name, exc,
            )
            reasons.append(f"{backend.name}: {type(exc).__name__}: {exc}")
            continue
        if reasons:
            logger.info("%s%s at %s went to %s after: %s", where, describe_linear(linear), level.value,
                        backend.name, "; ".join(reasons))
        return module, backend.name
    raise BackendError(
        f"no backend could quantize {where}{describe_linear(linear)} to {level.value} on {kind}: "
        + "; ".join(reasons)
    )
