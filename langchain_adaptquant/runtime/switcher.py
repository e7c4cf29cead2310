"""Build and swap a model's quantizable Linear layers, one at a time, from the memory-mapped weights.

Three uses share one layer builder (:meth:`LayerSwitcher.layer`: from the layer cache when it holds
the layer, else quantized from the source): filling a fresh skeleton at load, switching a serving
model in place (all-or-nothing: a failure puts back the layers already swapped), and quantizing
layers ahead of time into the layer cache. Peak memory stays the larger of before and after plus
about one layer. Locks, the step gate and the manager's bookkeeping are the loader's: the switcher
only moves weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn
from tqdm.auto import tqdm

from langchain_adaptquant.backends.base import compute_dtype, linear_with
from langchain_adaptquant.backends.registry import get_backend, quantize_linear_with_fallback
from langchain_adaptquant.control.layer_plan import MixedPrecision, plan_levels
from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.control.resources import process_memory
from langchain_adaptquant.errors import SwitchError, WeightsError
from langchain_adaptquant.runtime.accounting import stored_bytes
from langchain_adaptquant.runtime.layer_cache import LayerCache
from langchain_adaptquant.runtime.loaded_model import LoadedModel, SwitchRecord, quantizable_linears
from langchain_adaptquant.runtime.os_memory import (
    TRIM_EVERY_BYTES,
    drop_file_pages,
    mapped_ranges,
    release_memory,
    trim_heap,
)
from langchain_adaptquant.runtime.weights import WeightSource


@dataclass(frozen=True)
class BuiltLayer:
    """One Linear at its level: the module, the backend that stores it, whether the layer cache had it."""

    module: nn.Module
    backend: str
    from_cache: bool


@dataclass(frozen=True)
class PreparedLevel:
    """What quantizing one level ahead of time did."""

    layers_written: int
    layers_already_cached: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"layers_written": self.layers_written, "layers_already_cached": self.layers_already_cached,
                "seconds": round(self.seconds, 3)}


def swap_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``name`` points inside ``model`` (the old one is dropped by the caller)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@dataclass
class LayerSwitcher:
    """Moves one model's Linear layers between levels on ``device``; see the module docstring.
    Mutable on purpose: the loader's ``mixed_precision`` and ``show_progress`` write through to it."""

    device: str
    layer_cache: LayerCache
    mixed_precision: MixedPrecision
    show_progress: bool

    def layer(
        self, source: WeightSource, layer: str, level: QuantizationLevel, backend_name: Optional[str] = None,
        ranges: Optional[list[tuple[int, int]]] = None, model_key: Optional[str] = None,
    ) -> BuiltLayer:
        """``layer`` at ``level``: from the layer cache when it holds it (with ``backend_name``, when
        given), else quantized from the source and queued for the cache (with a ``model_key``)."""
        if model_key is not None and level is not QuantizationLevel.FP16:
            hit = self.layer_cache.load(model_key, level, layer, self.device)
            if hit is not None and (backend_name is None or hit[1] == backend_name):
                if ranges:  # a 16-bit layer it replaces may have left its source pages resident
                    drop_file_pages(source.tensor(f"{layer}.weight"), ranges)
                return BuiltLayer(hit[0], hit[1], True)
        weight = source.tensor(f"{layer}.weight")
        bias_name = f"{layer}.bias"
        bias = source.tensor(bias_name) if bias_name in source else None
        linear = linear_with(weight, bias, self.device, compute_dtype(self.device))
        if backend_name is not None:
            module, backend = get_backend(backend_name).quantize_linear(linear, level, self.device), backend_name
        else:
            module, backend = quantize_linear_with_fallback(linear, level, self.device)
        if ranges and level is not QuantizationLevel.FP16:
            drop_file_pages(weight, ranges)  # the quantized copy is all this layer keeps
        if model_key is not None:
            self.layer_cache.store_later(model_key, level, layer, backend, module)
        return BuiltLayer(module, backend, False)

    def materialize(
        self, model: Any, source: WeightSource, level: QuantizationLevel, name: str, key: str
    ) -> tuple[nn.Module, dict[str, str], dict[str, QuantizationLevel]]:
        """Fill a meta-device skeleton: 16-bit parts as stored, each quantizable Linear at its planned
        level. Returns the model, each layer's backend and each layer's level."""
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
            built = self.layer(source, layer, plan[layer], ranges=ranges, model_key=key)
            swap_module(model, layer, built.module)
            backends[layer] = built.backend
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise WeightsError(f"weights in {str(source.folder)!r} lack {len(missing)} tensor(s), e.g. {missing[:3]}")
        return model, backends, plan

    def switch(self, loaded: LoadedModel, level: QuantizationLevel, reason: str) -> SwitchRecord:
        """Requantize ``loaded`` to ``level`` in place and record it; on failure roll back, record the
        failed switch and raise :class:`SwitchError`. The caller holds the model's gate."""
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
            progress = tqdm(layers, desc=f"{loaded.name}: {previous.value} -> {level.value}", unit="layer",
                            disable=not self.show_progress)
            since_trim = 0
            try:
                for layer in progress:
                    built = self.layer(source, layer, plan[layer], ranges=ranges, model_key=loaded.key)
                    swap_module(loaded.model, layer, built.module)
                    swapped.append(layer)
                    new_backends[layer] = built.backend
                    from_cache += built.from_cache
                    del built
                    since_trim += source.nbytes(f"{layer}.weight")
                    if since_trim >= TRIM_EVERY_BYTES:
                        trim_heap()
                        since_trim = 0
            except Exception as error:
                self._roll_back(loaded, swapped)
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
        return record

    def _roll_back(self, loaded: LoadedModel, swapped: list[str]) -> None:
        """Put back each swapped layer at its previous level with its previous backend."""
        for layer in swapped:
            built = self.layer(loaded.source, layer, loaded.layer_levels.get(layer, loaded.level),
                               loaded.layer_backends[layer], model_key=loaded.key)
            swap_module(loaded.model, layer, built.module)

    def prepare(
        self, loaded: LoadedModel, level: QuantizationLevel, show: bool, still_cached: Callable[[], bool]
    ) -> PreparedLevel:
        """Quantize ``loaded``'s layers at ``level`` into the layer cache without touching the model;
        stops early once ``still_cached()`` says the model left the cache."""
        started, written, present = time.perf_counter(), 0, 0
        if level is not QuantizationLevel.FP16:  # 16-bit is the source itself: nothing to prepare
            plan = plan_levels(loaded.layer_backends, level, self.mixed_precision)
            layers = [layer for layer in plan if plan[layer] is not QuantizationLevel.FP16]
            for layer in tqdm(layers, desc=f"prepare {loaded.name} at {level.value}", unit="layer", disable=not show):
                if not still_cached():
                    break  # evicted meanwhile: its cached layers were just forgotten
                if self.layer_cache.has(loaded.key, plan[layer], layer):
                    present += 1
                    continue
                built = self.layer(loaded.source, layer, plan[layer])
                written += self.layer_cache.store(loaded.key, plan[layer], layer, built.backend, built.module)
                del built
            trim_heap()
        return PreparedLevel(written, present, time.perf_counter() - started)
