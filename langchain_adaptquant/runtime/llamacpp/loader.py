"""LlamaCppLoader: the llama.cpp runtime's loader, with the torch loader's public surface.

The same manager decides (levels, hysteresis, projected memory, KV bytes); this loader turns each
decision into a GGUF file (made once, cached beside the model) that its engine serves. A model
folder qualifies when it holds a GGUF (a pulled model keeps its source GGUF) and a tokenizer: the
chat template and the text of every answer come from the Hugging Face tokenizer, so both runtimes
render prompts and decode tokens the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority
from langchain_adaptquant.control.manager import DynamicQuantizationManager, ServingFacts
from langchain_adaptquant.control.resources import process_status
from langchain_adaptquant.control.sizing import ModelSize, size_of
from langchain_adaptquant.errors import AdaptQuantError, InvalidValueError, ModelNotFoundError, SwitchError
from langchain_adaptquant.runtime.llamacpp.engine import LlamaCppEngine
from langchain_adaptquant.runtime.llamacpp.gguf_files import LEVEL_TYPES, GGUFTable, LevelFiles, check_level, find_gguf
from langchain_adaptquant.runtime.llamacpp.weights import LlamaCppConfig, LlamaWeights
from langchain_adaptquant.runtime.records import SwitchRecord
from langchain_adaptquant.runtime.served import InUse, revisit
from langchain_adaptquant.units import GIB

logger = logging.getLogger(__name__)

RUNTIME_NAME = "llamacpp"


def gguf_size(table: GGUFTable, files: Optional[LevelFiles] = None) -> ModelSize:
    """The policy's view of a GGUF model: parameters from its table, bytes per level from the tables."""
    quantizable = [t for t in table.tensors if t.columns != t.elements and t.name not in ("token_embd.weight", "output.weight")]
    q_params = sum(t.elements for t in quantizable)
    rows = sum(t.elements // t.columns for t in quantizable)
    total = sum(t.elements for t in table.tensors)
    known = tuple((level, files.estimated_bytes(level) if files else table.estimated_bytes(level)) for level in LEVEL_TYPES)
    return ModelSize(q_params, rows, total - q_params, source="gguf tensor table", known_bytes=known)


@dataclass(eq=False)
class LlamaCppModel(InUse):
    """A model served by llama.cpp: what the chat model, stats and the server read of it."""

    key: str
    name: str
    folder: Path
    tokenizer: Any
    level: QuantizationLevel
    size: ModelSize
    files: LevelFiles
    engine: Optional[LlamaCppEngine]
    stored_bytes: int
    load_seconds: float
    eos: set[int]
    stop_strings: tuple[str, ...]
    context_length: int
    source_format: str
    device: str = "cpu"
    runtime: str = RUNTIME_NAME
    gguf_types: dict[str, int] = field(default_factory=dict)
    access_count: int = 0
    last_access: float = field(default_factory=time.time)
    active_requests: int = 0
    last_error: Optional[str] = None
    last_decision_reason: str = ""
    switches: list[SwitchRecord] = field(default_factory=list)
    quality: Any = None  # no quality profile on this runtime yet: every level reads "not measured"
    last_priority: TaskPriority = TaskPriority.BALANCED
    last_forced: Optional[QuantizationLevel] = None
    switch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def precision(self) -> str:
        return LEVEL_TYPES[self.level]

    @property
    def grammar_tokenizer(self) -> Any:
        """transformers' tokenizer, for llguidance (loaded on the first constrained answer)."""
        return self.tokenizer.hf() if hasattr(self.tokenizer, "hf") else self.tokenizer

    def precision_of(self, level: QuantizationLevel) -> str:
        """The GGUF type that stores ``level`` here (F16, Q8_0, Q4_0, Q2_K)."""
        return LEVEL_TYPES[level]

    @property
    def backend(self) -> str:
        return "llama.cpp"

    def backend_summary(self) -> dict[str, int]:
        """Tensors per GGUF type of the level being served (e.g. ``{"Q4_0": 180, "Q8_0": 1, "F32": 61}``)."""
        return dict(self.gguf_types)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": str(self.folder), "runtime": self.runtime, "level": self.level.value,
            "precision": self.precision, "source_format": self.source_format, "device": self.device,
            "size_mb": round(self.stored_bytes / 2**20, 2),
            "estimated_mb": round(self.size.estimated_bytes(self.level) / 2**20, 2),
            "parameters": self.size.total_params, "backends": self.backend_summary(),
            "level_files": {level.value: self.files.is_made(level) for level in LEVEL_TYPES},
            "quality": None, "load_seconds": round(self.load_seconds, 3), "access_count": self.access_count,
            "last_access": self.last_access, "active_requests": self.active_requests,
            "engine": self.engine.stats().to_dict() if self.engine is not None else None,
            "switches": len(self.switches), "last_error": self.last_error,
        }


def _read_eos_and_stops(folder: Path, tokenizer: Any) -> tuple[set[int], tuple[str, ...]]:
    import json

    eos: set[int] = set()
    stops: tuple[str, ...] = ()
    path = folder / "generation_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        value = data.get("eos_token_id")
        eos.update([value] if isinstance(value, int) else list(value or []))
        stops = tuple(data.get("stop_strings") or ())
    value = getattr(tokenizer, "eos_token_id", None)
    if isinstance(value, int):
        eos.add(value)
    return eos, stops


class LlamaCppLoader:
    """Loads GGUF models at the level the manager picks and switches them between decode steps."""

    name = RUNTIME_NAME

    def __init__(self, manager: Optional[DynamicQuantizationManager] = None, cache_budget_gb: Optional[float] = None,
                 cache_dir: Optional[str | Path] = None, config: Optional[LlamaCppConfig] = None,
                 show_progress: bool = True) -> None:
        from langchain_adaptquant.model_zoo import cache_root

        self.manager = manager or DynamicQuantizationManager(device="cpu")  # llama.cpp stores every level
        if self.manager.device != "cpu":
            raise InvalidValueError("manager", f"a manager for {self.manager.device}",
                                    "a CPU manager: this runtime serves llama.cpp's CPU build")
        self.device = "cpu"
        self.cache_budget_gb = cache_budget_gb
        self.cache_dir = cache_root(cache_dir)
        self.config = config or LlamaCppConfig()
        self.show_progress = show_progress
        self._models: dict[str, LlamaCppModel] = {}
        self._lock = threading.Lock()
        self._making: dict[tuple[str, QuantizationLevel], threading.Thread] = {}

    # -- the seam the chat model uses ---------------------------------------------------------------
    def check_level_available(self, level: QuantizationLevel) -> None:
        check_level(level)

    def load_model(self, model_id_or_path: Any, model_size_params: Optional[float] = None,
                   task_priority: TaskPriority | str = TaskPriority.BALANCED,
                   force_quantization: Optional[QuantizationLevel | str] = None, tokenizer: Any = None,
                   on_switch: Optional[Callable[[SwitchRecord], None]] = None,
                   on_decision: Optional[Callable[[str], None]] = None) -> LlamaCppModel:
        """The cached model (re-decided now) or a fresh load at the level the manager picks."""
        from langchain_adaptquant.pretrained.store import local_model_folder

        priority = TaskPriority.parse(task_priority)
        forced = check_level(force_quantization) if force_quantization is not None else None
        if not isinstance(model_id_or_path, (str, Path)):
            raise InvalidValueError("model", type(model_id_or_path).__name__,
                                    "a model folder holding a GGUF file (runtime='llamacpp'); use runtime='torch' for a module")
        folder = local_model_folder(model_id_or_path)
        if folder is None:
            raise ModelNotFoundError(f"model {str(model_id_or_path)!r} is neither a local folder nor a pulled model "
                                     "(`adaptquant models pull NAME`)")
        key = str(folder)
        with self._lock:
            cached = self._models.get(key)
            if cached is None:
                loaded = self._load(key, str(model_id_or_path), folder, model_size_params, priority, forced)
                self._models[key] = loaded
                if on_decision is not None:
                    on_decision(loaded.last_decision_reason)
                return loaded
        return revisit(self, cached, priority, forced, model_size_params, on_switch, on_decision)

    def engine(self, loaded: LlamaCppModel) -> LlamaCppEngine:
        if loaded.engine is None:
            raise AdaptQuantError(f"model {loaded.name!r} left the cache; load it again")
        return loaded.engine

    def reoptimize(self, loaded: LlamaCppModel, task_priority: TaskPriority | str = TaskPriority.BALANCED,
                   model_size_params: Optional[float] = None) -> Optional[SwitchRecord]:
        return self._reoptimize(loaded, task_priority, model_size_params)[0]

    def requantize(self, loaded: LlamaCppModel, level: QuantizationLevel | str,
                   reason: str = "requested") -> Optional[SwitchRecord]:
        """Serve ``loaded`` at ``level`` from the next decode step on (its GGUF is made first if needed).

        The answers in flight go on at the new level; a level file that fails to load leaves the
        model at its level and raises :class:`SwitchError`.
        """
        level = check_level(level)
        with loaded.switch_lock:
            if loaded.level is level:
                return None
            path = loaded.files.ensure(level, say=self._say)  # may quantize: before the engine pauses
            return self._switch(loaded, level, path, reason)

    def prepare_levels_in_background(self, loaded: LlamaCppModel,
                                     levels: Iterable[QuantizationLevel | str]) -> Optional[threading.Thread]:
        """Make the GGUF files of ``levels`` in a daemon thread, so a later switch only loads them."""
        wanted = [check_level(level) for level in levels]
        wanted = [level for level in wanted if not loaded.files.is_made(level)]
        if not wanted:
            return None
        def make_all() -> None:
            for level in wanted:
                self._make_quietly(loaded, level)

        thread = threading.Thread(target=make_all, name=f"adaptquant-gguf-{loaded.name}", daemon=True)
        thread.start()
        return thread

    def prepare_levels(self, loaded: LlamaCppModel, levels: Iterable[QuantizationLevel | str],
                       progress: Optional[bool] = None) -> dict[str, dict[str, Any]]:
        """Make the GGUF files of ``levels`` now; returns each one's path, MB and seconds."""
        out: dict[str, dict[str, Any]] = {}
        for level in [check_level(value) for value in levels]:
            started = time.perf_counter()
            path = loaded.files.ensure(level, say=self._say)
            out[level.value] = {"path": str(path), "mb": round(path.stat().st_size / 2**20, 2),
                                "seconds": round(time.perf_counter() - started, 3)}
        return out

    # -- cache ----------------------------------------------------------------------------------------
    def get(self, key_or_path: str | Path) -> Optional[LlamaCppModel]:
        return self._models.get(str(key_or_path))

    def models(self) -> list[LlamaCppModel]:
        return list(self._models.values())

    def stats(self) -> list[dict[str, Any]]:
        return [loaded.to_dict() for loaded in self.models()]

    def cached_bytes(self) -> int:
        return sum(loaded.stored_bytes for loaded in self.models())

    def evict(self, key_or_path: str | Path) -> bool:
        """Drop one idle model (its engine stops, its weights are unmapped); a busy one stays."""
        with self._lock:
            loaded = self._models.get(str(key_or_path))
            if loaded is None or loaded.active_requests:
                return False
            del self._models[loaded.key]
        self.manager.forget(loaded.key)
        loaded.close_engine()
        return True

    def clear(self) -> dict[str, Any]:
        before = process_status()
        evicted: list[str] = []
        kept: list[str] = []
        for loaded in self.models():
            (evicted if self.evict(loaded.key) else kept).append(loaded.name)
        after = process_status()
        return {"evicted": evicted, "kept_in_use": kept, "freed_rss_mb": round((before.rss - after.rss) / 2**20, 1),
                "freed_anon_mb": round((before.anon - after.anon) / 2**20, 1), "rss_mb": round(after.rss / 2**20, 1)}

    # -- internals ------------------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        (print if self.show_progress else logger.info)(message)

    def _make_quietly(self, loaded: LlamaCppModel, level: QuantizationLevel) -> None:
        try:
            loaded.files.ensure(level, say=logger.info)
        except Exception as error:  # noqa: BLE001 - a background helper: log, never raise into a thread
            logger.warning("making the %s level of %s failed: %s", level.value, loaded.name, error)

    def _facts(self, loaded: LlamaCppModel) -> ServingFacts:
        if loaded.engine is None:
            return ServingFacts()
        kv = loaded.engine.kv_usage()
        return ServingFacts(kv_resident_bytes=kv.resident_bytes, kv_reserved_bytes=kv.reserved_bytes)

    def _reoptimize(self, loaded: LlamaCppModel, task_priority: TaskPriority | str,
                    model_size_params: Optional[float]) -> tuple[Optional[SwitchRecord], str]:
        size = size_of(model_size_params) if model_size_params is not None else self._fresh_size(loaded)
        verdict = self.manager.should_reoptimize(loaded.level, size, task_priority, model_key=loaded.key,
                                                 current_bytes=loaded.stored_bytes, facts=self._facts(loaded))
        loaded.last_decision_reason = verdict.reason
        if not verdict:
            return None, verdict.reason
        try:
            return self.requantize(loaded, verdict.target_level, reason=verdict.reason), verdict.reason
        except SwitchError as error:
            logger.warning("switch of %s failed, still at %s: %s", loaded.name, loaded.level.value, error)
            return (loaded.switches[-1] if loaded.switches else None), verdict.reason

    def _fresh_size(self, loaded: LlamaCppModel) -> ModelSize:
        """Sizes move from estimates to the files' own tables as level files get made."""
        known = tuple((level, loaded.files.estimated_bytes(level)) for level in LEVEL_TYPES)
        if known != loaded.size.known_bytes:
            from dataclasses import replace

            loaded.size = replace(loaded.size, known_bytes=known)
        return loaded.size

    def _between_steps(self, loaded: LlamaCppModel) -> None:
        """The engine's boundary hook (its worker thread): re-decide; switch there if the file exists,
        else make the file in the background and switch at a later boundary."""
        if loaded.last_forced is not None or self._models.get(loaded.key) is not loaded:
            return
        verdict = self.manager.should_reoptimize(loaded.level, self._fresh_size(loaded), loaded.last_priority,
                                                 model_key=loaded.key, current_bytes=loaded.stored_bytes,
                                                 facts=self._facts(loaded))
        loaded.last_decision_reason = verdict.reason
        if not verdict:
            return
        level = verdict.target_level
        if not loaded.files.is_made(level):
            key = (loaded.key, level)
            if key not in self._making or not self._making[key].is_alive():
                self._making[key] = threading.Thread(target=self._make_quietly, args=(loaded, level), daemon=True)
                self._making[key].start()
            return
        if not loaded.switch_lock.acquire(blocking=False):
            return  # a caller's switch is under way
        try:
            self._switch(loaded, level, loaded.files.path(level), verdict.reason)
        except SwitchError as error:
            logger.warning("switch of %s failed, still at %s: %s", loaded.name, loaded.level.value, error)
        finally:
            loaded.switch_lock.release()

    def _switch(self, loaded: LlamaCppModel, level: QuantizationLevel, path: Path, reason: str) -> SwitchRecord:
        engine = self.engine(loaded)
        before = process_status()
        stored_before, from_level = loaded.stored_bytes, loaded.level
        started = time.perf_counter()
        error: Optional[BaseException] = None
        try:
            engine.switch_to(path, level)
        except Exception as failure:  # noqa: BLE001 - reported in the record, raised as SwitchError
            error = failure
        after = process_status()
        if error is None:
            loaded.level = level
            loaded.stored_bytes = engine.weights.tensor_bytes
            loaded.gguf_types = engine.weights.table.type_summary()
            self.manager.record_switch(loaded.key, level)
        record = SwitchRecord(
            model=loaded.name, from_level=from_level.value, to_level=level.value, reason=reason,
            seconds=time.perf_counter() - started, ok=error is None, rss_before=before.rss, rss_after=after.rss,
            anon_before=before.anon, anon_after=after.anon, stored_bytes_before=stored_before,
            stored_bytes_after=loaded.stored_bytes, error=None if error is None else str(error),
        )
        loaded.switches.append(record)
        if error is not None:
            loaded.last_error = str(error)
            raise SwitchError(f"switching {loaded.name} to {level.value} failed; still at {from_level.value}: {error}",
                              from_level.value) from error
        logger.info("switched %s %s -> %s (%s) in %.2fs: %s", loaded.name, from_level.value, level.value,
                    LEVEL_TYPES[level], record.seconds, reason)
        return record

    def _load(self, key: str, name: str, folder: Path, model_size_params: Optional[float], priority: TaskPriority,
              forced: Optional[QuantizationLevel]) -> LlamaCppModel:
        from langchain_adaptquant.runtime.llamacpp.tokenizer import FolderTokenizer

        started = time.perf_counter()
        source = find_gguf(folder)
        if source is None:
            raise InvalidValueError("model", str(folder), "a folder holding one GGUF file (or a pulled model) for "
                                    "runtime='llamacpp'; runtime='torch' serves safetensors folders")
        files = LevelFiles(source, self.cache_dir, self.config.threads)
        size = gguf_size(files.source_table, files)
        policy_size = size_of(model_size_params) if model_size_params is not None else size
        if forced is not None:
            level, reason = forced, f"forced to {forced.value}"
        else:
            decision = self.manager.calculate_optimal_quantization(policy_size, priority)
            level, reason = decision.level, decision.reason
        if self.cache_budget_gb is not None and size.estimated_bytes(level) > self.cache_budget_gb * GIB:
            raise InvalidValueError("cache_budget_gb", self.cache_budget_gb,
                                    f"at least {size.estimated_bytes(level) / GIB:.3f} GiB for {name} at {level.value}")
        tokenizer = FolderTokenizer(folder)  # no transformers: this path imports no torch
        eos, stops = _read_eos_and_stops(folder, tokenizer)
        path = files.ensure(level, say=self._say)
        weights = LlamaWeights(path, level, self.config)
        from langchain_adaptquant.pretrained.store import read_source

        record = read_source(folder)
        fmt = (record.format.split(", dequantized")[0] + ", expanded to F16 by llama.cpp; lower levels quantized from it"
               if record else f"GGUF {source.name}")
        loaded = LlamaCppModel(
            key=key, name=name, folder=folder, tokenizer=tokenizer, level=level, size=size, files=files, engine=None,
            stored_bytes=weights.tensor_bytes, load_seconds=0.0, eos=eos, stop_strings=stops,
            context_length=weights.n_ctx, source_format=fmt,
            gguf_types=weights.table.type_summary(), last_decision_reason=reason, access_count=1,
            last_priority=priority, last_forced=forced,
        )
        loaded.engine = LlamaCppEngine(weights, tokenizer, eos, self.config, name=name,
                                       on_boundary=lambda _: self._between_steps(loaded))
        loaded.load_seconds = time.perf_counter() - started
        self.manager.record_switch(key, level)
        logger.info("loaded %s on llama.cpp at %s (%s) in %.2fs (%s)", name, level.value, LEVEL_TYPES[level],
                    loaded.load_seconds, reason)
        return loaded
