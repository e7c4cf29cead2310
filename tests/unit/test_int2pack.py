"""int2pack: 2-bit codes stored four to a byte and run through torch's int4 CPU kernel."""

import io

import pytest
import torch
from torch import nn

from langchain_adaptquant.runtime.accounting import stored_bytes
from langchain_adaptquant.backends.base import BackendError
from langchain_adaptquant.backends.int2pack import Int2PackBackend, Int2PackedLinear, quantize_and_pack, quantize_int2
from langchain_adaptquant.errors import InvalidValueError


def linear(in_features, out_features, bias=False, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
    return layer


def dequantized(layer, group):
    codes, scale, zero = quantize_int2(layer.weight, group, "minmax")
    n, k = codes.shape
    return ((codes.float().reshape(n, -1, group) - zero[..., None]) * scale[..., None]).reshape(n, k)


@pytest.mark.parametrize("shape, bias", [((576, 192), False), ((1024, 2816), False), ((64, 48), True)])
def test_output_matches_the_2bit_dequantized_weight(shape, bias):
    layer = linear(*shape, bias=bias)
    module = Int2PackBackend(32).quantize_linear(layer, "int2")
    assert isinstance(module, Int2PackedLinear)
    x = torch.randn(3, 7, shape[0], dtype=torch.bfloat16)
    expected = x.float() @ dequantized(layer, 32).T + (layer.bias.float() if bias else 0)
    out = module(x)
    assert out.shape == (3, 7, shape[1]) and out.dtype == torch.bfloat16
    # the kernel computes in bf16: only rounding separates it from the exact 2-bit product
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.02


def test_stores_two_bits_per_weight_plus_the_group_table():
    layer = linear(1024, 2816)
    module = Int2PackBackend(32).quantize_linear(layer, "int2")
    weights = 1024 * 2816
    assert stored_bytes(module) == weights // 4 + (weights // 32) * 4  # bf16 scale + zero per 32
    assert stored_bytes(module) / stored_bytes(layer) == pytest.approx(3 / 16)


def test_minmax_codes_use_all_four_values_and_hqq_lowers_the_error():
    layer = linear(256, 256)
    codes, _, _ = quantize_int2(layer.weight, 32, "minmax")
    assert set(codes.unique().tolist()) == {0, 1, 2, 3}
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    ref = layer(x).float()
    errors = {}
    for algorithm in ("minmax", "hqq"):
        out = Int2PackBackend(32, algorithm).quantize_linear(layer, "int2")(x).float()
        errors[algorithm] = ((out - ref).norm() / ref.norm()).item()
    assert errors["hqq"] <= errors["minmax"] * 1.02


def test_round_trips_through_torch_save_for_the_layer_cache():
    module = Int2PackBackend().quantize_linear(linear(128, 64), "int2")
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert torch.equal(again(x), module(x))


def test_shapes_the_kernel_cannot_take_are_refused_for_the_next_backend():
    backend = Int2PackBackend(32)
    assert "out_features % 16" in backend.shape_problem(linear(64, 40), "int2")
    assert "group size 32" in backend.shape_problem(linear(48, 64), "int2")
    with pytest.raises(BackendError):
        backend.quantize_linear(linear(64, 40), "int2")
    assert not backend.supports("int4") and not backend.supports("int2", "cuda")


@pytest.mark.parametrize("kwargs, named", [({"group_size": 16}, "16"), ({"algorithm": "gptq"}, "gptq")])
def test_bad_settings_are_clear_errors(kwargs, named):
    with pytest.raises(InvalidValueError, match=named):
        Int2PackBackend(**kwargs)


@pytest.mark.parametrize("algorithm", ["minmax", "hqq"])
@pytest.mark.parametrize("out_features", [2816, 2832])  # 2832 rows end in a short packing tile (16 rows)
def test_quantizing_in_row_blocks_gives_the_whole_layers_result_bit_for_bit(algorithm, out_features):
    weight = linear(1024, out_features).weight
    whole_codes, whole_scale, whole_zero = quantize_int2(weight, 32, algorithm)
    whole_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(whole_codes, 1)
    for rows in (4096, 256, 192):  # one block; even blocks; a short last block
        packed, scale, zero = quantize_and_pack(weight, 32, algorithm, rows_per_block=rows)
        assert torch.equal(packed, whole_packed), rows
        assert torch.equal(scale, whole_scale) and torch.equal(zero, whole_zero), rows


def test_a_row_block_the_packing_cannot_tile_is_refused():
    with pytest.raises(InvalidValueError, match="rows_per_block: 40; allowed: a multiple of 64"):
        quantize_and_pack(linear(64, 64).weight, 32, "minmax", rows_per_block=40)


def test_where_packing_is_not_row_blocked_the_codes_are_packed_once_with_the_same_result(monkeypatch):
    from langchain_adaptquant.backends import int2pack

    weight = linear(256, 2832).weight
    blocked = quantize_and_pack(weight, 32, "minmax")
    monkeypatch.setattr(int2pack, "_packing_is_row_blocked", lambda: False)  # as on a torch that tiles otherwise
    whole = quantize_and_pack(weight, 32, "minmax")
    assert all(torch.equal(a, b) for a, b in zip(blocked, whole))
