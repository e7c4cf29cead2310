"""Cost of a memory snapshot and of a decision, cached and uncached: median of N calls each.

    python -m benchmarks.decision_cost [--calls 10000]

Prints a table and writes benchmarks/results/decision_cost.json. The common path of an invocation
(cached snapshot + decision + hysteresis "keep") must stay in the microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from benchmarks.common import RESULTS, machine_info, write_json
from langchain_adaptquant.control.manager import DynamicQuantizationManager
from langchain_adaptquant.control.resources import SystemMemoryProbe


def per_call_us(fn: Callable[[], object], calls: int, label: str) -> dict:
    samples = []
    for _ in tqdm(range(calls), desc=label, leave=False, mininterval=1.0):
        start = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return {
        "median_us": statistics.median(samples) / 1000,
        "p99_us": samples[int(0.99 * (len(samples) - 1))] / 1000,
        "calls": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decision_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--out", default=str(RESULTS / "decision_cost.json"))
    args = parser.parse_args()

    raw = SystemMemoryProbe(device="cpu")
    cached = DynamicQuantizationManager(device="cpu", snapshot_ttl_s=0.05)
    uncached = DynamicQuantizationManager(device="cpu", snapshot_ttl_s=0.0)
    cached.record_switch("bench", cached.decide(0.5).level)
    level = cached.decide(0.5).level
    rows = {
        "snapshot, uncached (psutil + cgroup + /proc)": per_call_us(raw, args.calls, "snapshot uncached"),
        "snapshot, cached (50 ms TTL)": per_call_us(cached.snapshot, args.calls, "snapshot cached"),
        "decision, cached snapshot": per_call_us(lambda: cached.decide(0.5), args.calls, "decide cached"),
        "decision, uncached snapshot": per_call_us(lambda: uncached.decide(0.5), args.calls, "decide uncached"),
        "should_reoptimize (keep), cached": per_call_us(
            lambda: cached.should_reoptimize(level, 0.5, model_key="bench"), args.calls, "reoptimize cached"
        ),
    }
    width = max(map(len, rows))
    print(f"{'operation':<{width}}  median µs    p99 µs")
    for name, row in rows.items():
        print(f"{name:<{width}}  {row['median_us']:9.2f}  {row['p99_us']:8.2f}")
    out = write_json(Path(args.out), {"machine": machine_info(), "results": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
