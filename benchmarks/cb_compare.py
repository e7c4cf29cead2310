"""transformers' continuous batching against our engine and sequential ``generate``, on CPU, same process.

    python -m benchmarks.cb_compare --model /work/models/smollm2-135m-instruct [--levels fp16,int4]
        [--requests 8] [--tokens 16] [--runs 3]

Why this exists: issue 14 asked to use transformers' own continuous batching
(``init_continuous_batching`` / ``add_requests``, paged SDPA) where it works. Per level, on one
model loaded by our loader (so the quantized layers are ours), each path answers the same
``--requests`` chat prompts with exactly ``--tokens`` greedy tokens (end of turn disabled), with
fresh prompts per run so the library's prefix sharing cannot reuse a previous run's blocks.
Reports total tokens per second (median of ``--runs``), the library's set-up and warm-up time,
and how many of its greedy answers equal ``generate``'s and ours. Writes
``benchmarks/results/cb_compare.json``. Hold the benchmark lock for measured runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.common import RESULTS, machine_info, print_table, quiet_loader, write_json
from langchain_adaptquant.runtime import EngineConfig, GenerationEngine, GenerationRequest

TEXTS = ("What is a list?", "Explain dictionaries.", "How do I open a file?", "What does len return?",
         "Describe a tuple.", "Why use a set?", "What is an argument?", "How does a loop work?")


def one_level(folder: str, level: str, requests: int, tokens: int, runs: int) -> dict[str, Any]:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    loader, _ = quiet_loader()
    loaded = loader.load_model(folder, force_quantization=level)
    model, tokenizer = loaded.model, loaded.tokenizer

    def prompts(run: int) -> list[list[int]]:
        return [tokenizer.apply_chat_template([{"role": "user", "content": f"{TEXTS[i % len(TEXTS)]} ({run}.{i})"}],
                                              add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                for i in range(requests)]

    def sequential(batch: list[list[int]]) -> list[list[int]]:
        with torch.no_grad():
            return [model.generate(input_ids=torch.tensor([p]), max_new_tokens=tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in batch]

    times: dict[str, list[float]] = {"sequential generate": [], "transformers continuous batching": [], "our engine": []}
    outputs: dict[str, list[list[list[int]]]] = {name: [] for name in times}

    def timed(name: str, call: Any, batch: list[list[int]]) -> None:
        started = time.perf_counter()
        outputs[name].append(call(batch))
        times[name].append(time.perf_counter() - started)

    sequential(prompts(-1)[:1])  # warm-up
    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    started = time.perf_counter()
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=ContinuousBatchingConfig(
        max_requests_per_batch=requests))
    manager.warmup()
    manager.start()
    setup_s = time.perf_counter() - started

    def library(batch: list[list[int]]) -> list[list[int]]:
        ids = manager.add_requests(inputs=batch, max_new_tokens=tokens)
        done: dict[str, list[int]] = {}
        while len(done) < len(batch):
            result = manager.get_result(timeout=5)
            if result is not None and result.is_finished():
                done[result.request_id] = result.generated_tokens
        return [done[i] for i in ids]

    library(prompts(-1))  # its first batch pays one-off costs too
    for run in range(runs):
        batch = prompts(run)
        timed("sequential generate", sequential, batch)
        timed("transformers continuous batching", library, batch)
    manager.stop(block=True, timeout=10)  # gives the model its attention implementation back
    engine = GenerationEngine(model, tokenizer, level_of=lambda: level, config=EngineConfig(max_batch=requests))
    engine.eos = set()  # no end of turn, like the other two: exactly ``tokens`` each

    def ours(batch: list[list[int]]) -> list[Any]:
        handles = [engine.submit(GenerationRequest(tuple(p), tokens)) for p in batch]
        return [h.result(120).output_tokens for h in handles]

    ours(prompts(-1))
    for run in range(runs):
        timed("our engine", ours, prompts(run))
    engine.close()
    reference = outputs["sequential generate"]
    library_equal = sum(a == b for run_a, run_b in zip(outputs["transformers continuous batching"], reference)
                        for a, b in zip(run_a, run_b))
    loader.clear()
    return {
        "level": level, "requests": requests, "tokens": tokens, "runs": runs,
        "library_setup_and_warmup_s": round(setup_s, 2),
        "tok_s": {name: round(requests * tokens / statistics.median(values), 1) for name, values in times.items()},
        "seconds_per_run": {name: [round(v, 3) for v in values] for name, values in times.items()},
        "library_answers_equal_to_generate": f"{library_equal}/{requests * runs}",
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cb_compare", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--levels", default="fp16,int4")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "cb_compare.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [one_level(args.model, level, args.requests, args.tokens, args.runs) for level in args.levels.split(",")]
    table = [{"level": r["level"], **{k: v for k, v in r["tok_s"].items()}, "setup": r["library_setup_and_warmup_s"],
              "equal": r["library_answers_equal_to_generate"]} for r in rows]
    print(f"\n{args.model}: {args.requests} requests x {args.tokens} tokens, tok/s (median of {args.runs})")
    print_table(table, [("level", "level"), ("sequential generate", "sequential generate"),
                        ("transformers continuous batching", "transformers CB"), ("our engine", "our engine"),
                        ("setup", "CB set-up + warm-up s"), ("equal", "CB answers = generate")])
    out = write_json(Path(args.out), {"machine": machine_info(), "model": args.model, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
