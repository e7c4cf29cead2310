"""AdaptiveModelLoader: load a model at any level, requantize it in place, cache and evict.

A load builds the model skeleton without memory (meta device), then fills it one tensor at a time
from the memory-mapped safetensors: 16-bit parts as they are, each quantizable Linear through a
backend. A switch does the same for the Linear layers only, swapping one module at a time, so peak
memory is the larger of before/after plus about one layer, never two models. Requests in flight
keep running: they are decoded by the model's one :class:`~langchain_adaptquant.runtime.GenerationEngine`
(:meth:`AdaptiveModelLoader.engine`), and a switch holds the model's
:class:`~langchain_adaptquant.runtime.StepGate`, so it lands between two decode steps: every token
is produced with one known set of weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from torch import nn
from tqdm.auto import tqdm

from langchain_adaptquant.backends.base import UnsupportedLevelError, compute_dtype, linear_with
from langchain_adaptquant.backends.registry import (
    available_levels,
    backend_catalog,
    get_backend,
    quantize_linear_with_fallback,
    recipe,
)
from langchain_adaptquant.control.layer_plan import DEFAULT_MIXED_PRECISION, MixedPrecision, plan_levels
from langchain_adaptquant.control.levels import QuantizationLevel, SwitchDirection, TaskPriority, switch_direction
from langchain_adaptquant.control.manager import DynamicQuantizationManager
from langchain_adaptquant.control.resources import GIB, process_memory, validate_budget_gb
from langchain_adaptquant.control.sizing import ModelSize, size_from_model, size_of
from langchain_adaptquant.errors import (
    AdaptQuantError,
    InsufficientMemoryError,
    InvalidValueError,
    SwitchError,
    UnsupportedArchitectureError,
    WeightsError,
)
from langchain_adaptquant.runtime.accounting import stored_bytes
from langchain_adaptquant.runtime.gate import StepGate
from langchain_adaptquant.runtime.layer_cache import LayerCache
from langchain_adaptquant.runtime.os_memory import (
    TRIM_EVERY_BYTES,
    drop_file_pages,
    file_backed_bytes,
    mapped_ranges,
    release_memory,
    trim_heap,
)
from langchain_adaptquant.runtime.quality import (
    PROFILE_TOKENS,
    QualityProfile,
    heldout_text,
    text_ids,
    weights_fingerprint,
)
from langchain_adaptquant.runtime.weights import WeightSource, resolve_model_folder

if TYPE_CHECKING:
    from langchain_adaptquant.runtime.engine import EngineConfig, GenerationEngine

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("ADAPTQUANT_CACHE_DIR", Path.home() / ".cache" / "langchain_adaptquant"))


@dataclass(frozen=True)
class SwitchRecord:
    """One requantization, successful or rolled back: what telemetry and stats report."""

    model: str
    from_level: str
    to_level: str
    reason: str
    seconds: float
    ok: bool
    rss_before: int
    rss_after: int
    anon_before: int
    anon_after: int
    stored_bytes_before: int
    stored_bytes_after: int
    at: float = field(default_factory=time.time)
    error: Optional[str] = None
    #: Layers read back from the layer cache instead of quantized from the source.
    layers_from_cache: int = 0

    @property
    def direction(self) -> SwitchDirection:
        """'downgrade' or 'upgrade' (a record is only made when the level changes)."""
        return switch_direction(QuantizationLevel.parse(self.from_level), QuantizationLevel.parse(self.to_level))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "from_level": self.from_level,
            "to_level": self.to_level,
            "direction": self.direction,
            "reason": self.reason,
            "seconds": round(self.seconds, 4),
            "ok": self.ok,
            "error": self.error,
            "memory_before_mb": round(self.rss_before / 2**20, 1),
            "memory_after_mb": round(self.rss_after / 2**20, 1),
            "anon_before_mb": round(self.anon_before / 2**20, 1),
            "anon_after_mb": round(self.anon_after / 2**20, 1),
            "stored_mb_before": round(self.stored_bytes_before / 2**20, 2),
            "stored_mb_after": round(self.stored_bytes_after / 2**20, 2),
            "layers_from_cache": self.layers_from_cache,
            "at": self.at,
        }


@dataclass(eq=False)
class LoadedModel:
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

    @property
    def precision(self) -> str:
        return self.level.precision(self.device)

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

    @contextmanager
    def in_use(self) -> Iterator["LoadedModel"]:
        """Mark a request in flight on this model: it cannot be evicted meanwhile."""
        with self._count_lock:
            self.active_requests += 1
            self.last_access = time.time()
        try:
            yield self
        finally:
            with self._count_lock:
                self.active_requests -= 1

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


def serving_manager(**settings: Any) -> DynamicQuantizationManager:
    """A manager that offers the levels the installed backends store and reports their settings:
    the one every serving entry point (chat model, server, CLI, Ray replica) builds."""
    return DynamicQuantizationManager(catalog=backend_catalog(), **settings)


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every Linear except the output head, in module order (the head stays 16-bit, as in sizing)."""
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if output_embeddings is not None else None
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]


def _close_engine(loaded: LoadedModel) -> None:
    engine, loaded.engine = loaded.engine, None
    if engine is not None:
        engine.close()


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _read_generation_config(model: Any, folder: Path) -> None:
    """Use the folder's generation_config.json (end-of-turn ids, a base model's stop strings), as
    ``from_pretrained`` does; a skeleton built from the config alone only knows the config's eos id."""
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        logger.warning("ignoring %s/generation_config.json: %s", folder, error)


def _source_format(folder: Path) -> str:
    """"safetensors" for a plain folder; a pulled model's record says which GGUF it was converted from."""
    from langchain_adaptquant.pretrained.store import read_source

    source = read_source(folder)
    return source.format if source is not None else "safetensors"


def _object_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1)[:64].float().cpu().numpy().tobytes()
        digest.update(flat)
    return digest.hexdigest()[:16]


def _check_manager_levels(manager: DynamicQuantizationManager, device: str) -> None:
    """A manager that may choose a level no installed backend stores would fail loads later: say so now."""
    stored = available_levels(device)
    extra = [level for level in manager.available_levels if level not in stored]
    if extra:
        raise InvalidValueError(
            "manager", f"a manager offering {', '.join(level.value for level in extra)} on {device}",
            f"one offering only levels an installed backend stores there ({', '.join(level.value for level in stored)}):"
            " build it with serving_manager(...) or DynamicQuantizationManager(catalog=backend_catalog())",
        )


class AdaptiveModelLoader:
    """Loads models at the level the manager picks, keeps them in an LRU cache, switches them in place."""

    def __init__(
        self,
        manager: Optional[DynamicQuantizationManager] = None,
        cache_budget_gb: Optional[float] = None,
        device: Optional[str] = None,
        cache_dir: Optional[str | Path] = None,
        show_progress: bool = True,
        layer_cache_gb: Optional[float] = None,
        engine_config: Optional["EngineConfig"] = None,
        mixed_precision: MixedPrecision = DEFAULT_MIXED_PRECISION,
        measure_quality: bool = True,
        quality_dir: Optional[str | Path] = None,
    ) -> None:
        """``layer_cache_gb`` bounds the disk used to keep quantized layers for switching back to a
        level (None: up to half the free disk, 0: off); see :mod:`langchain_adaptquant.runtime.layer_cache`.
        ``engine_config`` sizes each model's generation engine (batch, queue, threads).
        ``mixed_precision`` names the layers kept one level up (see :mod:`langchain_adaptquant.control.layer_plan`).
        ``measure_quality``: score each level once per model against 16-bit (one forward pass of
        the quality probe on first visit; see :mod:`langchain_adaptquant.runtime.quality`). The profile
        lives with the cached model; with ``quality_dir`` it is also kept there as
        ``<weights fingerprint>.json`` and read back by later loads of the same weights."""
        if not isinstance(mixed_precision, MixedPrecision):
            raise TypeError(f"mixed_precision must be a MixedPrecision, got {type(mixed_precision).__name__}")
        self.mixed_precision = mixed_precision
        self.measure_quality_enabled = bool(measure_quality)
        self.quality_dir = Path(quality_dir) if quality_dir is not None else None
        if manager is not None:
            _check_manager_levels(manager, device or manager.device)
        self.manager = manager or serving_manager(device=device)
        self.device = device or self.manager.device
        self.cache_budget_gb = validate_budget_gb(cache_budget_gb, name="cache_budget_gb")
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
        self.layer_cache = LayerCache(self.cache_dir / "layers", layer_cache_gb)
        if not self.layer_cache.enabled:
            logger.info("layer cache off: %s", self.layer_cache.disabled_reason)
        self.show_progress = show_progress
        self.engine_config = engine_config
        self._cache: "OrderedDict[str, LoadedModel]" = OrderedDict()
        self._preparing: dict[str, threading.Thread] = {}  # background prepare_levels, one per model
        self._lock = threading.RLock()
        self._load_lock = threading.Lock()

    # -- public API -----------------------------------------------------------------------------
    def load_model(
        self,
        model_id_or_path: Any,
        model_size_params: Optional[float] = None,
        task_priority: TaskPriority | str = TaskPriority.BALANCED,
        force_quantization: Optional[QuantizationLevel | str] = None,
        tokenizer: Any = None,
        on_switch: Optional[Callable[[SwitchRecord], None]] = None,
        on_decision: Optional[Callable[[str], None]] = None,
    ) -> LoadedModel:
        """The cached model (re-optimized if conditions changed) or a fresh load at the best level.

        ``model_id_or_path`` is a local folder, a hub id already in the local cache, or an
        ``nn.Module`` (written once to a local safetensors cache, then loaded from there).
        ``model_size_params`` overrides the size the policy reasons with (billions).
        ``on_switch`` is called with the record of a switch this call performed (telemetry), and
        ``on_decision`` with the reason of the decision this call took.
        """
        priority = TaskPriority.parse(task_priority)
        forced = QuantizationLevel.parse(force_quantization) if force_quantization is not None else None
        if forced is not None:
            self.check_level_available(forced)
        if isinstance(model_id_or_path, nn.Module):
            folder = self._write_object(model_id_or_path, tokenizer)
            name = str(getattr(getattr(model_id_or_path, "config", None), "_name_or_path", "") or folder.name)
        else:
            folder = resolve_model_folder(model_id_or_path)
            name = str(model_id_or_path)
        key = str(folder)
        cached = self.get(key)
        if cached is None:
            with self._load_lock:
                cached = self.get(key)
                if cached is None:
                    loaded = self._load(key, name, folder, model_size_params, priority, forced)
                    loaded.last_priority, loaded.last_forced = priority, forced
                    if on_decision is not None:
                        on_decision(loaded.last_decision_reason)
                    return loaded
        with self._lock:
            self._cache.move_to_end(key)
        cached.access_count += 1
        cached.last_access = time.time()
        cached.last_priority, cached.last_forced = priority, forced
        if forced is not None:
            reason = cached.last_decision_reason = f"forced to {forced.value}"
            record = self.requantize(cached, forced, reason=reason) if forced is not cached.level else None
        else:
            record, reason = self._reoptimize(cached, priority, model_size_params)
        if record is not None and on_switch is not None:
            on_switch(record)
        if on_decision is not None:
            on_decision(reason)
        return cached

    def reoptimize(
        self,
        loaded: LoadedModel,
        task_priority: TaskPriority | str = TaskPriority.BALANCED,
        model_size_params: Optional[float] = None,
    ) -> Optional[SwitchRecord]:
        """Ask the manager whether ``loaded`` should switch now, and switch if so.

        A failed switch is logged, recorded in the model's stats and leaves it serving at its level.
        """
        return self._reoptimize(loaded, task_priority, model_size_params)[0]

    def _reoptimize(
        self, loaded: LoadedModel, task_priority: TaskPriority | str, model_size_params: Optional[float]
    ) -> tuple[Optional[SwitchRecord], str]:
        size = size_of(model_size_params) if model_size_params is not None else loaded.size
        kv = loaded.engine.kv_usage() if loaded.engine is not None else None
        quality = loaded.quality.agreement_map() if loaded.quality is not None else None
        verdict = self.manager.should_reoptimize(
            loaded.level, size, task_priority, model_key=loaded.key, current_bytes=loaded.stored_bytes,
            kv_resident_bytes=kv.resident_bytes if kv else 0, kv_reserved_bytes=kv.reserved_bytes if kv else 0,
            quality=quality,
        )
        loaded.last_decision_reason = verdict.reason
        if not verdict:
            return None, verdict.reason
        try:
            return self.requantize(loaded, verdict.target_level, reason=verdict.reason), verdict.reason
        except SwitchError as error:
            logger.warning("switch of %s failed, still at %s: %s", loaded.name, loaded.level.value, error)
            return (loaded.switches[-1] if loaded.switches else None), verdict.reason

    def requantize(self, loaded: LoadedModel, level: QuantizationLevel | str, reason: str = "requested") -> Optional[SwitchRecord]:
        """Switch ``loaded`` to ``level`` in place, one Linear at a time, from the weights on disk.

        All-or-nothing: if any layer fails, the layers already swapped are requantized back with
        their previous backend and :class:`SwitchError` is raised; the model keeps serving. Two
        switches of one model never overlap: the second waits, then finds the level already set.
        The switch waits for the engine's decode step in progress (at most one) and no step starts
        until it is done, so every token is produced at one level.
        """
        level = QuantizationLevel.parse(level)
        self.check_level_available(level)
        with loaded.switch_lock:
            if loaded.level is level:
                return None
            with loaded.gate.exclusive():
                loaded.weights_version += 1  # odd while layers are being swapped
                try:
                    with self.layer_cache.writes_held():  # cache writes wait: they would slow the switch
                        record = self._switch(loaded, level, reason)
                finally:
                    loaded.weights_version += 1
            # still under the switch lock (no other switch interleaves); decode steps run meanwhile
            self._profile_level(loaded)
            return record

    def engine(self, loaded: LoadedModel) -> "GenerationEngine":
        """The model's generation engine (one worker thread), started on first use.

        Between steps it lets the policy re-decide (with the latest call's priority, the engine's
        KV bytes and the requests in flight), so a memory-forced downgrade lands within a step even
        while no new request arrives. A level forced by the latest call is left alone.
        """
        with loaded._count_lock:
            if loaded.engine is None:
                from langchain_adaptquant.runtime.engine import EngineConfig, GenerationEngine

                loaded.engine = GenerationEngine(
                    loaded.model, loaded.tokenizer, gate=loaded.gate, level_of=lambda: loaded.level.value,
                    config=self.engine_config or EngineConfig(), on_boundary=lambda _: self._between_steps(loaded),
                    name=loaded.name,
                )
            return loaded.engine

    def _between_steps(self, loaded: LoadedModel) -> None:
        if loaded.last_forced is not None or self.get(loaded.key) is not loaded:
            return
        self._reoptimize(loaded, loaded.last_priority, None)

    # -- quality profile ----------------------------------------------------------------------
    def _attach_quality(self, loaded: LoadedModel) -> None:
        """Give a fresh model its profile (read from disk when this weights+recipe was measured before)."""
        if not self.measure_quality_enabled or loaded.tokenizer is None:
            return
        try:
            key = weights_fingerprint(loaded.folder) if self.quality_dir is not None else loaded.key
            path = self.quality_dir / f"{key}.json" if self.quality_dir is not None else None
            loaded.quality = QualityProfile(key, f"{recipe(self.device)}|{self.mixed_precision.describe()}", path)
            loaded.quality_ids = text_ids(loaded.tokenizer, heldout_text(), PROFILE_TOKENS)
        except Exception as error:  # noqa: BLE001 - quality is advisory: never fail a load for it
            logger.warning("no quality profile for %s: %s", loaded.name, error)
            loaded.quality = None
            return
        self._profile_level(loaded)

    def _profile_level(self, loaded: LoadedModel) -> None:
        """Measure the model's current level if the profile lacks it (one forward pass)."""
        profile, ids = loaded.quality, loaded.quality_ids
        if profile is None or not ids or not profile.needs(loaded.level):
            return
        try:
            result = profile.measure(loaded.model, ids, loaded.level)
        except Exception as error:  # noqa: BLE001 - as above
            logger.warning("measuring quality of %s at %s failed: %s", loaded.name, loaded.level.value, error)
            return
        if result is not None:
            logger.info("quality of %s at %s: top-1 agreement %.3f with 16-bit (%d tokens, %.2fs)",
                        loaded.name, loaded.level.value, result.agreement, result.tokens, result.seconds)

    def measure_quality(self, loaded: LoadedModel, levels: Iterable[QuantizationLevel | str]) -> dict[str, Any]:
        """Measure ``levels`` now (16-bit first, as the reference), then return to the model's level.

        This switches the serving model through those levels (requests keep running, at whatever
        level each layer has): call it at deployment or while idle. Levels already in the profile,
        here or from an earlier run on the same weights, are not visited again.
        """
        wanted = [QuantizationLevel.parse(level) for level in levels]
        for level in wanted:
            self.check_level_available(level)
        if loaded.quality is None:
            raise AdaptQuantError(f"model {loaded.name!r} has no quality profile (no tokenizer, or measure_quality=False)")
        start = loaded.level
        for level in [QuantizationLevel.FP16, *wanted]:
            if loaded.quality.needs(level):
                if loaded.level is level:
                    self._profile_level(loaded)
                else:
                    self.requantize(loaded, level, reason=f"measuring quality at {level.value}")
        if loaded.level is not start:
            self.requantize(loaded, start, reason="back after measuring quality")
        return loaded.quality.to_dict()

    def get(self, key_or_path: str | Path) -> Optional[LoadedModel]:
        with self._lock:
            found = self._cache.get(str(key_or_path))
            if found is None and Path(str(key_or_path)).exists():
                found = self._cache.get(str(Path(key_or_path).resolve()))
            return found

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._cache.values())

    def stats(self) -> list[dict[str, Any]]:
        """Per cached model: name, level, size MB, access count, last access, backends, errors, and
        how many layers the layer cache holds per level (a switch there reads instead of quantizing)."""
        return [{**loaded.to_dict(), "layer_cache": self.layer_cache.levels(loaded.key)} for loaded in self.models()]

    def prepare_levels_in_background(
        self, loaded: LoadedModel, levels: Iterable[QuantizationLevel | str]
    ) -> Optional[threading.Thread]:
        """Run :meth:`prepare_levels` once per model in a daemon thread (no progress bars).

        Later calls for the same model return the thread already started; levels with no backend on
        this device are skipped with a warning; None when nothing is left to prepare or the layer
        cache is off. What ``ChatAdaptQuant(prepare_levels=...)`` uses after the first load.
        """
        wanted = [QuantizationLevel.parse(level) for level in levels]
        available = available_levels(self.device)
        for level in wanted:
            if level not in available:
                logger.warning("not preparing %s: no backend stores it on %s", level.value, self.device)
        wanted = [level for level in wanted if level in available and level is not QuantizationLevel.FP16]
        if not wanted or not self.layer_cache.enabled:
            return None
        with self._lock:
            thread = self._preparing.get(loaded.key)
            if thread is not None:
                return thread
            thread = threading.Thread(
                target=self._prepare_quietly, args=(loaded, wanted), name=f"adaptquant-prepare-{loaded.name}", daemon=True
            )
            self._preparing[loaded.key] = thread
        thread.start()
        return thread

    def _prepare_quietly(self, loaded: LoadedModel, levels: list[QuantizationLevel]) -> None:
        try:
            summary = self.prepare_levels(loaded, levels, progress=False)
            logger.info("prepared %s: %s", loaded.name, summary)
        except Exception as error:  # noqa: BLE001 - a background helper: log, never raise into a thread
            logger.warning("preparing levels of %s failed: %s", loaded.name, error)

    def prepare_levels(
        self, loaded: LoadedModel, levels: Iterable[QuantizationLevel | str], progress: Optional[bool] = None
    ) -> dict[str, dict[str, Any]]:
        """Quantize ``loaded``'s layers at ``levels`` into the layer cache without switching.

        A later switch to a prepared level only reads its layers back, so a memory-forced downgrade
        is quick when it matters. This spends the quantization work now (call it from a thread while
        the machine is idle); it holds one extra layer in memory at a time and never touches the
        serving model. Returns, per level, the layers written, already there, and seconds taken.
        """
        wanted = [QuantizationLevel.parse(level) for level in levels]
        for level in wanted:
            self.check_level_available(level)
        if not self.layer_cache.enabled:
            raise AdaptQuantError(f"cannot prepare levels: the layer cache is off ({self.layer_cache.disabled_reason})")
        summary: dict[str, dict[str, Any]] = {}
        for level in wanted:
            started, written, present = time.perf_counter(), 0, 0
            if level is not QuantizationLevel.FP16:  # 16-bit is the source itself: nothing to prepare
                plan = plan_levels(loaded.layer_backends, level, self.mixed_precision)
                layers = [layer for layer in plan if plan[layer] is not QuantizationLevel.FP16]
                show = self.show_progress if progress is None else progress
                for layer in tqdm(layers, desc=f"prepare {loaded.name} at {level.value}", unit="layer", disable=not show):
                    if self.get(loaded.key) is not loaded:
                        break  # evicted meanwhile: its cached layers were just forgotten
                    if self.layer_cache.has(loaded.key, plan[layer], layer):
                        present += 1
                        continue
                    module, backend, _ = self._quantize_layer(loaded.source, layer, plan[layer])
                    written += self.layer_cache.store(loaded.key, plan[layer], layer, backend, module)
                    del module
                trim_heap()
            summary[level.value] = {
                "layers_written": written,
                "layers_already_cached": present,
                "seconds": round(time.perf_counter() - started, 3),
            }
        return summary

    def cached_bytes(self) -> int:
        return sum(loaded.stored_bytes for loaded in self.models())

    def evict(self, key_or_path: str | Path) -> bool:
        """Drop one idle model from the cache; a model with requests in flight is never evicted."""
        with self._lock:
            loaded = self.get(key_or_path)
            if loaded is None:
                return False
            if loaded.active_requests:
                raise AdaptQuantError(
                    f"model {loaded.name!r} has {loaded.active_requests} request(s) in flight; not evicted"
                )
            del self._cache[loaded.key]
            self._preparing.pop(loaded.key, None)
        self.manager.forget(loaded.key)
        self.layer_cache.forget(loaded.key)
        _close_engine(loaded)
        del loaded
        release_memory(full=True)
        return True

    def clear(self) -> dict[str, Any]:
        """Evict every idle model and return what was freed, measured on the process."""
        rss_before, anon_before = process_memory()
        evicted, kept = [], []
        loaded: Optional[LoadedModel] = None
        for loaded in self.models():
            if loaded.active_requests:
                kept.append(loaded.name)
                continue
            with self._lock:
                self._cache.pop(loaded.key, None)
                self._preparing.pop(loaded.key, None)
            self.manager.forget(loaded.key)
            self.layer_cache.forget(loaded.key)
            _close_engine(loaded)
            evicted.append(loaded.name)
        loaded = None  # noqa: F841 - drop the loop's last reference before collecting
        release_memory(full=True)
        rss_after, anon_after = process_memory()
        return {
            "evicted": evicted,
            "kept_in_use": kept,
            "freed_rss_mb": round((rss_before - rss_after) / 2**20, 1),
            "freed_anon_mb": round((anon_before - anon_after) / 2**20, 1),
            "rss_mb": round(rss_after / 2**20, 1),
        }

    # -- internals ------------------------------------------------------------------------------
    def check_level_available(self, level: QuantizationLevel) -> None:
        """Raise UnsupportedLevelError (naming the levels there are) when no backend here stores ``level``."""
        levels = available_levels(self.device)
        if level not in levels:
            raise UnsupportedLevelError(level, self.device, levels)

    def _make_room(self, needed: int, name: str) -> None:
        if self.cache_budget_gb is None:
            return
        budget = int(self.cache_budget_gb * GIB)
        with self._lock:
            idle = [m for m in self._cache.values() if not m.active_requests]  # LRU first
            used = sum(m.stored_bytes for m in self._cache.values())
            victims = []
            for candidate in idle:
                if used + needed <= budget:
                    break
                victims.append(candidate)
                used -= candidate.stored_bytes
            if used + needed > budget:
                raise InsufficientMemoryError(
                    required_gb=needed / GIB,
                    available_gb=(budget - used) / GIB,
                    headroom_gb=0.0,
                    level=f"cache budget {self.cache_budget_gb:g} GiB for {name}",
                )
        for victim in victims:
            logger.info("evicting %s (LRU, idle) to make room for %s", victim.name, name)
            self.evict(victim.key)

    def _load(
        self,
        key: str,
        name: str,
        folder: Path,
        model_size_params: Optional[float],
        priority: TaskPriority,
        forced: Optional[QuantizationLevel],
    ) -> LoadedModel:
        started = time.perf_counter()
        source = WeightSource(folder)
        config = source.config()
        skeleton = self._skeleton(config)
        size = size_from_model(skeleton, source=f"{getattr(config, 'model_type', 'model')} config").with_mixed(
            self.mixed_precision
        )
        policy_size = size_of(model_size_params) if model_size_params is not None else size
        if forced is not None:
            level, reason = forced, f"forced to {forced.value}"
        else:
            decision = self.manager.calculate_optimal_quantization(policy_size, priority)
            level, reason = decision.level, decision.reason
        self._make_room(size.estimated_bytes(level), name)
        source.verify()  # opens (maps) every file once; the model keeps this mapping for its lifetime
        with self.layer_cache.writes_held():
            model, backends, layer_levels = self._materialize(skeleton, source, level, name, key)
        tokenizer = self._tokenizer(folder)
        _read_generation_config(model, folder)
        loaded = LoadedModel(
            key=key,
            name=name,
            folder=folder,
            source=source,
            model=model,
            tokenizer=tokenizer,
            level=level,
            device=self.device,
            size=size,
            layer_backends=backends,
            layer_levels=layer_levels,
            stored_bytes=stored_bytes(model),
            load_seconds=time.perf_counter() - started,
            last_decision_reason=reason,
            source_format=_source_format(folder),
        )
        loaded.access_count = 1
        self._attach_quality(loaded)
        with self._lock:
            self._cache[key] = loaded
        self.manager.record_switch(key, level)
        logger.info("loaded %s at %s in %.2fs (%s)", name, level.value, loaded.load_seconds, reason)
        return loaded

    def _skeleton(self, config: Any) -> nn.Module:
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(self.device))
        except (ValueError, KeyError, ImportError) as error:
            raise UnsupportedArchitectureError(
                f"architecture {getattr(config, 'model_type', '?')!r} has no causal-LM class in transformers: {error}"
            ) from None
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()  # so sizing counts a tied head once, as it is stored
        return model.eval()

    def _materialize(
        self, model: Any, source: WeightSource, level: QuantizationLevel, name: str, key: str
    ) -> tuple[nn.Module, dict[str, str], dict[str, QuantizationLevel]]:
        dtype = compute_dtype(self.device)
        targets = quantizable_linears(model)
        plan = plan_levels((layer for layer, _ in targets), level, self.mixed_precision)
        target_names = {layer for layer, _ in targets}
        for module_name, module in model.named_modules():
            if module_name in target_names:
                continue
            for param_name, _param in list(module.named_parameters(recurse=False)):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if full not in source:
                    continue  # tied weights are filled by tie_weights below; leftovers are checked after
                tensor = source.tensor(full).to(device=self.device, dtype=dtype)
                module._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        for module in model.modules():  # buffers built at init (rotary inv_freq) are on the CPU: move them
            for buffer_name, buffer in list(module._buffers.items()):
                if buffer is not None and not buffer.is_meta:
                    module._buffers[buffer_name] = buffer.to(self.device)  # no copy when already there
        backends: dict[str, str] = {}
        ranges = mapped_ranges(source.folder)
        for layer, _ in tqdm(targets, desc=f"load {name} at {level.value}", unit="layer", disable=not self.show_progress):
            module, backend, _ = self._quantize_layer(source, layer, plan[layer], ranges=ranges, model_key=key)
            _swap(model, layer, module)
            backends[layer] = backend
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise WeightsError(f"weights in {str(source.folder)!r} lack {len(missing)} tensor(s), e.g. {missing[:3]}")
        return model, backends, plan

    def _quantize_layer(
        self, source: WeightSource, layer: str, level: QuantizationLevel, backend_name: Optional[str] = None,
        ranges: Optional[list[tuple[int, int]]] = None, model_key: Optional[str] = None,
    ) -> tuple[nn.Module, str, bool]:
        """One layer at ``level``: from the layer cache when it holds it, else quantized from the
        source (and queued for the cache). The bool says whether it came from the cache."""
        if model_key is not None and level is not QuantizationLevel.FP16:
            hit = self.layer_cache.load(model_key, level, layer, self.device)
            if hit is not None and (backend_name is None or hit[1] == backend_name):
                if ranges:  # a 16-bit layer it replaces may have left its source pages resident
                    drop_file_pages(source.tensor(f"{layer}.weight"), ranges)
                return hit[0], hit[1], True
        weight = source.tensor(f"{layer}.weight")
        bias_name = f"{layer}.bias"
        bias = source.tensor(bias_name) if bias_name in source else None
        dtype = compute_dtype(self.device)
        linear = linear_with(weight, bias, self.device, dtype)
        if backend_name is not None:
            module, backend = get_backend(backend_name).quantize_linear(linear, level, self.device), backend_name
        else:
            module, backend = quantize_linear_with_fallback(linear, level, self.device)
        if ranges and level is not QuantizationLevel.FP16:
            drop_file_pages(weight, ranges)  # the quantized copy is all this layer keeps
        if model_key is not None:
            self.layer_cache.store_later(model_key, level, layer, backend, module)
        return module, backend, False

    def _switch(self, loaded: LoadedModel, level: QuantizationLevel, reason: str) -> SwitchRecord:
        started = time.perf_counter()
        previous = loaded.level
        rss_before, anon_before = process_memory()
        bytes_before = loaded.stored_bytes
        layers = list(loaded.layer_backends)
        plan = plan_levels(layers, level, self.mixed_precision)
        # a layer already stored at its planned level (mixed precision) keeps its module
        layers = [layer for layer in layers if loaded.layer_levels.get(layer, previous) is not plan[layer]]
        swapped: list[str] = []
        new_backends = dict(loaded.layer_backends)
        source = loaded.source
        from_cache = 0
        try:
            source.verify()
            ranges = mapped_ranges(loaded.folder)
            progress = tqdm(layers, desc=f"{loaded.name}: {previous.value} -> {level.value}", unit="layer", disable=not self.show_progress)
            since_trim = 0
            try:
                for layer in progress:
                    module, backend, cached = self._quantize_layer(source, layer, plan[layer], ranges=ranges, model_key=loaded.key)
                    _swap(loaded.model, layer, module)
                    swapped.append(layer)
                    new_backends[layer] = backend
                    from_cache += cached
                    del module
                    since_trim += source.nbytes(f"{layer}.weight")
                    if since_trim >= TRIM_EVERY_BYTES:
                        trim_heap()
                        since_trim = 0
            except Exception as error:
                self._roll_back(loaded, source, swapped)
                raise error
        except Exception as error:  # noqa: BLE001 - any failure becomes a rollback and a SwitchError
            release_memory()
            rss_after, anon_after = process_memory()
            message = f"switch {previous.value} -> {level.value} of {loaded.name!r} failed and was rolled back: {error}"
            loaded.last_error = message
            loaded.switches.append(
                SwitchRecord(loaded.name, previous.value, level.value, reason, time.perf_counter() - started, False,
                             rss_before, rss_after, anon_before, anon_after, bytes_before, loaded.stored_bytes,
                             error=str(error), layers_from_cache=from_cache)
            )
            raise SwitchError(message, previous.value) from error
        loaded.level = level
        loaded.layer_backends = new_backends
        loaded.layer_levels = {layer: plan[layer] for layer in new_backends}
        release_memory()
        loaded.stored_bytes = stored_bytes(loaded.model)
        rss_after, anon_after = process_memory()
        record = SwitchRecord(
            loaded.name, previous.value, level.value, reason, time.perf_counter() - started, True,
            rss_before, rss_after, anon_before, anon_after, bytes_before, loaded.stored_bytes,
            layers_from_cache=from_cache,
        )
        loaded.switches.append(record)
        self.manager.record_switch(loaded.key, level)
        logger.info("switched %s %s -> %s in %.2fs: %s", loaded.name, previous.value, level.value, record.seconds, reason)
        return record

    def _roll_back(self, loaded: LoadedModel, source: WeightSource, swapped: list[str]) -> None:
        for layer in swapped:
            module, _, _ = self._quantize_layer(
                source, layer, loaded.layer_levels.get(layer, loaded.level), loaded.layer_backends[layer],
                model_key=loaded.key,
            )
            _swap(loaded.model, layer, module)

    def _tokenizer(self, folder: Path) -> Any:
        if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))

    def _write_object(self, model: Any, tokenizer: Any) -> Path:
        """Write an in-memory model once to the local safetensors cache; later calls reuse it."""
        if not hasattr(model, "save_pretrained"):
            raise UnsupportedArchitectureError(
                f"model object of type {type(model).__name__} cannot be saved; pass a transformers PreTrainedModel"
            )
        folder = self.cache_dir / "objects" / _object_fingerprint(model)
        marker = folder / ".complete"
        if not marker.exists():
            folder.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(str(folder), safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(folder))
            marker.write_text(json.dumps({"written_at": time.time()}))
        return folder.resolve()
