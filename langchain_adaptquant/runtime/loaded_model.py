"""What the loader holds per model: :class:`LoadedModel` (weights, level, counters) and :class:`SwitchRecord`.

Plain records shared by the model cache, the switcher and the loader that composes them; telemetry,
the server and the chat model read them. ``LoadedModel.model`` is swapped in place on every switch.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority
from langchain_adaptquant.control.sizing import ModelSize
from langchain_adaptquant.runtime.gate import StepGate
from langchain_adaptquant.runtime.os_memory import file_backed_bytes
from langchain_adaptquant.runtime.quality import QualityProfile
from langchain_adaptquant.runtime.records import SwitchRecord
from langchain_adaptquant.runtime.served import InUse
from langchain_adaptquant.runtime.weights import WeightSource

__all__ = ["LoadedModel", "SwitchRecord", "quantizable_linears"]

if TYPE_CHECKING:
    from langchain_adaptquant.runtime.engine import GenerationEngine


@dataclass(eq=False)
class LoadedModel(InUse):
    """A cached model and what we know about it. ``model`` is swapped in place on every switch."""

    key: str
    name: str
    folder: Path
    source: WeightSource  # the open, memory-mapped weights: switches re-read from this one mapping
    model: Any
    tokenizer: Any
    level: QuantizationLevel
    device: str
    size: ModelSize
    layer_backends: dict[str, str]
    stored_bytes: int
    load_seconds: float
    access_count: int = 0
    last_access: float = field(default_factory=time.time)
    active_requests: int = 0
    last_error: Optional[str] = None
    last_decision_reason: str = ""
    #: What the weights on disk came from, e.g. "GGUF Q4_1 (Q8_0 embeddings), dequantized to bf16" for a
    #: pulled model: its 16-bit level is that file made dense, not the upstream 16-bit checkpoint.
    source_format: str = "safetensors"
    #: Even when the weights are stable, odd while a switch swaps layers (a seqlock) — for code that
    #: runs the model outside the engine; the engine itself knows each step's level (``gate``).
    weights_version: int = 0
    switches: list[SwitchRecord] = field(default_factory=list)
    #: The level each quantizable Linear is stored at (mixed precision keeps some one level up).
    layer_levels: dict[str, QuantizationLevel] = field(default_factory=dict)
    #: Measured agreement with 16-bit per level (None: no tokenizer, or measuring is off).
    quality: Optional[QualityProfile] = None
    #: Token ids the quality profile scores (the held-out text's start, in this model's tokens).
    quality_ids: Optional[list[int]] = field(default=None, repr=False)
    switch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Decode steps run inside ``gate.step()``, switches inside ``gate.exclusive()``: never both.
    gate: StepGate = field(default_factory=StepGate, repr=False)
    #: The model's generation engine, started by ``AdaptiveModelLoader.engine`` on first use.
    engine: Optional["GenerationEngine"] = field(default=None, repr=False)
    #: Priority and forced level of the latest call: the engine's between-steps check re-decides with them.
    last_priority: TaskPriority = TaskPriority.BALANCED
    last_forced: Optional[QuantizationLevel] = None
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    #: Which runtime serves it (every answer's metadata says; runtime.registry chooses).
    runtime: str = "torch"

    @property
    def precision(self) -> str:
        return self.level.precision(self.device)

    @property
    def grammar_tokenizer(self) -> Any:
        """The tokenizer llguidance's grammars read (this one: transformers' already)."""
        return self.tokenizer

    def precision_of(self, level: QuantizationLevel) -> str:
        """How ``level`` is stored here (bf16 for 16-bit on a CPU)."""
        return level.precision(self.device)

    @property
    def context_length(self) -> Optional[int]:
        """Longest prompt plus answer the model takes (its config's ``max_position_embeddings``)."""
        return getattr(getattr(self.model, "config", None), "max_position_embeddings", None)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """The model's own stop strings (generation_config.json), e.g. a base model's next-turn marker."""
        return tuple(getattr(getattr(self.model, "generation_config", None), "stop_strings", None) or ())

    @property
    def eos(self) -> set[int]:
        """Token ids that end an answer (the generation config's and the tokenizer's)."""
        from langchain_adaptquant.runtime.generation import eos_ids

        return eos_ids(self.model, self.tokenizer)

    def level_summary(self) -> dict[str, int]:
        """How many Linear layers are stored at each level (differs from ``level`` under mixed precision)."""
        counts: dict[str, int] = {}
        for level in self.layer_levels.values():
            counts[level.value] = counts.get(level.value, 0) + 1
        return counts

    def backend_summary(self) -> dict[str, int]:
        """Which backend holds how many Linear layers (a layer a backend rejects falls to the next)."""
        counts: dict[str, int] = {}
        for backend in self.layer_backends.values():
            counts[backend] = counts.get(backend, 0) + 1
        return counts

    @property
    def backend(self) -> str:
        """The backend holding most layers: the one-word answer for response metadata."""
        summary = self.backend_summary()
        return max(summary, key=lambda backend: summary[backend]) if summary else "none"

    def to_dict(self) -> dict[str, Any]:
        """Cache statistics in the documented shape (name, size_mb, access_count) and more."""
        return {
            "name": self.name,
            "path": str(self.folder),
            "level": self.level.value,
            "precision": self.precision,
            "source_format": self.source_format,
            "device": self.device,
            "size_mb": round(self.stored_bytes / 2**20, 2),
            "estimated_mb": round(self.size.estimated_bytes(self.level) / 2**20, 2),
            "file_backed_mb": round(file_backed_bytes(self.model, self.folder) / 2**20, 2),
            "parameters": self.size.total_params,
            "backends": self.backend_summary(),
            "layer_levels": self.level_summary(),
            "quality": self.quality.to_dict() if self.quality is not None else None,
            "load_seconds": round(self.load_seconds, 3),
            "access_count": self.access_count,
            "last_access": self.last_access,
            "active_requests": self.active_requests,
            "engine": self.engine.stats().to_dict() if self.engine is not None else None,
            "switches": len(self.switches),
            "last_error": self.last_error,
        }


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every Linear except the output head, in module order (the head stays 16-bit, as in sizing)."""
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if output_embeddings is not None else None
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]
