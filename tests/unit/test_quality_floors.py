"""Quality floors in the pure policy, and the quality module's scoring helpers."""

import pytest
from pydantic import ValidationError

from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION, TaskPriority
from langchain_adaptquant.control.policy import PolicyConfig, PolicyInputs, decide
from langchain_adaptquant.runtime.quality import PROBE_PROMPTS, TextScore, answer_matches, is_degenerate
from langchain_adaptquant.units import GIB

FP16, INT8, INT4, INT2 = LEVELS_BY_PRECISION
MB = 2**20
#: A small model (17 MB at 16-bit) on a 64 GiB machine: its own bytes barely move the projection.
BYTES = {FP16: 17 * MB, INT8: 12 * MB, INT4: 10 * MB, INT2: 9 * MB}
MEASURED = {FP16: 1.0, INT8: 0.99, INT4: 0.96, INT2: 0.80}


def inputs(used_percent, requests, priority="balanced", quality=MEASURED, current=INT4):
    total = 64 * GIB
    return PolicyInputs(total_bytes=total, used_bytes=int(total * used_percent / 100), active_requests=requests,
                        priority=TaskPriority.parse(priority), level_bytes=BYTES, current_level=current,
                        current_bytes=BYTES[current], quality=quality)


def test_load_alone_cannot_push_below_the_floor():
    # critical memory with 12 requests: the matrix says INT2 (load), memory alone says INT4
    decision = decide(inputs(80, 12))
    assert decision.level is INT4
    assert "int2 is below the balanced quality floor 0.93 (measured top-1 agreement 0.800)" in decision.reason
    assert "memory does not force it" in decision.reason and "int4 (measured 0.960)" in decision.reason


def test_memory_pressure_takes_the_level_and_says_why():
    decision = decide(inputs(92, 0))
    assert decision.level is INT2
    assert decision.reason.endswith(
        "int2 is below the balanced quality floor 0.93 (measured top-1 agreement 0.800), used because memory forces it")


def test_floors_depend_on_priority_and_unmeasured_levels_are_not_judged():
    assert decide(inputs(80, 12, "speed", {**MEASURED, INT2: 0.86})).level is INT2  # speed floor 0.85
    assert decide(inputs(80, 12, "balanced", {**MEASURED, INT2: 0.86})).level is INT4
    assert decide(inputs(80, 12, quality={})).level is INT2  # nothing measured: the matrix as before
    # quality priority, moderate memory, saturated: the matrix says INT4, whose 0.96 is under the
    # quality floor 0.97; memory alone allows INT8 there
    decision = decide(inputs(45, 12, "quality"))
    assert decision.level is INT8 and "below the quality quality floor 0.97" in decision.reason


def test_an_alternative_also_below_the_floor_is_skipped():
    quality = {FP16: 1.0, INT8: 0.99, INT4: 0.90, INT2: 0.80}
    decision = decide(inputs(45, 12, quality=quality))  # moderate memory, saturated: matrix INT4
    assert decision.level is INT8  # INT4 0.90 < 0.93; INT8 is allowed by memory alone at 45%
    assert "int4 is below" in decision.reason


@pytest.mark.parametrize("floors", [(0.9, 0.95, 0.8), (1.2, 0.9, 0.8), (0.9, 0.8, float("nan"))])
def test_bad_floors_are_rejected_naming_the_value(floors):
    with pytest.raises(ValidationError, match="quality_floors"):
        PolicyConfig(quality_floors=floors)


def test_answers_match_whole_words_after_normalizing():
    assert answer_matches("The capital of France is Paris.", ("paris",))
    assert answer_matches("4", ("4", "four")) and answer_matches("Four!", ("4", "four"))
    assert not answer_matches("Parisian food", ("paris",))
    assert not answer_matches("14", ("4",))
    assert len(PROBE_PROMPTS) >= 20 and all(p.answers for p in PROBE_PROMPTS)


def test_degenerate_repetition():
    assert is_degenerate("would would would would")
    assert is_degenerate("it is good it is good it is good")
    assert not is_degenerate("The capital of France is Paris.")


def test_text_score_agreement_and_perplexity():
    ref = TextScore(nll=4.0, tokens=4, top1=(1, 2, 3, 4))
    other = TextScore(nll=8.0, tokens=4, top1=(1, 2, 0, 4))
    assert other.agreement(ref) == 0.75
    assert other.perplexity / ref.perplexity == pytest.approx(2.718281828 ** 1.0)


def test_a_damaged_or_foreign_profile_file_is_ignored(tmp_path):
    from langchain_adaptquant.runtime.quality import PROFILE_METHOD, QualityProfile

    path = tmp_path / "p.json"
    path.write_text('{"key": "k", "recipe": "r", "method": "%s", "levels": {"int3": {"agreement": 1}}}' % PROFILE_METHOD)
    assert QualityProfile("k", "r", path).to_dict()["levels"]["int4"]["source"] == "not measured"
    path.write_text("not json")
    assert QualityProfile("k", "r", path).agreement_map() == {}
    good = ('{"key": "k", "recipe": "r", "method": "%s", "reference": null, "levels": {"int4": {"agreement": 0.9, '
            '"perplexity_ratio": 1.1, "tokens": 8, "seconds": 0.1, "measured_at": 1.0}}}' % PROFILE_METHOD)
    path.write_text(good)
    assert QualityProfile("k", "r", path).entry("int4")["agreement"] == 0.9
    assert QualityProfile("other weights", "r", path).entry("int4")["source"] == "not measured"
    assert QualityProfile("k", "other backends", path).entry("int4")["source"] == "not measured"
