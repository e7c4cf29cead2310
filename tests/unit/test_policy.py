"""The decision is a pure function: tested as a table and with hypothesis properties."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from langchain_adaptquant import InsufficientMemoryError, QuantizationLevel, TaskPriority
from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION
from langchain_adaptquant.control.policy import (
    DECISION_MATRIX,
    HysteresisState,
    PolicyConfig,
    PolicyInputs,
    after_switch,
    apply_hysteresis,
    decide,
    decision_table,
    matrix_level,
)
from langchain_adaptquant.control.sizing import size_from_params
from langchain_adaptquant.units import GIB

FP16, INT8, INT4, INT2 = LEVELS_BY_PRECISION
Q, B, S = TaskPriority.QUALITY, TaskPriority.BALANCED, TaskPriority.SPEED
CONFIG = PolicyConfig()


# The documented decision matrix (docs/DYNAMIC_QUANTIZATION.md, section 2), exactly.
@pytest.mark.parametrize(
    "used, requests, priority, expected",
    [
        (30, 1, Q, FP16),
        (30, 3, B, INT8),
        (50, 1, Q, INT8),
        (50, 3, B, INT4),
        (70, 0, S, INT4),
        (70, 12, Q, INT4),
        (80, 9, Q, INT4),
        (90, 0, Q, INT2),
        (90, 20, S, INT2),
    ],
)
def test_matrix_reproduces_the_documented_rows(used, requests, priority, expected):
    assert matrix_level(used, requests, priority, CONFIG) is expected


def test_matrix_defines_every_cell_and_is_monotone():
    rows = decision_table()
    assert len(rows) == 5 * 4
    for band in range(5):
        for load in range(4):
            cell = DECISION_MATRIX[band][load]
            assert cell[0].rank >= cell[1].rank >= cell[2].rank  # quality >= balanced >= speed
            if band:
                assert all(a.rank <= b.rank for a, b in zip(cell, DECISION_MATRIX[band - 1][load]))
            if load:
                assert all(a.rank <= b.rank for a, b in zip(cell, DECISION_MATRIX[band][load - 1]))


def test_band_edges_belong_to_the_higher_band():
    assert matrix_level(39.99, 0, Q, CONFIG) is FP16
    assert matrix_level(40.0, 0, Q, CONFIG) is INT8
    assert matrix_level(85.0, 0, Q, CONFIG) is INT2
    assert matrix_level(80, 10, Q, CONFIG) is INT2


SIZES = size_from_params(7.0).bytes_per_level()


def inputs(used_pct, requests=0, priority=B, total_gb=64.0, current=None, levels=LEVELS_BY_PRECISION, sizes=SIZES):
    total = int(total_gb * GIB)
    current_bytes = sizes[current] if current else 0
    return PolicyInputs(
        total_bytes=total,
        used_bytes=int(total * used_pct / 100),
        active_requests=requests,
        priority=priority,
        level_bytes=sizes,
        current_level=current,
        current_bytes=current_bytes,
        available_levels=levels,
    )


@settings(max_examples=300, deadline=None)
@given(
    used=st.floats(0, 100),
    more=st.floats(0, 50),
    requests=st.integers(0, 64),
    extra=st.integers(0, 32),
    priority=st.sampled_from(list(TaskPriority)),
    total_gb=st.floats(4, 2048),
    params=st.floats(0.05, 200),
)
def test_total_monotone_and_fits(used, more, requests, extra, priority, total_gb, params):
    sizes = size_from_params(params).bytes_per_level()

    def level_or_none(u, r, p=priority):
        try:
            decision = decide(inputs(u, r, p, total_gb, sizes=sizes))
        except InsufficientMemoryError as error:
            assert error.required_gb == pytest.approx(sizes[INT2] / GIB)
            assert error.level == "int2"
            return None
        # fits: the chosen level leaves the headroom free
        inp = decision.inputs
        assert inp.projected_used_bytes(decision.level) <= inp.total_bytes - inp.headroom_bytes(CONFIG)
        return decision.level

    base = level_or_none(used, requests)
    worse_memory = level_or_none(min(used + more, 100), requests)
    worse_load = level_or_none(used, requests + extra)
    for worse in (worse_memory, worse_load):
        if base is None:
            assert worse is None  # if nothing fits, more pressure cannot make something fit
        elif worse is not None:
            assert worse.rank <= base.rank
    # quality never gets lower precision than balanced, balanced never lower than speed
    ranks = [level_or_none(used, requests, p) for p in (Q, B, S)]
    if None not in ranks:
        assert ranks[0].rank >= ranks[1].rank >= ranks[2].rank


def test_projected_memory_counts_the_model_being_loaded():
    # 35% used on a 64 GiB host: a 13 GiB FP16 7B would push it to 55% -> moderate -> INT8.
    decision = decide(inputs(35, 0, B, total_gb=64))
    assert decision.level is INT8
    assert decision.projected_used_percent == pytest.approx(35 + 100 * SIZES[INT8] / (64 * GIB), abs=0.01)


def test_projection_replaces_the_current_model_bytes():
    # At INT4, 42% used; the same machine projected at FP16 adds only the difference.
    inp = inputs(42, 0, B, total_gb=64, current=INT4)
    delta = (SIZES[FP16] - SIZES[INT4]) / (64 * GIB) * 100
    assert inp.projected_percent(FP16) == pytest.approx(42 + delta, abs=0.01)


def test_upgrade_needs_the_margin():
    # Just under the 40% edge at FP16 is not enough to upgrade from INT8: it must hold with +5%.
    sizes = size_from_params(1.0).bytes_per_level()
    total = 100 * GIB
    used_at_fp16 = int(0.37 * total)
    at_int8 = PolicyInputs(total, used_at_fp16 - sizes[FP16] + sizes[INT8], 0, B, sizes,
                           current_level=INT8, current_bytes=sizes[INT8])
    assert decide(at_int8).level is INT8
    fresh = PolicyInputs(total, used_at_fp16 - sizes[FP16], 0, B, sizes)
    assert decide(fresh).level is FP16  # a fresh load needs no margin


def test_nothing_fits_raises_with_the_numbers():
    with pytest.raises(InsufficientMemoryError) as info:
        decide(inputs(99, 0, B, total_gb=4))
    error = info.value
    assert error.required_gb == pytest.approx(SIZES[INT2] / GIB)
    assert error.available_gb == pytest.approx(0.04, abs=0.01)
    assert "int2" in str(error) and "GB available" in str(error)


def test_unavailable_level_falls_back_to_the_nearest_available():
    decision = decide(inputs(90, 0, B, total_gb=512, levels=(FP16, INT4)))
    assert decision.level is INT4
    assert "no backend" in decision.reason and "int2" in decision.reason


def test_int8_missing_goes_to_the_next_lower_level():
    decision = decide(inputs(20, 3, B, total_gb=512, levels=(FP16, INT4, INT2)))
    assert decision.level is INT4


# -- hysteresis ---------------------------------------------------------------------------------

def hyst(decision_inputs, state, now, config=CONFIG):
    return apply_hysteresis(decide(decision_inputs, config), state, now, config)


def test_memory_pressure_downgrades_at_once():
    state = after_switch(HysteresisState(), FP16, now=0)
    verdict = hyst(inputs(70, 0, Q, total_gb=512, current=FP16), state, now=1)
    assert verdict.switch and "memory pressure" in verdict.reason


def test_load_only_downgrade_waits_until_it_persists():
    state = after_switch(HysteresisState(), FP16, now=0)
    busy = inputs(30, 8, B, total_gb=512, current=FP16)  # relaxed memory, busy -> INT4
    first = hyst(busy, state, now=100)
    assert not first.switch and "persist" in first.reason
    still = hyst(busy, first.state, now=105)
    assert not still.switch
    later = hyst(busy, still.state, now=100 + CONFIG.load_downgrade_delay_s)
    assert later.switch
    # a calm call in between resets the wait
    calm = hyst(inputs(30, 0, B, total_gb=512, current=FP16), first.state, now=105)
    again = hyst(busy, calm.state, now=100 + CONFIG.load_downgrade_delay_s)
    assert not again.switch


def test_upgrade_waits_for_the_cooldown_after_a_switch_and_after_bad_conditions():
    state = after_switch(HysteresisState(), INT4, now=1000)
    good = inputs(10, 0, B, total_gb=512, current=INT4)
    assert not hyst(good, state, now=1000 + CONFIG.upgrade_cooldown_s - 1).switch
    assert hyst(good, state, now=1000 + CONFIG.upgrade_cooldown_s).switch
    # conditions were bad at t=5000: the cooldown counts from then
    bad = hyst(inputs(70, 0, B, total_gb=512, current=INT4), state, now=5000)
    assert not bad.switch
    assert not hyst(good, bad.state, now=5000 + CONFIG.upgrade_cooldown_s - 1).switch
    assert hyst(good, bad.state, now=5000 + CONFIG.upgrade_cooldown_s).switch


def test_initial_load_always_acts():
    verdict = hyst(inputs(30), HysteresisState(), now=0)
    assert verdict.switch and verdict.reason.startswith("initial load")


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"memory_bands": (60, 40, 75, 85)}, "strictly increasing"),
        ({"memory_bands": (0, 40, 75, 85)}, "strictly increasing"),
        ({"memory_bands": (40, 60, 75, 100)}, "strictly increasing"),
        ({"load_bands": (2, 2, 10)}, "strictly increasing"),
        ({"load_bands": (0, 2, 10)}, ">= 1"),
        ({"upgrade_margin_percent": -1}, "upgrade_margin_percent"),
        ({"upgrade_cooldown_s": math.inf}, "upgrade_cooldown_s"),
        ({"headroom_percent": math.nan}, "headroom_percent"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_thresholds_name_the_field(kwargs, needle):
    with pytest.raises(ValidationError) as info:
        PolicyConfig(**kwargs)
    assert needle in str(info.value)


def test_custom_bands_move_the_matrix():
    config = PolicyConfig(memory_bands=(20, 30, 40, 50))
    assert matrix_level(25, 0, Q, config) is INT8
    assert matrix_level(55, 0, Q, config) is INT2
