"""Measure every CPU path per level on real layer shapes, to choose the registry's order.

Paths: every registered backend (cast, quanto, torchao, bitsandbytes, int2pack) at every level it
supports, plus library configurations we do not ship, measured so the choice is visible: torchao
``IntxWeightOnlyConfig`` (int4/int2, group 32: stores one value per int8 on x86),
``Int8DynamicActivationIntxWeightConfig`` (unpacked int8, and the ``opaque_aten_kleidiai`` int4
layout on torch's own ``_dyn_quant_matmul_4bit``), and torchao's CPU int4 with HQQ scales. HQQ's
own library is not installed: on CPU it dequantizes to 16-bit per forward like quanto, and its
quantizer is measured here through torchao (``_choose_qparams_and_quantize_affine_hqq``).

Shapes: the Linear layers of ``llama-150m`` (hidden 1024, MLP 2816, 256-wide k/v) and of
SmolLM2-135M (hidden 576, MLP 1536, 192-wide k/v). For each: quantize time, stored bytes (and
ratio to bf16), forward time for a batch-1 decode step and a 64-token prefill (min and median of
several runs after a warm-up) and relative output error against the bf16 layer. Prints a table
and writes ``benchmarks/results/backends_probe.json``.

    HF_HUB_OFFLINE=1 python -m benchmarks.backends_probe [--repeats 15] [--threads 1] [--out PATH]

Timings are for this machine only; on a shared machine compare paths within one run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.common import RESULTS, cpu_model, write_json
from langchain_adaptquant.backends import all_backends, compute_dtype
from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION
from langchain_adaptquant.runtime.accounting import stored_bytes

#: model -> (in_features, out_features) of its Linear layers: q/o, k/v, gate/up, down.
SHAPES: dict[str, list[tuple[int, int]]] = {
    "llama-150m": [(1024, 1024), (1024, 256), (1024, 2816), (2816, 1024)],
    "smollm2-135m": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
}


class _Path:
    """One way to store a level: a registered backend, or a library configuration we measure only."""

    def __init__(self, name: str, level: str, make: Callable[[nn.Linear], nn.Module],
                 problem: Callable[[nn.Linear], Any] = lambda layer: None, shipped: bool = False) -> None:
        self.name, self.level, self.make, self.problem, self.shipped = name, level, make, problem, shipped


def _torchao_path(name: str, level: str, config: Callable[[], Any]) -> _Path:
    def make(layer: nn.Linear) -> nn.Module:
        from torchao.quantization import quantize_

        work = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=layer.weight.dtype)
        work.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        quantize_(work, config())
        return work.eval()

    return _Path(name, level, make, lambda layer: None if layer.in_features % 32 == 0 else "in_features % 32")


def extra_paths() -> list[_Path]:
    """torchao configurations the registry does not use, measured for the record."""
    import torch as _t

    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerGroup
        from torchao.quantization.quantize_.workflows import IntxPackingFormat
    except Exception:  # torchao missing
        return []
    from langchain_adaptquant.backends.torchao import TorchAOBackend

    hqq4 = TorchAOBackend((32,), "hqq")
    paths = [
        _Path("torchao int4 g32 hqq", "int4", lambda layer: hqq4.quantize_linear(layer, "int4"),
              lambda layer: hqq4.shape_problem(layer, "int4")),
    ]
    for bits in (4, 2):
        dtype = getattr(_t, f"int{bits}")
        paths.append(_torchao_path(f"torchao IntxWeightOnly int{bits} g32", f"int{bits}",
                                   lambda dtype=dtype: IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(32))))
        paths.append(_torchao_path(f"torchao Int8DynAct-Intx int{bits} g32", f"int{bits}",
                                   lambda dtype=dtype: Int8DynamicActivationIntxWeightConfig(
                                       weight_dtype=dtype, weight_granularity=PerGroup(32))))
    paths.append(_torchao_path(
        "torchao Int8DynAct-Int4 g32 aten-kleidiai", "int4",
        lambda: Int8DynamicActivationIntxWeightConfig(
            weight_dtype=_t.int4, weight_granularity=PerGroup(32),
            intx_packing_format=IntxPackingFormat.OPAQUE_ATEN_KLEIDIAI)))
    return paths


def all_paths(device: str) -> list[_Path]:
    from langchain_adaptquant.backends.registry import MEASURED_PREFERENCE

    paths = []
    for backend in (b for b in all_backends() if b.available()):
        for level in LEVELS_BY_PRECISION:
            if backend.supports(level, device):
                shipped = MEASURED_PREFERENCE.get(device, {}).get(level, [None])[0] == backend.name
                paths.append(_Path(backend.name, level.value,
                                   lambda layer, b=backend, lv=level: b.quantize_linear(layer, lv, device),
                                   lambda layer, b=backend, lv=level: b.shape_problem(layer, lv, device), shipped))
    return paths + extra_paths()
PREFILL_TOKENS = 64
DEFAULT_OUT = RESULTS / "backends_probe.json"


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
    flags["model"] = cpu_model()
    return flags


def probe(repeats: int, device: str = "cpu", models: tuple[str, ...] = tuple(SHAPES)) -> list[dict[str, Any]]:
    dtype = compute_dtype(device)
    rows: list[dict[str, Any]] = []
    for path in all_paths(device):
        try:  # one-time costs (lazy imports, kernel registration) out of the measured quantize time
            path.make(_layer(256, 256, dtype))
        except Exception:
            pass
        for model in models:
            for in_f, out_f in SHAPES[model]:
                row: dict[str, Any] = {"backend": path.name, "level": path.level, "model": model, "in": in_f,
                                       "out": out_f, "shipped": path.shipped}
                layer = _layer(in_f, out_f, dtype)
                bf16_bytes = stored_bytes(layer)
                torch.manual_seed(1)
                decode_x = torch.randn(1, 1, in_f, dtype=dtype, device=device)
                prefill_x = torch.randn(1, PREFILL_TOKENS, in_f, dtype=dtype, device=device)
                with torch.no_grad():
                    reference = layer(prefill_x)
                problem = path.problem(layer)
                if problem is not None:
                    rows.append({**row, "status": "rejected", "reason": problem})
                    continue
                try:
                    started = time.perf_counter()
                    with torch.no_grad():
                        module = path.make(layer)
                    quantize_s = time.perf_counter() - started
                    with torch.no_grad():
                        error = _relative_error(module(prefill_x), reference)
                        decode_s, decode_min = _timings(lambda m=module, x=decode_x: m(x), repeats)
                        prefill_s, prefill_min = _timings(lambda m=module, x=prefill_x: m(x), max(3, repeats // 2))
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
    """Per (path, level, model): totals over the shapes it took, the basis of the preference order.

    ``decode_vs_bf16`` is the bf16 decode sum over the same shapes divided by this path's: above 1
    is faster than 16-bit (only comparable when the path took every shape)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["backend"], row["level"], row["model"]), []).append(row)
    bf16 = {(r["model"], r["in"], r["out"]): r for r in rows if r["backend"] == "cast" and r["status"] == "ok"}
    out = []
    for (backend, level, model), items in groups.items():
        ok = [r for r in items if r["status"] == "ok"]
        base = sum(bf16[(model, r["in"], r["out"])]["decode_min_ms"] for r in ok if (model, r["in"], r["out"]) in bf16)
        mine = sum(r["decode_min_ms"] for r in ok)
        out.append({
            "backend": backend,
            "level": level,
            "model": model,
            "shipped": bool(ok and ok[0].get("shipped")),
            "decode_vs_bf16": round(base / mine, 2) if ok and mine else None,
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
    header = f"{'path':<42}{'level':<6}{'shape':>11} {'quant ms':>9} {'x bf16':>7} {'decode ms':>10} {'pre64 ms':>9} {'rel err':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        shape = f"{r['in']}x{r['out']}"
        if r["status"] != "ok":
            print(f"{r['backend']:<42}{r['level']:<6}{shape:>11}  {r['status']}: {r['reason'][:70]}")
            continue
        print(
            f"{r['backend']:<42}{r['level']:<6}{shape:>11} {r['quantize_ms']:>9.1f} {r['bytes_vs_bf16']:>7.3f} "
            f"{r['decode_min_ms']:>10.3f} {r['prefill64_ms']:>9.2f} {r['rel_error']:>8.4f}"
        )
    print()
    print("| model | level | path | shipped | shapes | decode min ms (sum) | speed vs bf16 | prefill64 ms | quantize ms | bytes vs bf16 | max rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in sorted(summary, key=lambda s: (s["model"], LEVELS_BY_PRECISION.index(_level(s["level"])), s["decode_min_ms_sum"] or 1e9)):
        print(
            f"| {s['model']} | {s['level']} | {s['backend']} | {'yes' if s['shipped'] else ''} | {s['shapes_ok']} | "
            f"{s['decode_min_ms_sum']:.3f} | {s['decode_vs_bf16'] or '-'} | {s['prefill64_min_ms_sum']:.2f} | "
            f"{s['quantize_ms_sum']:.1f} | {s['bytes_vs_bf16_mean'] or '-'} | {s['rel_error_max'] or '-'} |"
        )


def _level(value: str):
    from langchain_adaptquant.control.levels import QuantizationLevel

    return QuantizationLevel.parse(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backends_probe", description=__doc__.splitlines()[0])
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
    write_json(args.out, result)
    print(f"\nwrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
