"""Quality profile and floors on the embedded reference model (real weights, real quantization).

The profile measures each level's top-1 agreement with 16-bit once; the policy then refuses a level
below the priority's floor when only load asks for it, and takes it when memory forces it, saying
so with the measured figure. Memory is scripted (ScriptedProbe), the model and its levels are real.
"""

import re
from contextlib import ExitStack

import pytest

from langchain_adaptquant import AdaptiveModelLoader, DynamicQuantizationManager, PolicyConfig, ScriptedProbe
from langchain_adaptquant.assets import reference_model_path
from langchain_adaptquant.control.levels import QuantizationLevel

INT4, INT2 = QuantizationLevel.INT4, QuantizationLevel.INT2


def named_agreement(reason: str) -> float:
    """The measured agreement a decision reason names, as a number (the profile keeps 4 decimals, the reason 3)."""
    found = re.search(r"measured top-1 agreement (\d+\.\d+)", reason)
    assert found, f"the reason names no measured agreement: {reason!r}"
    return float(found.group(1))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    probe = ScriptedProbe(total_gb=64, used_percent=10)
    manager = DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0.0)
    cache = tmp_path_factory.mktemp("aq-cache")
    loader = AdaptiveModelLoader(manager=manager, cache_dir=cache, show_progress=False, layer_cache_gb=0,
                                 quality_dir=cache / "quality")
    loaded = loader.load_model(reference_model_path(), force_quantization="fp16")
    profile = loader.measure_quality(loaded, ["int4", "int2"])
    yield loader, loaded, probe, profile, cache
    loader.clear()


def test_profile_measures_each_level_once_and_returns_to_the_serving_level(measured):
    loader, loaded, _, profile, cache = measured
    assert loaded.level is QuantizationLevel.FP16
    levels = profile["levels"]
    assert levels["fp16"]["agreement"] == 1.0
    assert levels["int8"] == {"agreement": None, "source": "not measured"}
    for name in ("int4", "int2"):
        assert levels[name]["source"] == "measured" and 0.0 < levels[name]["agreement"] < 1.0
    assert levels["int4"]["agreement"] > levels["int2"]["agreement"]  # fewer bits keep less
    switches = len(loaded.switches)
    loader.measure_quality(loaded, ["int4", "int2"])  # already measured: no switch at all
    assert len(loaded.switches) == switches
    assert list((cache / "quality").glob("*.json")), "with quality_dir the profile is kept on disk"
    assert loader.stats()[0]["quality"]["levels"] == levels  # what /status lists per cached model


def test_a_new_loader_reads_the_kept_profile_instead_of_measuring(measured):
    _, loaded, _, profile, cache = measured
    other = AdaptiveModelLoader(manager=DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=10)),
                                cache_dir=cache, show_progress=False, layer_cache_gb=0, quality_dir=cache / "quality")
    again = other.load_model(reference_model_path(), force_quantization="int8")
    assert again.quality.to_dict()["levels"]["int2"] == profile["levels"]["int2"]
    # the 16-bit reference came from the file too, so a level never seen before is measured at load
    assert again.quality.get("int8") is not None and 0.0 < again.quality.get("int8").agreement <= 1.0
    other.clear()
    # without quality_dir a profile lives only with the cached model: a new loader measures afresh
    fresh = AdaptiveModelLoader(manager=DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=10)),
                                cache_dir=cache, show_progress=False, layer_cache_gb=0)
    assert fresh.load_model(reference_model_path(), force_quantization="int8").quality.get("int2") is None
    fresh.clear()


def test_balanced_refuses_a_below_floor_level_under_load_and_takes_it_under_memory_pressure(measured):
    loader, loaded, probe, profile, _ = measured
    int4, int2 = profile["levels"]["int4"]["agreement"], profile["levels"]["int2"]["agreement"]
    floor = round((int4 + int2) / 2, 4)  # between the two measured levels: int4 meets it, int2 does not
    manager = loader.manager
    manager.policy = PolicyConfig(quality_floors=(max(floor, 0.97), floor, min(floor, 0.85)),
                                  upgrade_cooldown_s=0, load_downgrade_delay_s=0)
    tracker = manager.tracker
    with ExitStack() as stack:
        for _ in range(12):  # saturated: the matrix asks for INT2 from 75% memory on
            stack.enter_context(tracker.track())
        probe.set(80.0)  # critical band: with no load the matrix would give INT4
        loader.reoptimize(loaded, "balanced")
        assert loaded.level is INT4
        reason = loaded.last_decision_reason
        assert "below the balanced quality floor" in reason and "memory does not force it" in reason
        assert named_agreement(reason) == pytest.approx(int2, abs=1e-3)

        probe.set(92.0)  # emergency band: memory alone asks for INT2
        loader.reoptimize(loaded, "balanced")
        assert loaded.level is INT2
        reason = loaded.last_decision_reason
        assert "used because memory forces it" in reason
        assert named_agreement(reason) == pytest.approx(int2, abs=1e-3)
    probe.set(10.0)
    manager.policy = PolicyConfig()


def test_response_metadata_carries_the_levels_quality(measured):
    from langchain_adaptquant import ChatAdaptQuant

    loader, loaded, probe, profile, _ = measured
    llm = ChatAdaptQuant(model=str(reference_model_path()), loader=loader, max_tokens=2, force_quantization="int4")
    meta = llm.invoke("hi").response_metadata
    assert meta["quantization_level"] == "int4"
    assert meta["quality"] == profile["levels"]["int4"]
