"""What the adaptive wrapper costs per call: ChatAdaptQuant.invoke vs model.generate vs ChatHuggingFace.

    python -m benchmarks.overhead [--model PATH] [--runs 20] [--tokens 32]

All three run on the same model object (loaded once at 16-bit by our loader), the same prompt,
greedy, exactly ``--tokens`` new tokens (min = max), interleaved run by run so machine noise hits
them alike. Reports medians and the ratios against direct ``generate``; writes JSON.
langchain-huggingface is optional: without it that column is skipped, and the script says so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

from benchmarks.common import RESULTS, machine_info, write_json
from langchain_adaptquant import ChatAdaptQuant, reference_model_path, serving_manager
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

PROMPT = "Explain in one sentence what a Python list is."


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(reference_model_path()))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--level", default="fp16")
    parser.add_argument("--out", default=str(RESULTS / "overhead.json"))
    args = parser.parse_args(argv)

    manager = serving_manager()
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    loaded = loader.load_model(args.model, force_quantization=args.level)
    model, tokenizer = loaded.model, loaded.tokenizer
    fixed = {"min_new_tokens": args.tokens}
    llm = ChatAdaptQuant(model=args.model, loader=loader, max_tokens=args.tokens, temperature=0,
                         force_quantization=args.level, model_kwargs=fixed)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]

    def direct() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, **fixed,
                                 pad_token_id=tokenizer.pad_token_id)
        return out.shape[1] - ids.shape[1]

    def adaptive() -> int:
        return llm.invoke(PROMPT).usage_metadata["output_tokens"]

    contenders: dict[str, Callable[[], Any]] = {"direct generate": direct, "ChatAdaptQuant.invoke": adaptive}
    note = None
    try:
        from langchain_huggingface import ChatHuggingFace, HuggingFacePipeline
        from transformers import pipeline

        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, max_new_tokens=args.tokens,
                        do_sample=False, return_full_text=False, **fixed)
        hf = ChatHuggingFace(llm=HuggingFacePipeline(pipeline=pipe), tokenizer=tokenizer)
        contenders["ChatHuggingFace.invoke"] = lambda: hf.invoke(PROMPT)
    except ImportError as error:
        note = f"langchain-huggingface not installed ({error}); install it to add that column"
        print(note)

    for fn in contenders.values():  # warm-up: first calls pay one-off costs
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    tokens = {}
    for _ in tqdm(range(args.runs), desc="interleaved runs"):
        for name, fn in contenders.items():
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            if isinstance(result, int):
                tokens[name] = result
    base = statistics.median(times["direct generate"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({"path": name, "median_s": round(median, 4), "ratio_vs_direct": round(median / base, 4),
                     "overhead_ms": round((median - base) * 1000, 2), "runs": len(samples)})
    print(f"\n{'path':24s} {'median s':>9s} {'x direct':>9s} {'overhead ms':>12s}")
    for row in rows:
        print(f"{row['path']:24s} {row['median_s']:9.4f} {row['ratio_vs_direct']:9.4f} {row['overhead_ms']:12.2f}")
    out = write_json(Path(args.out), {"machine": machine_info(), "model": args.model, "level": args.level,
                                      "tokens": args.tokens, "tokens_generated": tokens, "note": note, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
