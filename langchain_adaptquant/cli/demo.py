"""The live demo: the documented 10:00-11:00 timeline (docs/DYNAMIC_QUANTIZATION.md) played against a real model, with real switches.

Memory follows the timeline's percentages through a :class:`ScriptedProbe` (we cannot make the machine
actually fill up on cue), time runs on a virtual clock (fifteen minutes per step, so hysteresis
timers behave as in the example without waiting an hour), and load is real: each step starts its
requests in threads that arrive together, so the manager sees them in flight when it decides.
Everything else is real: the chat model generates, the loader requantizes layer by layer, and the
table reports measured switch times and stored bytes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from langchain_adaptquant.callbacks import QuantizationTelemetryHandler
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.control.levels import TaskPriority
from langchain_adaptquant.control.replay import EXAMPLE_TIMELINE
from langchain_adaptquant.control.resources import ScriptedProbe, process_memory
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader, LoadedModel, SwitchRecord, serving_manager
from langchain_adaptquant.runtime.weights import resolve_model_folder
from langchain_adaptquant.units import MIB as MB

#: Questions the reference model was trained around (the standard library's documentation).
PROMPTS = (
    "What does list.append do?",
    "Explain dict.get in one sentence.",
    "What is a tuple?",
    "How do I read a file line by line?",
    "What does str.split return?",
)
#: Questions for a real instruction-tuned model: short, with answers anyone can check.
CHAT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Name the three primary colors.",
    "What does a CPU do? Answer in one sentence.",
    "Give one synonym for the word happy.",
    "How many days are in a week?",
)


def prompts_for(folder: Path) -> tuple[str, ...]:
    """Docstring questions for the embedded reference model, everyday questions for any other model."""
    from langchain_adaptquant.assets import reference_model_path

    return PROMPTS if folder.resolve() == reference_model_path().resolve() else CHAT_PROMPTS



class VirtualClock:
    """A clock the demo moves by hand: hysteresis sees minutes pass in milliseconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _ArrivalGate:
    """A runtime's loader whose callers wait for each other before deciding, so a step's requests arrive
    together.

    The chat model counts a request in flight before it asks the loader, so when the gate opens the
    manager sees every request of the step: the decision depends on the scripted load, not on
    which thread the scheduler ran first. Everything else goes to the wrapped loader.
    """

    def __init__(self, loader: Any) -> None:
        self.inner = loader
        self.gate: Optional[threading.Barrier] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def load_model(self, *args: Any, **kwargs: Any) -> LoadedModel:
        gate = self.gate
        if gate is not None:
            gate.wait(timeout=60)
        return self.inner.load_model(*args, **kwargs)


def _demo_loader(folder: Path, probe: ScriptedProbe, clock: "VirtualClock", runtime: str) -> tuple[Any, str]:
    """The loader of the runtime ``runtime`` picks for ``folder`` (llama.cpp for a pulled GGUF on a CPU)."""
    from langchain_adaptquant.chat_model import _default_device
    from langchain_adaptquant.runtime.registry import choose_runtime

    choice = choose_runtime(runtime, str(folder), _default_device())
    if choice.name == "llamacpp":
        from langchain_adaptquant.control.manager import DynamicQuantizationManager
        from langchain_adaptquant.runtime.llamacpp.loader import LlamaCppLoader

        manager = DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0.0, clock=clock, device="cpu")
        return LlamaCppLoader(manager=manager, show_progress=False), choice.name
    manager = serving_manager(probe=probe, snapshot_ttl_s=0.0, clock=clock)
    return AdaptiveModelLoader(manager=manager, show_progress=False), choice.name


@dataclass
class DemoRow:
    clock: str
    used_percent: float
    requests: int
    in_flight: int  # requests the manager saw in flight when it decided
    level: str
    stored_mb: float
    rss_mb: float
    action: str
    reason: str
    switch_seconds: Optional[float]
    tokens: int
    seconds: float
    sample: str
    question: str = ""
    answer: str = ""


@dataclass
class DemoResult:
    model: str
    runtime: str = "torch"
    rows: list[DemoRow] = field(default_factory=list)
    switches: list[SwitchRecord] = field(default_factory=list)
    telemetry: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _sample(text: str, width: int = 36) -> str:
    flat = " ".join(text.split())
    printable = "".join(ch for ch in flat if ch.isprintable() and ch != "\ufffd")
    return printable if len(printable) <= width else printable[: width - 1] + "…"


def _action(switched: Sequence[SwitchRecord], first: bool) -> str:
    if first:
        return "initial load"
    ok = [record for record in switched if record.ok]
    if ok:
        return "downgraded" if ok[-1].direction == "downgrade" else "upgraded"
    if any(not record.ok for record in switched):
        return "switch failed, kept"
    return "kept"


def run_demo(
    model: str | Path,
    task_priority: TaskPriority | str = TaskPriority.BALANCED,
    timeline: Sequence[tuple[str, float, int]] = EXAMPLE_TIMELINE,
    total_gb: float = 16.0,
    max_tokens: int = 16,
    step_s: float = 900.0,
    on_row: Optional[Callable[[DemoRow], None]] = None,
    runtime: str = "auto",
) -> DemoResult:
    """Play ``timeline`` (clock, memory used %, requests) against ``model``; ``on_row`` sees each step as it ends.

    ``runtime`` as in ``ChatAdaptQuant``: "auto" serves a pulled GGUF on llama.cpp on a CPU."""
    folder = resolve_model_folder(model)  # a folder or a pulled catalog name; a clear error otherwise
    prompts = prompts_for(folder)
    priority = TaskPriority.parse(task_priority)
    started = time.perf_counter()
    clock = VirtualClock()
    probe = ScriptedProbe(total_gb=total_gb, used_percent=timeline[0][1])
    inner, runtime_name = _demo_loader(folder, probe, clock, runtime)
    loader = _ArrivalGate(inner)
    handler = QuantizationTelemetryHandler(prometheus=False)
    llm = ChatAdaptQuant(model=str(folder), loader=loader, max_tokens=max_tokens, task_priority=priority)
    result = DemoResult(model=str(folder), runtime=runtime_name)
    for step, (clock_label, used, requests) in enumerate(timeline):
        clock.now = step * step_s
        probe.set(used)
        loaded = loader.get(folder)
        switches_before = len(loaded.switches) if loaded else 0
        step_started = time.perf_counter()
        answers: list[Any] = []
        in_flight = 0
        if requests > 0:
            answers, in_flight = _ask_together(llm, loader, handler, requests, step, prompts)
            loaded = loader.get(folder)
            reason = loaded.last_decision_reason if loaded else ""
        else:
            # nobody asks: an idle re-check, as a server's maintenance tick would do
            record = loader.reoptimize(loaded, priority) if loaded else None
            reason = loaded.last_decision_reason if loaded else "no model loaded"
            if record is not None:
                handler.recorder.switch(record.to_dict())
        if loaded is None:
            raise RuntimeError(f"model {folder} was not loaded by step {clock_label}")
        switched = loaded.switches[switches_before:]
        rss, _ = process_memory()
        row = DemoRow(
            clock=clock_label,
            used_percent=used,
            requests=requests,
            in_flight=in_flight,
            level=loaded.level.value,
            stored_mb=round(loaded.stored_bytes / MB, 2),
            rss_mb=round(rss / MB, 1),
            action=_action(switched, first=step == 0),
            reason=reason,
            switch_seconds=round(sum(r.seconds for r in switched), 3) if switched else None,
            tokens=sum((a.usage_metadata or {}).get("output_tokens", 0) for a in answers),
            seconds=round(time.perf_counter() - step_started, 2),
            sample=_sample(answers[0].content) if answers else "",
            question=prompts[step % len(prompts)] if answers else "",
            answer=" ".join(answers[0].content.split()) if answers else "",
        )
        result.rows.append(row)
        result.switches.extend(switched)
        if on_row is not None:
            on_row(row)
    result.telemetry = handler.summary()
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _ask_together(llm: ChatAdaptQuant, loader: _ArrivalGate, handler: QuantizationTelemetryHandler,
                  requests: int, step: int, prompts: Sequence[str]) -> tuple[list[Any], int]:
    """Send ``requests`` chats at once from threads; the answers in order, and how many were in flight."""
    answers: list[Any] = [None] * requests
    errors: list[BaseException] = []
    seen: list[int] = []
    tracker = loader.manager.tracker
    loader.gate = threading.Barrier(requests, action=lambda: seen.append(tracker.active))

    def ask(index: int) -> None:
        prompt = prompts[(step + index) % len(prompts)]
        try:
            answers[index] = llm.invoke(prompt, config={"callbacks": [handler]})
        except BaseException as error:  # noqa: BLE001 - reported once all threads are done
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,), name=f"demo-request-{i}") for i in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loader.gate = None
    if errors:
        raise errors[0]
    return answers, (seen[0] if seen else 0)


# -- presentation --------------------------------------------------------------------------------
#: The live table fits a 100-column terminal; each step's reason and answer follow it as lines.
COLUMNS = ("time", "memory", "asked", "in flight", "level", "weights MB", "RSS MB", "action", "switch s", "tokens",
           "step s")


def row_cells(row: DemoRow) -> list[str]:
    return [
        row.clock, f"{row.used_percent:.0f}%", str(row.requests), str(row.in_flight), row.level.upper(),
        f"{row.stored_mb:.2f}", f"{row.rss_mb:.0f}", row.action,
        "" if row.switch_seconds is None else f"{row.switch_seconds:.2f}", str(row.tokens), f"{row.seconds:.2f}",
    ]


def render(result_rows: Sequence[DemoRow], title: str) -> Any:
    """A rich Table of the rows so far."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", padding=(0, 0))
    for column in COLUMNS:
        table.add_column(column, overflow="fold", no_wrap=True)
    for row in result_rows:
        style = {"downgraded": "bold red", "upgraded": "bold green"}.get(row.action)
        table.add_row(*row_cells(row), style=style)
    return table


def progress_line(row: DemoRow) -> str:
    """One step in one line, for output that is not a terminal."""
    switch = f", switch {row.switch_seconds:.2f}s" if row.switch_seconds is not None else ""
    return (f"{row.clock}  memory {row.used_percent:.0f}%  {row.requests} request(s), {row.in_flight} in flight  "
            f"-> {row.level.upper()} ({row.action}{switch})  {row.tokens} tokens in {row.seconds:.2f}s")


def transcript_lines(rows: Sequence[DemoRow]) -> list[str]:
    """Each step's first question and its whole answer, with the level it was produced at."""
    return [f"{row.clock} [{row.level}] why: {row.reason}" + (f"\n      Q: {row.question}\n      A: {row.answer}"
                                                             if row.question else "") for row in rows]


def switch_lines(switches: Sequence[SwitchRecord]) -> list[str]:
    lines = []
    for record in switches:
        lines.append(
            f"{record.from_level} -> {record.to_level} ({record.direction}{'' if record.ok else ', FAILED'}) in "
            f"{record.seconds:.2f}s: stored {record.stored_bytes_before / MB:.2f} -> {record.stored_bytes_after / MB:.2f} MB, "
            f"RSS {record.rss_before / MB:.0f} -> {record.rss_after / MB:.0f} MB"
        )
    return lines
