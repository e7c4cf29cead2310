"""Replay a timeline of (memory used %, requests in flight) through the real decision engine.

The documented re-optimization example (``docs/DYNAMIC_QUANTIZATION.md``, section 2, the decision
matrix and its timeline) is such a timeline. Replaying it through the manager, with a
scripted probe and real load-tracker slots, shows what the engine does with it; the demo prints it
and a test pins it down.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Iterable, Optional

from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority, switch_direction
from langchain_adaptquant.control.manager import DynamicQuantizationManager
from langchain_adaptquant.control.resources import GIB, ScriptedProbe

#: The documented 10:00-11:00 example (docs/DYNAMIC_QUANTIZATION.md, section 2): (clock, memory used %, requests in flight), fifteen minutes apart.
EXAMPLE_TIMELINE: tuple[tuple[str, float, int], ...] = (
    ("10:00", 35.0, 1),
    ("10:15", 48.0, 3),
    ("10:30", 68.0, 5),
    ("10:45", 42.0, 2),
    ("11:00", 32.0, 0),
)

#: Host the replay assumes. With honest sizes a 7B model is 13 GiB at 16-bit; the example's
#: percentages let it load at FP16 (projected < 40%) only on a host where that is a small share.
EXAMPLE_HOST_GB = 512.0


@dataclass(frozen=True)
class ReplayRow:
    clock: str
    used_percent: float
    requests: int
    level: QuantizationLevel
    size_gb: float
    action: str
    reason: str


def replay(
    timeline: Iterable[tuple[str, float, int]] = EXAMPLE_TIMELINE,
    model_size_params: float = 7.0,
    task_priority: TaskPriority | str = TaskPriority.BALANCED,
    total_gb: float = EXAMPLE_HOST_GB,
    step_s: float = 900.0,
    manager: Optional[DynamicQuantizationManager] = None,
    probe: Optional[ScriptedProbe] = None,
) -> list[ReplayRow]:
    """Run each step through ``calculate_optimal_quantization`` (first) or ``should_reoptimize``."""
    if probe is None:
        probe = ScriptedProbe(total_gb=total_gb)
    if manager is None:
        manager = DynamicQuantizationManager(
            probe=probe, snapshot_ttl_s=0.0, available_levels=list(QuantizationLevel)
        )
    sizes = manager.model_size(model_size_params).bytes_per_level()
    rows: list[ReplayRow] = []
    level: Optional[QuantizationLevel] = None
    for step, (clock, used, requests) in enumerate(timeline):
        now = step * step_s
        probe.set(used)
        with ExitStack() as in_flight:
            for _ in range(requests):
                in_flight.enter_context(manager.tracker.track())
            if level is None:
                config = manager.calculate_optimal_quantization(model_size_params, task_priority)
                level, action, reason = config.level, "initial load", config.reason
                manager.record_switch("replay", level, now=now)
            else:
                verdict = manager.should_reoptimize(level, model_size_params, task_priority, "replay", now=now)
                if verdict.switch:
                    direction = switch_direction(level, verdict.target_level)  # a switch: down or up
                    level, action = verdict.target_level, f"{direction}d"
                    manager.record_switch("replay", level, now=now)
                else:
                    action = "kept"
                reason = verdict.reason
        rows.append(ReplayRow(clock, used, requests, level, sizes[level] / GIB, action, reason))
    return rows
