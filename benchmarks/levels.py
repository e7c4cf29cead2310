"""What each precision level costs and buys, per model: memory, load time, speed and quality.

    python -m benchmarks.levels [--models reference,llama-150m] [--runs 5] [--quick]

For each model (a name from the model zoo, ``reference`` or a folder) and each level this CPU has a
backend for (fp16 = bf16 here, int8, int4, int2), a fresh ``load_model(..., force_quantization=level)``
(evicted before the next level) gives:

* stored MB (``loaded.stored_bytes``, counted from the tensors) against the sizing estimate
  (``loaded.size.estimated_bytes(level)``); error % = 100 x (estimate - stored) / stored;
* process RSS and anonymous MB after one forward pass, their growth over the process before the
  load, and the MB of parameters still backed by the memory-mapped weights file;
* load seconds (median of ``--load-runs``; the weights file is read once first, so every level
  finds it in the page cache);
* prefill tokens/s (a forward pass over a ``--prompt-tokens`` prompt) and decode tokens/s
  (``generate`` of ``--new-tokens`` greedy tokens with min_new_tokens = max_new_tokens, timed
  from the first new token to the last with a streamer), each the median of ``--runs`` runs; also
  decode tokens/s of a bare greedy loop of forward passes over the KV cache ("fwd-loop"), which
  separates the model's own cost from ``generate``'s per-step work;
* decode speed as a share of the memory-bandwidth limit: bandwidth (best of several copies of a
  ``--bandwidth-mb`` tensor, counting bytes read + written, as STREAM's "copy" does) divided by the
  bytes one decode step reads (stored bytes minus the input-embedding table, of which one row is read);
* for a model folder with ``heldout_sample.txt`` (the reference model): held-out perplexity with
  eval.json's method (leading <|endoftext|>, windows of eval.json's ``window`` predicted tokens,
  float32 log-softmax over the logits) and top-1 agreement with 16-bit (share of positions whose
  argmax next token equals the 16-bit one). The loader computes in bf16 on CPU, while eval.json used
  float32 compute; the float32 figure is recomputed here too so the two can be told apart.

Writes a table to stdout, ``levels.json`` (with machine info) and ``levels.png`` to ``--out-dir``.
Timings need a quiet machine: the load average at start is recorded in the JSON. On a busy one,
torch's threads wait on each other at every operator (a 10M model decoded at 2.6 tokens/s with 2
threads and 160 tokens/s with ``--threads 1`` while other jobs held both cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from benchmarks.common import (
    MB,
    RESULTS,
    bytes_read_per_token,
    copy_bandwidth,
    eval_window,
    heldout_ids,
    machine_info,
    model_folder,
    print_table,
    quiet_loader,
    read_status,
    warm_page_cache,
    write_json,
)
from langchain_adaptquant.backends.registry import available_levels
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader, LoadedModel
from langchain_adaptquant.runtime.os_memory import file_backed_bytes, release_memory
from langchain_adaptquant.runtime.quality import TextScore, score_text

DEFAULT_OUT_DIR = RESULTS
COLUMNS = (
    ("model", "model"), ("level", "level"), ("backends", "backends"), ("stored_mb", "stored MB"),
    ("estimated_mb", "est. MB"), ("estimate_error_percent", "est. err %"), ("rss_mb", "RSS MB"),
    ("anon_mb", "anon MB"), ("file_backed_mb", "file MB"), ("load_s", "load s"),
    ("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
    ("decode_fraction_of_limit", "decode / BW limit"), ("decode_forward_tok_s", "fwd-loop tok/s"),
    ("perplexity", "held-out ppl"), ("top1_agreement", "top-1 vs 16-bit"),
)


# -- measurements -------------------------------------------------------------------------------------
class _TokenClock(BaseStreamer):
    """Timestamps every ``put``: first the prompt, then each new token as generate emits it."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def prompt_ids(vocab_size: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """Seeded random ids: speed does not depend on the text, and every model (tokenizer or not) gets one."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (1, tokens), generator=generator)


@torch.no_grad()
def prefill_rates(model: Any, ids: torch.Tensor, runs: int) -> list[float]:
    """Tokens/s of one forward pass over the whole prompt, per run."""
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        rates.append(ids.shape[1] / (time.perf_counter() - started))
    return rates


@torch.no_grad()
def decode_rates(model: Any, ids: torch.Tensor, new_tokens: int, runs: int, pad_id: int) -> list[float]:
    """Tokens/s of greedy decoding after the first new token (prefill excluded), per run."""
    rates = []
    for _ in range(runs):
        clock = _TokenClock()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                       pad_token_id=pad_id, streamer=clock)
        steps = len(clock.stamps) - 2  # stamps: prompt, token 1, ..., token N
        rates.append(steps / (clock.stamps[-1] - clock.stamps[1]) if steps > 0 else float("nan"))
    return rates


@torch.no_grad()
def forward_decode_rates(model: Any, ids: torch.Tensor, new_tokens: int, runs: int) -> list[float]:
    """Tokens/s of a bare greedy loop over the KV cache: the model's own cost, without generate's per-step work.

    A decode loop of its own on purpose: this figure is the forward passes alone, the floor that
    ``decode_rates`` (``model.generate``) and the library's engine are compared with; going through
    either of them would time their per-step work too.
    """
    import inspect

    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rates = []
    for _ in range(runs):
        out = model(input_ids=ids, use_cache=True)
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            token = out.logits[:, -1:].argmax(dim=-1)
            out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
        rates.append((new_tokens - 1) / (time.perf_counter() - started))
    return rates


def _median(values: Sequence[float]) -> Optional[float]:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else None


# -- one level ----------------------------------------------------------------------------------------
def timed_loads(loader: AdaptiveModelLoader, folder: Path, level: str, runs: int) -> tuple[LoadedModel, list[float]]:
    """``runs`` fresh loads at ``level`` (evicting in between); returns the last one and all durations."""
    seconds = []
    for run in range(runs):
        if run:
            loader.evict(str(folder))
        started = time.perf_counter()
        loaded = loader.load_model(folder, force_quantization=level)
        seconds.append(time.perf_counter() - started)
    return loaded, seconds


def bench_level(loader: AdaptiveModelLoader, name: str, folder: Path, level: str, args: argparse.Namespace,
                bandwidth_gb_s: float, reference: Optional[TextScore]) -> tuple[dict[str, Any], Optional[TextScore]]:
    """Every number of one (model, level) row; also the held-out score, so 16-bit can serve as reference."""
    release_memory(full=True)
    base = read_status()
    loaded, load_seconds = timed_loads(loader, folder, level, args.load_runs)
    ids = prompt_ids(loaded.model.config.vocab_size, args.prompt_tokens)
    prefill_rates(loaded.model, ids, 1)  # the forward pass the memory figures are taken after
    release_memory()
    estimated = loaded.size.estimated_bytes(level)
    row: dict[str, Any] = {
        "model": name,
        "level": level,
        "precision": loaded.precision,
        "backends": loaded.backend_summary(),
        "parameters": loaded.size.total_params,
        "stored_mb": round(loaded.stored_bytes / MB, 2),
        "estimated_mb": round(estimated / MB, 2),
        "estimate_error_percent": round(100.0 * (estimated - loaded.stored_bytes) / loaded.stored_bytes, 2),
        **_process_memory(loaded, base),
        "load_s": round(_median(load_seconds), 3),
        "load_s_all": [round(s, 3) for s in load_seconds],
        **_speeds(loaded, ids, args, bandwidth_gb_s),
        "perplexity": None,
        "top1_agreement": None,
    }
    score = _quality(loaded, folder, row, reference)
    loader.evict(str(folder))
    del loaded
    return row, score


def _process_memory(loaded: LoadedModel, base: dict[str, int]) -> dict[str, float]:
    """RSS and anonymous memory now, their growth since ``base``, and what still maps the weights file."""
    after = read_status()
    return {
        "rss_mb": round(after["VmRSS"] / MB, 1),
        "anon_mb": round(after["RssAnon"] / MB, 1),
        "rss_growth_mb": round((after["VmRSS"] - base["VmRSS"]) / MB, 1),
        "anon_growth_mb": round((after["RssAnon"] - base["RssAnon"]) / MB, 1),
        "file_backed_mb": round(file_backed_bytes(loaded.model, loaded.folder) / MB, 2),
    }


def _speeds(loaded: LoadedModel, ids: torch.Tensor, args: argparse.Namespace, bandwidth_gb_s: float) -> dict[str, Any]:
    """Prefill and decode medians, and decode against the bandwidth limit for this level's bytes."""
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    prefill = prefill_rates(loaded.model, ids, args.runs)
    decode_rates(loaded.model, ids[:, :8], 2, 1, pad_id)  # warm generate's first-call set-up
    decode = decode_rates(loaded.model, ids, args.new_tokens, args.runs, pad_id)
    forward = forward_decode_rates(loaded.model, ids, args.new_tokens, args.runs)
    per_token = bytes_read_per_token(loaded)
    limit = bandwidth_gb_s * 1e9 / per_token
    decode_median, forward_median = _median(decode), _median(forward)
    return {
        "prompt_tokens": args.prompt_tokens,
        "prefill_tok_s": round(_median(prefill), 1),
        "prefill_tok_s_all": [round(r, 1) for r in prefill],
        "new_tokens": args.new_tokens,
        "decode_tok_s": round(decode_median, 1) if decode_median else None,
        "decode_tok_s_all": [round(r, 1) for r in decode],
        "decode_forward_tok_s": round(forward_median, 1) if forward_median else None,
        "decode_forward_tok_s_all": [round(r, 1) for r in forward],
        "bytes_per_token_mb": round(per_token / MB, 2),
        "decode_limit_tok_s": round(limit, 1),
        "decode_fraction_of_limit": round(decode_median / limit, 3) if decode_median else None,
        "decode_forward_fraction_of_limit": round(forward_median / limit, 3) if forward_median else None,
    }


def _quality(loaded: LoadedModel, folder: Path, row: dict[str, Any],
             reference: Optional[TextScore]) -> Optional[TextScore]:
    """Fill perplexity and top-1 agreement into ``row`` when the folder has a held-out sample."""
    ids = heldout_ids(folder, loaded.tokenizer)
    if ids is None:
        return None
    score = score_text(loaded.model, ids, eval_window(folder))
    row["perplexity"] = round(score.perplexity, 4)
    row["heldout_tokens"] = score.tokens
    if reference is not None:
        row["top1_agreement"] = round(score.agreement(reference), 4)
    elif row["level"] == "fp16":
        row["top1_agreement"] = 1.0
    return score


def float32_perplexity(folder: Path) -> Optional[float]:
    """eval.json's own set-up (float32 compute on the bf16 file), to tell method from precision effects."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(folder) / "heldout_sample.txt").is_file():
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    score = score_text(model, heldout_ids(folder, tokenizer), eval_window(folder))
    del model
    release_memory()
    return round(score.perplexity, 4)


def bench_model(name: str, folder: Path, levels: Sequence[str], args: argparse.Namespace,
                bandwidth_gb_s: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All levels of one model, 16-bit first (it is the reference for top-1 agreement)."""
    warm_page_cache(folder)
    loader, _ = quiet_loader()
    rows, reference = [], None
    for level in tqdm(levels, desc=f"levels of {name}", unit="level"):
        row, score = bench_level(loader, name, folder, level, args, bandwidth_gb_s, reference)
        if level == "fp16":
            reference = score
        rows.append(row)
    eval_file = Path(folder) / "eval.json"
    info = {
        "folder": str(folder),
        "eval_json": json.loads(eval_file.read_text()) if eval_file.is_file() else None,
        "float32_perplexity": float32_perplexity(folder),
    }
    loader.clear()
    return rows, info


# -- output -------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], bandwidth_gb_s: float, path: Path) -> Path:
    """Memory against quality, and decode speed against memory with the bandwidth roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    fig, (quality, speed, sizes) = plt.subplots(1, 3, figsize=(16, 4.8))
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        scored = [r for r in mine if r["perplexity"] is not None]
        if scored:
            quality.plot([r["stored_mb"] for r in scored], [r["perplexity"] for r in scored], "o-", label=model)
            for r in scored:
                quality.annotate(r["level"], (r["stored_mb"], r["perplexity"]), textcoords="offset points",
                                 xytext=(4, 4))
        timed = [r for r in mine if r["decode_tok_s"]]
        (points,) = speed.plot([r["bytes_per_token_mb"] for r in timed], [r["decode_tok_s"] for r in timed], "o",
                               label=f"{model}: generate")
        looped = [r for r in mine if r.get("decode_forward_tok_s")]
        speed.plot([r["bytes_per_token_mb"] for r in looped], [r["decode_forward_tok_s"] for r in looped], "x",
                   color=points.get_color(), label=f"{model}: forward loop")
        for r in timed:
            speed.annotate(r["level"], (r["bytes_per_token_mb"], r["decode_tok_s"]), textcoords="offset points",
                           xytext=(4, 4))
    if not any(r["perplexity"] is not None for r in rows):
        quality.text(0.5, 0.5, "no model with heldout_sample.txt", ha="center", transform=quality.transAxes)
    quality.set(xlabel="stored MB", ylabel="held-out perplexity (lower is better)", title="memory vs quality")
    if quality.lines:
        quality.legend(fontsize=8)
    span = [r["bytes_per_token_mb"] for r in rows]
    if span:
        low, high = min(span) * 0.8, max(span) * 1.25
        xs = [low * (high / low) ** (i / 49) for i in range(50)]
        speed.plot(xs, [bandwidth_gb_s * 1e9 / (x * MB) for x in xs], "k--", lw=1,
                   label=f"bandwidth limit ({bandwidth_gb_s:g} GB/s)")
    speed.set(xscale="log", yscale="log", xlabel="MB read per decode step", ylabel="decode tokens/s",
              title="decode speed vs memory")
    speed.legend(fontsize=8)
    _plot_sizes(sizes, rows, models)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_sizes(axis: Any, rows: list[dict[str, Any]], models: list[str]) -> None:
    """Stored bytes as a share of the model's 16-bit size (models of any size side by side), estimate as a tick."""
    width = 0.8 / max(1, len(models))
    levels = list(dict.fromkeys(row["level"] for row in rows))
    for i, model in enumerate(models):
        mine = {r["level"]: r for r in rows if r["model"] == model}
        base = mine["fp16"]["stored_mb"] if "fp16" in mine else max(r["stored_mb"] for r in mine.values())
        xs = [levels.index(level) + i * width for level in mine]
        bars = axis.bar(xs, [100 * mine[level]["stored_mb"] / base for level in mine], width, label=model)
        axis.scatter(xs, [100 * mine[level]["estimated_mb"] / base for level in mine], marker="_", s=300, color="k", zorder=3)
        axis.bar_label(bars, [f"{mine[level]['stored_mb']:.0f} MB" for level in mine], fontsize=7)
    axis.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(levels))], levels)
    axis.set(ylabel="% of the model's 16-bit size", title="stored (bars) vs sizing estimate (black ticks)")
    axis.legend(fontsize=8)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.levels", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="reference,llama-150m",
                        help="comma-separated: 'reference', a model-zoo name, or a model folder")
    parser.add_argument("--levels", default=None, help="comma-separated levels (default: all this CPU supports)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per speed figure (median)")
    parser.add_argument("--load-runs", type=int, default=3, help="fresh loads per level (median)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--bandwidth-mb", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); on a busy machine 1 thread can "
                             "be many times faster than oversubscribed cores")
    parser.add_argument("--quick", action="store_true", help="1 run, short prompts, small copy: a smoke test")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.load_runs, args.prompt_tokens, args.new_tokens, args.bandwidth_mb = 1, 1, 16, 4, 32
    if args.runs < 1 or args.load_runs < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        parser.error("--runs and --load-runs must be >= 1, --new-tokens >= 2, --prompt-tokens >= 1")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    supported = [level.value for level in available_levels("cpu")]
    levels = args.levels.split(",") if args.levels else supported
    levels = sorted(levels, key=lambda level: level != "fp16")  # 16-bit first: the agreement reference
    bandwidth = copy_bandwidth(args.bandwidth_mb, repeats=3 if args.quick else 7)
    print(f"copy bandwidth: {bandwidth['best_gb_s']} GB/s (best of {bandwidth['repeats']})", flush=True)
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    for name in args.models.split(","):
        folder = model_folder(name)
        label = Path(name).name if Path(name).is_dir() else name  # a short name for the table and plot
        model_rows, models[label] = bench_model(label, folder, levels, args, bandwidth["best_gb_s"])
        rows += model_rows
    print()
    print_table(rows, COLUMNS)
    settings = {key: value for key, value in vars(args).items() if key != "out_dir"}
    result = {"machine": machine, "settings": settings, "bandwidth": bandwidth, "models": models, "rows": rows}
    out_json = write_json(args.out_dir / "levels.json", result)
    out_png = plot(rows, bandwidth["best_gb_s"], args.out_dir / "levels.png")
    print(f"wrote {out_json} and {out_png}")
    return result


if __name__ == "__main__":
    main()
