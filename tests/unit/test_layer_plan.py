"""Mixed precision per layer: which layers keep one level more, and sizing that knows the plan."""

import pytest

from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.control.layer_plan import (
    DEFAULT_MIXED_PRECISION,
    UNIFORM,
    MixedPrecision,
    block_index,
    plan_levels,
)
from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.model_zoo import model_config
from langchain_adaptquant.control.sizing import DEFAULT_LAYOUTS, size_from_config, size_from_params

INT8, INT4, INT2 = QuantizationLevel.INT8, QuantizationLevel.INT4, QuantizationLevel.INT2
NAMES = [f"model.layers.{b}.{kind}" for b in range(8) for kind in
         ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]


def test_block_index_reads_common_layouts():
    assert block_index("model.layers.12.mlp.down_proj") == 12
    assert block_index("transformer.h.3.attn.c_attn") == 3
    assert block_index("lm_head") is None


def test_default_keeps_v_down_and_the_first_and_last_blocks_at_int4_when_at_int2():
    plan = plan_levels(NAMES, INT2, DEFAULT_MIXED_PRECISION)
    kept = {name for name, level in plan.items() if level is INT4}
    assert kept == {n for n in NAMES if ".layers.0." in n or ".layers.7." in n or n.endswith(("v_proj", "down_proj"))}
    assert all(level is INT2 for name, level in plan.items() if name not in kept)
    # other levels are untouched by a rule made for INT2
    assert set(plan_levels(NAMES, INT4, DEFAULT_MIXED_PRECISION).values()) == {INT4}
    assert set(plan_levels(NAMES, INT2, UNIFORM).values()) == {INT2}


def test_the_block_rule_stays_off_where_it_would_keep_most_of_the_model():
    two_blocks = [n for n in NAMES if ".layers.0." in n or ".layers.1." in n]
    plan = plan_levels(two_blocks, INT2, DEFAULT_MIXED_PRECISION)
    assert plan["model.layers.0.mlp.up_proj"] is INT2  # first/last would be everything: off
    assert plan["model.layers.0.mlp.down_proj"] is INT4  # the kinds still apply


def test_one_level_up_from_int8_is_16_bit():
    rule = MixedPrecision(frozenset({"int8"}), first_blocks=1)
    plan = plan_levels(NAMES, INT8, rule)
    assert plan["model.layers.0.mlp.up_proj"] is QuantizationLevel.FP16
    assert plan["model.layers.1.mlp.up_proj"] is INT8


def test_bad_rule_is_a_clear_error():
    with pytest.raises(InvalidValueError):
        MixedPrecision(frozenset({INT2}), first_blocks=-1)
    with pytest.raises(InvalidValueError):
        MixedPrecision(frozenset({"int3"}))


def test_sizing_sums_layers_at_their_planned_levels():
    size = size_from_config(model_config("llama-150m"))
    mixed = size.with_mixed(DEFAULT_MIXED_PRECISION)
    plan = plan_levels([name for name, _, _ in size.linears], INT2, DEFAULT_MIXED_PRECISION)
    by_hand = 2 * size.unquantized_params
    for name, in_f, out_f in size.linears:
        layout = DEFAULT_LAYOUTS[plan[name]]
        by_hand += in_f * out_f * layout.bits / 8 + (in_f * out_f // layout.group_size) * layout.group_bytes
    assert mixed.estimated_bytes(INT2) == int(by_hand)
    assert size.estimated_bytes(INT2) < mixed.estimated_bytes(INT2) < size.estimated_bytes(INT4)
    assert mixed.estimated_bytes(INT4) == size.estimated_bytes(INT4)  # the rule acts at INT2 only


def test_a_bare_parameter_count_uses_llama_7b_shares():
    plain, mixed = size_from_params(7.0), size_from_params(7.0).with_mixed(DEFAULT_MIXED_PRECISION)
    share = (mixed.estimated_bytes(INT2) - plain.estimated_bytes(INT2)) / (
        plain.estimated_bytes(INT4) - plain.estimated_bytes(INT2))
    assert share == pytest.approx(0.349, abs=0.002)  # v/down of 30 blocks + 2 whole blocks of Llama-2-7B
