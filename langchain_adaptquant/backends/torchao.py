"""torchao: INT8 weight-only (``Int8WeightOnlyConfig``) and INT4 weight-only, via ``quantize_``.

INT4 on CPU uses ``PrototypeInt4WeightOnlyConfig`` (torchao >= 0.13, an opaque tinygemm layout);
the stable ``Int4WeightOnlyConfig`` needs GPU kernels. On this CPU the int4 packing needs
``out_features % 16 == 0`` and a group size dividing ``in_features``; torchao silently leaves a
layer in 16-bit when the group does not divide, so we check the shape first and the result after.
The CUDA paths follow torchao's documentation and are not measured here (no GPU).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from langchain_adaptquant.backends.base import (
    BackendError,
    DeviceLike,
    LevelLike,
    QuantizationBackend,
    compute_dtype,
    device_type,
    linear_with,
)
from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError, choices

#: Smallest first: more scales per weight (0.125 B/weight at 32) but the error a real model's
#: answers need (benchmarks/quality.py: on SmolLM2-135M, group 128 lost the probe facts that group
#: 32 keeps). The tinygemm kernel decodes as fast at 32 as at 128 here (backends_probe.py).
#: torchao accepts 256/128/64/32; 128 is its default.
INT4_GROUP_SIZES = (32, 64, 128)
#: How torchao picks each group's scale and zero: "tinygemm" is the min/max affine grid, "hqq"
#: its half-quadratic optimizer (10-20x slower to quantize on CPU).
INT4_ALGORITHMS = ("tinygemm", "hqq")
#: The int4 packing kernels (CPU ``_convert_weight_to_int4pack_cpu``) tile output rows by 16.
INT4_OUT_MULTIPLE = 16


def _cpu_int4_config() -> Optional[type]:
    """The CPU int4 config class of the installed torchao, or None where there is none."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    except Exception:
        return None
    return PrototypeInt4WeightOnlyConfig


def int4_group_size(in_features: int, sizes: tuple[int, ...] = INT4_GROUP_SIZES) -> Optional[int]:
    """The first group size of ``sizes`` dividing ``in_features`` (None: no int4 for this layer)."""
    return next((g for g in sizes if in_features % g == 0), None)


class TorchAOBackend(QuantizationBackend):
    """Swaps the Linear's weight for a torchao tensor subclass; the module stays an ``nn.Linear``."""

    name = "torchao"

    def __init__(self, int4_group_sizes: tuple[int, ...] = INT4_GROUP_SIZES, int4_algorithm: str = "tinygemm") -> None:
        if not int4_group_sizes or any(g not in (32, 64, 128, 256) for g in int4_group_sizes):
            raise InvalidValueError("torchao int4_group_sizes", int4_group_sizes, "a non-empty tuple of 32, 64, 128, 256")
        if int4_algorithm not in INT4_ALGORITHMS:
            raise InvalidValueError("torchao int4_algorithm", int4_algorithm, choices(INT4_ALGORITHMS))
        self.int4_group_sizes, self.int4_algorithm = tuple(int4_group_sizes), int4_algorithm

    def _import(self) -> None:
        import torchao.quantization  # noqa: F401

    def supports(self, level: LevelLike, device: DeviceLike = "cpu") -> bool:
        level, kind = QuantizationLevel.parse(level), device_type(device)
        if kind == "cpu":
            if level is QuantizationLevel.INT4:
                return _cpu_int4_config() is not None
            return level is QuantizationLevel.INT8
        if kind == "cuda":
            # INT4 on CUDA: torchao 0.18's tile-packed tensor asserts "Only bfloat16 is supported for
            # Int4TilePackedTo4dTensor" (measured on an H100) and CUDA computes in float16 here, so
            # INT4 there goes to bitsandbytes NF4 (or quanto).
            return level is QuantizationLevel.INT8
        return False

    def shape_problem(self, linear: nn.Linear, level: LevelLike, device: DeviceLike = "cpu") -> Optional[str]:
        if QuantizationLevel.parse(level) is not QuantizationLevel.INT4:
            return None
        if int4_group_size(linear.in_features, self.int4_group_sizes) is None:
            return f"int4 needs in_features divisible by a group size in {self.int4_group_sizes}"
        if linear.out_features % INT4_OUT_MULTIPLE:
            return f"int4 packing needs out_features % {INT4_OUT_MULTIPLE} == 0"
        return None

    def settings(self, level: QuantizationLevel, device: DeviceLike = "cpu") -> dict[str, Any]:
        """The torchao config class ``quantize_`` gets and its arguments (the group size is per layer:
        the largest of ``int4_group_sizes`` that divides its input features)."""
        if level is QuantizationLevel.INT8:
            return {"backend": self.name, "config": "Int8WeightOnlyConfig"}
        cpu = device_type(device) == "cpu"
        return {
            "backend": self.name,
            "config": "PrototypeInt4WeightOnlyConfig" if cpu else "Int4WeightOnlyConfig",
            "group_sizes": list(self.int4_group_sizes),
            "int4_choose_qparams_algorithm": self.int4_algorithm,
        }

    def __repr__(self) -> str:
        return f"<TorchAOBackend int4_group_sizes={self.int4_group_sizes} int4_algorithm={self.int4_algorithm!r}>"

    def _config(self, linear: nn.Linear, level: QuantizationLevel, device: DeviceLike) -> Any:
        if level is QuantizationLevel.INT8:
            from torchao.quantization import Int8WeightOnlyConfig

            # set_inductor_config=False: do not change torch.compile settings for the whole process.
            return Int8WeightOnlyConfig(set_inductor_config=False)
        group = int4_group_size(linear.in_features, self.int4_group_sizes)
        cpu_int4 = _cpu_int4_config()
        if device_type(device) == "cpu" and cpu_int4 is not None:  # supports() admits CPU INT4 only with it
            return cpu_int4(
                group_size=group, int4_choose_qparams_algorithm=self.int4_algorithm, set_inductor_config=False
            )
        from torchao.quantization import Int4WeightOnlyConfig

        # tinygemm layout: its kernel ships with torch itself, unlike the default "plain" (fbgemm).
        return Int4WeightOnlyConfig(
            group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )

    def _quantize(self, linear: nn.Linear, level: QuantizationLevel, device: DeviceLike) -> nn.Module:
        from torchao.quantization import quantize_

        dtype = compute_dtype(device)
        # quantize_ replaces the weight in place; do it on a new Linear sharing the tensors, so the
        # caller's layer stays intact if torchao fails and the registry falls back.
        work = linear_with(linear.weight, linear.bias, device, dtype)
        quantize_(work, self._config(linear, level, device))
        if not hasattr(work.weight, "__tensor_flatten__"):  # still a plain tensor
            raise BackendError(f"torchao left the weight of {tuple(linear.weight.shape)} unquantized")
        # quantize_ binds a per-instance extra_repr (cosmetic) that cannot be unpickled; without it the
        # module round-trips through torch.save/torch.load, which the layer cache relies on.
        work.__dict__.pop("extra_repr", None)
        return work
