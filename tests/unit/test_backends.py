"""Backends on CPU: each (backend, level) quantizes, runs bf16, stays close to bf16 and is smaller;
the registry falls back per layer and reports clearly when nothing can take a level."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from langchain_adaptquant.runtime.accounting import stored_bytes
from langchain_adaptquant.backends import (
    BackendError,
    UnsupportedLevelError,
    all_backends,
    available_backends,
    available_levels,
    backend_preference,
    get_backend,
    quantize_linear_with_fallback,
    register_backend,
    unregister_backend,
)
from langchain_adaptquant.backends import preference
from langchain_adaptquant.backends import bitsandbytes as bnb_backend
from langchain_adaptquant.backends.quanto import QuantoBackend
from langchain_adaptquant.backends.torchao import TorchAOBackend
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.control.levels import QuantizationLevel

FP16, INT8, INT4, INT2 = (QuantizationLevel.FP16, QuantizationLevel.INT8, QuantizationLevel.INT4, QuantizationLevel.INT2)

#: Relative output error vs the bf16 layer, for Llama-like weights (std 0.02). Measured: int8
#: <= 0.013, int4 <= 0.10, int2 ~0.50 (benchmarks/results/backends_probe.json).
MAX_REL_ERROR = {FP16: 1e-6, INT8: 0.03, INT4: 0.15, INT2: 0.65}
#: Stored bytes / bf16 bytes, scales and zeros included.
BYTES_RATIO = {FP16: (1.0, 1.0), INT8: (0.45, 0.6), INT4: (0.2, 0.45), INT2: (0.1, 0.3)}

CPU_PAIRS = [
    pytest.param(backend.name, level, id=f"{backend.name}-{level.value}")
    for backend in all_backends()
    if backend.available()
    for level in QuantizationLevel
    if backend.supports(level, "cpu")
]


def make_linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
        if bias:
            layer.bias.normal_(0.0, 0.02)
    return layer.requires_grad_(False)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture
def registered():
    """Register test-only backends and always take them out again."""
    names: list[str] = []

    def add(backend, first=True):
        register_backend(backend, first=first)
        names.append(backend.name)
        return backend

    yield add
    for name in names:
        unregister_backend(name)


# -- every (backend, level) that works here ----------------------------------------------------


def test_cpu_offers_every_level_with_the_installed_libraries():
    assert {b.name for b in available_backends()} == {"cast", "bitsandbytes", "torchao", "quanto", "int2pack"}
    assert available_levels("cpu") == [FP16, INT8, INT4, INT2]
    assert len(CPU_PAIRS) == 9  # cast fp16; bnb int8/int4; torchao int8/int4; quanto int8/int4/int2; int2pack int2


@pytest.mark.parametrize("name, level", CPU_PAIRS)
def test_quantized_linear_runs_bf16_close_to_reference_and_smaller(name, level):
    backend = get_backend(name)
    layer = make_linear(256, 384)
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x)
    original = layer.weight.detach().clone()
    bf16_bytes = stored_bytes(layer)

    module = backend.quantize_linear(layer, level, "cpu")
    with torch.no_grad():
        out = module(x)
        decode = module(x[:, -1:])  # last-token slice: rows are strided once flattened
        transposed = module(torch.randn(256, 3, dtype=torch.bfloat16).t())  # strided last dim

    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 384)
    assert decode.dtype == torch.bfloat16 and decode.shape == (2, 1, 384)
    assert transposed.shape == (3, 384)
    assert rel_error(out, ref) < MAX_REL_ERROR[level]
    low, high = BYTES_RATIO[level]
    ratio = backend.stored_bytes(module) / bf16_bytes
    assert low <= ratio <= high, f"{name} {level}: {ratio:.3f} of bf16"
    if level is not FP16:  # the caller's Linear is left as it was (the registry relies on it)
        assert type(layer.weight) is nn.Parameter and torch.equal(layer.weight, original)


@pytest.mark.parametrize("name, level", CPU_PAIRS)
def test_layer_without_bias(name, level):
    layer = make_linear(128, 64, bias=False)
    module = get_backend(name).quantize_linear(layer, level)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_error(module(x), layer(x)) < MAX_REL_ERROR[level]


def test_cast_keeps_a_bf16_layer_and_casts_others():
    cast = get_backend("cast")
    layer = make_linear(32, 16)
    assert cast.quantize_linear(layer, FP16) is layer
    fp32 = nn.Linear(32, 16)
    out = cast.quantize_linear(fp32, "FP16", "cpu")
    assert out.weight.dtype == torch.bfloat16 and out.bias.dtype == torch.bfloat16
    with pytest.raises(BackendError, match="cast does not support int4"):
        cast.quantize_linear(layer, INT4)


# -- shape limits and per-layer fallback -------------------------------------------------------


def test_quanto_refuses_int8_widths_that_crash_the_cpu_kernel():
    # torch._weight_int8pack_mm segfaults for bf16 input with in_features % 4 == 0 but % 8 != 0
    quanto = get_backend("quanto")
    assert not quanto.accepts(make_linear(100, 64), INT8)
    assert quanto.accepts(make_linear(104, 64), INT8) and quanto.accepts(make_linear(99, 64), INT8)
    assert quanto.accepts(make_linear(100, 64), INT4)


def test_torchao_int4_shape_limits():
    torchao = get_backend("torchao")
    assert torchao.accepts(make_linear(256, 384), INT4)
    assert "out_features % 16" in torchao.shape_problem(make_linear(256, 200), INT4)
    assert "group size" in torchao.shape_problem(make_linear(100, 64), INT4)
    assert torchao.accepts(make_linear(100, 200), INT8)


def test_nf4_limits_apply_only_where_bitsandbytes_repacks(monkeypatch):
    bnb = get_backend("bitsandbytes")
    odd = make_linear(256, 200)
    monkeypatch.setattr(bnb_backend, "_cpu_repacks_nf4", lambda: True)
    assert "out_features % 32" in bnb.shape_problem(odd, INT4)
    assert "in_features % 64" in bnb.shape_problem(make_linear(96, 64), INT4)
    assert bnb.accepts(odd, INT8)
    monkeypatch.setattr(bnb_backend, "_cpu_repacks_nf4", lambda: False)
    assert bnb.accepts(odd, INT4)


def test_int4_layer_torchao_rejects_falls_to_quanto():
    layer = make_linear(256, 200)  # out_features % 16 != 0: torchao's int4 packing cannot
    order = [b.name for b in backend_preference(INT4, "cpu")]
    assert order[0] == "torchao"
    module, name = quantize_linear_with_fallback(layer, INT4, "cpu")
    assert name == "quanto"
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_error(module(x), layer(x)) < MAX_REL_ERROR[INT4]


def test_layer_nf4_rejects_skips_bitsandbytes(monkeypatch):
    # On an AVX512-BF16 CPU with bitsandbytes preferred, a 256x200 layer is refused by nf4
    # (out % 32) and by torchao (out % 16) and lands on quanto.
    monkeypatch.setattr(bnb_backend, "_cpu_repacks_nf4", lambda: True)
    monkeypatch.setitem(preference["cpu"], INT4, ["bitsandbytes", "torchao", "quanto"])
    module, name = quantize_linear_with_fallback(make_linear(256, 200), INT4, "cpu")
    assert name == "quanto"
    module, name = quantize_linear_with_fallback(make_linear(256, 192), INT4, "cpu")
    assert name == "bitsandbytes"


def test_int8_layer_quanto_rejects_falls_to_torchao():
    layer = make_linear(100, 64)
    assert [b.name for b in backend_preference(INT8, "cpu")][0] == "quanto"
    module, name = quantize_linear_with_fallback(layer, INT8, "cpu")
    assert name == "torchao"
    x = torch.randn(4, 100, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_error(module(x), layer(x)) < MAX_REL_ERROR[INT8]


class ExplodingTorchAO(TorchAOBackend):
    """A real backend whose quantization fails half-way, as a broken kernel would."""

    name = "exploding-torchao"

    def _quantize(self, linear, level, device):
        raise RuntimeError("kernel exploded")


def test_backend_failing_mid_quantize_falls_back_to_the_next(registered, caplog):
    registered(ExplodingTorchAO(), first=True)
    assert backend_preference(INT8, "cpu")[0].name == "exploding-torchao"
    layer = make_linear(256, 128)
    with caplog.at_level(logging.WARNING, logger="langchain_adaptquant.backends.registry"):
        module, name = quantize_linear_with_fallback(layer, INT8, "cpu", layer="model.layers.0.mlp.up_proj")
    assert name == "quanto"
    assert "exploding-torchao failed" in caplog.text and "kernel exploded" in caplog.text
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert rel_error(module(x), layer(x)) < MAX_REL_ERROR[INT8]


def test_all_backends_failing_names_layer_level_and_each_failure(monkeypatch):
    def broken(linear, level, device):
        raise RuntimeError("no int2 today")

    for name in ("quanto", "int2pack"):
        monkeypatch.setattr(get_backend(name), "_quantize", broken)
    with pytest.raises(BackendError) as info:
        quantize_linear_with_fallback(make_linear(96, 48), INT2, "cpu", layer="lm.block.3")
    message = str(info.value)
    for part in ("lm.block.3", "in=96", "out=48", "int2", "cpu", "quanto", "int2pack", "no int2 today"):
        assert part in message


# -- levels a device lacks ---------------------------------------------------------------------


def test_missing_library_makes_backend_unavailable_without_raising(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    assert QuantoBackend().available() is False
    assert "quanto" not in {b.name for b in available_backends()}
    assert INT2 in available_levels("cpu")  # int2pack (torchao + torch's kernel) still stores it
    monkeypatch.setitem(sys.modules, "torchao.quantization.quant_primitives", None)
    assert INT2 not in available_levels("cpu")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert get_backend("bitsandbytes").available() is False


def test_unsupported_level_error_names_level_device_and_available_levels(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # the only MPS quantizer
    assert available_levels("mps") == [FP16]
    with pytest.raises(UnsupportedLevelError) as info:
        quantize_linear_with_fallback(make_linear(64, 64), INT4, "mps")
    message = str(info.value)
    assert "'int4'" in message and "'mps'" in message and "levels available there: 'fp16'" in message
    assert info.value.available == (FP16,)


def test_unsupported_level_error_message_forms():
    err = UnsupportedLevelError("int2", "cuda:0", ["fp16", "int8", "int4"])
    assert str(err).endswith("levels available there: 'fp16', 'int8' or 'int4'")
    assert err.level is INT2 and err.device == "cuda:0"
    assert str(UnsupportedLevelError("ready-made message")) == "ready-made message"


def test_gpu_orders_follow_measured_kernels(monkeypatch):
    from langchain_adaptquant.backends.quanto import CUDA_KERNELS_ENV

    monkeypatch.delenv(CUDA_KERNELS_ENV, raising=False)
    # torchao int4 takes bf16 only; quanto's int4/int2 CUDA kernels are opt-in (they crashed an H200)
    assert [b.name for b in backend_preference(INT4, "cuda")] == ["bitsandbytes"]
    assert [b.name for b in backend_preference(INT8, "cuda:1")] == ["torchao", "quanto", "bitsandbytes"]
    assert available_levels("cuda") == [FP16, INT8, INT4]
    monkeypatch.setenv(CUDA_KERNELS_ENV, "1")
    assert [b.name for b in backend_preference(INT4, "cuda")] == ["bitsandbytes", "quanto"]
    assert available_levels("cuda") == [FP16, INT8, INT4, INT2]
    assert [b.name for b in backend_preference(INT4, "mps")] == ["quanto"]
    assert [b.name for b in backend_preference(FP16, "mps")] == ["cast"]
    assert available_levels("mps") == [FP16, INT8, INT4, INT2]


@pytest.mark.parametrize(
    "call, bad",
    [
        (lambda: backend_preference("int3"), "'int3'"),
        (lambda: backend_preference(INT4, "gpu"), "'gpu'"),
        (lambda: backend_preference(INT4, "xpu"), "'xpu'"),
        (lambda: get_backend("hqq"), "'hqq'"),
    ],
)
def test_bad_names_are_clear_errors(call, bad):
    with pytest.raises(InvalidValueError) as info:
        call()
    assert bad in str(info.value) and "allowed" in str(info.value)
