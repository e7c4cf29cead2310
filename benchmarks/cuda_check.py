"""One bounded run that checks the package on a CUDA device: backends, loader, switch vs reload, requests in flight.

    python -m benchmarks.cuda_check [--device cuda] [--out $OUT/cuda_check.json] [--quick] [--parts a,b,c,d]
    python -m benchmarks.cuda_check --device cpu --quick      # dry run of everything not CUDA-specific

Checks (each one wrapped: a failure is recorded with its traceback and the next check still runs;
the JSON is rewritten after every check, so a run killed by a timeout keeps what it finished):

a. every registered backend x level it supports on the device, on fp16 Linear layers of 1024->1024,
   1024->2816, 2816->1024 and 1024->1000 (with bias): ok/error, relative error vs the fp16 layer on a
   (4, in) input, decode-size (1 row) forward median, stored bytes vs fp16, parameter device; then
   the registry's choice (``quantize_linear_with_fallback``) per level and shape; then, for quanto
   rows that failed, the same layers with quanto's CUDA extension out of the way (pure-PyTorch
   unpack, no AWQ kernel): what a backend-side fallback would give.
b. the loader on the device: the embedded reference model loaded at fp16, then
   fp16 -> int8 -> int4 -> int2 -> int4 -> fp16 with ``requantize``; per step the backends, stored vs
   estimated bytes, switch seconds, peak device memory during the switch vs max(before, after), a
   16-token greedy generation through the chat template, and whether every tensor is on the device.
c. the same chain on a random ~150M Llama (``model_zoo``), each step against a cold
   ``from_pretrained`` with the equivalent transformers config (bitsandbytes int8 / nf4, quanto int2)
   while the switched model is still held; switch_s and cold_s both include one forward pass.
d. requests in flight: a thread generates 32 tokens in a loop while the main thread switches
   int8 -> int4 -> fp16; exceptions must be none and every output non-empty.
e. only when a step of b failed (int2 where quanto cannot build its extension): b again with quanto
   routed around its extension, to show what a pure-PyTorch fallback in the quanto backend would give.

quanto JIT-compiles its C++/CUDA kernels on first use (``torch.utils.cpp_extension.load``: needs
ninja and, on CUDA, nvcc; minutes for its CUDA kernels). By default this script refuses that compile
unless the extension is already built, so it fails fast the way it does on a machine without a
toolchain; ``--quanto-jit`` allows it. ``--quanto-no-ext`` applies the pure-PyTorch fallback of
check a to the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

_HERE = Path(__file__).resolve().parent

T0 = time.perf_counter()
from langchain_adaptquant.units import MIB as MB  # noqa: E402

LEVELS = ("fp16", "int8", "int4", "int2")
CHAIN = ("int8", "int4", "int2", "int4", "fp16")
INFLIGHT_CHAIN = ("int8", "int4", "fp16")
#: (in_features, out_features, bias): Llama-150M's attention/MLP shapes, and an odd width with bias.
SHAPES = ((1024, 1024, False), (1024, 2816, False), (2816, 1024, False), (1024, 1000, True))
PROMPT = "How do I reverse a list in Python?"


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


def short_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:600]


def tb() -> str:
    return traceback.format_exc()[-4000:]


# -- device helpers ---------------------------------------------------------------------------


class Device:
    """Synchronize and read allocator statistics on CUDA; no-ops (None) elsewhere."""

    def __init__(self, name: str) -> None:
        import torch

        self.torch = torch
        self.name = name
        self.kind = torch.device(name).type
        self.cuda = self.kind == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def allocated(self) -> Optional[int]:
        return self.torch.cuda.memory_allocated() if self.cuda else None

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> Optional[int]:
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def cleanup(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()


def mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else round(value / MB, 2)


def ratio(numerator: Optional[float], denominator: Optional[float], digits: int = 3) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)


def tensors_off_device(model: Any, kind: str, limit: int = 5) -> tuple[bool, list[str]]:
    """Whether every parameter and buffer is on ``kind`` (meta counts as off); a few offenders."""
    off = []
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type != kind:
            off.append(f"{name}@{tensor.device}")
    return not off, off[:limit]


# -- quanto's JIT extensions ------------------------------------------------------------------


def guard_quanto_jit(allow: bool, undo: contextlib.ExitStack) -> dict[str, Any]:
    """Make quanto's extension builds fail fast unless already built (or ``allow``); say what is there.

    ``undo`` puts quanto's own loader back when it closes, so a caller in a longer process (a test)
    is left as it was.
    """
    facts: dict[str, Any] = {
        "ninja": shutil.which("ninja"),
        "nvcc": shutil.which("nvcc"),
        "jit_allowed": allow,
    }
    try:
        from torch.utils import cpp_extension

        facts["CUDA_HOME"] = cpp_extension.CUDA_HOME
    except Exception as error:  # noqa: BLE001
        facts["CUDA_HOME"] = short_error(error)
    try:
        extension = importlib.import_module("optimum.quanto.library.extensions.extension")
    except Exception as error:  # noqa: BLE001 - quanto missing or broken: nothing to guard
        facts["guard"] = f"not installed: {short_error(error)}"
        return facts
    real_load = extension.load
    attempts: dict[str, int] = {}
    facts["build_attempts"] = attempts  # "name: allowed|refused (prebuilt=...)" -> count

    def guarded_load(*args: Any, name: str = "", build_directory: str = "", **kwargs: Any) -> Any:
        built = bool(build_directory) and (Path(build_directory) / f"{name}.so").exists()
        label = f"{name}: {'allowed' if allow or built else 'refused'} (prebuilt={built})"
        attempts[label] = attempts.get(label, 0) + 1
        if allow or built:
            return real_load(*args, name=name, build_directory=build_directory, **kwargs)
        raise RuntimeError(
            f"quanto extension {name!r} is not built; cuda_check refuses the JIT compile "
            f"(ninja={facts['ninja']}, nvcc={facts['nvcc']}); pass --quanto-jit to allow it"
        )

    extension.load = guarded_load
    undo.callback(setattr, extension, "load", real_load)
    facts["guard"] = "installed"
    return facts


def _python_unpack(packed: Any, bits: int) -> Any:
    """quanto's own pure-PyTorch ``quanto::unpack`` (its "default" kernel, copied: the decorated name is None)."""
    import torch

    values_per_item = 8 // bits
    unpacked = []
    for i in range(values_per_item):
        mask = 2 ** (bits * (i + 1)) - 1
        unpacked.append((packed & mask) >> (bits * i))
    return torch.cat(unpacked).to(torch.uint8)


class _PythonOnlyExtension:
    """Stands in for a compiled quanto extension: ``unpack`` in PyTorch, anything else refused."""

    unpack = staticmethod(_python_unpack)

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"quanto kernel {name!r} needs the compiled extension (not built here)")


@contextlib.contextmanager
def quanto_without_extension(device_kind: str) -> Iterator[None]:
    """Route quanto around its compiled extension: pure-PyTorch unpack on ``device_kind``, no AWQ kernel.

    quanto's registered ``quanto::unpack`` kernels call ``ext.lib.unpack``; the extension object gets a
    stand-in ``lib`` (so nothing is compiled) and AWQ/Marlin selection is switched off. Undone on exit.
    """
    extensions = importlib.import_module("optimum.quanto.library.extensions")
    qbits = importlib.import_module("optimum.quanto.tensor.weights.qbits")
    name = {"cuda": "quanto_cuda", "cpu": "quanto_cpp", "mps": "quanto_mps"}[device_kind]
    ext = extensions.get_extension(name) if extensions.is_extension_available(name) else None
    previous_lib = ext._lib if ext is not None else None
    original = qbits.is_extension_available
    if ext is not None and previous_lib is None:
        ext._lib = _PythonOnlyExtension()
    qbits.is_extension_available = lambda ext_name: False if ext_name.startswith("quanto_") else original(ext_name)
    try:
        yield
    finally:
        qbits.is_extension_available = original
        if ext is not None and previous_lib is None:
            ext._lib = None


# -- machine ----------------------------------------------------------------------------------


def package_facts(module: str, dist: str) -> dict[str, Any]:
    from importlib import metadata

    facts: dict[str, Any] = {}
    try:
        facts["version"] = metadata.version(dist)
    except Exception:  # noqa: BLE001
        facts["version"] = None
    try:
        imported = importlib.import_module(module)
        facts["file"] = str(getattr(imported, "__file__", None) or list(getattr(imported, "__path__", [])))
        facts["module_version"] = getattr(imported, "__version__", None)
    except Exception as error:  # noqa: BLE001
        facts["import_error"] = short_error(error)
        facts["version"] = "missing" if facts["version"] is None else facts["version"] + " (import fails)"
    return facts


def machine_facts(dev: Device) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "device": dev.name,
        "cuda_available": torch.cuda.is_available(),
    }
    if dev.cuda:
        props = torch.cuda.get_device_properties(torch.device(dev.name))
        facts.update(
            gpu=torch.cuda.get_device_name(torch.device(dev.name)),
            gpu_capability=".".join(map(str, torch.cuda.get_device_capability(torch.device(dev.name)))),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
        )
    for module, dist in (
        ("transformers", "transformers"),
        ("accelerate", "accelerate"),
        ("safetensors", "safetensors"),
        ("tokenizers", "tokenizers"),
        ("huggingface_hub", "huggingface_hub"),
        ("pydantic", "pydantic"),
        ("pydantic_core", "pydantic_core"),
        ("bitsandbytes", "bitsandbytes"),
        ("torchao", "torchao"),
        ("optimum.quanto", "optimum-quanto"),
    ):
        facts[dist] = package_facts(module, dist)
    try:
        cext = importlib.import_module("bitsandbytes.cextension")
        lib = getattr(cext, "lib", None)
        facts["bitsandbytes"]["native_library"] = getattr(getattr(lib, "_lib", None), "_name", None)
        facts["bitsandbytes"]["native_class"] = type(lib).__name__
        facts["bitsandbytes"]["backend"] = getattr(cext, "BNB_BACKEND", None)
        if type(lib).__name__.startswith("ErrorHandler"):
            facts["bitsandbytes"]["native_error"] = str(getattr(lib, "error_msg", ""))[:600]
    except Exception as error:  # noqa: BLE001
        facts["bitsandbytes"]["native_library"] = short_error(error)
    return facts


# -- check a: backends per layer --------------------------------------------------------------


def decode_ms(module: Any, x: Any, dev: Device, runs: int) -> float:
    import torch

    with torch.no_grad():
        for _ in range(3):
            module(x)
        dev.sync()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            module(x)
            dev.sync()
            times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 4)


def layer_row(label: str, level: str, shape: tuple[int, int, bool], quantize: Callable[[Any], Any],
              args: argparse.Namespace, dev: Device, shape_problem: Optional[Callable[[Any], Optional[str]]] = None) -> dict[str, Any]:
    import torch
    from torch import nn

    from langchain_adaptquant.backends.base import compute_dtype
    from langchain_adaptquant.runtime.accounting import stored_bytes

    in_f, out_f, bias = shape
    row: dict[str, Any] = {"backend": label, "level": level, "shape": f"{in_f}->{out_f}", "bias": bias, "ok": False}
    dtype = compute_dtype(args.device)
    module = linear = None
    try:
        torch.manual_seed(0)
        linear = nn.Linear(in_f, out_f, bias=bias, device=args.device, dtype=dtype).eval().requires_grad_(False)
        problem = shape_problem(linear) if shape_problem else None
        if problem:
            row.update(skipped=True, error=f"shape: {problem}")
            return row
        x = torch.randn(4, in_f, device=args.device, dtype=dtype)
        with torch.no_grad():
            reference = linear(x).float()
        dev.sync()
        started = time.perf_counter()
        result = quantize(linear)
        dev.sync()
        row["quantize_s"] = round(time.perf_counter() - started, 4)
        module, chosen = result if isinstance(result, tuple) else (result, label)
        row["chosen"] = chosen
        row["module"] = type(module).__name__
        weight = getattr(module, "weight", None)
        row["weight_type"] = type(weight).__name__ if weight is not None else None
        with torch.no_grad():
            out = module(x)
        row["out_dtype"] = str(out.dtype).replace("torch.", "")
        row["finite"] = bool(torch.isfinite(out).all())
        row["rel_error"] = round(float((out.float() - reference).norm() / reference.norm()), 5)
        row["decode_ms"] = decode_ms(module, torch.randn(1, in_f, device=args.device, dtype=dtype), dev, args.runs)
        fp16 = stored_bytes(linear) if module is not linear else None
        row["stored_bytes"] = stored_bytes(module)
        row["fp16_bytes"] = fp16 if fp16 is not None else row["stored_bytes"]
        row["bytes_ratio"] = ratio(row["stored_bytes"], row["fp16_bytes"])
        row["param_device"] = str(next(module.parameters()).device)
        row["all_on_device"], row["off_device"] = tensors_off_device(module, dev.kind)
        row["ok"] = row["finite"] and row["all_on_device"]
    except Exception as error:  # noqa: BLE001
        row.update(error=short_error(error), traceback=tb())
    finally:
        del module, linear
        dev.cleanup()
    return row


def check_backends(args: argparse.Namespace, dev: Device, state: dict[str, Any], result: dict[str, Any]) -> None:
    from langchain_adaptquant.backends.base import device_type
    from langchain_adaptquant.backends.registry import (
        all_backends,
        available_levels,
        backend_preference,
        preference,
        quantize_linear_with_fallback,
    )

    kind = device_type(args.device)
    result["rows"] = []
    result["preference_table"] = {lvl.value: order for lvl, order in preference.get(kind, {}).items()}
    result["preference_available"] = {lvl: [b.name for b in backend_preference(lvl, args.device)] for lvl in LEVELS}
    result["available_levels"] = [lvl.value for lvl in available_levels(args.device)]
    result["backends"] = {}
    rows = result["rows"]
    for backend in all_backends():
        result["backends"][backend.name] = {"available": backend.available(),
                                            "levels": [lvl for lvl in LEVELS if backend.supports(lvl, kind)]}
        for level in LEVELS:
            if not backend.supports(level, kind):
                continue
            if not result["backends"][backend.name]["available"]:
                rows.append({"backend": backend.name, "level": level, "shape": "-", "ok": False, "skipped": True,
                             "error": "library not available"})
                continue
            for shape in SHAPES:
                row = layer_row(backend.name, level, shape,
                                lambda lin, b=backend, lv=level: b.quantize_linear(lin, lv, args.device), args, dev,
                                shape_problem=lambda lin, b=backend, lv=level: b.shape_problem(lin, lv, kind))
                rows.append(row)
                log(f"a {row_line(row)}")
    for level in LEVELS:
        for shape in SHAPES:
            row = layer_row("registry", level, shape,
                            lambda lin, lv=level: quantize_linear_with_fallback(lin, lv, args.device), args, dev)
            rows.append(row)
            log(f"a {row_line(row)}")
    failed_quanto = sorted({r["level"] for r in rows if r["backend"] == "quanto" and not r["ok"] and not r.get("skipped")})
    result["quanto_failed_levels"] = failed_quanto
    if failed_quanto and not args.quanto_no_ext:
        from langchain_adaptquant.backends.registry import get_backend

        quanto = get_backend("quanto")
        with quanto_without_extension(kind):
            for level in failed_quanto:
                for shape in SHAPES:
                    row = layer_row("quanto-noext", level, shape,
                                    lambda lin, lv=level: quanto.quantize_linear(lin, lv, args.device), args, dev,
                                    shape_problem=lambda lin, lv=level: quanto.shape_problem(lin, lv, kind))
                    rows.append(row)
                    log(f"a {row_line(row)}")


def row_line(row: dict[str, Any]) -> str:
    if not row.get("ok"):
        return f"{row['backend']:13s} {row['level']:5s} {row['shape']:10s} FAIL {row.get('error', '')[:160]}"
    return (
        f"{row['backend']:13s} {row['level']:5s} {row['shape']:10s} ok   -> {row.get('chosen', ''):12s} "
        f"rel.err {row['rel_error']:.4f}  decode {row['decode_ms']:.3f} ms  bytes x{row['bytes_ratio']}  "
        f"{row['param_device']}"
    )


# -- checks b, c: the loader's chain -----------------------------------------------------------


def make_loader(args: argparse.Namespace) -> Any:
    from langchain_adaptquant.control.manager import DynamicQuantizationManager
    from langchain_adaptquant.control.resources import ScriptedProbe
    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

    try:  # the installed backends' levels and settings (older packages: the manager asked them itself)
        from langchain_adaptquant.runtime.loader import serving_manager as make_manager
    except ImportError:
        make_manager = DynamicQuantizationManager
    kind = Device(args.device).kind
    manager = make_manager(
        probe=ScriptedProbe(total_gb=256, used_percent=10, device=kind), snapshot_ttl_s=0, device=args.device
    )
    extra: dict[str, Any] = {}
    if args.no_layer_cache and "layer_cache_gb" in inspect.signature(AdaptiveModelLoader).parameters:
        extra["layer_cache_gb"] = 0
    return AdaptiveModelLoader(manager=manager, device=args.device, show_progress=False, **extra)


def flush_layer_cache(loader: Any) -> Optional[float]:
    """Wait for the loader's background layer-cache writes (if it has a layer cache); seconds waited."""
    cache = getattr(loader, "layer_cache", None)
    if cache is None or not hasattr(cache, "flush"):
        return None
    started = time.perf_counter()
    cache.flush(timeout=20)
    return round(time.perf_counter() - started, 3)


def layer_cache_facts(loader: Any) -> Any:
    cache = getattr(loader, "layer_cache", None)
    if cache is None:
        return None
    try:
        facts = dict(cache.stats()) if hasattr(cache, "stats") else {}
    except Exception as error:  # noqa: BLE001
        facts = {"stats_error": short_error(error)}
    facts.setdefault("enabled", getattr(cache, "enabled", None))
    facts.setdefault("disabled_reason", getattr(cache, "disabled_reason", None))
    return facts


def chat_ids(loaded: Any) -> Any:
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def greedy(loaded: Any, ids: Any, new_tokens: int) -> tuple[str, int, float]:
    """Greedy generation on the loaded model: text, tokens generated, seconds."""
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    started = time.perf_counter()
    with torch.no_grad():  # not inference_mode: quanto's packed tensors fail under it
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
    seconds = time.perf_counter() - started
    generated = output[0, ids.shape[1]:]
    return tokenizer.decode(generated, skip_special_tokens=True), int(generated.shape[0]), seconds


def touch(loaded: Any, dev: Device) -> None:
    import torch

    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        loaded.model(torch.tensor([[1, 2, 3, 4]], device=device))
    dev.sync()


def step_facts(loaded: Any, level: str, dev: Device) -> dict[str, Any]:
    from langchain_adaptquant.runtime.accounting import stored_bytes

    stored = stored_bytes(loaded.model)
    estimated = loaded.size.estimated_bytes(level)
    on_device, off = tensors_off_device(loaded.model, dev.kind)
    return {
        "level_now": loaded.level.value,
        "backends": loaded.backend_summary(),
        "stored_mb": mb(stored),
        "loader_stored_mb": mb(loaded.stored_bytes),
        "estimated_mb": mb(estimated),
        "stored_vs_estimate_pct": round(100.0 * (stored - estimated) / estimated, 2) if estimated else None,
        "all_on_device": on_device,
        "off_device": off,
    }


def cold_kwargs(level: str, dev: Device) -> dict[str, Any]:
    """from_pretrained arguments equivalent to the CUDA backends' level."""
    import torch

    if level == "fp16":
        return {}
    from transformers import BitsAndBytesConfig, QuantoConfig

    if level == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    if level == "int4":
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16 if dev.cuda else torch.bfloat16)}
    return {"quantization_config": QuantoConfig(weights=level)}


def cold_load(folder: Path, level: str, args: argparse.Namespace, dev: Device) -> dict[str, Any]:
    """Time and measure a cold from_pretrained + one forward while the switched model is still held."""
    import torch
    from transformers import AutoModelForCausalLM

    from langchain_adaptquant.backends.base import compute_dtype

    facts: dict[str, Any] = {}
    model = None
    dev.cleanup()
    before = dev.allocated()
    dev.reset_peak()
    started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=compute_dtype(args.device), device_map=args.device, **cold_kwargs(level, dev)
        )
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3, 4]], device=args.device))
        dev.sync()
        facts["cold_s"] = round(time.perf_counter() - started, 3)
        facts["cold_peak_bytes"] = dev.peak()
        facts["cold_peak_mb"] = mb(facts["cold_peak_bytes"])
        facts["cold_model_mb"] = mb(dev.allocated() - before) if before is not None else None
        facts["cold_ok"] = True
    except Exception as error:  # noqa: BLE001
        facts.update(cold_ok=False, cold_s=round(time.perf_counter() - started, 3), cold_error=short_error(error),
                     cold_traceback=tb())
    finally:
        del model
        dev.cleanup()
    return facts


def run_chain(name: str, folder: Path, args: argparse.Namespace, dev: Device, result: dict[str, Any], *,
              generate: bool, cold: bool, deadline: float) -> None:
    from langchain_adaptquant.errors import SwitchError

    loader = make_loader(args)
    rows: list[dict[str, Any]] = result.setdefault("rows", [])
    result.update(model=name, folder=str(folder))
    ids = None
    dev.cleanup()
    dev.reset_peak()
    started = time.perf_counter()
    loaded = loader.load_model(folder, force_quantization="fp16")
    touch(loaded, dev)
    result["load_s"] = round(time.perf_counter() - started, 3)
    result["load_peak_mb"] = mb(dev.peak())
    result["params"] = loaded.size.total_params
    first = {"step": "load fp16", "ok": True, "switch_s": result["load_s"], **step_facts(loaded, "fp16", dev),
             "alloc_after_mb": mb(dev.allocated())}
    if generate:
        ids = chat_ids(loaded)
        first.update(generation_facts(loaded, ids, args))
    rows.append(first)
    log(f"{name}: {chain_line(first)}")
    previous = "fp16"
    try:
        for target in CHAIN:
            if elapsed() > deadline:
                rows.append({"step": f"{previous} -> {target}", "ok": False, "skipped": True, "error": "over the time budget"})
                log(f"{name}: {previous} -> {target} skipped (time budget)")
                continue
            row: dict[str, Any] = {"step": f"{previous} -> {target}"}
            dev.cleanup()
            before = dev.allocated()
            dev.reset_peak()
            started = time.perf_counter()
            try:
                record = loader.requantize(loaded, target)
                dev.sync()
                row["requantize_s"] = round(time.perf_counter() - started, 4)
                touch(loaded, dev)
                row["switch_s"] = round(time.perf_counter() - started, 4)
                row["ok"] = True
                row["noop"] = record is None
                if record is not None:
                    row["record_s"] = round(record.seconds, 4)
                    row["layers_from_cache"] = getattr(record, "layers_from_cache", None)
                    row["layers"] = len(loaded.layer_backends)
            except Exception as error:  # noqa: BLE001 - SwitchError (rolled back) normally; anything else too
                dev.sync()
                row.update(ok=False, switch_s=round(time.perf_counter() - started, 4), error=short_error(error),
                           traceback=tb(), rolled_back=isinstance(error, SwitchError),
                           cause=short_error(error.__cause__) if error.__cause__ else None)
            peak, after = dev.peak(), dev.allocated()
            row["cache_write_s"] = flush_layer_cache(loader)  # after the peak: writes run after a switch
            row.update(
                alloc_before_mb=mb(before), alloc_after_mb=mb(after), peak_mb=mb(peak),
                peak_ratio=ratio(peak, max(before, after)) if before is not None else None,
            )
            row.update(step_facts(loaded, loaded.level.value, dev))
            if generate:
                row.update(generation_facts(loaded, ids, args))
            if cold:
                row.update(cold_load(folder, target, args, dev))
                held = max(before, after) if before is not None else None
                row["cold_peak_ratio"] = ratio(row.pop("cold_peak_bytes", None), held)
                row["switch_vs_cold"] = ratio(row.get("switch_s"), row.get("cold_s")) if row.get("cold_ok") else None
            rows.append(row)
            log(f"{name}: {chain_line(row)}")
            if row.get("ok"):
                previous = loaded.level.value
    finally:
        result["switch_records"] = [record.to_dict() for record in loaded.switches]
        result["layer_cache"] = layer_cache_facts(loader)
        del loaded
        loader.clear()
        dev.cleanup()


def generation_facts(loaded: Any, ids: Any, args: argparse.Namespace) -> dict[str, Any]:
    try:
        text, count, seconds = greedy(loaded, ids, args.gen_tokens)
        return {"text": text, "non_empty": bool(text.strip()), "gen_tokens": count, "gen_s": round(seconds, 3)}
    except Exception as error:  # noqa: BLE001
        return {"text": None, "non_empty": False, "gen_error": short_error(error), "gen_traceback": tb()}


def chain_line(row: dict[str, Any]) -> str:
    parts = [f"{row['step']:16s}", "ok  " if row.get("ok") else "FAIL"]
    if row.get("noop"):
        parts.append("(no-op)")
    if row.get("layers_from_cache"):
        parts.append(f"[{row['layers_from_cache']}/{row.get('layers')} layers from cache]")
    if "switch_s" in row:
        parts.append(f"{row['switch_s']:.3f}s")
    if row.get("backends"):
        parts.append(",".join(f"{k}:{v}" for k, v in sorted(row["backends"].items())))
    if row.get("stored_mb") is not None:
        parts.append(f"stored {row['stored_mb']} MB ({row.get('stored_vs_estimate_pct')}% vs est)")
    if row.get("peak_ratio") is not None:
        parts.append(f"peak x{row['peak_ratio']}")
    if "cold_s" in row:
        parts.append(f"cold {row['cold_s']}s x{row.get('switch_vs_cold')} peak x{row.get('cold_peak_ratio')}"
                     + ("" if row.get("cold_ok") else f" COLD FAIL {row.get('cold_error', '')[:100]}"))
    if "text" in row or "gen_error" in row:
        parts.append(f"gen {row.get('text')!r:.60}" if row.get("text") is not None else f"GEN FAIL {row.get('gen_error')}")
    if row.get("all_on_device") is False:
        parts.append(f"OFF DEVICE {row.get('off_device')}")
    if row.get("error"):
        parts.append(row["error"][:200])
    return " ".join(parts)


def check_loader(args: argparse.Namespace, dev: Device, state: dict[str, Any], result: dict[str, Any]) -> None:
    from langchain_adaptquant.assets import reference_model_path

    state["b_rows"] = result.setdefault("rows", [])
    run_chain("reference", reference_model_path(), args, dev, result, generate=True, cold=False,
              deadline=state["deadline"])


def check_zoo(args: argparse.Namespace, dev: Device, state: dict[str, Any], result: dict[str, Any]) -> None:
    from langchain_adaptquant.model_zoo import build_random_model

    started = time.perf_counter()
    folder = build_random_model(args.zoo_model)
    result["build_s"] = round(time.perf_counter() - started, 2)
    log(f"c: {args.zoo_model} ready in {result['build_s']}s at {folder}")
    run_chain(args.zoo_model, folder, args, dev, result, generate=False, cold=True, deadline=state["deadline"])


def check_loader_noext(args: argparse.Namespace, dev: Device, state: dict[str, Any], result: dict[str, Any]) -> None:
    """Check b again with quanto routed around its extension, when b's int2 step failed (what a fix would give)."""
    from langchain_adaptquant.assets import reference_model_path

    b_rows = state.get("b_rows") or []
    failed = [r["step"] for r in b_rows if not r.get("ok") and not r.get("skipped")]
    if not failed and not args.quanto_no_ext:
        result["skipped"] = "check b had no failed step"
        return
    if args.quanto_no_ext:
        result["skipped"] = "--quanto-no-ext: check b already ran this way"
        return
    result["b_failed_steps"] = failed
    with quanto_without_extension(dev.kind):
        run_chain("reference (quanto without extension)", reference_model_path(), args, dev, result, generate=True,
                  cold=False, deadline=state["deadline"])


# -- check d: requests in flight ---------------------------------------------------------------


def check_inflight(args: argparse.Namespace, dev: Device, state: dict[str, Any], result: dict[str, Any]) -> None:
    from langchain_adaptquant.assets import reference_model_path

    loader = make_loader(args)
    loaded = loader.load_model(reference_model_path(), force_quantization="fp16")
    ids = chat_ids(loaded)
    stop = threading.Event()
    started_one = threading.Event()
    outputs: list[dict[str, Any]] = []
    errors: list[str] = []
    budget_end = time.monotonic() + args.inflight_s

    def worker() -> None:
        while not stop.is_set() and time.monotonic() < budget_end:
            version = loaded.weights_version
            level = loaded.level.value
            started_one.set()
            try:
                text, count, seconds = greedy(loaded, ids, 32)
                outputs.append({"text": text, "non_empty": bool(text.strip()), "tokens": count,
                                "seconds": round(seconds, 3), "level_start": level, "level_end": loaded.level.value,
                                "version_start": version, "version_end": loaded.weights_version})
            except Exception:  # noqa: BLE001
                errors.append(tb())

    thread = threading.Thread(target=worker, name="inflight-generate", daemon=True)
    switches: list[dict[str, Any]] = []
    try:
        thread.start()
        started_one.wait(timeout=30)
        time.sleep(0.02)  # let the first generation get going
        for target in INFLIGHT_CHAIN:
            started = time.perf_counter()
            try:
                record = loader.requantize(loaded, target, reason="in-flight check")
                switches.append({"to": target, "ok": True, "seconds": round(time.perf_counter() - started, 4),
                                 "generations_done": len(outputs), "noop": record is None})
            except Exception as error:  # noqa: BLE001
                switches.append({"to": target, "ok": False, "error": short_error(error), "traceback": tb()})
            log(f"d: switched to {target} while generating ({len(outputs)} generations done, {len(errors)} errors)")
            time.sleep(0.05)
        # one more whole generation at the final level
        done = len(outputs)
        deadline = time.monotonic() + 30
        while len(outputs) + len(errors) <= done + 1 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=60)
    overlapped = [o for o in outputs if o["version_start"] != o["version_end"] or o["version_start"] % 2]
    result.update({
        "generations": len(outputs),
        "errors": errors,
        "exceptions": len(errors),
        "all_non_empty": all(o["non_empty"] for o in outputs) if outputs else False,
        "overlapping_a_switch": len(overlapped),
        "switches": switches,
        "thread_alive_after_join": thread.is_alive(),
        "outputs": outputs[:12],
        "ok": bool(outputs) and not errors and all(o["non_empty"] for o in outputs) and all(s["ok"] for s in switches),
    })
    loaded = None  # the worker has joined: drop our reference so clear() frees the model  # noqa: F841
    loader.clear()
    dev.cleanup()


# -- driver -----------------------------------------------------------------------------------


CHECKS: dict[str, tuple[str, Callable[..., None]]] = {
    "a": ("a_backends", check_backends),
    "b": ("b_loader", check_loader),
    "d": ("d_inflight", check_inflight),
    "c": ("c_switch_vs_cold", check_zoo),
    "e": ("e_loader_quanto_noext", check_loader_noext),
}


def default_out() -> str:
    out = os.environ.get("OUT")
    return str(Path(out) / "cuda_check.json") if out else str(_HERE / "results" / "cuda_check.json")


def write(path: Path, report: dict[str, Any]) -> None:
    report["elapsed_s"] = round(elapsed(), 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def print_tables(report: dict[str, Any]) -> None:
    checks = report["checks"]
    print("\n== summary ==", flush=True)
    for key, check in checks.items():
        note = check.get("error") or check.get("result", {}).get("skipped") or ""
        print(f"{key:22s} {check['status']:8s} {check.get('seconds', 0):7.1f}s  {note[:200]}")
    print(f"quanto JIT: {json.dumps(report.get('quanto_jit'), default=str)}")
    a = checks.get("a_backends", {}).get("result")
    if a and a.get("rows"):
        print("\n== a: backends per layer ==")
        print(f"{'backend':13s} {'level':5s} {'shape':10s} {'ok':4s} {'chosen':12s} {'rel.err':>8s} {'decode ms':>9s} "
              f"{'bytes':>6s} {'device':8s} error")
        for r in a["rows"]:
            ok = "ok" if r.get("ok") else ("skip" if r.get("skipped") else "FAIL")
            rel = f"{r['rel_error']:.4f}" if "rel_error" in r else "-"
            dec = f"{r['decode_ms']:.3f}" if "decode_ms" in r else "-"
            print(f"{r['backend']:13s} {r['level']:5s} {r['shape']:10s} {ok:4s} {str(r.get('chosen', '-')):12s} "
                  f"{rel:>8s} {dec:>9s} {str(r.get('bytes_ratio', '-')):>6s} {str(r.get('param_device', '-')):8s} "
                  f"{(r.get('error') or '')[:90]}")
    for key in ("b_loader", "c_switch_vs_cold", "e_loader_quanto_noext"):
        chain = checks.get(key, {}).get("result")
        if not chain or not chain.get("rows"):
            continue
        print(f"\n== {key}: {chain['model']} ({chain.get('params')} params, load {chain.get('load_s')}s) ==")
        print(f"{'step':16s} {'ok':4s} {'switch_s':>8s} {'cold_s':>7s} {'ratio':>6s} {'peak':>6s} {'coldpk':>6s} "
              f"{'stored':>8s} {'vs est':>7s} {'cache':>5s} {'dev':3s} backends / generation / error")
        for r in chain["rows"]:
            ok = "ok" if r.get("ok") else ("skip" if r.get("skipped") else "FAIL")
            extra = ",".join(f"{k}:{v}" for k, v in sorted((r.get("backends") or {}).items()))
            if "text" in r:
                extra += f" | {r.get('text')!r:.50}"
            if r.get("error"):
                extra += f" | {r['error'][:120]}"
            if r.get("cold_ok") is False:
                extra += f" | cold: {r.get('cold_error', '')[:120]}"
            print(f"{r['step']:16s} {ok:4s} {str(r.get('switch_s', '-')):>8s} {str(r.get('cold_s', '-')):>7s} "
                  f"{str(r.get('switch_vs_cold', '-')):>6s} {str(r.get('peak_ratio', '-')):>6s} "
                  f"{str(r.get('cold_peak_ratio', '-')):>6s} {str(r.get('stored_mb', '-')):>8s} "
                  f"{str(r.get('stored_vs_estimate_pct', '-')):>7s} {str(r.get('layers_from_cache', '-')):>5s} "
                  f"{'y' if r.get('all_on_device') else 'n':3s} {extra}")
    d = checks.get("d_inflight", {}).get("result")
    if d and "ok" in d:
        print(f"\n== d: in flight == ok={d['ok']} generations={d['generations']} exceptions={d['exceptions']} "
              f"all_non_empty={d['all_non_empty']} overlapping_a_switch={d['overlapping_a_switch']} "
              f"switches={[(s['to'], s['ok'], s.get('seconds')) for s in d['switches']]}")
    print(flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=default_out())
    parser.add_argument("--quick", action="store_true", help="CPU dry run: fewer timing runs, a tiny zoo model")
    parser.add_argument("--parts", default="a,b,d,c,e", help="which checks, in this order (default a,b,d,c,e)")
    parser.add_argument("--zoo-model", default=None, help="model_zoo name for check c (default llama-150m; --quick: llama-tiny)")
    parser.add_argument("--runs", type=int, default=None, help="timed decode forwards per layer (default 20; --quick: 5)")
    parser.add_argument("--gen-tokens", type=int, default=16)
    parser.add_argument("--inflight-s", type=float, default=60.0, help="upper bound for check d's generation loop")
    parser.add_argument("--budget-s", type=float, default=210.0, help="chain steps after this many seconds are skipped")
    parser.add_argument("--quanto-jit", action="store_true", help="let quanto JIT-compile its extensions (slow)")
    parser.add_argument("--quanto-no-ext", action="store_true", help="route quanto around its extension for the whole run")
    parser.add_argument("--no-layer-cache", action="store_true", help="loader without its on-disk layer cache (if it has one)")
    args = parser.parse_args(argv)
    args.zoo_model = args.zoo_model or ("llama-tiny" if args.quick else "llama-150m")
    args.runs = args.runs or (5 if args.quick else 20)
    out = Path(args.out)
    log(f"cuda_check: device={args.device} quick={args.quick} parts={args.parts} out={out}")

    import torch

    try:  # per-file "Loading weights" / "Writing model shards" bars would bury the progress lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - transformers broken: the checks that need it record why
        pass
    torch.manual_seed(0)
    report: dict[str, Any] = {"args": vars(args), "machine": {}, "checks": {}}
    dev = Device(args.device)
    if dev.cuda and not torch.cuda.is_available():
        log("CUDA is not available here: nothing to check on this device")
        report["machine"] = {"torch": torch.__version__, "cuda_available": False}
        write(out, report)
        return 2
    with contextlib.ExitStack() as undo:
        report["quanto_jit"] = guard_quanto_jit(args.quanto_jit, undo)
        return _run_checks(args, dev, report, out)


def _run_checks(args: argparse.Namespace, dev: Any, report: dict[str, Any], out: Path) -> int:
    import torch

    try:
        report["machine"] = machine_facts(dev)
    except Exception as error:  # noqa: BLE001
        report["machine"] = {"error": short_error(error), "traceback": tb()}
    machine = report["machine"]
    log("machine: " + json.dumps({k: machine.get(k) for k in ("gpu", "gpu_capability", "torch", "torch_cuda", "python")}))
    for dist in ("transformers", "bitsandbytes", "torchao", "optimum-quanto", "pydantic"):
        log(f"  {dist}: {json.dumps(machine.get(dist), default=str)[:300]}")
    log(f"  quanto JIT: {json.dumps(report['quanto_jit'], default=str)}")
    write(out, report)

    stack = contextlib.ExitStack()
    if args.quanto_no_ext:
        try:
            stack.enter_context(quanto_without_extension(dev.kind))
        except Exception as error:  # noqa: BLE001
            report["quanto_no_ext_error"] = short_error(error)
    state = {"deadline": args.budget_s}
    with stack:
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            key, check = CHECKS[part]
            log(f"--- check {key} ---")
            started = time.perf_counter()
            entry: dict[str, Any] = {"status": "running", "result": {}}
            report["checks"][key] = entry
            try:
                check(args, dev, state, entry["result"])  # fills result as it goes: kept if it fails midway
                entry["status"] = "skipped" if entry["result"].get("skipped") else "ok"
            except Exception as error:  # noqa: BLE001
                entry.update(status="error", error=short_error(error), traceback=tb())
                log(f"check {key} failed: {short_error(error)}")
            entry["seconds"] = round(time.perf_counter() - started, 2)
            if dev.cuda:
                entry["max_memory_allocated_mb"] = mb(torch.cuda.max_memory_allocated())
            dev.cleanup()
            write(out, report)
            log(f"--- check {key}: {entry['status']} in {entry['seconds']}s ---")
    print_tables(report)
    write(out, report)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
