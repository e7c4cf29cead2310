"""Cost of an in-place switch vs a cold reload, per step of 16-bit -> INT8 -> INT4 -> INT2 -> INT4 -> 16-bit.

    python -m benchmarks.switch [--models reference,llama-150m] [--passes 2] [--no-layer-cache]
                                [--out benchmarks/results/switch.json]

The chain runs ``--passes`` times on one loaded model. Pass 1 visits each level for the first time:
every layer is quantized from the weights. Later passes find the layers in the loader's layer cache
(written in the background after pass 1's switches; the benchmark waits for those writes between
steps and reports their time as ``cache_write_s``), as a model does when memory goes back and forth,
or after ``AdaptiveModelLoader.prepare_levels``.

For each model and step: seconds of ``AdaptiveModelLoader.requantize`` and its peak process memory
(RSS from the kernel's high-water mark, reset before each step; anonymous memory sampled every
2 ms), against a cold ``from_pretrained`` of the same model with the equivalent quantization config,
timed in the same process. Reload-based switching holds the old model while the new one loads, so
its peak is before + after; the in-place target is at most 1.15 x max(before, after).
After every switch (and every cold load) one forward pass touches all weights, so memory-mapped
16-bit weights are resident when "after" is measured; ``switch_s`` includes it like ``cold_reload_s``
does, and ``requantize_s`` is the switch alone. An INT2 forward dequantizes every weight, so it is a
large share of the INT2 steps on both sides.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any, Optional

import torch

from benchmarks.common import MB, RESULTS, machine_info, measured, read_status, resolve, write_json
from langchain_adaptquant import ScriptedProbe, serving_manager
from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader
from langchain_adaptquant.runtime.os_memory import release_memory

CHAIN = ("int8", "int4", "int2", "int4", "fp16")


def touch(model: Any) -> None:
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))


def cold_config(level: str) -> dict[str, Any]:
    """from_pretrained arguments equivalent to our CPU backends for ``level``."""
    if level == "fp16":
        return {}
    if level == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}
    from transformers import QuantoConfig

    return {"quantization_config": QuantoConfig(weights=level)}


def cold_load(folder: Path, level: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, **cold_config(level))
    touch(model)
    return model


def bench_model(name: str, folder: Path, passes: int = 2, layer_cache: bool = True) -> list[dict[str, Any]]:
    manager = serving_manager(probe=ScriptedProbe(total_gb=256, used_percent=10), snapshot_ttl_s=0)
    # uniform levels: the cold reloads it is compared with quantize every layer at the level
    from langchain_adaptquant.control.layer_plan import UNIFORM

    loader = AdaptiveModelLoader(manager=manager, show_progress=False, layer_cache_gb=None if layer_cache else 0,
                                 mixed_precision=UNIFORM)
    loaded, load_stats = measured(lambda: loader.load_model(folder, force_quantization="fp16"))
    touch(loaded.model)
    rows = []
    previous = "fp16"
    for step, target in [(p + 1, level) for p in range(passes) for level in CHAIN]:
        after_prev = read_status()
        record, stats = measured(lambda target=target: (loader.requantize(loaded, target), touch(loaded.model))[0])
        flush_started = time.perf_counter()
        loader.layer_cache.flush()
        cache_write_s = time.perf_counter() - flush_started
        release_memory()
        after = read_status()
        # the cold reload of the target level, while the current model is still held (reload-based switching)
        cold_model, cold = measured(lambda target=target: cold_load(folder, target))
        cold_peak_anon = cold["peak_anon_mb"]
        del cold_model
        gc.collect()
        release_memory()
        rss_before, rss_after = after_prev["VmRSS"] / MB, after["VmRSS"] / MB
        anon_before, anon_after = after_prev["RssAnon"] / MB, after["RssAnon"] / MB
        row = {
            "model": name,
            "pass": step,
            "switch": f"{previous} -> {target}",
            "direction": "downgrade" if QuantizationLevel(target).rank < QuantizationLevel(previous).rank else "upgrade",
            "switch_s": round(stats["seconds"], 3),
            "cold_reload_s": round(cold["seconds"], 3),
            "time_ratio": round(stats["seconds"] / cold["seconds"], 3),
            # the switch alone, without the forward pass that both sides include
            "requantize_s": round(record.seconds, 3) if record is not None else 0.0,
            "layers_from_cache": record.layers_from_cache if record is not None else 0,
            "layers": len(loaded.layer_backends),
            "cache_write_s": round(cache_write_s, 3),
            "rss_before_mb": round(rss_before, 1),
            "rss_after_mb": round(rss_after, 1),
            "peak_rss_mb": round(stats["peak_rss_mb"], 1),
            "peak_rss_ratio": round(stats["peak_rss_mb"] / max(rss_before, rss_after), 3),
            "anon_before_mb": round(anon_before, 1),
            "anon_after_mb": round(anon_after, 1),
            "peak_anon_mb": round(stats["peak_anon_mb"], 1),
            "peak_anon_ratio": round(stats["peak_anon_mb"] / max(anon_before, anon_after), 3),
            "reload_peak_anon_mb": round(cold_peak_anon, 1),
            "reload_peak_rss_mb": round(cold["peak_rss_mb"], 1),
            "reload_peak_rss_ratio": round(cold["peak_rss_mb"] / max(rss_before, rss_after), 3),
            "stored_mb": round(loaded.stored_bytes / MB, 2),
            "backends": loaded.backend_summary(),
        }
        rows.append(row)
        print(
            f"{name:12s} pass {step} {row['switch']:14s} switch {row['switch_s']:6.2f}s  cold {row['cold_reload_s']:6.2f}s "
            f"(x{row['time_ratio']:.2f})  peak RSS x{row['peak_rss_ratio']:.3f}  peak anon x{row['peak_anon_ratio']:.3f}"
            f"  stored {row['stored_mb']:.1f} MB  from cache {row['layers_from_cache']}/{row['layers']}",
            flush=True,
        )
        previous = target
    rows[-1]["layer_cache"] = loader.layer_cache.stats()
    loader.clear()
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.switch", description="in-place switch vs cold reload")
    parser.add_argument("--models", default="reference,llama-150m")
    parser.add_argument("--passes", type=int, default=2, help="times the chain runs (later ones revisit levels)")
    parser.add_argument("--no-layer-cache", action="store_true", help="quantize every switch from the weights")
    parser.add_argument("--out", default=str(RESULTS / "switch.json"))
    args = parser.parse_args(argv)
    if args.passes < 1:
        parser.error(f"--passes must be at least 1, got {args.passes}")
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, resolve(name), args.passes, not args.no_layer_cache)
    header = ["model", "pass", "switch", "switch_s", "requantize_s", "cold_reload_s", "time_ratio", "peak_rss_ratio", "reload_peak_rss_ratio",
              "peak_anon_ratio", "layers_from_cache",
              "rss_before_mb", "rss_after_mb", "peak_rss_mb", "stored_mb"]
    print()
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join(str(row[h]) for h in header))
    out = write_json(Path(args.out), {"machine": machine_info(), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
