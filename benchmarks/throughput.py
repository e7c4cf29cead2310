"""Concurrent clients: the per-request path (one ``model.generate`` per request, each in its own
thread) against the generation engine (one worker decoding every request in flight as a batch).

    python -m benchmarks.throughput --model /work/models/smollm2-135m-instruct [--level fp16]
        [--clients 1,4,16,32] [--tokens 32] [--min-requests 16]

Both paths run in one process, on the same loaded model at one pinned level, with the same
chat-templated prompts and exactly ``--tokens`` new tokens per answer (``min_new_tokens``), for
1, 4, 16 and 32 closed-loop clients (each sends its next request when the last one is answered;
at least ``--min-requests`` requests per point). "per-request" is what ``ChatAdaptQuant.invoke``
ran before the engine: ``generation.generate`` on the caller's thread. "engine" is
``ChatAdaptQuant.invoke`` today (template, policy check, engine). Reported per point: total
tokens per second, p50 and p99 latency per request.

Then, with one client: decode speed per token of ``model.generate``, of the engine, and of a
bare loop of ``model.forward`` calls (what a step costs without any loop around it), against the
memory-bandwidth limit for the level's bytes; and the peak RSS of a switch landing while a full
batch decodes, against 1.15 x max(before, after) + the KV cache. Writes
``benchmarks/results/throughput.json``. Hold the benchmark lock for measured runs
(``flock /tmp/adaptquant-bench.lock ...``).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from benchmarks.common import (
    MB,
    RESULTS,
    bytes_read_per_token,
    copy_bandwidth,
    machine_info,
    print_table,
    quiet_loader,
    read_status,
    reset_peak,
    write_json,
)
from langchain_adaptquant import ChatAdaptQuant
from langchain_adaptquant.control.load_tracker import nearest_rank
from langchain_adaptquant.runtime import EngineConfig, GenerationEngine, generation
from langchain_adaptquant.runtime.loader import LoadedModel

PROMPTS = (
    "What is a list in Python?",
    "Explain what a dictionary is used for.",
    "How do I open and read a text file?",
    "What does the len function return?",
    "Describe a tuple in one paragraph.",
    "Why would I use a set instead of a list?",
    "What is a function argument?",
    "How does a for loop work?",
)


@dataclass(frozen=True)
class Point:
    """One path at one number of clients."""

    path: str
    clients: int
    requests: int
    tokens: int
    seconds: float
    tok_s: float
    p50_s: float
    p99_s: float
    mean_s: float
    #: answers whose text differs from the same prompt's answer alone (model.generate, batch of 1)
    differ_from_alone: int


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest rank, as LoadTracker reports it (the package's one percentile rule)."""
    value = nearest_rank(sorted(values), fraction)
    if value is None:
        raise ValueError("no latencies were measured")
    return value


def run_clients(call: Callable[[str], tuple[int, str]], clients: int, requests: int,
                alone: dict[str, str]) -> tuple[list[float], int, float, int]:
    """``clients`` threads, closed loop, ``requests`` in all: latencies, tokens, wall seconds, answers unlike ``alone``."""
    tickets = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = [0, 0]  # tokens, answers that differ from the prompt's answer alone
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                index = next(tickets, None)
            if index is None:
                return
            prompt = PROMPTS[index % len(PROMPTS)]
            started = time.perf_counter()
            try:
                produced, text = call(prompt)
            except BaseException as error:  # noqa: BLE001 - reported after the run
                errors.append(error)
                return
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += produced
                tokens[1] += text != alone.get(prompt, text)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies, tokens[0], time.perf_counter() - started, tokens[1]


def point(path: str, clients: int, requests: int, call: Callable[[str], tuple[int, str]],
          alone: dict[str, str]) -> Point:
    latencies, tokens, seconds, differ = run_clients(call, clients, requests, alone)
    return Point(path, clients, requests, tokens, round(seconds, 3), round(tokens / seconds, 2),
                 round(percentile(latencies, 0.5), 3), round(percentile(latencies, 0.99), 3),
                 round(statistics.fmean(latencies), 3), differ)


# -- per-token overhead --------------------------------------------------------------------------
def per_token_seconds(timed: Callable[[int], float], tokens: int, runs: int) -> float:
    """Seconds per decoded token: (time for 1 + tokens) - (time for 1), medians; the prefill cancels out."""
    one = statistics.median(timed(1) for _ in range(runs))
    many = statistics.median(timed(1 + tokens) for _ in range(runs))
    return max(many - one, 1e-9) / tokens


def decode_overhead(loaded: LoadedModel, llm: ChatAdaptQuant, ids: torch.Tensor, tokens: int, runs: int,
                    bandwidth_gb_s: float) -> dict[str, Any]:
    model, tokenizer = loaded.model, loaded.tokenizer

    def direct(n: int) -> float:
        settings = generation.GenerationSettings(max_new_tokens=n, extra=(("min_new_tokens", n),))
        started = time.perf_counter()
        generation.generate(model, tokenizer, ids, settings)
        return time.perf_counter() - started

    def engine(n: int) -> float:
        started = time.perf_counter()
        llm.invoke(PROMPTS[0], max_tokens=n, min_new_tokens=n)
        return time.perf_counter() - started

    def forward_loop(n: int) -> float:
        # A decode loop of its own on purpose: what a step costs with no loop around it (no
        # generate, no engine), the floor the two library paths above are compared with.
        from transformers import DynamicCache

        with torch.no_grad():
            started = time.perf_counter()
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            for step in range(n - 1):
                position = torch.tensor([[ids.shape[1] + step]])
                out = model(input_ids=token, position_ids=position, cache=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - started

    rows = {}
    for name, timed in (("model.generate", direct), ("engine (ChatAdaptQuant.invoke)", engine),
                        ("bare model.forward loop", forward_loop)):
        timed(4)  # warm-up
        seconds = per_token_seconds(timed, tokens, runs)
        rows[name] = round(1 / seconds, 2)
    per_token = bytes_read_per_token(loaded)
    limit = bandwidth_gb_s * 1e9 / per_token
    return {"decode_tok_s": rows, "bytes_per_token_mb": round(per_token / MB, 2), "bandwidth_gb_s": bandwidth_gb_s,
            "bandwidth_limit_tok_s": round(limit, 1),
            "share_of_limit": {name: round(rate / limit, 3) for name, rate in rows.items()}}


# -- a switch under a full batch --------------------------------------------------------------------
def switch_under_batch(llm: ChatAdaptQuant, loaded: LoadedModel, clients: int, tokens: int, to_level: str,
                       ) -> dict[str, Any]:
    """Peak RSS while ``clients`` answers decode and the model switches to ``to_level`` under them."""
    engine = llm._loader().engine(loaded)
    from_level = loaded.level.value
    results: list[Any] = []
    threads = [threading.Thread(target=lambda p=p: results.append(llm.invoke(p, max_tokens=tokens, min_new_tokens=tokens)))
               for p in (PROMPTS * (clients // len(PROMPTS) + 1))[:clients]]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while (engine.stats().active < clients or engine.tokens < 4 * clients) and time.monotonic() < deadline:
        time.sleep(0.005)
    kv = engine.kv_usage()
    active = engine.stats().active
    before = read_status()
    reset_peak()
    started = time.perf_counter()
    record = llm._loader().requantize(loaded, to_level, reason="benchmark: switch under a full batch")
    seconds = time.perf_counter() - started
    peak = read_status()["VmHWM"]
    after = read_status()
    for thread in threads:
        thread.join()
    mixed = sum(m.response_metadata["switched_during_generation"] for m in results)
    bound = 1.15 * max(before["VmRSS"], after["VmRSS"]) + kv.reserved_bytes
    return {
        "clients": clients, "from_level": from_level, "to_level": to_level, "switch_s": round(seconds, 3),
        "active_at_switch": active, "switched": record is not None,
        "answers_mixed_levels": mixed, "answers": len(results),
        "rss_before_mb": round(before["VmRSS"] / MB, 1), "rss_after_mb": round(after["VmRSS"] / MB, 1),
        "peak_rss_mb": round(peak / MB, 1), "kv_reserved_mb": round(kv.reserved_bytes / MB, 2),
        "kv_resident_mb": round(kv.resident_bytes / MB, 2),
        "bound_mb": round(bound / MB, 1), "peak_over_max": round(peak / max(before["VmRSS"], after["VmRSS"]), 3),
        "within_bound": peak <= bound,
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder, e.g. /work/models/smollm2-135m-instruct")
    parser.add_argument("--level", default="fp16")
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer (exactly)")
    parser.add_argument("--min-requests", type=int, default=16, help="requests per point at least")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (set once, before anything runs)")
    parser.add_argument("--overhead-tokens", type=int, default=32)
    parser.add_argument("--overhead-runs", type=int, default=3)
    parser.add_argument("--switch-to", default="int8", help="level of the switch under a full batch ('' skips)")
    parser.add_argument("--also-padded", action="store_true",
                        help="also measure the engine with one masked attention call per layer (attention='padded')")
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    loader, _ = quiet_loader()
    loader.engine_config = EngineConfig(max_batch=max(clients), threads=args.threads)
    loaded = loader.load_model(args.model, force_quantization=args.level)
    llm = ChatAdaptQuant(model=args.model, loader=loader, max_tokens=args.tokens, temperature=0,
                         force_quantization=args.level, model_kwargs={"min_new_tokens": args.tokens})
    tokenizer = loaded.tokenizer
    ids_of = {p: tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"] for p in PROMPTS}
    settings = generation.GenerationSettings(max_new_tokens=args.tokens, extra=(("min_new_tokens", args.tokens),))

    def per_request(prompt: str) -> tuple[int, str]:
        result = generation.generate(loaded.model, tokenizer, ids_of[prompt], settings)
        return result.output_tokens, result.text

    def engine(prompt: str) -> tuple[int, str]:
        message = llm.invoke(prompt)
        return message.usage_metadata["output_tokens"], message.content

    exact = loader.engine(loaded)
    padded = GenerationEngine(loaded.model, tokenizer, gate=loaded.gate, level_of=lambda: loaded.level.value,
                              config=replace(exact.config, attention="padded"), name="padded") if args.also_padded else None

    def engine_padded(prompt: str) -> tuple[int, str]:
        loaded.engine = padded  # the chat model asks the loader for the model's engine: this one, for now
        try:
            return engine(prompt)
        finally:
            loaded.engine = exact

    alone = {prompt: per_request(prompt)[1] for prompt in PROMPTS}  # also the warm-up
    engine(PROMPTS[0])
    paths = [("per-request", per_request), ("engine", engine)] + ([("engine, padded attention", engine_padded)]
                                                                    if padded else [])
    points: list[Point] = []
    for n, count in enumerate(tqdm(clients, desc="clients")):
        requests = max(count, args.min_requests)
        order = paths if n % 2 == 0 else paths[::-1]  # alternate which path runs first: drift hits all alike
        for path, call in order:
            points.append(point(path, count, requests, call, alone))
    by = {(p.path, p.clients): p for p in points}
    rows = []
    for count in clients:
        old, new = by[("per-request", count)], by[("engine", count)]
        row = {"clients": count, "old_tok_s": old.tok_s, "new_tok_s": new.tok_s,
               "speedup": round(new.tok_s / old.tok_s, 2), "old_p50": old.p50_s, "old_p99": old.p99_s,
               "new_p50": new.p50_s, "new_p99": new.p99_s, "differ": f"{new.differ_from_alone}/{new.requests}"}
        if padded:
            pad = by[("engine, padded attention", count)]
            row.update(padded_tok_s=pad.tok_s, padded_p99=pad.p99_s, padded_differ=f"{pad.differ_from_alone}/{pad.requests}")
        rows.append(row)
    print(f"\n{args.model} at {args.level}, {args.tokens} new tokens per answer, {args.threads} torch threads")
    print_table(rows, [("clients", "clients"), ("old_tok_s", "per-request tok/s"), ("new_tok_s", "engine tok/s"),
                       ("speedup", "engine / per-request"), ("old_p50", "per-request p50 s"),
                       ("old_p99", "per-request p99 s"), ("new_p50", "engine p50 s"), ("new_p99", "engine p99 s"),
                       ("differ", "engine answers unlike alone")]
                + ([("padded_tok_s", "padded-attention tok/s"), ("padded_p99", "padded p99 s"),
                    ("padded_differ", "padded unlike alone")] if padded else []))
    single = by[("engine", 1)].p50_s if ("engine", 1) in by else None
    goals = {}
    if ("engine", 16) in by and single:
        goals = {"speedup_at_16": rows[clients.index(16)]["speedup"], "speedup_goal": 5.0,
                 "p99_at_16_over_single": round(by[("engine", 16)].p99_s / single, 2), "p99_goal": 3.0,
                 "single_request_s": single}
        print(f"goals: {goals}")

    bandwidth = copy_bandwidth(256, 3)
    overhead = decode_overhead(loaded, llm, ids_of[PROMPTS[0]], args.overhead_tokens, args.overhead_runs,
                               bandwidth["best_gb_s"])
    print("\nper-token decode, 1 client:")
    print_table([{"path": k, "tok_s": v, "share": overhead["share_of_limit"][k]} for k, v in overhead["decode_tok_s"].items()],
                [("path", "path"), ("tok_s", "decode tok/s"), ("share", "share of bandwidth limit")])
    print(f"bandwidth limit {overhead['bandwidth_limit_tok_s']} tok/s ({overhead['bytes_per_token_mb']} MB per token "
          f"at {bandwidth['best_gb_s']} GB/s)")
    switch = None
    if args.switch_to:
        switch = switch_under_batch(llm, loaded, max(clients), args.tokens * 2, args.switch_to)
        print(f"\nswitch under a full batch: {switch}")
    out = write_json(Path(args.out), {
        "machine": machine_info(), "model": args.model, "level": args.level, "tokens": args.tokens,
        "threads": args.threads, "points": [asdict(p) for p in points], "table": rows, "goals": goals,
        "decode_overhead": overhead, "bandwidth": bandwidth, "switch_under_batch": switch,
        "engine": loaded.engine.stats().to_dict() if loaded.engine else None,
    })
    if padded is not None:
        padded.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
