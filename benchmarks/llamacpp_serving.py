"""Serving on the llama.cpp runtime: one stream, 16 concurrent clients, and a switch with 16 in flight.

    flock /tmp/adaptquant-bench.lock .venv/bin/python -m benchmarks.llamacpp_serving [--clients 16] [--new-tokens 64]

All through the public path (``ChatAdaptQuant.invoke`` on SmolLM2-135M-Instruct, greedy, exactly N new
tokens each), one process, one run, so the ratios compare like with like on a shared machine:

* **single**: one client, ``--repeats`` calls; whole-call tok/s (median) and latency.
* **concurrent**: ``--clients`` threads call at once; total tok/s (all tokens / wall time), p50/p99
  latency; ratios to the single stream (total tok/s x, p99 / single latency).
* **switch under load**: ``--clients`` requests in flight, then fp16 -> int2 -> fp16 from another
  thread: requests lost or failed, each switch's seconds, peak RSS during the switches (the kernel's
  high-water mark, reset before) against max(RSS before, RSS after).
* **per level**: single-stream decode at every level, and int2 / fp16.

llama-server (``--parallel 16``) is the reference for the concurrent figure; it is not built by this
script (545 s on 2 cores from the llama-cpp-python sdist, see DESIGN.md): pass ``--llama-server-tok-s``
with a figure measured on the same machine to get the ratio, else the JSON says it was not measured.
Writes ``benchmarks/results/llamacpp_serving.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from typing import Any, Optional

from benchmarks.common import MB, RESULTS, machine_info, print_table, write_json

PROMPT = "Tell me a short story about a cat who learns to read."


def _chat(level: str, loader: Any, new_tokens: int) -> Any:
    from langchain_adaptquant.chat_model import ChatAdaptQuant

    return ChatAdaptQuant(model="smollm2-135m", loader=loader, force_quantization=level, temperature=0,
                          max_tokens=new_tokens)


def _call(llm: Any, new_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    reply = llm.invoke(PROMPT, min_new_tokens=new_tokens)
    return time.perf_counter() - started, reply.usage_metadata["output_tokens"]


def single(llm: Any, new_tokens: int, repeats: int) -> dict[str, Any]:
    runs = [_call(llm, new_tokens) for _ in range(repeats)]
    seconds = statistics.median(s for s, _ in runs)
    return {"tok_s": round(new_tokens / seconds, 1), "latency_s": round(seconds, 3),
            "tokens_exact": all(n == new_tokens for _, n in runs)}


def concurrent(llm: Any, new_tokens: int, clients: int) -> dict[str, Any]:
    latencies: list[float] = []
    counts: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            seconds, tokens = _call(llm, new_tokens)
            with lock:
                latencies.append(seconds)
                counts.append(tokens)
        except Exception as error:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(repr(error))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))] if ordered else None
    return {"clients": clients, "total_tok_s": round(sum(counts) / wall, 1), "wall_s": round(wall, 3),
            "p50_s": round(statistics.median(ordered), 3) if ordered else None,
            "p99_s": round(p99, 3) if p99 else None, "errors": errors, "answers": len(counts)}


def switch_under_load(loader: Any, new_tokens: int, clients: int) -> dict[str, Any]:
    from langchain_adaptquant.control.resources import process_status, reset_peak_rss
    from langchain_adaptquant.runtime.requests import GenerationRequest, Sampling

    loaded = loader.load_model("smollm2-135m", force_quantization="fp16")
    loaded.last_forced = loaded.level  # no policy switch of its own meanwhile
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
    engine = loader.engine(loaded)
    handles = [engine.submit(GenerationRequest(ids, new_tokens, sampling=Sampling(min_new_tokens=new_tokens)))
               for _ in range(clients)]
    while engine.stats().tokens < clients * 4:
        time.sleep(0.005)
    records = []
    for level in ("int2", "fp16"):
        before = process_status().rss
        reset_peak_rss()
        record = loader.requantize(loaded, level, reason="benchmark")
        after = process_status()
        records.append({"to": level, "seconds": round(record.seconds, 3), "engine_pause_s":
                        round(engine.last_switch.seconds, 3), "refed_tokens": engine.last_switch.refed_tokens,
                        "rss_before_mb": round(before / MB, 1), "rss_after_mb": round(after.rss / MB, 1),
                        "peak_rss_mb": round(after.peak_rss / MB, 1),
                        "peak_ratio": round(after.peak_rss / max(before, after.rss), 3)})
    failed, lost, results = 0, 0, []
    for handle in handles:
        try:
            results.append(handle.result(timeout=600))
        except TimeoutError:
            lost += 1
        except Exception:  # noqa: BLE001 - counted
            failed += 1
    return {"in_flight": clients, "lost": lost, "failed": failed,
            "all_exact": all(r.output_tokens == new_tokens for r in results),
            "answers_spanning_levels": sum(len(r.levels_used) > 1 for r in results), "switches": records}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp_serving", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-server-tok-s", type=float, default=None,
                        help="llama-server --parallel 16 total tok/s measured on this machine, for the ratio")
    args = parser.parse_args(argv)
    from langchain_adaptquant.control.manager import DynamicQuantizationManager
    from langchain_adaptquant.control.resources import process_status
    from langchain_adaptquant.runtime.llamacpp.loader import LlamaCppLoader
    from langchain_adaptquant.runtime.llamacpp.weights import LlamaCppConfig

    loader = LlamaCppLoader(manager=DynamicQuantizationManager(device="cpu"), show_progress=True,
                            config=LlamaCppConfig(threads=args.threads))
    started = time.time()
    print("per level, one stream:", flush=True)
    levels = {}
    for level in ("fp16", "int8", "int4", "int2"):
        llm = _chat(level, loader, args.new_tokens)
        _call(llm, 4)  # the load or switch is not timed
        levels[level] = single(llm, args.new_tokens, args.repeats)
        print(f"  {level}: {levels[level]['tok_s']} tok/s", flush=True)
    llm = _chat("fp16", loader, args.new_tokens)
    _call(llm, 4)
    base = single(llm, args.new_tokens, args.repeats)
    many = concurrent(llm, args.new_tokens, args.clients)
    switching = switch_under_load(loader, args.new_tokens, args.clients)
    ratio_total = round(many["total_tok_s"] / base["tok_s"], 2)
    ratio_p99 = round(many["p99_s"] / base["latency_s"], 2) if many["p99_s"] else None
    server = args.llama_server_tok_s
    rows = [
        {"measure": "one stream (fp16)", "value": f"{base['tok_s']} tok/s", "goal": "", "ratio": ""},
        {"measure": f"{args.clients} clients, total", "value": f"{many['total_tok_s']} tok/s",
         "goal": ">= 3x one stream", "ratio": f"{ratio_total}x"},
        {"measure": f"{args.clients} clients, p99", "value": f"{many['p99_s']} s", "goal": "<= 3x one request",
         "ratio": f"{ratio_p99}x"},
        {"measure": "vs llama-server --parallel 16", "value": f"{server} tok/s" if server else "not measured",
         "goal": ">= 0.8x", "ratio": f"{round(many['total_tok_s'] / server, 2)}x" if server else ""},
        {"measure": f"switch with {args.clients} in flight", "value":
         f"{switching['lost']} lost, {switching['failed']} failed", "goal": "0 lost, 0 failed", "ratio": ""},
    ]
    for record in switching["switches"]:
        rows.append({"measure": f"switch to {record['to']}", "value": f"{record['seconds']} s, peak RSS "
                     f"{record['peak_rss_mb']} MB", "goal": "<= 0.5 s, peak <= 1.2x", "ratio": f"{record['peak_ratio']}x"})
    rows.append({"measure": "int2 / fp16 decode", "value": f"{levels['int2']['tok_s']} / {levels['fp16']['tok_s']}",
                 "goal": ">= 1.0x", "ratio": f"{round(levels['int2']['tok_s'] / levels['fp16']['tok_s'], 2)}x"})
    table = print_table(rows, (("measure", "measure"), ("value", "value"), ("goal", "goal"), ("ratio", "ratio")))
    result = {"benchmark": "llamacpp_serving", "command": "python -m benchmarks.llamacpp_serving " + " ".join(
        argv if argv is not None else sys.argv[1:]), "machine": machine_info(), "seconds": round(time.time() - started, 1),
        "settings": vars(args), "levels": levels, "single": base, "concurrent": many, "switch_under_load": switching,
        "ratios": {"total_vs_single": ratio_total, "p99_vs_single": ratio_p99,
                   "vs_llama_server": round(many["total_tok_s"] / server, 2) if server else None},
        "llama_server": {"tok_s": server, "note": None if server else "not built in this run (see the docstring)"},
        "rss_end_mb": round(process_status().rss / MB, 1), "table": table}
    path = write_json(RESULTS / "llamacpp_serving.json", result)
    print(f"wrote {path}")
    loader.clear()
    return result


if __name__ == "__main__":
    main()
