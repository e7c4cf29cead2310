"""What each level keeps of a model's 16-bit answers, per backend and configuration, with its bytes.

    python -m benchmarks.quality --models smollm2-135m [--configs default]

For each model and each configuration (a level, the backend that stores it, its group size and
scale algorithm, and which layers mixed precision keeps one level up), a fresh forced load gives:

* stored MB (counted from the tensors), the sizing estimate and its error, load seconds;
* held-out perplexity of ``assets/heldout/alice_ch8_9.txt`` (public domain; windows of 512
  predicted tokens after the tokenizer's BOS) and its % over 16-bit;
* top-1 agreement with 16-bit on that text (share of positions with the same most likely token);
* the probe prompts of ``langchain_adaptquant.runtime.quality.PROBE_PROMPTS`` through the chat template,
  greedy, ``--probe-tokens`` new tokens, batched: how many answers match, how many of those the
  16-bit model also answers ("kept"), and how many answers are degenerate repetition.

16-bit runs first: it is the reference for agreement and for which probe facts count.
Writes the table to stdout and ``benchmarks/results/quality.json`` (with machine info).
Timings here are incidental (load seconds); speed is ``benchmarks.levels``'s job.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm.auto import tqdm

from benchmarks.common import MB, RESULTS, machine_info, model_folder, print_table, quiet_loader, write_json
from langchain_adaptquant.backends import registry
from langchain_adaptquant.backends.base import QuantizationBackend
from langchain_adaptquant.backends.int2pack import Int2PackBackend
from langchain_adaptquant.backends.torchao import TorchAOBackend
from langchain_adaptquant.control.layer_plan import DEFAULT_MIXED_PRECISION, UNIFORM, MixedPrecision
from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.runtime.quality import (
    PROBE_PROMPTS,
    PROFILE_TOKENS,
    TextScore,
    answer_matches,
    heldout_text,
    is_degenerate,
    score_text,
    text_ids,
)

DEFAULT_OUT = RESULTS / "quality.json"
INT2 = frozenset({QuantizationLevel.INT2})


@dataclass(frozen=True)
class Config:
    """One way of storing a level: the backend order, backend instances to use, the mixed-precision rule."""

    name: str
    level: str
    order: tuple[str, ...]
    backends: tuple[QuantizationBackend, ...] = ()
    mixed: MixedPrecision = field(default=UNIFORM)
    default: bool = False  # what the package ships


CONFIGS: tuple[Config, ...] = (
    Config("bf16", "fp16", ("cast",), default=True),
    Config("quanto int8", "int8", ("quanto",), default=True),
    Config("torchao int8", "int8", ("torchao",)),
    Config("torchao int4 g32 minmax", "int4", ("torchao", "quanto"), (TorchAOBackend((32, 64, 128)),), default=True),
    Config("torchao int4 g128/64 minmax", "int4", ("torchao", "quanto"), (TorchAOBackend((128, 64, 32)),)),
    Config("torchao int4 g32 hqq", "int4", ("torchao", "quanto"), (TorchAOBackend((32,), "hqq"),)),
    Config("quanto int4 g128/64", "int4", ("quanto",)),
    Config("quanto int2 g64 (old)", "int2", ("quanto",)),
    Config("int2pack g32 minmax", "int2", ("int2pack", "quanto"), (Int2PackBackend(32, "minmax"),)),
    Config("int2pack g32 hqq", "int2", ("int2pack", "quanto"), (Int2PackBackend(32, "hqq"),)),
    Config("int2pack g32 + first/last blocks int4", "int2", ("int2pack", "quanto"), (Int2PackBackend(32, "minmax"),),
           MixedPrecision(INT2, first_blocks=1, last_blocks=1)),
    Config("int2pack g32 + v/down int4", "int2", ("int2pack", "quanto"), (Int2PackBackend(32, "minmax"),),
           MixedPrecision(INT2, kinds=("v_proj", "down_proj"))),
    Config("int2pack g32 + v/down + first/last int4", "int2", ("int2pack", "quanto"), (Int2PackBackend(32, "minmax"),),
           DEFAULT_MIXED_PRECISION, default=True),
    Config("int2pack g32 hqq + v/down + first/last int4", "int2", ("int2pack", "quanto"), (Int2PackBackend(32, "hqq"),),
           DEFAULT_MIXED_PRECISION),
    Config("int2pack g32: only MLP gate/up at int2", "int2", ("int2pack", "quanto"), (Int2PackBackend(32, "minmax"),),
           MixedPrecision(INT2, first_blocks=1, last_blocks=1,
                          kinds=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))),
)
COLUMNS = (
    ("model", "model"), ("level", "level"), ("config", "backend / config"), ("default", "default"),
    ("layer_levels", "layers per level"), ("stored_mb", "stored MB"), ("estimate_error_percent", "est. err %"),
    ("perplexity", "ppl"), ("ppl_over_bf16_percent", "ppl vs bf16 %"), ("top1_agreement", "top-1 vs bf16"),
    ("profile_agreement", "profile top-1 (256 tok)"), ("probe_correct", "probe right"), ("probe_kept", "bf16's facts kept"), ("degenerate", "degenerate"),
    ("load_s", "load s"),
)


@contextmanager
def configured(config: Config) -> Iterator[None]:
    """The registry as ``config`` wants it: its backend order for the level and its backend instances."""
    level = QuantizationLevel.parse(config.level)
    orders = registry.preference["cpu"]
    saved = list(orders[level])
    orders[level][:] = list(config.order)
    try:
        with ExitStack() as stack:
            for backend in config.backends:
                stack.enter_context(registry.replaced_backend(backend))
            yield
    finally:
        orders[level][:] = saved


def probe_answers(model: Any, tokenizer: Any, new_tokens: int) -> list[str]:
    """Greedy answers to every probe prompt, batched with left padding."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True,
                                           tokenize=False) for p in PROBE_PROMPTS]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=pad)
    return [tokenizer.decode(row[batch.input_ids.shape[1]:], skip_special_tokens=True).strip() for row in out]


def bench_config(name: str, folder: Path, config: Config, ids: list[int], args: argparse.Namespace,
                 reference: Optional[dict[str, Any]]) -> tuple[dict[str, Any], TextScore, list[bool]]:
    with configured(config):
        loader, _ = quiet_loader()
        loader.mixed_precision = config.mixed
        started = time.perf_counter()
        loaded = loader.load_model(folder, force_quantization=config.level)
        load_s = time.perf_counter() - started
        score = score_text(loaded.model, ids, args.window)
        answers = probe_answers(loaded.model, loaded.tokenizer, args.probe_tokens) if loaded.tokenizer else []
        estimated = loaded.size.estimated_bytes(config.level)
        row: dict[str, Any] = {
            "model": name, "level": config.level, "config": config.name, "default": "yes" if config.default else "",
            "mixed_precision": config.mixed.describe(), "backends": loaded.backend_summary(),
            "layer_levels": loaded.level_summary(), "stored_mb": round(loaded.stored_bytes / MB, 2),
            "estimated_mb": round(estimated / MB, 2),
            "estimate_error_percent": round(100 * (estimated - loaded.stored_bytes) / loaded.stored_bytes, 1),
            "load_s": round(load_s, 2), "perplexity": round(score.perplexity, 3), "heldout_tokens": score.tokens,
        }
        loader.clear()
    correct = [answer_matches(a, p.answers) for a, p in zip(answers, PROBE_PROMPTS)]
    row["answers"] = answers
    row["probe_correct"] = f"{sum(correct)}/{len(correct)}" if answers else None
    row["degenerate"] = sum(is_degenerate(a) for a in answers) if answers else None
    if reference is None:
        row["ppl_over_bf16_percent"], row["top1_agreement"] = 0.0, 1.0
        row["probe_kept"] = f"{sum(correct)}/{sum(correct)}" if answers else None
    else:
        row["ppl_over_bf16_percent"] = round(100 * (score.perplexity / reference["score"].perplexity - 1), 2)
        row["top1_agreement"] = round(score.agreement(reference["score"]), 4)
        # what the runtime profile measures: the first PROFILE_TOKENS positions (causal: same context)
        first = TextScore(0.0, PROFILE_TOKENS, score.top1[:PROFILE_TOKENS])
        row["profile_agreement"] = round(first.agreement(TextScore(0.0, PROFILE_TOKENS,
                                                                   reference["score"].top1[:PROFILE_TOKENS])), 4)
        base = reference["correct"]
        if answers:
            kept = sum(1 for mine, theirs in zip(correct, base) if mine and theirs)
            row["probe_kept"] = f"{kept}/{sum(base)}"
            row["probe_kept_fraction"] = round(kept / sum(base), 3) if sum(base) else None
    return row, score, correct


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m",
                        help="comma-separated model folders, pulled catalog names (smollm2-135m), 'reference' or model-zoo names")
    parser.add_argument("--configs", default="all", help="'all', 'default', or comma-separated config names")
    parser.add_argument("--window", type=int, default=512, help="predicted tokens per forward pass")
    parser.add_argument("--heldout-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--probe-tokens", type=int, default=16, help="new tokens per probe answer")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    names = {c.name for c in CONFIGS}
    if args.configs not in ("all", "default"):
        wanted = [c.strip() for c in args.configs.split(",")]
        unknown = [c for c in wanted if c not in names]
        if unknown:
            parser.error(f"unknown config(s) {unknown}; known: {sorted(names)}")
    return args


def selected(args: argparse.Namespace) -> list[Config]:
    if args.configs == "all":
        chosen = list(CONFIGS)
    elif args.configs == "default":
        chosen = [c for c in CONFIGS if c.default]
    else:
        wanted = {c.strip() for c in args.configs.split(",")}
        chosen = [c for c in CONFIGS if c.name in wanted]
    if not any(c.level == "fp16" for c in chosen):
        chosen.insert(0, CONFIGS[0])  # the reference always runs
    return sorted(chosen, key=lambda c: c.level != "fp16")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        folder = model_folder(name)
        label = Path(name).name if Path(name).is_dir() else name
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        ids = text_ids(tokenizer, heldout_text(), args.heldout_tokens)
        reference = None
        for config in tqdm(selected(args), desc=f"configs of {label}", unit="config"):
            row, score, correct = bench_config(label, folder, config, ids, args, reference)
            if reference is None:
                reference = {"score": score, "correct": correct}
                row["bf16_answers_right"] = [p.prompt for p, ok in zip(PROBE_PROMPTS, correct) if ok]
            rows.append(row)
            print(f"  {config.name}: ppl {row['perplexity']} ({row['ppl_over_bf16_percent']:+}%), top-1 "
                  f"{row['top1_agreement']}, probes {row['probe_correct']} kept {row.get('probe_kept')}, "
                  f"degenerate {row['degenerate']}, {row['stored_mb']} MB", flush=True)
    print()
    table = print_table(rows, COLUMNS)
    result = {"machine": machine_info(), "settings": {k: str(v) for k, v in vars(args).items()},
              "probe_prompts": [{"prompt": p.prompt, "answers": list(p.answers)} for p in PROBE_PROMPTS],
              "heldout": "langchain_adaptquant/assets/heldout/alice_ch8_9.txt", "rows": rows, "table": table}
    out = write_json(args.out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
