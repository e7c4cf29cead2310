"""stored_bytes counts what is really stored: hand-computed for plain and bitsandbytes layers,
below get_memory_footprint() for tensor subclasses, each storage once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from langchain_adaptquant.runtime.accounting import stored_bytes, stored_bytes_by_module
from langchain_adaptquant.backends import get_backend, quantize_linear_with_fallback
from langchain_adaptquant.backends import bitsandbytes as bnb_backend
from langchain_adaptquant.control.levels import QuantizationLevel


def make_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
    return layer.requires_grad_(False)


def test_plain_bf16_linear_is_weight_plus_bias():
    assert stored_bytes(make_linear(64, 32)) == (64 * 32 + 32) * 2
    assert stored_bytes(make_linear(64, 32, bias=False)) == 64 * 32 * 2
    assert stored_bytes(nn.Linear(64, 32)) == (64 * 32 + 32) * 4


def test_nf4_linear_matches_hand_count():
    module = get_backend("bitsandbytes").quantize_linear(make_linear(256, 128), "int4")
    weights = 256 * 128 // 2  # two 4-bit codes per byte
    blocks = 256 * 128 // bnb_backend.NF4_BLOCKSIZE
    code, offset, bias = 16 * 4, 4, 128 * 2  # fp32 NF4 code book, fp32 offset, bf16 bias
    if bnb_backend._cpu_repacks_nf4():
        # AVX512-BF16 CPUs: the first forward undoes double quantization, absmax becomes bf16
        expected = weights + blocks * 2 + code + offset + bias
    else:
        # double quantization: uint8 absmax per block + fp32 absmax per 256 blocks + fp32 code book
        expected = weights + blocks + code + offset + -(-blocks // 256) * 4 + 256 * 4 + bias
    assert stored_bytes(module) == expected


def test_llm_int8_linear_matches_hand_count():
    module = get_backend("bitsandbytes").quantize_linear(make_linear(256, 128), "int8")
    # int8 weight + one fp32 scale per output row (SCB) + bf16 bias; CB is the weight itself
    assert stored_bytes(module) == 256 * 128 + 128 * 4 + 128 * 2


@pytest.mark.parametrize("backend", ["torchao", "quanto"])
def test_tensor_subclasses_are_unwrapped_to_their_int8_data_and_scales(backend):
    module = get_backend(backend).quantize_linear(make_linear(256, 128, bias=False), "int8")
    nominal = module.weight.numel() * module.weight.element_size()  # what the subclass claims: bf16
    assert nominal == 256 * 128 * 2
    counted = stored_bytes(module)
    assert 256 * 128 <= counted < 256 * 128 + 128 * 16  # int8 data + per-row scale (and zero)


def test_shared_and_viewed_storage_counted_once():
    big = torch.zeros(100, 10, dtype=torch.float32)
    assert stored_bytes(big[:10]) == 10 * 10 * 4  # only the bytes the view covers
    holder = nn.Module()
    holder.register_buffer("whole", big)
    holder.register_buffer("part", big[20:30])
    assert stored_bytes(holder) == 100 * 10 * 4
    pair = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    pair[1].weight = pair[0].weight  # tied
    assert stored_bytes(pair) == 8 * 8 * 4


def test_meta_tensors_store_nothing():
    assert stored_bytes(nn.Linear(1024, 1024, device="meta")) == 0


def test_rejects_other_types():
    with pytest.raises(TypeError):
        stored_bytes([torch.zeros(3)])


@pytest.fixture(scope="module")
def transformers_llama():
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


def tiny_llama(llama, tie: bool):
    config_cls, model_cls = llama
    config = config_cls(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return model_cls(config).to(torch.bfloat16).eval()


def quantize_linears(model: nn.Module, level: str) -> set[str]:
    backends = set()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        module, backend = quantize_linear_with_fallback(model.get_submodule(name), level, "cpu")
        setattr(model.get_submodule(parent_name), child, module)
        backends.add(backend)
    return backends


def test_get_memory_footprint_misses_quantization_we_do_not(transformers_llama):
    model = tiny_llama(transformers_llama, tie=False)
    before = stored_bytes(model)
    assert before == model.get_memory_footprint(return_buffers=True)  # agree on plain bf16
    linear_bf16 = sum(
        stored_bytes(m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"
    )
    assert quantize_linears(model, "int4") <= {"torchao", "quanto"}  # tensor-subclass backends
    after = stored_bytes(model)
    assert model.get_memory_footprint(return_buffers=True) == before  # still claims bf16 weights
    saved = before - after
    assert 0.65 * linear_bf16 < saved < 0.8 * linear_bf16  # int4 plus scales is ~27% of bf16
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (1, 8))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_by_module_sums_to_total_and_charges_tied_weights_once(transformers_llama):
    model = tiny_llama(transformers_llama, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    per_module = stored_bytes_by_module(model)
    assert sum(per_module.values()) == stored_bytes(model)
    assert "lm_head" not in per_module  # charged to the embedding that comes first
    assert per_module["model.embed_tokens"] == 256 * 128 * 2
    assert per_module["model.layers.0.self_attn.q_proj"] == 128 * 128 * 2
