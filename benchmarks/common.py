"""Helpers shared by the level and adaptation benchmarks: machine facts, a quiet loader, held-out scoring.

Peak-memory helpers (``read_status``, ``reset_peak``, ``AnonSampler``, ``measured``) and model
resolution live in ``switch.py``; this module re-exports them so each benchmark imports one place.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from langchain_adaptquant import AdaptiveModelLoader, DynamicQuantizationManager, PolicyConfig, ScriptedProbe
from langchain_adaptquant.units import MIB as MB

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # switch.py is a sibling script, not a package module

from switch import AnonSampler, measured, read_status, reset_peak, resolve  # noqa: E402

__all__ = [
    "MB",
    "AnonSampler",
    "HeldoutScore",
    "heldout_ids",
    "eval_window",
    "machine_info",
    "measured",
    "model_folder",
    "print_table",
    "quiet_loader",
    "read_status",
    "reset_peak",
    "resolve",
    "score_heldout",
    "write_json",
]

#: Document separator the reference model was evaluated with (first context token of eval.json's method).
EOT = "<|endoftext|>"
DEFAULT_WINDOW = 256


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")) -> list[str]:
    """The SIMD features that decide which int4/int8 kernels are fast here."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [flag for flag in wanted if flag in have]
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two result files: CPU, cores, memory, library versions, threads."""
    import psutil
    import transformers

    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
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


def model_folder(name: str) -> Path:
    """Folder of 'reference', a model-zoo name or a path; a clear exit when the reference is not built yet."""
    folder = Path(resolve(name))
    if not (folder / "config.json").is_file():
        hint = " (train it: python scripts/train_reference_model.py)" if name == "reference" else ""
        raise SystemExit(f"model {name!r}: no config.json in {folder}{hint}")
    return folder


def quiet_loader(total_gb: float = 256.0, used_percent: float = 10.0, policy: Optional[PolicyConfig] = None,
                 clock: Any = None) -> tuple[AdaptiveModelLoader, ScriptedProbe]:
    """A loader whose manager sees a scripted machine, so benchmarks decide the same way on any host."""
    probe = ScriptedProbe(total_gb=total_gb, used_percent=used_percent)
    kwargs: dict[str, Any] = {"probe": probe, "snapshot_ttl_s": 0.0}
    if policy is not None:
        kwargs["policy"] = policy
    if clock is not None:
        kwargs["clock"] = clock
    manager = DynamicQuantizationManager(**kwargs)
    return AdaptiveModelLoader(manager=manager, show_progress=False), probe


# -- held-out quality ---------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class HeldoutScore:
    """Summed NLL and per-position argmax over one held-out text; perplexity and agreement follow."""

    nll: float
    tokens: int
    argmax: torch.Tensor

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    def agreement(self, reference: "HeldoutScore") -> float:
        """Share of positions whose top-1 next token equals the reference's (e.g. 16-bit's)."""
        return float((self.argmax == reference.argmax).float().mean())


@torch.no_grad()  # not inference_mode: quanto's packed tensors fail under it
def score_heldout(model: Any, ids: Sequence[int], window: int = DEFAULT_WINDOW) -> HeldoutScore:
    """NLL of ids[1:] given what precedes, in windows of ``window`` predicted tokens (eval.json's method)."""
    total, count, argmax = 0.0, 0, []
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([list(ids[start : start + window + 1])])
        logits = model(input_ids=chunk).logits[0, :-1].float()
        total += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
        argmax.append(logits.argmax(dim=-1))
    return HeldoutScore(total, count, torch.cat(argmax))


# -- output -------------------------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
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
