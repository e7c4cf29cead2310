"""AdaptiveModelLoader: load a model at the level the manager picks, switch it in place, cache and evict.

The loader composes three parts, each in its own module: the :class:`~langchain_adaptquant.runtime.model_cache.ModelCache`
(which models are loaded, LRU order, who may leave to make room), the
:class:`~langchain_adaptquant.runtime.switcher.LayerSwitcher` (building and swapping Linear layers
from the memory-mapped safetensors, one at a time, so peak memory is the larger of before/after
plus about one layer, never two models) and the manager (which level, when to switch). It adds
what ties them together: one switch per model at a time, the step gate (a switch lands between two
decode steps of the model's :class:`~langchain_adaptquant.runtime.GenerationEngine`, so every token
is produced with one known set of weights), the quality profile and the engine's between-steps
re-decision.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from torch import nn

from langchain_adaptquant.backends.base import UnsupportedLevelError
from langchain_adaptquant.backends.registry import available_levels, backend_catalog, recipe
from langchain_adaptquant.control.layer_plan import DEFAULT_MIXED_PRECISION, MixedPrecision
from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority
from langchain_adaptquant.control.manager import DynamicQuantizationManager, ServingFacts
from langchain_adaptquant.control.resources import process_memory
from langchain_adaptquant.control.sizing import size_from_model, size_of
from langchain_adaptquant.errors import AdaptQuantError, InvalidValueError, SwitchError
from langchain_adaptquant.runtime.accounting import stored_bytes
from langchain_adaptquant.runtime.layer_cache import LayerCache
from langchain_adaptquant.runtime.loaded_model import LoadedModel, SwitchRecord, quantizable_linears
from langchain_adaptquant.runtime.model_cache import ModelCache, ModelInUseError
from langchain_adaptquant.runtime.model_files import (
    build_skeleton,
    load_tokenizer,
    read_generation_config,
    source_format,
    write_model_object,
)
from langchain_adaptquant.runtime.os_memory import release_memory
from langchain_adaptquant.runtime.quality import (
    PROFILE_TOKENS,
    QualityProfile,
    heldout_text,
    text_ids,
    weights_fingerprint,
)
from langchain_adaptquant.runtime.served import revisit
from langchain_adaptquant.runtime.switcher import LayerSwitcher
from langchain_adaptquant.runtime.weights import WeightSource, resolve_model_folder

if TYPE_CHECKING:
    from langchain_adaptquant.runtime.engine import EngineConfig, GenerationEngine

#: LoadedModel, SwitchRecord and quantizable_linears live in loaded_model.py; importable from here as before.
__all__ = [
    "DEFAULT_CACHE_DIR",
    "AdaptiveModelLoader",
    "LoadedModel",
    "SwitchRecord",
    "quantizable_linears",
    "serving_manager",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(os.environ.get("ADAPTQUANT_CACHE_DIR", Path.home() / ".cache" / "langchain_adaptquant"))


def serving_manager(**settings: Any) -> DynamicQuantizationManager:
    """A manager that offers the levels the installed backends store and reports their settings:
    the one every serving entry point (chat model, server, CLI, Ray replica) builds."""
    return DynamicQuantizationManager(catalog=backend_catalog(), **settings)


def serving_facts(loaded: LoadedModel) -> ServingFacts:
    """What the policy weighs about ``loaded`` beyond its size: its engine's KV bytes and its quality profile."""
    kv = loaded.engine.kv_usage() if loaded.engine is not None else None
    return ServingFacts(
        kv_resident_bytes=kv.resident_bytes if kv else 0,
        kv_reserved_bytes=kv.reserved_bytes if kv else 0,
        quality=loaded.quality.agreement_map() if loaded.quality is not None else {},
    )


def _mixed_precision(value: Any) -> MixedPrecision:
    """``value`` when it is a MixedPrecision plan; a clear TypeError otherwise."""
    if not isinstance(value, MixedPrecision):
        raise TypeError(f"mixed_precision must be a MixedPrecision, got {type(value).__name__}")
    return value


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
        mixed_precision = _mixed_precision(mixed_precision)
        self.measure_quality_enabled = bool(measure_quality)
        self.quality_dir = Path(quality_dir) if quality_dir is not None else None
        self.manager = manager or serving_manager(device=device)
        self.device = device or self.manager.device
        if manager is not None:
            _check_manager_levels(manager, self.device)
        self.cache = ModelCache(cache_budget_gb)
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
        self.layer_cache = LayerCache(self.cache_dir / "layers", layer_cache_gb)
        if not self.layer_cache.enabled:
            logger.info("layer cache off: %s", self.layer_cache.disabled_reason)
        self.switcher = LayerSwitcher(self.device, self.layer_cache, mixed_precision, show_progress)
        self.engine_config = engine_config
        self._preparing: dict[str, threading.Thread] = {}  # background prepare_levels, one per model
        self._preparing_lock = threading.Lock()
        self._load_lock = threading.Lock()

    # -- settings the parts share -------------------------------------------------------------
    @property
    def cache_budget_gb(self) -> Optional[float]:
        return self.cache.budget_gb

    @property
    def mixed_precision(self) -> MixedPrecision:
        """Layers kept one level up; takes effect at the next load or switch."""
        return self.switcher.mixed_precision

    @mixed_precision.setter
    def mixed_precision(self, value: MixedPrecision) -> None:
        self.switcher.mixed_precision = _mixed_precision(value)

    @property
    def show_progress(self) -> bool:
        return self.switcher.show_progress

    @show_progress.setter
    def show_progress(self, value: bool) -> None:
        self.switcher.show_progress = bool(value)

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
            folder = write_model_object(model_id_or_path, tokenizer, self.cache_dir)
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
        self.cache.touch(cached)
        return revisit(self, cached, priority, forced, model_size_params, on_switch, on_decision)

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
        verdict = self.manager.should_reoptimize(
            loaded.level, size, task_priority, model_key=loaded.key, current_bytes=loaded.stored_bytes,
            facts=serving_facts(loaded),
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
                        record = self.switcher.switch(loaded, level, reason)
                finally:
                    loaded.weights_version += 1
            self.manager.record_switch(loaded.key, level)
            logger.info("switched %s %s -> %s in %.2fs: %s", loaded.name, record.from_level, level.value, record.seconds, reason)
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
        if loaded.last_forced is not None or not self.cache.holds(loaded):
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
        return self.cache.get(key_or_path)

    def models(self) -> list[LoadedModel]:
        return self.cache.models()

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
        with self._preparing_lock:
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
        show = self.show_progress if progress is None else progress
        return {
            level.value: self.switcher.prepare(loaded, level, show, lambda: self.cache.holds(loaded)).to_dict()
            for level in wanted
        }

    def cached_bytes(self) -> int:
        return self.cache.total_bytes()

    def evict(self, key_or_path: str | Path) -> bool:
        """Drop one idle model from the cache; a model with requests in flight is never evicted."""
        loaded = self.cache.pop_idle(key_or_path)
        if loaded is None:
            return False
        self._forget(loaded)
        del loaded
        release_memory(full=True)
        return True

    def clear(self) -> dict[str, Any]:
        """Evict every idle model and return what was freed, measured on the process."""
        rss_before, anon_before = process_memory()
        evicted, kept = [], []
        for key in [loaded.key for loaded in self.models()]:
            try:
                loaded = self.cache.pop_idle(key)
            except ModelInUseError as busy:
                kept.append(busy.loaded.name)
                continue
            if loaded is not None:
                self._forget(loaded)
                evicted.append(loaded.name)
                del loaded  # drop the loop's reference before collecting
        release_memory(full=True)
        rss_after, anon_after = process_memory()
        return {
            "evicted": evicted,
            "kept_in_use": kept,
            "freed_rss_mb": round((rss_before - rss_after) / 2**20, 1),
            "freed_anon_mb": round((anon_before - anon_after) / 2**20, 1),
            "rss_mb": round(rss_after / 2**20, 1),
        }

    def _forget(self, loaded: LoadedModel) -> None:
        """What leaves with a model that left the cache: its background preparation, hysteresis state,
        cached layers and engine."""
        with self._preparing_lock:
            self._preparing.pop(loaded.key, None)
        self.manager.forget(loaded.key)
        self.layer_cache.forget(loaded.key)
        loaded.close_engine()

    # -- internals ------------------------------------------------------------------------------
    def check_level_available(self, level: QuantizationLevel) -> None:
        """Raise UnsupportedLevelError (naming the levels there are) when no backend here stores ``level``."""
        levels = available_levels(self.device)
        if level not in levels:
            raise UnsupportedLevelError(level, self.device, levels)

    def _make_room(self, needed: int, name: str) -> None:
        for victim in self.cache.victims_for(needed, name):
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
        skeleton = build_skeleton(config, self.device)
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
            model, backends, layer_levels = self.switcher.materialize(skeleton, source, level, name, key)
        tokenizer = load_tokenizer(folder)
        read_generation_config(model, folder)
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
            source_format=source_format(folder),
        )
        loaded.access_count = 1
        self._attach_quality(loaded)
        self.cache.add(loaded)
        self.manager.record_switch(key, level)
        logger.info("loaded %s at %s in %.2fs (%s)", name, level.value, loaded.load_seconds, reason)
        return loaded
