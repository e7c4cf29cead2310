"""Measure every (backend, level) on Llama-shaped Linear layers, to choose the registry's order.

For each layer shape and each backend/level available here: quantize time, stored bytes (and
ratio to bf16), forward time for a batch-1 decode step and a 64-token prefill (median of several
runs after a warm-up), and relative output error against the bf16 layer. Prints a table and writes
``benchmarks/results/backends_probe.json``.

    HF_HUB_OFFLINE=1 python benchmarks/backends_probe.py [--repeats 15] [--threads 1] [--out PATH]

Runs in well under three minutes on a 2-core CPU. Timings are for this machine only.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from langchain_adaptquant.accounting import stored_bytes  # noqa: E402
from langchain_adaptquant.backends import all_backends, compute_dtype  # noqa: E402
from langchain_adaptquant.levels import LEVELS_BY_PRECISION  # noqa: E402

#: (in_features, out_features): attention/MLP shapes of a ~150M Llama, and one awkward width.
SHAPES: list[tuple[int, int]] = [(768, 768), (768, 3072), (3072, 768), (768, 1000)]
PREFILL_TOKENS = 64
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "backends_probe.json"


def _timings(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """(median, min) seconds. The min is what the code costs; the median what a busy machine sees."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), min(samples)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _layer(in_features: int, out_features: int, dtype: torch.dtype) -> nn.Linear:
    """A seeded layer with Llama-like weight scale (std 0.02), no bias (Llama has none)."""
    torch.manual_seed(in_features * 7919 + out_features)
    layer = nn.Linear(in_features, out_features, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
    return layer.requires_grad_(False)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("bitsandbytes", "torchao", "optimum-quanto", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _cpu_flags() -> dict[str, Any]:
    flags: dict[str, Any] = {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    try:
        from bitsandbytes.functional import has_avx512bf16

        flags["avx512bf16"] = bool(has_avx512bf16())
    except Exception:
        flags["avx512bf16"] = None
    try:
        model = next(line for line in open("/proc/cpuinfo") if line.startswith("model name"))
        flags["model"] = model.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pass
    return flags


def probe(repeats: int, device: str = "cpu") -> list[dict[str, Any]]:
    dtype = compute_dtype(device)
    rows: list[dict[str, Any]] = []
    backends = [b for b in all_backends() if b.available()]
    for backend in backends:
        for level in LEVELS_BY_PRECISION:
            if not backend.supports(level, device):
                continue
            # one-time costs (lazy imports, kernel registration) out of the measured quantize time
            backend.quantize_linear(_layer(256, 256, dtype), level, device)
            for in_f, out_f in SHAPES:
                row: dict[str, Any] = {"backend": backend.name, "level": level.value, "in": in_f, "out": out_f}
                layer = _layer(in_f, out_f, dtype)
                bf16_bytes = stored_bytes(layer)
                torch.manual_seed(1)
                decode_x = torch.randn(1, 1, in_f, dtype=dtype, device=device)
                prefill_x = torch.randn(1, PREFILL_TOKENS, in_f, dtype=dtype, device=device)
                with torch.no_grad():
                    reference = layer(prefill_x)
                problem = backend.shape_problem(layer, level, device)
                if problem is not None:
                    rows.append({**row, "status": "rejected", "reason": problem})
                    continue
                try:
                    started = time.perf_counter()
                    module = backend.quantize_linear(layer, level, device)
                    quantize_s = time.perf_counter() - started
                    with torch.no_grad():
                        error = _relative_error(module(prefill_x), reference)
                        decode_s, decode_min = _timings(lambda: module(decode_x), repeats)
                        prefill_s, prefill_min = _timings(lambda: module(prefill_x), max(3, repeats // 2))
                except Exception as exc:  # report, keep probing the rest
                    rows.append({**row, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                size = stored_bytes(module)
                rows.append({
                    **row,
                    "status": "ok",
                    "module": type(module).__name__,
                    "quantize_ms": round(quantize_s * 1e3, 2),
                    "stored_bytes": size,
                    "bytes_vs_bf16": round(size / bf16_bytes, 4),
                    "decode_ms": round(decode_s * 1e3, 4),
                    "decode_min_ms": round(decode_min * 1e3, 4),
                    "prefill64_ms": round(prefill_s * 1e3, 3),
                    "prefill64_min_ms": round(prefill_min * 1e3, 3),
                    "rel_error": round(error, 5),
                })
                del module
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (backend, level): totals over the shapes it took, the basis of the preference order."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["backend"], row["level"]), []).append(row)
    out = []
    for (backend, level), items in groups.items():
        ok = [r for r in items if r["status"] == "ok"]
        out.append({
            "backend": backend,
            "level": level,
            "shapes_ok": f"{len(ok)}/{len(items)}",
            "decode_ms_sum": round(sum(r["decode_ms"] for r in ok), 3),
            "decode_min_ms_sum": round(sum(r["decode_min_ms"] for r in ok), 3),
            "prefill64_ms_sum": round(sum(r["prefill64_ms"] for r in ok), 2),
            "prefill64_min_ms_sum": round(sum(r["prefill64_min_ms"] for r in ok), 2),
            "quantize_ms_sum": round(sum(r["quantize_ms"] for r in ok), 1),
            "bytes_vs_bf16_mean": round(statistics.mean(r["bytes_vs_bf16"] for r in ok), 3) if ok else None,
            "rel_error_max": round(max(r["rel_error"] for r in ok), 4) if ok else None,
        })
    return out


def _print_table(rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    header = f"{'backend':<13}{'level':<6}{'shape':>11} {'quant ms':>9} {'x bf16':>7} {'decode ms':>10} {'pre64 ms':>9} {'rel err':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = f"{r['in']}x{r['out']}"
        if r["status"] != "ok":
            print(f"{r['backend']:<13}{r['level']:<6}{shape:>11}  {r['status']}: {r['reason'][:70]}")
            continue
        print(
            f"{r['backend']:<13}{r['level']:<6}{shape:>11} {r['quantize_ms']:>9.1f} {r['bytes_vs_bf16']:>7.3f} "
            f"{r['decode_ms']:>10.3f} {r['prefill64_ms']:>9.2f} {r['rel_error']:>8.4f}"
        )
    print()
    print(f"{'backend':<13}{'level':<6}{'shapes':>7} {'decode sum':>11} {'pre64 sum':>10} {'quant sum':>10} {'x bf16':>7} {'max err':>8}")
    for s in sorted(summary, key=lambda s: (LEVELS_BY_PRECISION.index(_level(s["level"])), s["decode_ms_sum"])):
        print(
            f"{s['backend']:<13}{s['level']:<6}{s['shapes_ok']:>7} {s['decode_ms_sum']:>11.3f} {s['prefill64_ms_sum']:>10.2f} "
            f"{s['quantize_ms_sum']:>10.1f} {s['bytes_vs_bf16_mean'] or 0:>7.3f} {s['rel_error_max'] or 0:>8.4f}"
        )


def _level(value: str):
    from langchain_adaptquant.levels import QuantizationLevel

    return QuantizationLevel.parse(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per forward (median)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared 2-core box, 2 threads time the neighbours' jobs)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    started = time.perf_counter()
    rows = probe(args.repeats)
    summary = summarize(rows)
    _print_table(rows, summary)
    result = {
        "machine": {**_cpu_flags(), "platform": platform.platform()},
        "versions": _versions(),
        "device": "cpu",
        "dtype": str(compute_dtype("cpu")),
        "prefill_tokens": PREFILL_TOKENS,
        "repeats": args.repeats,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
