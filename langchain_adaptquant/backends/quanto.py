"""optimum-quanto: INT8, INT4 and INT2 weights on CPU, CUDA and MPS (the only INT2 backend).

One Linear becomes a ``QLinear`` (``quantize_module`` then ``freeze``), with a 16-bit base so scales
are 16-bit and bf16 int4 takes quanto's tinygemm path on CPU. Two kernel limits measured on this
CPU (torch 2.13, AVX2) shape what we accept:

* int8 with bf16 activations uses ``torch._weight_int8pack_mm`` when ``in_features % 4 == 0``; with
  ``in_features % 8 != 0`` and more than one row it segfaults, so those layers are refused on CPU.
* int4 with group size 128 packs for tinygemm, which needs ``out_features % 16 == 0``; for other
  widths we use group size 64 (quanto's generic path) instead of failing.

Both tinygemm and int8pack kernels also require contiguous input, so a pre-hook makes it so.

On CUDA only INT8 is claimed by default. quanto's INT4/INT2 CUDA kernels are JIT-compiled on first
use (~100 s on 16 cores with nvcc and ninja), and on an H200 (torch 2.11 cu130, quanto 0.2.7) its
INT4 kernel then failed with "an illegal memory access", which poisons the CUDA context for the
whole process, so no per-layer fallback can recover (benchmarks/results/cuda_check_h200_quanto_jit.log).
Set ``ADAPTQUANT_QUANTO_CUDA_KERNELS=1`` to use them where you have verified they work.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from torch import nn

from langchain_adaptquant.backends.base import (
    DeviceLike,
    LevelLike,
    QuantizationBackend,
    compute_dtype,
    device_type,
    linear_with,
)
from langchain_adaptquant.control.levels import QuantizationLevel

_QTYPE_NAMES = {
    QuantizationLevel.INT8: "qint8",
    QuantizationLevel.INT4: "qint4",
    QuantizationLevel.INT2: "qint2",
}
#: Opt-in for quanto's JIT-compiled INT4/INT2 CUDA kernels (see the module docstring).
CUDA_KERNELS_ENV = "ADAPTQUANT_QUANTO_CUDA_KERNELS"
_TINYGEMM_GROUP = 128
_TINYGEMM_OUT_MULTIPLE = 16


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: quanto's packed kernels reject strided activations (a no-op when contiguous)."""
    if args and hasattr(args[0], "contiguous"):
        return (args[0].contiguous(), *args[1:])
    return args


class QuantoBackend(QuantizationBackend):
    """Weight-only quantization with optimum-quanto's ``QLinear``."""

    name = "quanto"

    def _import(self) -> None:
        import optimum.quanto  # noqa: F401

    def supports(self, level: LevelLike, device: DeviceLike = "cpu") -> bool:
        level, kind = QuantizationLevel.parse(level), device_type(device)
        if kind == "cuda" and level in (QuantizationLevel.INT4, QuantizationLevel.INT2):
            return os.environ.get(CUDA_KERNELS_ENV) == "1"  # see the module docstring
        return level in _QTYPE_NAMES

    def shape_problem(self, linear: nn.Linear, level: LevelLike, device: DeviceLike = "cpu") -> Optional[str]:
        level = QuantizationLevel.parse(level)
        k = linear.in_features
        if level is QuantizationLevel.INT8 and device_type(device) == "cpu" and k % 4 == 0 and k % 8:
            return "torch._weight_int8pack_mm crashes on CPU for in_features % 8 != 0 (multiple of 4)"
        return None

    def _quantize(self, linear: nn.Linear, level: QuantizationLevel, device: DeviceLike) -> nn.Module:
        import optimum.quanto as quanto
        from optimum.quanto.nn import quantize_module

        dtype = compute_dtype(device)
        source = linear
        if linear.weight.dtype != dtype or linear.weight.device.type != device_type(device):
            source = linear_with(linear.weight, linear.bias, device, dtype)
        # quantize_module builds a new QLinear sharing the weight; freeze swaps in the quantized
        # tensor there, so the caller's Linear is left as it was.
        module = quantize_module(source, weights=getattr(quanto, _QTYPE_NAMES[level]))
        if (
            level is QuantizationLevel.INT4
            and device_type(device) in ("cpu", "cuda")
            and module.weight_group_size == _TINYGEMM_GROUP
            and linear.out_features % _TINYGEMM_OUT_MULTIPLE
        ):
            module.weight_group_size = 64  # 128 divides in_features, so 64 does; avoids tinygemm
        module.freeze()
        module.register_forward_pre_hook(_contiguous_input)
        return module
