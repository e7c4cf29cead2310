"""Telemetry for ChatAdaptQuant: per-call records, switch records and optional Prometheus metrics.

Two LangChain handlers (sync and async) feed one :class:`TelemetryRecorder`, so a process that
mixes ``invoke`` and ``ainvoke`` keeps a single history. Everything a record holds comes from what
the chat model already publishes: the ``response_metadata``/``usage_metadata`` of the message in
``on_llm_end``, and one ``adaptquant.requantize`` custom event per switch. Handlers never raise into
the model call: telemetry must not break generation.

Prometheus export uses a private ``CollectorRegistry`` unless the caller passes one, never the
global default, so two recorders (or two tests) in one process do not collide.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Optional
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.outputs import LLMResult

from langchain_adaptquant.chat_model import REQUANTIZE_EVENT
from langchain_adaptquant.control.levels import QuantizationLevel, switch_direction
from langchain_adaptquant.control.load_tracker import nearest_rank
from langchain_adaptquant.errors import InvalidValueError

__all__ = [
    "REQUANTIZE_EVENT",
    "METRIC_PREFIX",
    "CallRecord",
    "TelemetryRecorder",
    "QuantizationTelemetryHandler",
    "AsyncQuantizationTelemetryHandler",
    "level_number",
]

#: Prefix of every Prometheus metric name this module exports.
METRIC_PREFIX = "adaptquant"

#: Seconds buckets for the latency histogram: CPU generation ranges from tens of ms to minutes.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, math.inf)


def level_number(level: Optional[str]) -> Optional[int]:
    """A level as a number a gauge can plot: its bits (fp16=16, int8=8, int4=4, int2=2)."""
    if level is None:
        return None
    try:
        return QuantizationLevel.parse(level).bits
    except InvalidValueError:
        return None


def _percent(value: Any) -> Optional[float]:
    """The snapshot's ``used_percent`` (a number); None when the metadata carries none."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass(frozen=True)
class CallRecord:
    """One chat-model call as telemetry saw it; ``error`` is set (and the rest mostly None) on failure."""

    run_id: str
    model: Optional[str]
    level: Optional[str]
    precision: Optional[str]
    backend: Optional[str]
    memory_used_percent: Optional[float]
    process_mb: Optional[float]
    latency_s: float
    generation_s: Optional[float]
    input_tokens: Optional[int]
    output_tokens: Optional[int]
    finish_reason: Optional[str]
    decision_reason: Optional[str]
    switches: int
    started_at: float
    error: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Pending:
    started: float  # perf_counter, for latency
    wall: float  # time.time(), for the record
    model: Optional[str]
    switches: int = 0


@dataclass
class _Totals:
    calls: int = 0
    errors: int = 0
    cancelled: int = 0
    switches: dict[str, int] = field(default_factory=lambda: {"downgrade": 0, "upgrade": 0, "failed": 0})
    levels: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0


class _Metrics:
    """The Prometheus side of a recorder; exists only when prometheus-client is installed."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        p = METRIC_PREFIX
        self.registry = registry
        self.level_bits = Gauge(f"{p}_quantization_bits", "Current weight precision of a model, in bits "
                                "(fp16=16, int8=8, int4=4, int2=2).", ["model"], registry=registry)
        self.level_info = Gauge(f"{p}_quantization_level", "1 for the current level of a model, 0 for the others.",
                                ["model", "level"], registry=registry)
        self.memory_used = Gauge(f"{p}_memory_used_percent", "Memory in use as the policy sees it, percent.",
                                 registry=registry)
        self.process_rss = Gauge(f"{p}_process_rss_bytes", "Resident memory of the serving process.", registry=registry)
        self.active = Gauge(f"{p}_active_requests", "Chat-model calls in flight.", registry=registry)
        self.switches = Counter(f"{p}_switches", "Precision switches, by direction and outcome.",
                                ["direction", "outcome"], registry=registry)
        self.latency = Histogram(f"{p}_request_latency_seconds", "Chat-model call latency, by level.",
                                 ["level"], buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter(f"{p}_requests", "Chat-model calls, by outcome.", ["outcome"], registry=registry)
        self.tokens = Counter(f"{p}_tokens", "Tokens processed, by kind (input or output).", ["kind"], registry=registry)
        for direction in ("downgrade", "upgrade"):
            for outcome in ("ok", "failed"):
                self.switches.labels(direction, outcome)
        for kind in ("input", "output"):
            self.tokens.labels(kind)
        for outcome in ("ok", "error", "cancelled"):
            self.requests.labels(outcome)

    def set_level(self, model: str, level: str) -> None:
        bits = level_number(level)
        if bits is None:
            return
        self.level_bits.labels(model).set(bits)
        for candidate in QuantizationLevel:
            self.level_info.labels(model, candidate.value).set(1 if candidate.value == level else 0)


class TelemetryRecorder:
    """Thread-safe store of call and switch records with totals and optional Prometheus metrics.

    ``max_history`` bounds the per-call and per-switch deques (totals keep counting past it).
    ``registry`` is a ``prometheus_client.CollectorRegistry`` to export into; with
    ``prometheus=True`` and no registry a private one is created; ``prometheus=False`` exports nothing.
    """

    def __init__(self, max_history: int = 1000, registry: Any = None, prometheus: Optional[bool] = None) -> None:
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise InvalidValueError("max_history", max_history, "an integer >= 1")
        self.max_history = max_history
        self._lock = threading.Lock()
        self._calls: deque[CallRecord] = deque(maxlen=max_history)
        self._switches: deque[dict[str, Any]] = deque(maxlen=max_history)
        self._switch_keys: deque[tuple] = deque(maxlen=max_history * 4)
        self._seen_switches: set[tuple] = set()
        self._pending: dict[str, _Pending] = {}
        self._totals = _Totals()
        self.metrics: Optional[_Metrics] = None
        if prometheus is None:
            prometheus = registry is not None or _prometheus_installed()
        if prometheus:
            if registry is None:
                from prometheus_client import CollectorRegistry

                registry = CollectorRegistry(auto_describe=True)
            self.metrics = _Metrics(registry)

    # -- inputs ---------------------------------------------------------------------------------
    def start(self, run_id: UUID | str, model: Optional[str] = None) -> None:
        with self._lock:
            self._pending[str(run_id)] = _Pending(time.perf_counter(), time.time(), model)
        if self.metrics:
            self.metrics.active.inc()

    def end(self, run_id: UUID | str, response: LLMResult) -> Optional[CallRecord]:
        message_meta, usage = _first_message_data(response)
        with self._lock:
            pending = self._pending.pop(str(run_id), None)
        if pending is None:
            return None  # a run we did not see start (handler attached mid-run): no latency to report
        memory = message_meta.get("memory") or {}
        process_gb = memory.get("process_gb")
        record = CallRecord(
            run_id=str(run_id),
            model=message_meta.get("model_name") or pending.model,
            level=message_meta.get("quantization_level"),
            precision=message_meta.get("precision"),
            backend=message_meta.get("backend"),
            memory_used_percent=_percent(memory.get("used_percent")),
            process_mb=round(process_gb * 1024, 1) if isinstance(process_gb, (int, float)) else None,
            latency_s=time.perf_counter() - pending.started,
            generation_s=message_meta.get("generation_seconds"),
            input_tokens=usage.get("input_tokens"),
            output_tokens=usage.get("output_tokens"),
            finish_reason=message_meta.get("finish_reason"),
            decision_reason=message_meta.get("decision_reason"),
            switches=pending.switches,
            started_at=pending.wall,
        )
        with self._lock:
            self._calls.append(record)
            self._totals.calls += 1
            if record.level:
                self._totals.levels[record.level] = self._totals.levels.get(record.level, 0) + 1
            self._totals.input_tokens += record.input_tokens or 0
            self._totals.output_tokens += record.output_tokens or 0
        if self.metrics:
            m = self.metrics
            m.active.dec()
            m.requests.labels("ok").inc()
            m.latency.labels(record.level or "unknown").observe(record.latency_s)
            m.tokens.labels("input").inc(record.input_tokens or 0)
            m.tokens.labels("output").inc(record.output_tokens or 0)
            if record.model and record.level:
                m.set_level(record.model, record.level)
            if record.memory_used_percent is not None:
                m.memory_used.set(record.memory_used_percent)
        return record

    def error(self, run_id: UUID | str, error: BaseException) -> Optional[CallRecord]:
        with self._lock:
            pending = self._pending.pop(str(run_id), None)
        if pending is None:
            return None
        cancelled = isinstance(error, (GeneratorExit, asyncio.CancelledError))  # the caller left: not a failure
        record = CallRecord(
            run_id=str(run_id), model=pending.model, level=None, precision=None, backend=None,
            memory_used_percent=None, process_mb=None, latency_s=time.perf_counter() - pending.started,
            generation_s=None, input_tokens=None, output_tokens=None,
            finish_reason="cancelled" if cancelled else "error", decision_reason=None, switches=pending.switches,
            started_at=pending.wall, error=f"{type(error).__name__}: {error}",
        )
        with self._lock:
            self._calls.append(record)
            self._totals.calls += 1
            if cancelled:
                self._totals.cancelled += 1
            else:
                self._totals.errors += 1
        if self.metrics:
            self.metrics.active.dec()
            self.metrics.requests.labels("cancelled" if cancelled else "error").inc()
        return record

    def switch(self, data: dict[str, Any], run_id: UUID | str | None = None) -> bool:
        """Record one switch (a ``SwitchRecord.to_dict()``); the same switch seen twice counts once."""
        key = (data.get("model"), data.get("from_level"), data.get("to_level"), data.get("at"))
        entry = dict(data)
        if run_id is not None:
            entry["run_id"] = str(run_id)
        ok = bool(entry.get("ok", True))
        direction = entry.get("direction") or _direction(entry.get("from_level"), entry.get("to_level"))
        with self._lock:
            if key in self._seen_switches:
                return False
            if len(self._switch_keys) == self._switch_keys.maxlen:
                self._seen_switches.discard(self._switch_keys[0])
            self._switch_keys.append(key)
            self._seen_switches.add(key)
            self._switches.append(entry)
            bucket = direction if ok and direction in ("downgrade", "upgrade") else "failed"
            self._totals.switches[bucket] = self._totals.switches.get(bucket, 0) + 1
            if run_id is not None and str(run_id) in self._pending:
                self._pending[str(run_id)].switches += 1
        if self.metrics:
            self.metrics.switches.labels(direction or "unknown", "ok" if ok else "failed").inc()
            if ok and entry.get("model") and entry.get("to_level"):
                self.metrics.set_level(str(entry["model"]), str(entry["to_level"]))
        return True

    def observe_memory(self, used_percent: float, process_rss_bytes: Optional[int] = None) -> None:
        """Refresh the memory gauges from a live snapshot (a server does this on every scrape)."""
        if self.metrics:
            self.metrics.memory_used.set(round(used_percent, 3))
            if process_rss_bytes is not None:
                self.metrics.process_rss.set(process_rss_bytes)

    def observe_levels(self, models: Iterable[tuple[str, str]]) -> None:
        """Refresh the level gauges from (model name, level) pairs, e.g. a loader's cache."""
        if self.metrics:
            for model, level in models:
                self.metrics.set_level(model, level)

    # -- outputs --------------------------------------------------------------------------------
    def calls(self) -> list[CallRecord]:
        with self._lock:
            return list(self._calls)

    def switches(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(entry) for entry in self._switches]

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def summary(self) -> dict[str, Any]:
        """Totals since creation; latency percentiles over the calls still in the history."""
        with self._lock:
            totals = self._totals
            latencies = sorted(c.latency_s for c in self._calls if c.error is None)  # finished calls only
            switches = dict(totals.switches)
            return {
                "calls": totals.calls,
                "errors": totals.errors,
                "cancelled": totals.cancelled,
                "in_flight": len(self._pending),
                "switches": {"total": sum(switches.values()), **switches},
                "latency_p50_s": _round(nearest_rank(latencies, 0.50)),
                "latency_p95_s": _round(nearest_rank(latencies, 0.95)),
                "levels": dict(totals.levels),
                "tokens": {"input": totals.input_tokens, "output": totals.output_tokens},
                "history": {"calls": len(self._calls), "switches": len(self._switches), "max": self.max_history},
            }

    @property
    def registry(self) -> Any:
        return self.metrics.registry if self.metrics else None

    def prometheus_text(self) -> bytes:
        """Metrics in the Prometheus text format; empty when export is off."""
        if not self.metrics:
            return b""
        from prometheus_client import generate_latest

        return generate_latest(self.metrics.registry)


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 4)


def _direction(from_level: Any, to_level: Any) -> Optional[str]:
    """The direction of a switch event that did not carry one; None when a level is not one we know."""
    try:
        before, after = QuantizationLevel.parse(from_level), QuantizationLevel.parse(to_level)
    except InvalidValueError:
        return None
    return switch_direction(before, after)


def _prometheus_installed() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _first_message_data(response: LLMResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """(response_metadata, usage_metadata) of the first chat generation, or empty dicts."""
    for generations in response.generations:
        for generation in generations:
            message = getattr(generation, "message", None)
            if message is not None:
                usage = getattr(message, "usage_metadata", None) or {}
                return dict(message.response_metadata or {}), dict(usage)
    return {}, {}


def _model_name(serialized: Optional[dict[str, Any]], kwargs: dict[str, Any]) -> Optional[str]:
    params = kwargs.get("invocation_params") or {}
    name = params.get("model")
    if isinstance(name, str):
        return name
    return (serialized or {}).get("name") if serialized else None


class _TelemetryHooks:
    """What both handlers do: the recorder (own or shared), its read side, and the hook bodies.

    The hooks are plain methods; the sync handler uses them as they are and the async handler wraps
    each one in a coroutine (``_awaitable``), so the two cannot drift apart.
    """

    def __init__(
        self,
        recorder: Optional[TelemetryRecorder] = None,
        max_history: int = 1000,
        registry: Any = None,
        prometheus: Optional[bool] = None,
    ) -> None:
        super().__init__()
        self.recorder = recorder or TelemetryRecorder(max_history=max_history, registry=registry, prometheus=prometheus)

    # -- the recorder's read side, on the handler for convenience --------------------------------
    def summary(self) -> dict[str, Any]:
        return self.recorder.summary()

    def calls(self) -> list[CallRecord]:
        return self.recorder.calls()

    def switches(self) -> list[dict[str, Any]]:
        return self.recorder.switches()

    def prometheus_text(self) -> bytes:
        return self.recorder.prometheus_text()

    # -- hooks ------------------------------------------------------------------------------------
    def on_chat_model_start(self, serialized: dict[str, Any], messages: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.recorder.start(run_id, _model_name(serialized, kwargs))

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        self.recorder.start(run_id, _model_name(serialized, kwargs))

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self.recorder.end(run_id, response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.recorder.error(run_id, error)

    def on_custom_event(self, name: str, data: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if name == REQUANTIZE_EVENT and isinstance(data, dict):
            self.recorder.switch(data, run_id)


def _awaitable(hook: Callable[..., None]) -> Callable[..., Awaitable[None]]:
    """The async form of a sync hook: same body, run inline (it only takes a lock and appends)."""

    @functools.wraps(hook)
    async def run(self: Any, *args: Any, **kwargs: Any) -> None:
        hook(self, *args, **kwargs)

    return run


class QuantizationTelemetryHandler(_TelemetryHooks, BaseCallbackHandler):
    """Records every chat-model call and every precision switch it sees (sync callbacks).

    Attach it per call (``config={"callbacks": [handler]}``) or to the model (``callbacks=[...]``).
    Pass ``recorder=`` to share one history with an :class:`AsyncQuantizationTelemetryHandler`.
    """

    run_inline = True  # cheap, lock-protected work: no need for a thread hop in async runs


class AsyncQuantizationTelemetryHandler(_TelemetryHooks, AsyncCallbackHandler):
    """The async twin of :class:`QuantizationTelemetryHandler` (same recorder API, awaitable hooks)."""

    on_chat_model_start = _awaitable(_TelemetryHooks.on_chat_model_start)  # type: ignore[assignment]
    on_llm_start = _awaitable(_TelemetryHooks.on_llm_start)  # type: ignore[assignment]
    on_llm_end = _awaitable(_TelemetryHooks.on_llm_end)  # type: ignore[assignment]
    on_llm_error = _awaitable(_TelemetryHooks.on_llm_error)  # type: ignore[assignment]
    on_custom_event = _awaitable(_TelemetryHooks.on_custom_event)  # type: ignore[assignment]
