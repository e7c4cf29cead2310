"""DynamicQuantizationManager: probes + load tracker + policy -> a level, and when to switch to it.

The manager owns no model. It answers two questions for the loader and the chat model:
``calculate_optimal_quantization`` (what level would a model of this size get now?) and
``should_reoptimize`` (should this loaded model switch now, given its history?). The common path,
"keep the current level", costs one cached snapshot and a table look-up.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict

from langchain_adaptquant.control.capabilities import FixedLevels, LevelCatalog
from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority
from langchain_adaptquant.control.load_tracker import LoadTracker
from langchain_adaptquant.control.policy import (
    Decision,
    HysteresisState,
    PolicyConfig,
    PolicyInputs,
    after_switch,
    apply_hysteresis,
    decide,
    decision_table,
)
from langchain_adaptquant.control.resources import (
    GIB,
    CachedProbe,
    MemoryProbe,
    MemorySnapshot,
    SystemMemoryProbe,
    validate_budget_gb,
)
from langchain_adaptquant.control.sizing import ModelSize, size_of
from langchain_adaptquant.errors import InsufficientMemoryError, InvalidValueError

logger = logging.getLogger(__name__)


class QuantizationConfig(BaseModel):
    """The answer of ``calculate_optimal_quantization``: the documented JSON shape (docs/DYNAMIC_QUANTIZATION.md) plus the reason."""

    model_config = ConfigDict(frozen=True)

    level: QuantizationLevel
    precision: str
    compression_ratio: str
    estimated_memory_gb: float
    config: dict[str, Any]
    reason: str
    bits: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass(frozen=True)
class ServingFacts:
    """What the runtime measured about a loaded model that the policy weighs, as plain numbers.

    ``kv_resident_bytes``: its KV cache now (inside the measured memory); ``kv_reserved_bytes``: at
    its longest for the requests in flight and queued; ``quality``: its measured agreement with
    16-bit per level (its quality profile), for the priority's quality floor.
    """

    kv_resident_bytes: int = 0
    kv_reserved_bytes: int = 0
    quality: Mapping[QuantizationLevel, float] = field(default_factory=dict)


#: A model nothing is known about yet (a load's first decision, or a size asked about).
NO_FACTS = ServingFacts()


class ReoptimizeDecision(BaseModel):
    """Whether a loaded model should switch now; truthy when it should."""

    model_config = ConfigDict(frozen=True)

    switch: bool
    current_level: Optional[QuantizationLevel]
    target_level: QuantizationLevel
    reason: str
    projected_used_percent: float

    def __bool__(self) -> bool:
        return self.switch


@functools.lru_cache(maxsize=256)
def _level_bytes(size: ModelSize) -> dict[QuantizationLevel, int]:
    """Sizes per level are a pure function of the split; computing them once keeps decisions cheap."""
    return size.bytes_per_level()


class DynamicQuantizationManager:
    """Chooses levels from live memory, load, device and priority, with per-model hysteresis."""

    def __init__(
        self,
        probe: Optional[MemoryProbe] = None,
        tracker: Optional[LoadTracker] = None,
        policy: Optional[PolicyConfig] = None,
        device: Optional[str] = None,
        memory_budget_gb: Optional[float] = None,
        snapshot_ttl_s: float = 0.05,
        available_levels: Optional[Sequence[QuantizationLevel | str]] = None,
        default_model_size_params: float = 7.0,
        clock: Callable[[], float] = time.monotonic,
        catalog: Optional[LevelCatalog] = None,
    ) -> None:
        """``catalog`` says which levels this device offers and each level's backend settings
        (:func:`langchain_adaptquant.backends.registry.backend_catalog` for the installed backends);
        ``available_levels`` is the short form of a catalog of just those levels. With neither, the
        manager reasons from numbers alone: every level, no backend settings."""
        if catalog is not None and available_levels is not None:
            raise InvalidValueError(
                "available_levels", list(available_levels),
                "None when a catalog is given (the catalog says which levels there are)",
            )
        self.memory_budget_gb = validate_budget_gb(memory_budget_gb)
        base_probe = probe or SystemMemoryProbe(device=device, memory_budget_gb=self.memory_budget_gb)
        self.probe = CachedProbe(base_probe, ttl_s=snapshot_ttl_s, clock=clock)
        self.tracker = tracker or LoadTracker()
        self.policy = policy or PolicyConfig()
        self._clock = clock
        self.device = device or getattr(base_probe, "device", None) or "cpu"
        if catalog is None:
            catalog = FixedLevels(tuple(QuantizationLevel.parse(level) for level in available_levels)) \
                if available_levels is not None else FixedLevels()
        self.catalog: LevelCatalog = catalog
        self.available_levels = list(catalog.levels(self.device))
        if not self.available_levels:
            raise InvalidValueError("catalog", catalog, f"one offering at least one level on {self.device}")
        self.default_model_size = size_of(default_model_size_params)
        self._states: dict[str, HysteresisState] = {}
        self._states_lock = threading.Lock()
        self._sizes: dict[float, ModelSize] = {}
        # Objects are keyed by a weak reference (never by id(): a freed object's id is reused), where the
        # object allows one and is hashable (a model). Mappings and transformers configs (which compare
        # by value and do not hash) are sized afresh each call; pass a ModelSize to repeat cheaply.
        self._object_sizes: weakref.WeakKeyDictionary[Any, ModelSize] = weakref.WeakKeyDictionary()

    # -- inputs ---------------------------------------------------------------------------------
    def snapshot(self) -> MemorySnapshot:
        return self.probe()

    def model_size(self, model_size_params: Any = None) -> ModelSize:
        """Parameter split for a size argument (cached per number and per live module); None means
        the default size."""
        if model_size_params is None:
            return self.default_model_size
        if isinstance(model_size_params, ModelSize):
            return model_size_params
        if isinstance(model_size_params, (int, float)) and not isinstance(model_size_params, bool):
            size = self._sizes.get(model_size_params)
            if size is None:
                size = self._sizes[model_size_params] = size_of(model_size_params)
            return size
        try:
            size = self._object_sizes.get(model_size_params)
        except TypeError:  # unhashable, or no weak references to it
            return size_of(model_size_params)
        if size is None:
            size = self._object_sizes[model_size_params] = size_of(model_size_params)
        return size

    def _inputs(
        self,
        size: ModelSize,
        priority: TaskPriority,
        current_level: Optional[QuantizationLevel],
        current_bytes: Optional[int],
        active_requests: Optional[int],
        facts: ServingFacts,
    ) -> PolicyInputs:
        snap = self.snapshot()
        level_bytes = _level_bytes(size)
        if current_level is not None and current_bytes is None:
            current_bytes = level_bytes[current_level]
        return PolicyInputs(
            total_bytes=snap.model_total_bytes,
            used_bytes=snap.model_total_bytes - snap.model_available_bytes,
            active_requests=self.tracker.active if active_requests is None else active_requests,
            priority=priority,
            level_bytes=level_bytes,
            device=snap.device,
            current_level=current_level,
            current_bytes=current_bytes or 0,
            available_levels=self.available_levels,
            kv_resident_bytes=facts.kv_resident_bytes,
            kv_reserved_bytes=facts.kv_reserved_bytes,
            quality=dict(facts.quality),
        )

    # -- questions ------------------------------------------------------------------------------
    def decide(
        self,
        model_size_params: Any = None,
        task_priority: TaskPriority | str = TaskPriority.BALANCED,
        current_level: Optional[QuantizationLevel | str] = None,
        current_bytes: Optional[int] = None,
        active_requests: Optional[int] = None,
        facts: ServingFacts = NO_FACTS,
    ) -> Decision:
        """The policy's decision with the live snapshot and load; no hysteresis.

        ``facts``: what the runtime measured about the model (KV-cache bytes, quality per level).
        """
        priority = TaskPriority.parse(task_priority)
        level = QuantizationLevel.parse(current_level) if current_level is not None else None
        inputs = self._inputs(self.model_size(model_size_params), priority, level, current_bytes, active_requests, facts)
        return decide(inputs, self.policy)

    def calculate_optimal_quantization(
        self,
        model_size_params: Any = None,
        task_priority: TaskPriority | str = TaskPriority.BALANCED,
    ) -> QuantizationConfig:
        """Level for a model of this size (billions, a config, or a ModelSize) loaded now."""
        decision = self.decide(model_size_params, task_priority)
        level = decision.level
        return QuantizationConfig(
            level=level,
            precision=level.precision(self.device),
            compression_ratio=f"{level.compression_vs_fp32:.1f}x",
            estimated_memory_gb=round(decision.estimated_bytes / GIB, 3),
            config=self.catalog.settings(level, self.device),
            reason=decision.reason,
            bits=level.bits,
            device=self.device,
        )

    def should_reoptimize(
        self,
        current_level: QuantizationLevel | str,
        model_size_params: Any = None,
        task_priority: TaskPriority | str = TaskPriority.BALANCED,
        model_key: str = "default",
        current_bytes: Optional[int] = None,
        now: Optional[float] = None,
        facts: ServingFacts = NO_FACTS,
    ) -> ReoptimizeDecision:
        """Should the model at ``current_level`` switch now? Call :meth:`record_switch` once it did."""
        level = QuantizationLevel.parse(current_level)
        now = self._clock() if now is None else now
        try:
            decision = self.decide(model_size_params, task_priority, level, current_bytes, facts=facts)
        except InsufficientMemoryError as error:
            # The model is already resident: failing its requests would not free anything. Shrink it
            # to the smallest level at once and keep serving.
            smallest = self.available_levels[-1]
            reason = f"nothing fits ({error}); shrink to the smallest level {smallest.value} and keep serving"
            with self._states_lock:
                self._states[model_key] = replace(
                    self._states.get(model_key) or HysteresisState(level=level), level=level, upgrade_blocked_at=now
                )
            logger.warning("%s: %s", model_key, reason)
            return ReoptimizeDecision(
                switch=smallest is not level, current_level=level, target_level=smallest, reason=reason,
                projected_used_percent=100.0,
            )
        with self._states_lock:
            state = self._states.get(model_key) or HysteresisState()
            if state.level is not level:  # the caller knows the model's level best; keep the timers
                state = replace(state, level=level)
            verdict = apply_hysteresis(decision, state, now, self.policy)
            self._states[model_key] = verdict.state
        if verdict.switch:
            logger.info("reoptimize %s: %s -> %s (%s)", model_key, level.value, decision.level.value, verdict.reason)
        return ReoptimizeDecision(
            switch=verdict.switch,
            current_level=level,
            target_level=decision.level,
            reason=verdict.reason,
            projected_used_percent=round(decision.projected_used_percent, 2),
        )

    def record_switch(self, model_key: str, level: QuantizationLevel | str, now: Optional[float] = None) -> None:
        """A model reached ``level`` (initial load or switch): starts its cooldown."""
        level = QuantizationLevel.parse(level)
        now = self._clock() if now is None else now
        with self._states_lock:
            self._states[model_key] = after_switch(self._states.get(model_key, HysteresisState()), level, now)
        self.probe.invalidate()

    def forget(self, model_key: str) -> None:
        """Drop a model's hysteresis state (it was evicted)."""
        with self._states_lock:
            self._states.pop(model_key, None)

    def get_status(
        self,
        model_size_params: Any = None,
        current_models: Iterable[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """The documented status JSON: device, load, memory, recommended level, models and thresholds."""
        snap = self.snapshot()
        load = self.tracker.stats()
        try:
            decision = self.decide(model_size_params)
            recommended: Optional[str] = decision.level.value
            recommendation_reason = decision.reason
        except MemoryError as error:
            recommended, recommendation_reason = None, str(error)
        return {
            "device": self.device,
            "active_requests": load.active,
            "memory": snap.to_dict(),
            "recommended_level": recommended,
            "recommendation_reason": recommendation_reason,
            "recommended_for_params_b": round(self.model_size(model_size_params).params_billions, 3),
            "available_levels": [level.value for level in self.available_levels],
            "current_models": list(current_models),
            "load": load.to_dict(),
            "thresholds": self.policy.model_dump(mode="json"),
            "decision_matrix": decision_table(self.policy),
        }

