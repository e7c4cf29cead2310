"""The decision: which level a model should have, as pure functions of what was measured.

Two steps, both free of clocks and I/O so they can be tested as tables:

1. :func:`decide` maps (memory, load, priority, device levels, model sizes) to a level. Memory is
   *projected*: for each candidate level it is the memory the system would use with the model at
   that level (``used - current model bytes + candidate bytes``). Without projection a downgrade
   frees memory, the freed memory asks for an upgrade, and the model oscillates. The KV cache of
   the requests in flight and queued is projected the same way: what it holds now is inside
   ``used``, what it will hold at their longest is added (``- kv resident + kv reserved``).
2. :func:`apply_hysteresis` decides whether to act on that level now, given when the model last
   switched: downgrades forced by memory happen at once, downgrades asked for only by load or
   priority wait until the load has persisted, and upgrades wait for a cooldown and need a margin.

Quality floors: each priority has a minimum top-1 agreement with 16-bit
(:attr:`PolicyConfig.quality_floors`). A level whose *measured* agreement
(``PolicyInputs.quality``, from the model's quality profile) is below the floor is taken only when
memory forces it, i.e. when no more precise level that meets the floor fits and is allowed by the
memory band alone (the matrix cell at that memory with no load). Otherwise the least precise such
level is taken instead, and the reason names the measured figure either way. Levels not measured
are not judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from langchain_adaptquant.control.levels import (
    LEVELS_BY_PRECISION,
    QuantizationLevel,
    SwitchDirection,
    TaskPriority,
    switch_direction,
)
from langchain_adaptquant.errors import InsufficientMemoryError
from langchain_adaptquant.units import GIB

FP16, INT8, INT4, INT2 = (
    QuantizationLevel.FP16,
    QuantizationLevel.INT8,
    QuantizationLevel.INT4,
    QuantizationLevel.INT2,
)

MEMORY_BAND_NAMES = ("relaxed", "moderate", "tight", "critical", "emergency")
LOAD_BAND_NAMES = ("idle", "light", "busy", "saturated")
PRIORITIES = (TaskPriority.QUALITY, TaskPriority.BALANCED, TaskPriority.SPEED)

# DECISION_MATRIX[memory band][load band] = (quality, balanced, speed).
# Rows of the documented decision matrix (docs/DYNAMIC_QUANTIZATION.md, section 2) are marked
# (documented); the rest are ours, chosen so precision never rises with
# memory or load and quality >= balanced >= speed in every cell (the tests check both).
DECISION_MATRIX: tuple[tuple[tuple[QuantizationLevel, ...], ...], ...] = (
    # relaxed: used < 40%
    (
        (FP16, FP16, INT8),  # idle (< 2 requests): quality FP16 (documented)
        (FP16, INT8, INT4),  # light (2-5): balanced INT8 (documented)
        (INT8, INT4, INT4),  # busy (6-9)
        (INT8, INT4, INT4),  # saturated (>= 10)
    ),
    # moderate: 40-60%
    (
        (INT8, INT8, INT4),  # idle: quality INT8 (documented)
        (INT8, INT4, INT4),  # light: balanced INT4 (documented)
        (INT4, INT4, INT4),
        (INT4, INT4, INT4),
    ),
    # tight: 60-75%: INT4 for any load and priority (documented)
    ((INT4,) * 3, (INT4,) * 3, (INT4,) * 3, (INT4,) * 3),
    # critical: 75-85%: INT4 below 10 requests (documented), INT2 from 10 on
    ((INT4,) * 3, (INT4,) * 3, (INT4,) * 3, (INT2,) * 3),
    # emergency: > 85%: INT2 for everything (documented)
    ((INT2,) * 3, (INT2,) * 3, (INT2,) * 3, (INT2,) * 3),
)


class PolicyConfig(BaseModel):
    """Thresholds of the decision matrix and of the hysteresis, validated on construction."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    memory_bands: tuple[float, float, float, float] = Field(
        (40.0, 60.0, 75.0, 85.0),
        description="Used-percent edges between relaxed/moderate/tight/critical/emergency, increasing.",
    )
    load_bands: tuple[int, int, int] = Field(
        (2, 6, 10), description="Requests in flight where idle/light/busy/saturated begin, increasing."
    )
    headroom_percent: float = Field(5.0, ge=0, lt=50, description="Share of memory a level must leave free.")
    min_headroom_gb: float = Field(0.25, ge=0, description="Free memory kept at least, in GiB.")
    upgrade_margin_percent: float = Field(
        5.0, ge=0, lt=50, description="An upgrade must still hold with this much more memory used."
    )
    upgrade_cooldown_s: float = Field(
        60.0, ge=0, description="Seconds since the last switch and since conditions were last bad before an upgrade."
    )
    load_downgrade_delay_s: float = Field(
        10.0, ge=0, description="How long a downgrade asked for only by load/priority must persist."
    )
    quality_floors: tuple[float, float, float] = Field(
        (0.97, 0.93, 0.85),
        description="Minimum measured top-1 agreement with 16-bit for quality, balanced and speed priority; "
        "a level below it is used only when memory forces it.",
    )

    @field_validator("quality_floors")
    @classmethod
    def _floors_in_order(cls, floors: tuple[float, ...]) -> tuple[float, ...]:
        if any(not math.isfinite(f) or not 0.0 <= f <= 1.0 for f in floors) or not floors[0] >= floors[1] >= floors[2]:
            raise ValueError(
                f"quality_floors {floors!r} must be three agreements in [0, 1] for quality >= balanced >= speed"
            )
        return floors

    def quality_floor(self, priority: TaskPriority) -> float:
        """The minimum measured agreement a level needs at ``priority`` unless memory forces it."""
        return self.quality_floors[PRIORITIES.index(priority)]

    @field_validator("memory_bands")
    @classmethod
    def _memory_bands_in_order(cls, bands: tuple[float, ...]) -> tuple[float, ...]:
        if any(not math.isfinite(b) for b in bands) or not all(0 < a < b < 100 for a, b in zip(bands, bands[1:])):
            raise ValueError(
                f"memory_bands {bands!r} must be four finite percentages strictly increasing within (0, 100)"
            )
        return bands

    @field_validator("load_bands")
    @classmethod
    def _load_bands_in_order(cls, bands: tuple[int, ...]) -> tuple[int, ...]:
        if bands[0] < 1 or not all(a < b for a, b in zip(bands, bands[1:])):
            raise ValueError(f"load_bands {bands!r} must be three request counts >= 1, strictly increasing")
        return bands

    @property
    def pressure_percent(self) -> float:
        """From here up memory alone sets the level (the matrix ignores load), so downgrades are urgent."""
        return self.memory_bands[1]


def memory_band(used_percent: float, config: PolicyConfig) -> int:
    return sum(used_percent >= edge for edge in config.memory_bands)


def load_band(active_requests: int, config: PolicyConfig) -> int:
    return sum(active_requests >= edge for edge in config.load_bands)


def matrix_level(
    used_percent: float, active_requests: int, priority: TaskPriority, config: PolicyConfig
) -> QuantizationLevel:
    """The matrix cell for these conditions, ignoring sizes and availability."""
    row = DECISION_MATRIX[memory_band(used_percent, config)][load_band(active_requests, config)]
    return row[PRIORITIES.index(priority)]


@dataclass(frozen=True)
class PolicyInputs:
    """Everything a decision depends on; the current model's bytes are inside ``used_bytes``."""

    total_bytes: int
    used_bytes: int
    active_requests: int
    priority: TaskPriority
    level_bytes: Mapping[QuantizationLevel, int]
    device: str = "cpu"
    current_level: Optional[QuantizationLevel] = None
    current_bytes: int = 0  # bytes the model holds now (0 when not loaded)
    available_levels: Sequence[QuantizationLevel] = LEVELS_BY_PRECISION
    #: KV cache the model's engine holds now (already inside ``used_bytes``) ...
    kv_resident_bytes: int = 0
    #: ... and what the requests in flight and queued will hold at their longest (prompt + max tokens).
    kv_reserved_bytes: int = 0
    #: Measured top-1 agreement with 16-bit per level (the model's quality profile); absent = not measured.
    quality: Mapping[QuantizationLevel, float] = field(default_factory=dict)

    def projected_used_bytes(self, level: QuantizationLevel) -> int:
        kv = self.kv_reserved_bytes - self.kv_resident_bytes
        return self.used_bytes - self.current_bytes + self.level_bytes[level] + kv

    def projected_percent(self, level: QuantizationLevel) -> float:
        return 100.0 * self.projected_used_bytes(level) / self.total_bytes

    def headroom_bytes(self, config: PolicyConfig) -> int:
        return int(max(config.min_headroom_gb * GIB, self.total_bytes * config.headroom_percent / 100.0))

    def fits(self, level: QuantizationLevel, config: PolicyConfig) -> bool:
        return self.projected_used_bytes(level) <= self.total_bytes - self.headroom_bytes(config)


@dataclass(frozen=True)
class Decision:
    """The level the policy wants, why, and the numbers behind it."""

    level: QuantizationLevel
    reason: str
    inputs: PolicyInputs = field(repr=False)
    projected_used_percent: float
    estimated_bytes: int

    @property
    def direction(self) -> SwitchDirection:
        return switch_direction(self.inputs.current_level, self.level)


def _describe(inputs: PolicyInputs, percent: float, config: PolicyConfig) -> str:
    kv = f" (KV cache {inputs.kv_reserved_bytes / 2**20:.1f} MB)" if inputs.kv_reserved_bytes else ""
    return (
        f"{MEMORY_BAND_NAMES[memory_band(percent, config)]} memory ({percent:.1f}% projected{kv}), "
        f"{inputs.active_requests} request(s) in flight, {inputs.priority.value} priority"
    )


def decide(inputs: PolicyInputs, config: PolicyConfig = PolicyConfig()) -> Decision:
    """Most precise available level whose matrix cell, at its own projected memory, allows it and fits.

    Levels above the current one must hold with ``upgrade_margin_percent`` more memory used, so a
    model that just downgraded does not qualify for an upgrade on the memory it freed.
    Raises :class:`InsufficientMemoryError` when not even the smallest available level fits.
    """
    candidates = [level for level in LEVELS_BY_PRECISION if level in set(inputs.available_levels)]
    if not candidates:
        raise ValueError(f"no quantization level is available on device {inputs.device!r}")
    current = inputs.current_level
    for level in candidates:
        percent = inputs.projected_percent(level)
        judged = percent
        if current is not None and level.rank > current.rank:
            judged += config.upgrade_margin_percent
        cell = matrix_level(judged, inputs.active_requests, inputs.priority, config)
        if cell.rank >= level.rank and inputs.fits(level, config):
            reason = f"{_describe(inputs, percent, config)} -> {level.value}"
            return _apply_quality_floor(Decision(level, reason, inputs, percent, inputs.level_bytes[level]), candidates, config)
    smallest = candidates[-1]
    percent = inputs.projected_percent(smallest)
    if inputs.fits(smallest, config):
        wanted = matrix_level(percent, inputs.active_requests, inputs.priority, config)
        reason = (
            f"{_describe(inputs, percent, config)} asks for {wanted.value}, which has no backend on "
            f"{inputs.device}; nearest available level {smallest.value}"
        )
        return Decision(smallest, reason, inputs, percent, inputs.level_bytes[smallest])
    headroom = inputs.headroom_bytes(config)
    raise InsufficientMemoryError(
        required_gb=inputs.level_bytes[smallest] / GIB,
        available_gb=(inputs.total_bytes - inputs.used_bytes + inputs.current_bytes) / GIB,
        headroom_gb=headroom / GIB,
        level=smallest.value,
    )


def _memory_allows(inputs: PolicyInputs, level: QuantizationLevel, config: PolicyConfig) -> bool:
    """Whether memory alone (the matrix cell with no load, and the headroom) allows ``level``."""
    judged = inputs.projected_percent(level)
    if inputs.current_level is not None and level.rank > inputs.current_level.rank:
        judged += config.upgrade_margin_percent
    cell = matrix_level(judged, 0, inputs.priority, config)
    return cell.rank >= level.rank and inputs.fits(level, config)


def _apply_quality_floor(decision: Decision, candidates: Sequence[QuantizationLevel], config: PolicyConfig) -> Decision:
    """Refuse a level measured below the priority's floor unless memory forces it (see the module docstring)."""
    inputs, level = decision.inputs, decision.level
    measured = inputs.quality.get(level)
    floor = config.quality_floor(inputs.priority)
    if measured is None or measured >= floor:
        return decision
    below = (f"{level.value} is below the {inputs.priority.value} quality floor {floor:g} "
             f"(measured top-1 agreement {measured:.3f})")
    better = [c for c in reversed(candidates) if c.rank > level.rank]  # least precise first
    for alternative in better:
        known = inputs.quality.get(alternative)
        if known is not None and known < floor:
            continue
        if _memory_allows(inputs, alternative, config):
            percent = inputs.projected_percent(alternative)
            quality = f"measured {known:.3f}" if known is not None else "not measured"
            reason = (f"{_describe(inputs, percent, config)} -> {alternative.value}: {below} and memory does not "
                      f"force it, so {alternative.value} ({quality})")
            return Decision(alternative, reason, inputs, percent, inputs.level_bytes[alternative])
    return replace(decision, reason=f"{decision.reason}: {below}, used because memory forces it")


@dataclass(frozen=True)
class HysteresisState:
    """Per-model memory of past decisions: the only state the policy needs."""

    level: Optional[QuantizationLevel] = None
    last_switch_at: float = -math.inf
    upgrade_blocked_at: float = -math.inf  # last time conditions did not allow an upgrade
    soft_downgrade_since: Optional[float] = None  # when a load-only downgrade was first asked for


@dataclass(frozen=True)
class HysteresisVerdict:
    switch: bool
    reason: str
    state: HysteresisState  # the state to keep if the caller does not switch


def apply_hysteresis(
    decision: Decision, state: HysteresisState, now: float, config: PolicyConfig = PolicyConfig()
) -> HysteresisVerdict:
    """Whether to act on ``decision`` now. Pure: returns the next state instead of mutating."""
    current = state.level
    target = decision.level
    if current is None:
        return HysteresisVerdict(True, f"initial load: {decision.reason}", state)
    if target is current:
        kept = replace(state, upgrade_blocked_at=now, soft_downgrade_since=None)
        return HysteresisVerdict(False, f"keep {current.value}: {decision.reason}", kept)
    if target.rank < current.rank:
        blocked = replace(state, upgrade_blocked_at=now)
        inputs = decision.inputs
        current_percent = inputs.projected_percent(current)
        if current_percent >= config.pressure_percent or not inputs.fits(current, config):
            return HysteresisVerdict(
                True,
                f"memory pressure ({current_percent:.1f}% used at {current.value}, "
                f">= {config.pressure_percent:g}%): downgrade at once: {decision.reason}",
                blocked,
            )
        since = state.soft_downgrade_since if state.soft_downgrade_since is not None else now
        waited = now - since
        if waited >= config.load_downgrade_delay_s:
            return HysteresisVerdict(
                True, f"load persisted {waited:.0f}s: downgrade: {decision.reason}", replace(blocked, soft_downgrade_since=since)
            )
        return HysteresisVerdict(
            False,
            f"keep {current.value}: {target.value} asked for by load, not memory; waiting "
            f"{config.load_downgrade_delay_s:g}s for it to persist ({waited:.0f}s so far): {decision.reason}",
            replace(blocked, soft_downgrade_since=since),
        )
    calm_since = max(state.last_switch_at, state.upgrade_blocked_at)
    pending = replace(state, soft_downgrade_since=None)
    if now - calm_since >= config.upgrade_cooldown_s:
        return HysteresisVerdict(True, f"upgrade after {config.upgrade_cooldown_s:g}s cooldown: {decision.reason}", pending)
    return HysteresisVerdict(
        False,
        f"keep {current.value}: {target.value} possible, cooling down "
        f"({now - calm_since:.0f}s of {config.upgrade_cooldown_s:g}s): {decision.reason}",
        pending,
    )


def after_switch(state: HysteresisState, level: QuantizationLevel, now: float) -> HysteresisState:
    """State once a switch to ``level`` has completed."""
    return HysteresisState(level=level, last_switch_at=now, upgrade_blocked_at=now, soft_downgrade_since=None)


def decision_table(config: PolicyConfig = PolicyConfig()) -> list[dict[str, str]]:
    """Every cell of the matrix with its band limits, for docs, the CLI and the status endpoint."""
    mem_edges = (0.0, *config.memory_bands, 100.0)
    load_edges = (0, *config.load_bands, None)
    rows = []
    for m, band in enumerate(DECISION_MATRIX):
        for n, cell in enumerate(band):
            low, high = load_edges[n], load_edges[n + 1]
            load_text = f">= {low}" if high is None else (f"< {high}" if low == 0 else f"{low}-{high - 1}")
            rows.append(
                {
                    "memory": f"{mem_edges[m]:g}-{mem_edges[m + 1]:g}%",
                    "memory_band": MEMORY_BAND_NAMES[m],
                    "requests": load_text,
                    **{p.value: cell[i].value for i, p in enumerate(PRIORITIES)},
                }
            )
    return rows
