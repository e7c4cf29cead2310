import contextlib
import time

import pytest

from langchain_adaptquant import (
    DynamicQuantizationManager,
    InsufficientMemoryError,
    InvalidValueError,
    PolicyConfig,
    QuantizationLevel,
    ScriptedProbe,
)
from langchain_adaptquant.backends.registry import backend_catalog, replaced_backend
from langchain_adaptquant.control.capabilities import FixedLevels
from langchain_adaptquant.control.manager import ServingFacts
from langchain_adaptquant.backends.torchao import TorchAOBackend
from langchain_adaptquant.control.replay import EXAMPLE_TIMELINE, replay

ALL = list(QuantizationLevel)


def manager(probe, **kwargs):
    return DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0, available_levels=ALL, **kwargs)


def serving(probe, **kwargs):
    """A manager that asks the installed backends (levels and settings), as the serving entry points build it."""
    return DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0, catalog=backend_catalog(), **kwargs)


def test_example_timeline_replay():
    rows = replay(EXAMPLE_TIMELINE, model_size_params=7.0, task_priority="balanced")
    assert [(r.clock, r.level.value, r.action) for r in rows] == [
        ("10:00", "fp16", "initial load"),
        ("10:15", "fp16", "kept"),
        ("10:30", "int4", "downgraded"),
        ("10:45", "int4", "kept"),
        ("11:00", "fp16", "upgraded"),
    ]
    assert "memory pressure" in rows[2].reason
    assert "load, not memory" in rows[1].reason


def test_calculate_returns_the_documented_shape():
    m = serving(ScriptedProbe(total_gb=16, used_percent=50))
    with m.tracker.track(), m.tracker.track(), m.tracker.track():
        result = m.calculate_optimal_quantization(1.0, "balanced")
    assert result.level is QuantizationLevel.INT4
    data = result.to_dict()
    assert data["level"] == "int4" and data["precision"] == "int4" and data["compression_ratio"] == "8.0x"
    # the settings of the backend the registry picks for INT4 on this CPU (torchao first), not bitsandbytes'
    assert data["config"] == {"backend": "torchao", "config": "PrototypeInt4WeightOnlyConfig",
                              "group_sizes": [32, 64, 128], "int4_choose_qparams_algorithm": "tinygemm"}
    assert data["estimated_memory_gb"] == pytest.approx(m.model_size(1.0).estimated_gb("int4"), abs=1e-3)
    assert "3 request(s)" in data["reason"]


class _MissingTorchAO(TorchAOBackend):
    """torchao as if its library were not installed here."""

    def available(self) -> bool:
        return False


def test_calculate_config_follows_the_backend_the_registry_picks():
    m = serving(ScriptedProbe(total_gb=16, used_percent=50))
    with m.tracker.track(), m.tracker.track(), m.tracker.track():
        assert m.calculate_optimal_quantization(1.0, "balanced").config["backend"] == "torchao"
        with replaced_backend(_MissingTorchAO()):  # INT4 on CPU then goes to the next backend: quanto
            result = m.calculate_optimal_quantization(1.0, "balanced")
    assert result.level is QuantizationLevel.INT4
    assert result.config == {"backend": "quanto", "weights": "int4", "compute_dtype": "bfloat16"}


def test_without_a_catalog_the_manager_reasons_from_numbers_alone():
    m = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=16, used_percent=50), snapshot_ttl_s=0)
    assert m.available_levels == ALL
    with m.tracker.track(), m.tracker.track(), m.tracker.track():
        result = m.calculate_optimal_quantization(1.0, "balanced")
    assert result.level is QuantizationLevel.INT4 and result.config == {}  # no backend was asked


class _OnlyTwoLevels:
    """A storage layer that stores 16-bit and INT8 only, with settings of its own."""

    def levels(self, device):
        return [QuantizationLevel.FP16, QuantizationLevel.INT8]

    def settings(self, level, device):
        return {"backend": "two-level", "level": level.value, "device": device}


def test_a_catalog_bounds_the_levels_and_supplies_the_settings():
    m = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=16, used_percent=50), snapshot_ttl_s=0,
                                   catalog=_OnlyTwoLevels())
    with m.tracker.track(), m.tracker.track(), m.tracker.track():
        result = m.calculate_optimal_quantization(1.0, "balanced")  # INT4 with every level; INT8 is the floor here
    assert result.level is QuantizationLevel.INT8
    assert result.config == {"backend": "two-level", "level": "int8", "device": "cpu"}
    assert m.get_status()["available_levels"] == ["fp16", "int8"]


def test_catalog_and_available_levels_together_are_rejected():
    with pytest.raises(InvalidValueError, match="available_levels"):
        DynamicQuantizationManager(catalog=_OnlyTwoLevels(), available_levels=["int8"])


class _NothingHere(_OnlyTwoLevels):
    """A storage layer with no backend for this device."""

    def levels(self, device):
        return []


def test_a_catalog_that_offers_no_level_on_the_device_is_refused_naming_it():
    with pytest.raises(InvalidValueError, match=r"invalid catalog: .*allowed: one offering at least one level on cpu"):
        DynamicQuantizationManager(catalog=_NothingHere(), device="cpu")


def test_fixed_levels_are_ordered_and_never_empty():
    assert FixedLevels(("int2", "fp16")).levels("cpu") == (QuantizationLevel.FP16, QuantizationLevel.INT2)
    with pytest.raises(InvalidValueError, match="offered levels"):
        FixedLevels(())
    with pytest.raises(InvalidValueError, match="int3"):
        FixedLevels(("int3",))


def test_serving_facts_reach_the_policy_kv_bytes_and_quality_floor():
    m = manager(ScriptedProbe(total_gb=16, used_percent=20))
    size = m.model_size(1.0)
    assert m.decide(size, "quality", "fp16").level is QuantizationLevel.FP16
    heavy = m.decide(size, "quality", "fp16", facts=ServingFacts(kv_reserved_bytes=10 * 2**30))
    assert heavy.level is not QuantizationLevel.FP16 and "KV cache 10240.0 MB" in heavy.reason
    verdict = m.should_reoptimize("fp16", size, "quality", model_key="kv", now=0.0,
                                  facts=ServingFacts(kv_reserved_bytes=10 * 2**30))
    assert verdict and verdict.target_level is heavy.level  # a memory-forced downgrade goes through at once
    # the quality floor: 12 requests at moderate memory make the matrix pick INT4; measured 0.90 < 0.93
    busy = manager(ScriptedProbe(total_gb=16, used_percent=45))
    with contextlib.ExitStack() as stack:
        for _ in range(12):
            stack.enter_context(busy.tracker.track())
        assert busy.decide(size).level is QuantizationLevel.INT4
        measured = {QuantizationLevel.FP16: 1.0, QuantizationLevel.INT8: 0.99, QuantizationLevel.INT4: 0.90}
        floored = busy.decide(size, facts=ServingFacts(quality=measured))
    assert floored.level is QuantizationLevel.INT8 and "int4 is below" in floored.reason


def test_cuda_decisions_use_device_memory_and_float16():
    probe = ScriptedProbe(total_gb=80, used_percent=10, device="cuda")
    result = serving(probe).calculate_optimal_quantization(7.0, "quality")
    assert result.level is QuantizationLevel.FP16 and result.precision == "float16"
    assert result.config == {"torch_dtype": "float16"}


def test_active_requests_come_from_the_tracker():
    probe = ScriptedProbe(total_gb=512, used_percent=10)
    m = manager(probe)
    assert m.calculate_optimal_quantization(7.0, "balanced").level is QuantizationLevel.FP16
    with contextlib.ExitStack() as stack:
        for _ in range(6):
            stack.enter_context(m.tracker.track())
        assert m.calculate_optimal_quantization(7.0, "balanced").level is QuantizationLevel.INT4
        assert m.get_status(7.0)["active_requests"] == 6


def test_insufficient_memory_carries_numbers():
    m = manager(ScriptedProbe(total_gb=2, used_percent=90))
    with pytest.raises(InsufficientMemoryError) as info:
        m.calculate_optimal_quantization(7.0)
    assert info.value.required_gb > info.value.available_gb


def test_should_reoptimize_is_truthy_only_when_switching():
    probe = ScriptedProbe(total_gb=512, used_percent=30)
    m = manager(probe)
    m.record_switch("a", "fp16", now=0)
    keep = m.should_reoptimize("fp16", 7.0, model_key="a", now=10)
    assert not keep and keep.target_level is QuantizationLevel.FP16
    probe.set(90)
    down = m.should_reoptimize("fp16", 7.0, model_key="a", now=20)
    assert down and down.target_level is QuantizationLevel.INT2
    # two models keep separate histories
    m.record_switch("b", "int2", now=0)
    probe.set(10)
    assert m.should_reoptimize("int2", 7.0, model_key="b", now=1000)
    # "a" saw bad conditions at t=20, so its upgrade cools down from then, whatever "b" did
    assert not m.should_reoptimize("int2", 7.0, model_key="a", now=21)


def test_status_reports_when_nothing_fits():
    status = manager(ScriptedProbe(total_gb=4, used_percent=90)).get_status(7.0)
    assert status["recommended_level"] is None
    assert "does not fit" in status["recommendation_reason"]


def test_status_has_the_documented_fields_and_thresholds():
    m = manager(ScriptedProbe(total_gb=16, used_percent=57.5))
    status = m.get_status(7.0, current_models=[{"name": "x", "size_mb": 1, "access_count": 2}])
    assert {"device", "active_requests", "memory", "recommended_level", "current_models", "thresholds"} <= set(status)
    assert status["memory"]["used_percent"] == 57.5
    # The documented example says int4. With honest INT4 bytes for a 7B (group-32 scales: 4.43 GiB) the
    # projection is 9.2 + 4.43 = 13.6 of 16 GiB = 85.2%, past the 85% edge: emergency -> int2.
    assert status["recommended_level"] == "int2"
    assert status["recommendation_reason"].endswith("-> int2")
    assert status["current_models"][0]["name"] == "x"
    assert status["thresholds"]["memory_bands"] == [40.0, 60.0, 75.0, 85.0]
    assert len(status["decision_matrix"]) == 20


def test_bad_inputs_name_the_value():
    m = manager(ScriptedProbe())
    with pytest.raises(InvalidValueError, match="'fast'"):
        m.calculate_optimal_quantization(7.0, "fast")
    with pytest.raises(InvalidValueError, match="-3"):
        m.calculate_optimal_quantization(-3)
    with pytest.raises(InvalidValueError, match="'int3'"):
        m.should_reoptimize("int3", 7.0)
    with pytest.raises(InvalidValueError, match="memory_budget_gb"):
        DynamicQuantizationManager(memory_budget_gb=0)


def test_real_probe_decides_on_this_machine():
    m = DynamicQuantizationManager(device="cpu", policy=PolicyConfig())
    result = m.calculate_optimal_quantization(0.01, "quality")
    assert result.level in set(QuantizationLevel)
    assert m.snapshot() is m.snapshot()  # a burst of calls costs one probe
    time.sleep(0.06)
    assert m.probe.probes >= 1


def test_model_size_of_a_freed_model_is_never_reused_for_a_new_one():
    import gc

    from torch import nn

    m = manager(ScriptedProbe(total_gb=16, used_percent=10))
    for width in (8, 16, 32, 64):
        model = nn.Sequential(nn.Linear(width, width))  # a new model often gets the freed one's id()
        assert m.model_size(model).total_params == width * width + width
        assert m.model_size(model) is m.model_size(model)  # a live model is sized once
        del model
        gc.collect()
