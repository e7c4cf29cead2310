"""Telemetry handlers on a real ChatAdaptQuant (tiny random chat model): calls, switches, Prometheus."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from langchain_adaptquant import AdaptiveModelLoader, DynamicQuantizationManager, ScriptedProbe
from langchain_adaptquant.callbacks import (
    REQUANTIZE_EVENT,
    AsyncQuantizationTelemetryHandler,
    QuantizationTelemetryHandler,
    TelemetryRecorder,
    level_number,
)
from langchain_adaptquant.chat_model import REQUANTIZE_EVENT as CHAT_EVENT
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.errors import InvalidValueError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from tiny_models import build_tiny_chat  # noqa: E402


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    return build_tiny_chat(tmp_path_factory.mktemp("tiny-chat-telemetry"))


@pytest.fixture()
def setup(chat_dir):
    probe = ScriptedProbe(total_gb=64, used_percent=10)
    manager = DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    llm = ChatAdaptQuant(model=str(chat_dir), loader=loader, max_tokens=6)
    return llm, probe, loader


def test_event_name_is_the_chat_models_and_levels_are_numbers():
    assert REQUANTIZE_EVENT is CHAT_EVENT == "adaptquant.requantize"
    assert [level_number(x) for x in ("fp16", "int8", "INT4", "int2", "nope", None)] == [16, 8, 4, 2, None, None]


def test_a_call_is_recorded_with_level_tokens_memory_and_latency(setup):
    llm, *_ = setup
    handler = QuantizationTelemetryHandler()
    message = llm.invoke("hello", config={"callbacks": [handler]})
    (call,) = handler.calls()
    assert call.level == "fp16" and call.precision == "bfloat16" and call.backend == "cast"
    assert call.input_tokens == message.usage_metadata["input_tokens"] > 0
    assert call.output_tokens == message.usage_metadata["output_tokens"] <= 6
    assert call.finish_reason == message.response_metadata["finish_reason"]
    assert call.memory_used_percent == 10.0 and call.process_mb == 512.0
    assert call.latency_s >= call.generation_s > 0 and call.error is None and call.switches == 0
    assert call.model == str(llm.model) and "relaxed memory" in call.decision_reason
    summary = handler.summary()
    assert summary["calls"] == 1 and summary["errors"] == 0 and summary["in_flight"] == 0
    assert summary["levels"] == {"fp16": 1} and summary["latency_p50_s"] == summary["latency_p95_s"] > 0
    assert summary["tokens"] == {"input": call.input_tokens, "output": call.output_tokens}


def test_a_switch_is_one_switch_record_tied_to_its_call(setup):
    llm, probe, _ = setup
    handler = QuantizationTelemetryHandler()
    llm.invoke("one", config={"callbacks": [handler]})
    probe.set(90)
    llm.invoke("two", config={"callbacks": [handler]})
    llm.invoke("three", config={"callbacks": [handler]})  # stays at int2: no new switch
    (switch,) = handler.switches()
    assert (switch["from_level"], switch["to_level"], switch["direction"], switch["ok"]) == ("fp16", "int2", "downgrade", True)
    first, second, third = handler.calls()
    assert switch["run_id"] == second.run_id and (first.switches, second.switches, third.switches) == (0, 1, 0)
    assert [c.level for c in handler.calls()] == ["fp16", "int2", "int2"]
    summary = handler.summary()
    assert summary["switches"] == {"total": 1, "downgrade": 1, "upgrade": 0, "failed": 0}
    assert summary["levels"] == {"fp16": 1, "int2": 2}


def test_streaming_and_async_calls_share_one_recorder(setup):
    llm, *_ = setup
    recorder = TelemetryRecorder(prometheus=False)
    sync_handler = QuantizationTelemetryHandler(recorder=recorder)
    async_handler = AsyncQuantizationTelemetryHandler(recorder=recorder)
    chunks = list(llm.stream("stream me", config={"callbacks": [sync_handler]}))

    async def scenario():
        await llm.ainvoke("async", config={"callbacks": [async_handler]})
        return [c async for c in llm.astream("async stream", config={"callbacks": [async_handler]})]

    achunks = asyncio.run(scenario())
    calls = recorder.calls()
    assert len(calls) == 3 and all(c.level == "fp16" and c.output_tokens for c in calls)
    assert calls[0].output_tokens == chunks[-1].usage_metadata["output_tokens"]
    assert calls[2].output_tokens == achunks[-1].usage_metadata["output_tokens"]
    assert sync_handler.summary() == async_handler.summary() and recorder.in_flight == 0


def test_errors_are_recorded_and_release_the_in_flight_count(setup):
    llm, *_ = setup
    handler = QuantizationTelemetryHandler()
    broken = llm.model_copy(update={"model_kwargs": {"no_such_generate_argument": 1}})
    with pytest.raises(ValueError):
        broken.invoke("x", config={"callbacks": [handler]})
    (call,) = handler.calls()
    assert call.error and "no_such_generate_argument" in call.error and call.finish_reason == "error"
    assert handler.summary()["errors"] == 1 and handler.summary()["in_flight"] == 0
    assert b'adaptquant_requests_total{outcome="error"} 1.0' in handler.prometheus_text()
    assert b"adaptquant_active_requests 0.0" in handler.prometheus_text()


def test_history_is_bounded_but_totals_keep_counting(setup):
    llm, *_ = setup
    handler = QuantizationTelemetryHandler(max_history=2, prometheus=False)
    llm.batch(["a", "b", "c"], config={"callbacks": [handler], "max_concurrency": 3})  # threads: lock-protected
    assert len(handler.calls()) == 2 and handler.summary()["calls"] == 3
    assert handler.summary()["history"] == {"calls": 2, "switches": 0, "max": 2}
    with pytest.raises(InvalidValueError, match="max_history"):
        TelemetryRecorder(max_history=0)


def test_the_same_switch_seen_twice_counts_once():
    recorder = TelemetryRecorder(prometheus=False)
    data = {"model": "m", "from_level": "int4", "to_level": "fp16", "direction": "upgrade", "ok": True, "at": 1.5}
    assert recorder.switch(data) is True and recorder.switch(dict(data)) is False
    assert recorder.switch({**data, "ok": False, "at": 2.0}) is True
    assert recorder.summary()["switches"] == {"total": 2, "downgrade": 0, "upgrade": 1, "failed": 1}


def test_prometheus_text_has_every_metric_in_a_private_registry(setup):
    llm, probe, _ = setup
    handler = QuantizationTelemetryHandler()
    other = QuantizationTelemetryHandler()  # a second private registry: no "duplicated timeseries" error
    llm.invoke("one", config={"callbacks": [handler]})
    probe.set(90)
    llm.invoke("two", config={"callbacks": [handler]})
    text = handler.prometheus_text().decode()
    model = llm.model
    for line in (
        f'adaptquant_quantization_bits{{model="{model}"}} 2.0',
        f'adaptquant_quantization_level{{level="int2",model="{model}"}} 1.0',
        f'adaptquant_quantization_level{{level="fp16",model="{model}"}} 0.0',
        'adaptquant_switches_total{direction="downgrade",outcome="ok"} 1.0',
        'adaptquant_switches_total{direction="upgrade",outcome="ok"} 0.0',
        'adaptquant_request_latency_seconds_count{level="fp16"} 1.0',
        'adaptquant_request_latency_seconds_count{level="int2"} 1.0',
        'adaptquant_requests_total{outcome="ok"} 2.0',
        "adaptquant_memory_used_percent 90.0",
        "adaptquant_active_requests 0.0",
    ):
        assert line in text, line
    tokens = [line for line in text.splitlines() if line.startswith('adaptquant_tokens_total{kind="output"}')]
    assert float(tokens[0].split()[-1]) == sum(c.output_tokens for c in handler.calls())
    assert "adaptquant_switches_total" in other.prometheus_text().decode()  # exists, still zero
    assert 'outcome="ok"} 1.0' not in other.prometheus_text().decode()


def test_a_caller_supplied_registry_and_export_off():
    registry = CollectorRegistry()
    recorder = TelemetryRecorder(registry=registry)
    recorder.observe_memory(42.5, 123)
    assert registry.get_sample_value("adaptquant_memory_used_percent") == 42.5
    assert registry.get_sample_value("adaptquant_process_rss_bytes") == 123
    off = TelemetryRecorder(prometheus=False)
    assert off.prometheus_text() == b"" and off.registry is None
