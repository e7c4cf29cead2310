"""Many concurrent requests while memory swings and the model switches levels under them.

    python -m benchmarks.stress [--model PATH] [--requests 600] [--threads 8] [--tasks 8]

Thread clients call ``invoke`` and asyncio clients ``ainvoke`` on one ChatAdaptQuant while a
scripted probe swings memory through the policy's bands, so switches happen mid-run. All of them
share the model's one generation engine, which decodes every request in flight as one batch and
switches between steps. Every request must end in a response or a typed error; greedy answers
produced at one level (``levels_used`` has one entry) must equal a reference answer at that level,
computed one request at a time (the engine's answers do not depend on their batch company where
the kernels are row-invariant; see docs/DYNAMIC_QUANTIZATION.md). Prints a table and writes JSON.
The test suite runs the same ``run_load`` with fewer requests (tests/integration/test_reliability.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from benchmarks.common import RESULTS, machine_info, write_json
from langchain_adaptquant.control.resources import process_status

PROMPTS = (
    "What is a list?",
    "Explain dictionaries.",
    "How do I open a file?",
    "What does len return?",
    "Describe a tuple.",
)
SWING = (10.0, 70.0, 92.0, 30.0, 80.0, 15.0)  # used percent: relaxed, tight, emergency, relaxed, critical


@dataclass
class Outcome:
    client: str
    prompt: str
    ok: bool
    seconds: float
    level: Optional[str] = None
    content: Optional[str] = None
    switched_during_generation: bool = False
    levels_used: tuple[str, ...] = ()
    error_type: Optional[str] = None
    error: Optional[str] = None


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    switches: int = 0
    peak_rss_mb: float = 0.0
    seconds: float = 0.0

    def summary(self, expected_errors: tuple[type, ...] = ()) -> dict[str, Any]:
        latencies = sorted(o.seconds for o in self.outcomes if o.ok)
        levels: dict[str, int] = {}
        for o in self.outcomes:
            if o.level:
                levels[o.level] = levels.get(o.level, 0) + 1
        names = {e.__name__ for e in expected_errors}
        return {
            "requests": len(self.outcomes),
            "ok": sum(o.ok for o in self.outcomes),
            "typed_errors": sum(1 for o in self.outcomes if not o.ok and o.error_type in names),
            "unexpected_failures": sum(1 for o in self.outcomes if not o.ok and o.error_type not in names),
            "switches": self.switches,
            "switched_during_generation": sum(o.switched_during_generation for o in self.outcomes),
            "levels": levels,
            "p50_s": round(statistics.median(latencies), 4) if latencies else None,
            "p99_s": round(latencies[max(0, int(0.99 * len(latencies)) - 1)], 4) if latencies else None,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "seconds": round(self.seconds, 2),
        }


def _record(report: LoadReport, lock: threading.Lock, client: str, prompt: str, started: float,
            message: Any = None, error: Optional[BaseException] = None) -> None:
    seconds = time.perf_counter() - started
    if error is None:
        meta = message.response_metadata
        outcome = Outcome(client, prompt, True, seconds, meta["quantization_level"], message.content,
                          bool(meta.get("switched_during_generation")), tuple(meta.get("levels_used", ())))
    else:
        outcome = Outcome(client, prompt, False, seconds, error_type=type(error).__name__, error=str(error)[:200])
    with lock:
        report.outcomes.append(outcome)


def _peak_rss_mb() -> float:
    return process_status().peak_rss / 2**20


def run_load(llm: Any, probe: Any, requests: int = 200, threads: int = 8, tasks: int = 8,
             prompts: Sequence[str] = PROMPTS, swing: Sequence[float] = SWING, swing_every_s: float = 0.2) -> LoadReport:
    """Send ``requests`` requests from ``threads`` thread clients and ``tasks`` asyncio clients."""
    report = LoadReport()
    lock = threading.Lock()
    tickets = itertools.count()
    done = threading.Event()

    def next_prompt() -> Optional[str]:
        index = next(tickets)
        return prompts[index % len(prompts)] if index < requests else None

    def thread_client(name: str) -> None:
        while (prompt := next_prompt()) is not None:
            started = time.perf_counter()
            try:
                _record(report, lock, name, prompt, started, message=llm.invoke(prompt))
            except Exception as error:  # noqa: BLE001 - every outcome is recorded, typed or not
                _record(report, lock, name, prompt, started, error=error)

    async def async_clients() -> None:
        async def client(name: str) -> None:
            while (prompt := next_prompt()) is not None:
                started = time.perf_counter()
                try:
                    _record(report, lock, name, prompt, started, message=await llm.ainvoke(prompt))
                except Exception as error:  # noqa: BLE001
                    _record(report, lock, name, prompt, started, error=error)

        await asyncio.gather(*(client(f"task-{i}") for i in range(tasks)))

    def swinger() -> None:
        for used in itertools.cycle(swing):
            if done.wait(swing_every_s):
                return
            probe.set(used)

    started = time.perf_counter()
    workers = [threading.Thread(target=thread_client, args=(f"thread-{i}",)) for i in range(threads)]
    workers.append(threading.Thread(target=lambda: asyncio.run(async_clients())))
    swing_thread = threading.Thread(target=swinger, daemon=True)
    swing_thread.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    swing_thread.join()
    report.seconds = time.perf_counter() - started
    report.switches = sum(len(m.switches) for m in llm._loader().models())
    report.peak_rss_mb = _peak_rss_mb()
    return report


def reference_answers(llm: Any, levels: Sequence[str], prompts: Sequence[str] = PROMPTS) -> dict[str, dict[str, str]]:
    """Greedy answers per level, one request at a time, nothing switching meanwhile."""
    return {level: {p: llm.invoke(p, force_quantization=level).content for p in prompts} for level in levels}


def mismatches(report: LoadReport, reference: dict[str, dict[str, str]]) -> list[Outcome]:
    """Answers produced at one level (no switch between their steps) that differ from the reference."""
    return [
        o for o in report.outcomes
        if o.ok and not o.switched_during_generation and o.level in reference and reference[o.level][o.prompt] != o.content
    ]


def main(argv: Optional[list[str]] = None) -> None:
    from langchain_adaptquant import (
        ChatAdaptQuant,
        PolicyConfig,
        ScriptedProbe,
        reference_model_path,
        serving_manager,
    )
    from langchain_adaptquant.backends.registry import available_levels
    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

    parser = argparse.ArgumentParser(prog="python -m benchmarks.stress", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(reference_model_path()))
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--budget-gb", type=float, default=8.0, help="memory the scripted probe pretends to have")
    parser.add_argument("--swing-every-s", type=float, default=1.0, help="seconds between memory swings")
    parser.add_argument("--out", default=str(RESULTS / "stress.json"))
    args = parser.parse_args(argv)

    probe = ScriptedProbe(total_gb=args.budget_gb, used_percent=10)
    policy = PolicyConfig(upgrade_cooldown_s=0.3, load_downgrade_delay_s=0.3)
    manager = serving_manager(probe=probe, policy=policy, snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    llm = ChatAdaptQuant(model=args.model, loader=loader, max_tokens=args.max_tokens, temperature=0)
    levels = [level.value for level in available_levels("cpu")]
    reference = reference_answers(llm, levels)
    report = run_load(llm, probe, args.requests, args.threads, args.tasks, swing_every_s=args.swing_every_s)
    summary_with_checks = {**report.summary(), "mismatches": len(mismatches(report, reference)),
                           "active_after": manager.tracker.stats().active, "clients": args.threads + args.tasks}
    for key, value in summary_with_checks.items():
        print(f"{key:28s} {value}")
    out = write_json(Path(args.out), {"machine": machine_info(), "model": args.model, "summary": summary_with_checks,
                                      "outcomes": [asdict(o) for o in report.outcomes]}, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
