"""Throughput of 1 vs 2 Ray Serve replicas on this machine, through Serve's HTTP proxy.

    python -m benchmarks.ray_replicas [--models reference,PATH] [--requests 48] [--concurrency 4] [--max-tokens 32]

One local Ray cluster (2 CPUs) runs three deployments of the same app in turn, each measured with
the same closed-loop load (``--concurrency`` clients, ``--requests`` chat completions, greedy):

* 1 replica, 1 torch thread: the baseline;
* 1 replica, 2 torch threads: the same cores used by one process;
* 2 replicas, 1 torch thread each: the same cores used by two processes.

Every setup must serve at one level, or the comparison measures the levels instead: requests ask for
``quality`` priority and each replica gets a 4 GiB budget over its own memory, so with at most 5
requests in flight per replica the policy keeps FP16 (the table's ``levels`` column shows it did).
Ratios are against the baseline of the same run. Only the measured load holds the benchmark lock
(``/tmp/adaptquant-bench.lock``); deploys and warm-up do not. Prints a table, writes
``benchmarks/results/ray_replicas.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx

from benchmarks.common import RESULTS, machine_info, print_table, resolve, write_json

LOCK = "/tmp/adaptquant-bench.lock"
BUDGET_GB = 4.0
PROMPTS = ("Explain what a Python list is.", "Describe a dictionary and when to use it.",
           "How do I read a file line by line?", "What does a for loop do?")


@dataclass(frozen=True)
class Setup:
    name: str
    replicas: int
    torch_threads: int
    num_cpus: float


SETUPS = (
    Setup("1 replica x 1 thread", 1, 1, 1.0),
    Setup("1 replica x 2 threads", 1, 2, 2.0),
    Setup("2 replicas x 1 thread", 2, 1, 1.0),
)


@dataclass
class Row:
    model: str
    setup: str
    replicas: int
    torch_threads: int
    requests: int
    seconds: float
    requests_per_s: float
    output_tokens: int
    tokens_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    answered_by: dict[str, int]
    levels: list[str]
    speedup_vs_baseline: float = 1.0


@contextmanager
def bench_lock() -> Iterator[None]:
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "task_priority": "quality"}


def run_load(url: str, requests: int, concurrency: int, max_tokens: int) -> tuple[float, list[tuple[float, int, str, str]]]:
    """``requests`` completions from ``concurrency`` clients: wall seconds and (latency, tokens, replica, level)."""
    client = httpx.Client(base_url=url, timeout=600)

    def one(index: int) -> tuple[float, int, str, str]:
        started = time.perf_counter()
        response = client.post("/v1/chat/completions", json=_body(PROMPTS[index % len(PROMPTS)], max_tokens))
        response.raise_for_status()
        body = response.json()
        return (time.perf_counter() - started, body["usage"]["completion_tokens"],
                response.headers.get("x-adaptquant-replica", "?"), body["adaptquant"]["quantization_level"])

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    return time.perf_counter() - started, results


def measure(setup: Setup, model: str, url: str, args: argparse.Namespace) -> Row:
    from ray import serve

    from langchain_adaptquant.serve_ray import BudgetSettings, ReplicaSettings, ScalingSettings, build_app

    replica = ReplicaSettings(model=model, served_model_name="bench", max_queue=args.concurrency,
                              torch_threads=setup.torch_threads, max_tokens_limit=max(args.max_tokens, 16))
    scaling = ScalingSettings(replicas=setup.replicas, num_cpus=setup.num_cpus)
    print(f"deploying {setup.name} ...", flush=True)
    budgets = BudgetSettings(memory_budget_gb=BUDGET_GB)
    serve.run(build_app(replica, scaling, budgets), name="bench", route_prefix="/")
    try:
        run_load(url, max(4, setup.replicas * 4), min(args.concurrency, 4), args.max_tokens)  # warm-up, every replica
        with bench_lock():
            seconds, results = run_load(url, args.requests, args.concurrency, args.max_tokens)
    finally:
        serve.delete("bench")
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    answered: dict[str, int] = {}
    for _, _, replica_id, _ in results:
        answered[replica_id] = answered.get(replica_id, 0) + 1
    return Row(
        model=Path(model).name, setup=setup.name, replicas=setup.replicas, torch_threads=setup.torch_threads, requests=len(results),
        seconds=round(seconds, 2), requests_per_s=round(len(results) / seconds, 3), output_tokens=tokens,
        tokens_per_s=round(tokens / seconds, 1), latency_p50_s=round(statistics.median(latencies), 3),
        latency_p95_s=round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        answered_by=dict(sorted(answered.items())), levels=sorted({r[3] for r in results}),
    )


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ray_replicas", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="reference", help="comma-separated: 'reference' or model folders, "
                        "e.g. reference,smollm2-135m")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4, help="clients; above 5 per replica the policy "
                        "trades precision for load even at quality priority")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "ray_replicas.json"))
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from langchain_adaptquant.serve_ray.local import free_port

    models = [str(resolve(name.strip())) for name in args.models.split(",") if name.strip()]
    port = free_port("127.0.0.1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows: list[Row] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for model in models:
            measured = [measure(setup, model, f"http://127.0.0.1:{port}", args) for setup in SETUPS]
            for row in measured:
                row.speedup_vs_baseline = round(row.tokens_per_s / measured[0].tokens_per_s, 2)
            rows += measured
    finally:
        serve.shutdown()
        ray.shutdown()
    print_table([asdict(r) for r in rows], [
        ("model", "model"), ("setup", "setup"), ("requests_per_s", "req/s"), ("tokens_per_s", "tok/s"),
        ("speedup_vs_baseline", "vs 1x1"), ("latency_p50_s", "p50 s"), ("latency_p95_s", "p95 s"),
        ("answered_by", "answered by replica"), ("levels", "levels"),
    ])
    result = {
        "benchmark": "ray_replicas",
        "models": models,
        "args": {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens},
        "machine": machine_info(),
        "rows": [asdict(r) for r in rows],
        "note": ("All setups share one 2-CPU machine with Serve's proxy and controller; 2 replicas use the same "
                 "cores as 1 replica with 2 threads. Nothing here measures more nodes, a network hop or memory "
                 "pressure across nodes."),
    }
    print(f"wrote {write_json(Path(args.out), result)}")
    return result


if __name__ == "__main__":
    main()
