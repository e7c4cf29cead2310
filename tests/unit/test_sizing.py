import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from langchain_adaptquant import InvalidValueError, QuantizationLevel
from langchain_adaptquant.control.sizing import DEFAULT_LAYOUTS, LevelLayout, size_from_config, size_from_model, size_from_params, size_of

LLAMA = LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
)
QWEN2 = Qwen2Config(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
)


def hand_count_llama(c):
    head_dim = c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads * head_dim
    per_layer = c.hidden_size * c.hidden_size * 2 + c.hidden_size * kv * 2 + 3 * c.hidden_size * c.intermediate_size
    rows_per_layer = c.hidden_size * 2 + kv * 2 + c.intermediate_size * 2 + c.hidden_size
    quantizable = per_layer * c.num_hidden_layers
    unquantized = 2 * c.vocab_size * c.hidden_size + (2 * c.num_hidden_layers + 1) * c.hidden_size
    return quantizable, rows_per_layer * c.num_hidden_layers, unquantized


def test_llama_config_split_matches_hand_count():
    size = size_from_config(LLAMA)
    assert (size.quantizable_params, size.quantizable_rows, size.unquantized_params) == hand_count_llama(LLAMA)


def test_meta_count_equals_a_real_instantiation_for_qwen2_with_biases_and_tied_head():
    torch.manual_seed(0)
    real = AutoModelForCausalLM.from_config(QWEN2)
    assert size_from_config(QWEN2) == size_from_model(real, source="qwen2 config")
    size = size_from_config(QWEN2)
    # tied: the embedding is counted once; q/k/v biases stay 16-bit
    assert size.total_params == sum(p.numel() for p in real.parameters())
    head_dim = 16
    biases = 2 * (64 + 2 * 2 * head_dim)
    assert size.unquantized_params == 512 * 64 + biases + (2 * 2 + 1) * 64


def test_formula_per_level_by_hand():
    size = size_from_config(LLAMA)
    q, rows, u = hand_count_llama(LLAMA)
    assert size.estimated_bytes("fp16") == 2 * (q + u)
    assert size.estimated_bytes("int8") == q + rows * 4 + 2 * u
    assert size.estimated_bytes("int4") == q // 2 + math.ceil(q / 32) * 4 + 2 * u
    assert size.estimated_bytes("int2") == q // 4 + math.ceil(q / 32) * 4 + 2 * u
    custom = LevelLayout(bits=4, group_size=128, group_bytes=2)
    assert size.estimated_bytes(QuantizationLevel.INT4, custom) == q // 2 + math.ceil(q / 128) * 2 + 2 * u


def test_sizes_fall_with_precision():
    for size in (size_from_config(LLAMA), size_from_params(7.0)):
        values = [size.estimated_bytes(level) for level in QuantizationLevel]
        assert values == sorted(values, reverse=True)


def test_seven_billion_parameters_are_honest():
    size = size_from_params(7.0)
    assert size.estimated_bytes("fp16") == 14_000_000_000
    # int4: 3.36 GB of 4-bit weights + 0.84 GB of group-32 scales + 0.56 GB unquantized: not the 1.75 GB first claimed for it
    assert 4.6e9 < size.estimated_bytes("int4") < 4.9e9
    assert size.estimated_gb("int4") == pytest.approx(size.estimated_bytes("int4") / 1024**3)


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "7", None, True, 1e6])
def test_bad_parameter_counts_are_rejected_with_the_value(bad):
    with pytest.raises(InvalidValueError) as info:
        size_from_params(bad)
    assert "model_size_params" in str(info.value) and repr(bad) in str(info.value)


def test_size_of_dispatches():
    assert size_of(7) == size_from_params(7.0)
    assert size_of(LLAMA) == size_from_config(LLAMA)
    assert size_of({"model_type": "llama", **{k: getattr(LLAMA, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")}}) == size_from_config(LLAMA)
    with pytest.raises(InvalidValueError, match="model_type"):
        size_of({"hidden_size": 4})
    with pytest.raises(InvalidValueError):
        size_of(object())


def test_default_layouts_cover_every_level():
    assert set(DEFAULT_LAYOUTS) == set(QuantizationLevel)
    assert all(DEFAULT_LAYOUTS[level].bits == level.bits for level in QuantizationLevel)
