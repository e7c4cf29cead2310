import pytest

from langchain_adaptquant import InvalidValueError, QuantizationLevel, TaskPriority
from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION


@pytest.mark.parametrize("text", ["int4", "INT4", " Int4 ", QuantizationLevel.INT4])
def test_level_parses_case_insensitively(text):
    assert QuantizationLevel.parse(text) is QuantizationLevel.INT4


@pytest.mark.parametrize("bad", ["int3", "", "fp32", None, 4, 4.0])
def test_unknown_level_names_value_and_choices(bad):
    with pytest.raises(InvalidValueError) as info:
        QuantizationLevel.parse(bad)
    message = str(info.value)
    assert repr(bad) in message
    assert "'fp16', 'int8', 'int4' or 'int2'" in message


def test_level_facts_bits_and_nominal_compression():
    table = {level.value: (level.bits, level.compression_vs_fp32) for level in QuantizationLevel}
    assert table == {"fp16": (16, 2.0), "int8": (8, 4.0), "int4": (4, 8.0), "int2": (2, 16.0)}
    for level in QuantizationLevel:
        assert level.compression_vs_fp32 == 32 / level.bits


def test_rank_orders_by_precision():
    ranks = [level.rank for level in LEVELS_BY_PRECISION]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) == 4


def test_sixteen_bit_means_bfloat16_on_cpu_and_float16_on_gpus():
    assert QuantizationLevel.FP16.precision("cpu") == "bfloat16"
    assert QuantizationLevel.FP16.precision("cuda") == "float16"
    assert QuantizationLevel.FP16.precision("mps") == "float16"
    assert QuantizationLevel.INT4.precision("cpu") == "int4"


def test_level_renders_as_its_value():
    assert str(QuantizationLevel.INT8) == "int8"
    assert f"{TaskPriority.SPEED}" == "speed"


@pytest.mark.parametrize("bad", ["fast", "", None, 1])
def test_unknown_priority_is_a_clear_error(bad):
    with pytest.raises(InvalidValueError, match="'quality', 'balanced' or 'speed'"):
        TaskPriority.parse(bad)


def test_priority_parses_case_insensitively():
    assert TaskPriority.parse("QUALITY") is TaskPriority.QUALITY
