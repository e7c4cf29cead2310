"""The 16-bit level: a plain ``nn.Linear`` in the device's compute dtype (bf16 on CPU, fp16 on GPUs).

Needs no optional library, so every device always has at least this level.
"""

from __future__ import annotations

from typing import Any

import torch
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


class CastBackend(QuantizationBackend):
    """FP16 means "no quantization": cast (or keep) the weight in the 16-bit compute dtype."""

    name = "cast"

    def supports(self, level: LevelLike, device: DeviceLike = "cpu") -> bool:
        device_type(device)
        return QuantizationLevel.parse(level) is QuantizationLevel.FP16

    def settings(self, level: QuantizationLevel, device: DeviceLike = "cpu") -> dict[str, Any]:
        """16-bit is a dtype, as ``from_pretrained(torch_dtype=...)`` takes it."""
        return {"torch_dtype": level.precision(device_type(device))}

    def _quantize(self, linear: nn.Linear, level: QuantizationLevel, device: DeviceLike) -> nn.Module:
        dtype = compute_dtype(device)
        weight = linear.weight
        if weight.dtype == dtype and weight.device == _as_device(device):
            return linear  # the fresh layer already is the answer: no copy
        return linear_with(weight, linear.bias, device, dtype)


def _as_device(device: DeviceLike) -> torch.device:
    """torch.device('cuda') compares unequal to a tensor's 'cuda:0'; resolve the index first."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
