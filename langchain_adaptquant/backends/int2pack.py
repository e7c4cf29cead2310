"""INT2 on CPU at int4-kernel speed: 2-bit codes stored four to a byte, run by torch's int4 CPU kernel.

Why this exists: no maintained library has a packed 2-bit matmul for x86 CPUs. optimum-quanto
and HQQ unpack and dequantize every 2-bit weight to 16-bit on every forward, then multiply (on a
150M Llama that decoded at 4.5 tokens/s, a fifth of bf16); torchao's ``IntxWeightOnlyConfig``
stores int2 values one per *byte* on x86 (its packed low-bit kernels are built for ARM only).

What we do instead, with torch's own kernel and torchao's quantizer (nothing hand-written but
the packing):

* torchao's ``_choose_qparams_and_quantize_affine_hqq`` picks a scale and zero per group of
  ``group_size`` weights (``algorithm="hqq"``: its half-quadratic optimizer; ``"minmax"``: the
  plain affine min/max grid, ~10x faster to compute) and gives codes 0..3;
* ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` packs those codes as if they were int4,
  so every nibble holds 0..3 and its two high bits are zero (checked, whatever layout the kernel
  uses on this CPU); scales and zeros go into tinygemm's ``[K/group, N, 2]`` bf16 table, mapped
  so that ``(q - 8) * scale + zero`` is the 2-bit dequantization;
* we keep only the significant bits: byte ``i`` of the first half of the packed tensor and byte
  ``i`` of the second half share one stored byte (``a & 0x33 | (b & 0x33) << 2``), so a weight
  costs 2 bits plus its group's share of the scale table;
* each forward expands the stored bytes back into the int4 layout (two masked shifts over
  ``N*K/4`` bytes, in int32 words) and calls ``_weight_int4pack_mm_for_cpu``. The expanded buffer
  exists only during the call (one layer's ``N*K/2`` bytes).

Kernel limits (torch 2.13): ``out_features % 16 == 0``, ``in_features`` divisible by the group
size, group size 32/64/128/256, bf16 activations, CPU only. Other layers fall to the next backend.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn

from langchain_adaptquant.backends.base import (
    BackendError,
    DeviceLike,
    LevelLike,
    QuantizationBackend,
    device_type,
)
from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError, choices

#: Group sizes torch's CPU int4 kernel accepts.
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
ALGORITHMS = ("minmax", "hqq")
#: The int4 packing tiles output rows by 16 on CPU.
OUT_MULTIPLE = 16
_LOW_BITS = 0x33333333  # bits 0-1 and 4-5 of every byte: the two significant bits of each nibble
#: Rows the CPU int4 packing lays out together (torch 2.13: blocks of 64 output rows; a block of 16
#: or 32 rows packs differently). Checked once per process (:func:`_packing_is_row_blocked`).
PACK_TILE_ROWS = 64
#: Output rows quantized and packed at a time. Groups run along a row, and blocks that start on a
#: packing tile give exactly the rows of the whole-tensor result (bit for bit: tests/unit/test_int2pack.py),
#: so only one block's float32 copy, HQQ work tensors and int32 codes exist at once instead of the
#: layer's (about 20 bytes per weight: 60 MB on a 1024x2816 layer).
ROWS_PER_BLOCK = 256


def _expand(stored: torch.Tensor, packed_shape: torch.Size) -> torch.Tensor:
    """The int4-kernel layout back from the 2-bit store: first half ``s & 0x33``, second ``s >> 2 & 0x33``."""
    words = stored.view(torch.int32)
    out = torch.empty(2 * words.numel(), dtype=torch.int32)
    half = words.numel()
    torch.bitwise_and(words, _LOW_BITS, out=out[:half])
    torch.bitwise_and(torch.bitwise_right_shift(words, 2), _LOW_BITS, out=out[half:])
    return out.view(torch.uint8).view(packed_shape)


class Int2PackedLinear(nn.Module):
    """A Linear whose weight is 2-bit codes (four per byte) with a bf16 scale and zero per group."""

    stored: torch.Tensor  # registered buffers, declared for the type checker
    scale_and_zero: torch.Tensor

    def __init__(self, in_features: int, out_features: int, group_size: int, stored: torch.Tensor,
                 scale_and_zero: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("stored", stored)
        self.register_buffer("scale_and_zero", scale_and_zero)
        self.register_buffer("bias", bias)

    @property
    def packed_shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        packed = _expand(self.stored, self.packed_shape)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, self.group_size, self.scale_and_zero)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=2, group_size={self.group_size}"


def quantize_int2(weight: torch.Tensor, group_size: int, algorithm: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0..3 as int32 [N, K], scale [N, K/g], zero [N, K/g]) with ``w ~ (codes - zero) * scale``."""
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    n, k = weight.shape
    codes, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
        weight.detach().float(), nbits=2, group_size=group_size, optimize=algorithm == "hqq", axis=1,
        compute_dtype=torch.float32, device="cpu", raw_output=True,
    )
    return codes.reshape(n, k).to(torch.int32), scale.reshape(n, -1).float(), zero.reshape(n, -1).float()


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (any integer dtype) in the CPU int4 kernel's layout [N, K/2] uint8."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    if packed.shape != torch.Size((codes.shape[0], codes.shape[1] // 2)):
        raise BackendError(f"this CPU's int4 packing gave shape {tuple(packed.shape)} for codes of shape "
                           f"{tuple(codes.shape)}; cannot store them in 2 bits")
    return packed


@functools.lru_cache(maxsize=1)
def _packing_is_row_blocked() -> bool:
    """Whether packing whole tiles of rows separately gives the whole tensor's layout on this torch/CPU."""
    codes = torch.arange(3 * PACK_TILE_ROWS * 64, dtype=torch.int32).reshape(3 * PACK_TILE_ROWS, 64) % 4
    codes = codes[:-OUT_MULTIPLE]  # a short last tile, as layers have
    blocks = torch.cat([_pack(codes[i:i + PACK_TILE_ROWS]) for i in range(0, codes.shape[0], PACK_TILE_ROWS)])
    return torch.equal(blocks, _pack(codes))


def quantize_and_pack(
    weight: torch.Tensor, group_size: int, algorithm: str, rows_per_block: int = ROWS_PER_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes in the CPU int4 layout [N, K/2] uint8, scale [N, K/g], zero [N, K/g]), computed
    ``rows_per_block`` output rows at a time so a layer's temporaries never exist all at once.

    Where packing is not row-blocked (another torch), the codes are kept one byte each and packed
    at the end in one call: more memory than by blocks, still a quarter of the int32 codes."""
    if rows_per_block % PACK_TILE_ROWS:
        raise InvalidValueError("rows_per_block", rows_per_block, f"a multiple of {PACK_TILE_ROWS}")
    n, k = weight.shape
    blocked = _packing_is_row_blocked()
    packed = torch.empty((n, k // 2), dtype=torch.uint8) if blocked else None
    codes8 = None if blocked else torch.empty((n, k), dtype=torch.uint8)
    scale = torch.empty((n, k // group_size), dtype=torch.float32)
    zero = torch.empty_like(scale)
    for start in range(0, n, rows_per_block):
        rows = slice(start, min(start + rows_per_block, n))
        codes, scale[rows], zero[rows] = quantize_int2(weight[rows], group_size, algorithm)
        if packed is not None:
            packed[rows] = _pack(codes)
        else:
            assert codes8 is not None
            codes8[rows] = codes
        del codes
    if packed is None:
        assert codes8 is not None
        packed = _pack(codes8)
    return packed, scale, zero


class Int2PackBackend(QuantizationBackend):
    """INT2 weights, 2 bits each, computed by torch's CPU int4 kernel (see the module docstring)."""

    name = "int2pack"

    def __init__(self, group_size: int = 32, algorithm: str = "minmax") -> None:
        if group_size not in KERNEL_GROUP_SIZES:
            raise InvalidValueError("int2pack group_size", group_size, choices(KERNEL_GROUP_SIZES))
        if algorithm not in ALGORITHMS:
            raise InvalidValueError("int2pack algorithm", algorithm, choices(ALGORITHMS))
        self.group_size, self.algorithm = group_size, algorithm

    def _import(self) -> None:
        import torchao.quantization.quant_primitives  # noqa: F401

        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            raise ImportError("this torch has no _weight_int4pack_mm_for_cpu")

    def supports(self, level: LevelLike, device: DeviceLike = "cpu") -> bool:
        return device_type(device) == "cpu" and QuantizationLevel.parse(level) is QuantizationLevel.INT2

    def shape_problem(self, linear: nn.Linear, level: LevelLike, device: DeviceLike = "cpu") -> Optional[str]:
        if linear.out_features % OUT_MULTIPLE:
            return f"the int4 CPU kernel needs out_features % {OUT_MULTIPLE} == 0"
        if linear.in_features % self.group_size:
            return f"in_features must be divisible by the group size {self.group_size}"
        return None

    def _quantize(self, linear: nn.Linear, level: QuantizationLevel, device: DeviceLike) -> nn.Module:
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

        packed, scale, zero = quantize_and_pack(linear.weight, self.group_size, self.algorithm)
        if bool((packed & 0xCC).any()):
            raise BackendError("this CPU's int4 packing changes the codes' bits; cannot store them in 2 bits")
        flat = packed.reshape(-1)
        half = flat.numel() // 2
        stored = (flat[:half] | (flat[half:] << 2)).contiguous()
        # tinygemm dequantizes (q - 8) * s + z; ours is (q - zero) * s, so z = (8 - zero) * s.
        table = pack_tinygemm_scales_and_zeros(scale.to(torch.bfloat16), ((8.0 - zero) * scale).to(torch.bfloat16),
                                               torch.bfloat16)
        bias = linear.bias.detach().to(torch.bfloat16).clone() if linear.bias is not None else None
        return Int2PackedLinear(linear.in_features, linear.out_features, self.group_size, stored, table, bias)

    def settings(self, level: QuantizationLevel, device: DeviceLike = "cpu") -> dict[str, Any]:
        return {"backend": self.name, "weights": "int2", "group_size": self.group_size, "algorithm": self.algorithm}

    def __repr__(self) -> str:
        return f"<Int2PackBackend group_size={self.group_size} algorithm={self.algorithm!r}>"
