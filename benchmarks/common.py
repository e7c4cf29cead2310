"""The one measuring module of the benchmarks: each fact every script needs is defined here once.

* where results go (``RESULTS``) and which folder a model name means (``resolve``, ``model_folder``);
* the machine a result came from (``machine_info``, with ``cpu_model`` and ``cpu_flags``);
* process memory around an action: ``read_status`` / ``reset_peak`` (the library's
  ``control.resources.process_status`` and ``reset_peak_rss``), ``AnonSampler``, ``measured``;
* bandwidth and bytes: ``copy_bandwidth``, ``bytes_read_per_token``, ``warm_page_cache``;
* a loader on a scripted machine (``quiet_loader``), so benchmarks decide the same way on any host;
* the held-out text and window of a model folder's eval.json (``heldout_ids``, ``eval_window``);
  scoring it is the library's ``runtime.quality.score_text``;
* output: ``write_json``, ``print_table``.

Importing it loads neither torch nor transformers (those are imported by the functions that need
them), so a worker that must not load torch, like llama.cpp's in ``llamacpp_compare``, can use it too.
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

from langchain_adaptquant.control.resources import process_status, reset_peak_rss
from langchain_adaptquant.units import MIB as MB

if TYPE_CHECKING:
    from langchain_adaptquant import AdaptiveModelLoader, PolicyConfig, ScriptedProbe
    from langchain_adaptquant.runtime.loader import LoadedModel

__all__ = [
    "MB",
    "RESULTS",
    "AnonSampler",
    "bytes_read_per_token",
    "copy_bandwidth",
    "cpu_flags",
    "cpu_model",
    "eval_window",
    "heldout_ids",
    "machine_info",
    "measured",
    "model_folder",
    "print_table",
    "quiet_loader",
    "read_status",
    "reset_peak",
    "resolve",
    "warm_page_cache",
    "write_json",
]

#: Where every benchmark writes its JSON and plots by default.
RESULTS = Path(__file__).resolve().parent / "results"
#: Document separator the reference model was evaluated with (first context token of eval.json's method).
EOT = "<|endoftext|>"
DEFAULT_WINDOW = 256


# -- models -------------------------------------------------------------------------------------------
def resolve(name: str) -> Path:
    """The folder of a path, 'reference' (the embedded model), a pulled catalog model or a model-zoo name."""
    if Path(name).is_dir():
        return Path(name)
    if name == "reference":
        from langchain_adaptquant.assets import reference_model_path

        return reference_model_path()
    from langchain_adaptquant.pretrained import CATALOG, model_path

    if name in CATALOG:
        return model_path(name)  # a pulled real model (a clear error says how to pull it)
    from langchain_adaptquant.model_zoo import build_random_model

    return build_random_model(name)


def model_folder(name: str) -> Path:
    """Folder of 'reference', a model-zoo name or a path; a clear exit when the reference is not built yet."""
    folder = Path(resolve(name))
    if not (folder / "config.json").is_file():
        hint = " (train it: python scripts/train_reference_model.py)" if name == "reference" else ""
        raise SystemExit(f"model {name!r}: no config.json in {folder}{hint}")
    return folder


def quiet_loader(total_gb: float = 256.0, used_percent: float = 10.0, policy: Optional["PolicyConfig"] = None,
                 clock: Any = None) -> tuple["AdaptiveModelLoader", "ScriptedProbe"]:
    """A loader whose manager sees a scripted machine, so benchmarks decide the same way on any host."""
    from langchain_adaptquant import AdaptiveModelLoader, ScriptedProbe, serving_manager

    probe = ScriptedProbe(total_gb=total_gb, used_percent=used_percent)
    kwargs: dict[str, Any] = {"probe": probe, "snapshot_ttl_s": 0.0}
    if policy is not None:
        kwargs["policy"] = policy
    if clock is not None:
        kwargs["clock"] = clock
    manager = serving_manager(**kwargs)
    return AdaptiveModelLoader(manager=manager, show_progress=False), probe


# -- the machine --------------------------------------------------------------------------------------
def _cpuinfo_lines() -> list[str]:
    # The library reads no CPU facts, so the benchmarks read /proc/cpuinfo here, in one place.
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what ``platform`` knows)."""
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    """The SIMD features that decide which int4/int8 kernels are fast here."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [flag for flag in wanted if flag in have]
    return []


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two result files: CPU, cores, memory, library versions, threads."""
    import psutil
    import torch
    import transformers

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


# -- process memory around an action ------------------------------------------------------------------
def read_status() -> dict[str, int]:
    """The kernel's memory figures for this process (``control.resources.process_status``), keyed
    as /proc/self/status names them."""
    status = process_status()
    return {"VmRSS": status.rss, "VmHWM": status.peak_rss, "RssAnon": status.anon, "RssFile": status.file}


def reset_peak() -> None:
    """Reset the peak RSS to the current RSS (``control.resources.reset_peak_rss``)."""
    reset_peak_rss()


class AnonSampler:
    """Samples RssAnon every ``interval`` seconds in a thread; ``peak`` is the highest seen."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, read_status()["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self) -> "AnonSampler":
        self.peak = read_status()["RssAnon"]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, read_status()["RssAnon"])


def measured(action: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``action`` once: its result, seconds, RSS and anonymous MB before it, peak RSS and peak anonymous MB."""
    import gc

    from langchain_adaptquant.runtime.os_memory import release_memory

    gc.collect()
    release_memory()
    before = read_status()
    reset_peak()
    started = time.perf_counter()
    with AnonSampler() as sampler:
        result = action()
    seconds = time.perf_counter() - started
    peak = read_status()
    return result, {
        "seconds": seconds,
        "rss_before_mb": before["VmRSS"] / MB,
        "anon_before_mb": before["RssAnon"] / MB,
        "peak_rss_mb": peak["VmHWM"] / MB,
        "peak_anon_mb": sampler.peak / MB,
    }


# -- bandwidth and bytes ------------------------------------------------------------------------------
def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Best copy bandwidth of a large tensor: the ceiling for a decode step that streams all weights."""
    import torch

    from langchain_adaptquant.runtime.os_memory import release_memory

    count = megabytes * MB
    source = torch.ones(count, dtype=torch.uint8)
    target = torch.empty_like(source)
    target.copy_(source)  # fault the pages in before timing
    speeds = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        speeds.append(2 * count / (time.perf_counter() - started) / 1e9)
    del source, target
    release_memory()
    return {"copy_mb": megabytes, "repeats": repeats, "best_gb_s": round(max(speeds), 2),
            "all_gb_s": [round(s, 2) for s in speeds], "counts": "bytes read + bytes written per second (1e9)"}


def bytes_read_per_token(loaded: "LoadedModel") -> int:
    """Weights one decode step streams: everything stored except the input-embedding table (one row read)."""
    model = loaded.model
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and head.weight is embedding:
        return loaded.stored_bytes  # tied: the table is read whole as the output head
    return loaded.stored_bytes - embedding.numel() * embedding.element_size()


def warm_page_cache(paths: Path | Sequence[Path]) -> None:
    """Read each weights file once (a folder's ``*.safetensors``, or a file such as a GGUF), so no
    load time that follows includes the disk."""
    for path in [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        for file in files:
            with open(file, "rb") as handle:
                while handle.read(64 * MB):
                    pass


# -- held-out inputs (scored by langchain_adaptquant.runtime.quality.score_text) -------------------------
def eval_window(folder: Path) -> int:
    """Predicted tokens per window, as the model's eval.json used (so our perplexity is comparable)."""
    eval_file = Path(folder) / "eval.json"
    if eval_file.is_file():
        return int(json.loads(eval_file.read_text()).get("window", DEFAULT_WINDOW))
    return DEFAULT_WINDOW


def heldout_ids(folder: Path, tokenizer: Any) -> Optional[list[int]]:
    """``[<|endoftext|>] + tokens of heldout_sample.txt``, eval.json's method; None without a sample."""
    sample = Path(folder) / "heldout_sample.txt"
    if tokenizer is None or not sample.is_file():
        return None
    first = tokenizer.convert_tokens_to_ids(EOT)
    if first is None or first == tokenizer.unk_token_id:
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(sample.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return [int(first)] + list(ids)


# -- output -------------------------------------------------------------------------------------------
def write_json(path: Path | str, data: Any, indent: int = 2) -> Path:
    """``data`` as JSON at ``path`` (folders made; values JSON cannot hold written as text); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) ``columns``; printed and returned."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text
