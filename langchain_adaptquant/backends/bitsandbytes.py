"""bitsandbytes: LLM.int8() for INT8 and NF4 for INT4, on CPU and CUDA.

Measured on the development CPU (AVX2, no AVX512-BF16): both levels run for every shape tried.
On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks NF4 weights for a fused kernel on the first
forward, and that repacking needs ``out_features % 32 == 0`` and ``in_features % blocksize == 0``;
:meth:`BitsAndBytesBackend.shape_problem` says so there, so such layers go to the next backend.
MPS has new 4-bit ops in bitsandbytes 0.50 that we have not measured, so we do not claim it.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from langchain_adaptquant.backends.base import (
    DeviceLike,
    LevelLike,
    QuantizationBackend,
    compute_dtype,
    device_type,
)
from langchain_adaptquant.control.levels import QuantizationLevel

_LEVELS = (QuantizationLevel.INT8, QuantizationLevel.INT4)
_DEVICES = ("cpu", "cuda")

#: Weights per absmax in NF4 (the bitsandbytes default); with double quantization of the absmax.
NF4_BLOCKSIZE = 64
#: LLM.int8() outlier threshold: activation columns above it run in 16-bit (the transformers default).
INT8_OUTLIER_THRESHOLD = 6.0


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs a warning on *every* int8 forward with bf16 input (it casts to fp16 to
    quantize activations). That cast is expected and documented; one line per layer per token is not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


_INT8_NOTICE_FILTER = _DropInt8CastNotice()


def _quiet_int8_cast_notice() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if _INT8_NOTICE_FILTER not in log.filters:
        log.addFilter(_INT8_NOTICE_FILTER)


def _cpu_repacks_nf4() -> bool:
    """True where bitsandbytes switches NF4 to its AVX512-BF16 layout (with its shape limits)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception:
        return False
    return bool(has_avx512bf16())


class BitsAndBytesBackend(QuantizationBackend):
    """INT8 via ``Linear8bitLt`` (int8 weights, fp32 row scales), INT4 via ``Linear4bit`` (NF4)."""

    name = "bitsandbytes"

    def _import(self) -> None:
        import bitsandbytes  # noqa: F401

    def supports(self, level: LevelLike, device: DeviceLike = "cpu") -> bool:
        return device_type(device) in _DEVICES and QuantizationLevel.parse(level) in _LEVELS

    def warms_up(self, level: QuantizationLevel, device_kind: str) -> bool:
        return level is QuantizationLevel.INT4 and device_kind == "cpu" and _cpu_repacks_nf4()

    def shape_problem(self, linear: nn.Linear, level: LevelLike, device: DeviceLike = "cpu") -> Optional[str]:
        level = QuantizationLevel.parse(level)
        if level is QuantizationLevel.INT4 and device_type(device) == "cpu" and _cpu_repacks_nf4():
            if linear.out_features % 32:
                return "the AVX512-BF16 NF4 kernel needs out_features % 32 == 0"
            if linear.in_features % NF4_BLOCKSIZE:
                return f"the AVX512-BF16 NF4 kernel needs in_features % {NF4_BLOCKSIZE} == 0"
        return None

    def settings(self, level: QuantizationLevel, device: DeviceLike = "cpu") -> dict[str, Any]:
        """transformers' ``BitsAndBytesConfig`` arguments for the modules built here."""
        compute = QuantizationLevel.FP16.precision(device_type(device))
        if level is QuantizationLevel.INT8:
            return {"backend": self.name, "load_in_8bit": True, "llm_int8_threshold": INT8_OUTLIER_THRESHOLD}
        return {"backend": self.name, "load_in_4bit": True, "bnb_4bit_compute_dtype": compute,
                "bnb_4bit_quant_type": "nf4"}

    def _quantize(self, linear: nn.Linear, level: QuantizationLevel, device: DeviceLike) -> nn.Module:
        import bitsandbytes as bnb

        has_bias = linear.bias is not None
        dtype = compute_dtype(device)
        # Both parameter classes quantize while being moved with .to(device); they only do so when
        # the data starts on the CPU, which is where the loader's memory-mapped weights are anyway.
        weight = linear.weight.detach().to(device="cpu", dtype=dtype)
        module: nn.Module
        if level is QuantizationLevel.INT8:
            _quiet_int8_cast_notice()
            module = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
                device="meta",
            )
            module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            module = four_bit = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                compute_dtype=dtype,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=torch.uint8,
                device="meta",
            )
            four_bit.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                blocksize=NF4_BLOCKSIZE,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=torch.uint8,
                module=four_bit,
            )
        if has_bias:
            module.bias = nn.Parameter(linear.bias.detach().to(device="cpu", dtype=dtype), requires_grad=False)
        return module.to(device)
