"""The loaded models, least recently used first, and which of them may leave to make room.

One lock guards the order and membership; a model with requests in flight is never removed. The
cache only decides who goes: closing engines, dropping hysteresis state and returning memory to the
OS is the loader's job (:meth:`~langchain_adaptquant.runtime.loader.AdaptiveModelLoader.evict`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from langchain_adaptquant.control.resources import validate_budget_gb
from langchain_adaptquant.errors import AdaptQuantError, InsufficientMemoryError
from langchain_adaptquant.runtime.loaded_model import LoadedModel
from langchain_adaptquant.units import GIB


class ModelInUseError(AdaptQuantError):
    """A model with requests in flight cannot leave the cache; ``loaded`` is that model."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        super().__init__(f"model {loaded.name!r} has {loaded.active_requests} request(s) in flight; not evicted")


class ModelCache:
    """An LRU of :class:`LoadedModel` keyed by resolved folder, bounded by ``budget_gb`` of stored weights."""

    def __init__(self, budget_gb: Optional[float] = None) -> None:
        self.budget_gb = validate_budget_gb(budget_gb, name="cache_budget_gb")
        self._models: "OrderedDict[str, LoadedModel]" = OrderedDict()
        self._lock = threading.RLock()

    def get(self, key_or_path: str | Path) -> Optional[LoadedModel]:
        """The model under this key, or under the path's resolved form (a relative or linked path)."""
        with self._lock:
            found = self._models.get(str(key_or_path))
            if found is None and Path(str(key_or_path)).exists():
                found = self._models.get(str(Path(key_or_path).resolve()))
            return found

    def holds(self, loaded: LoadedModel) -> bool:
        """Whether this very object is still the cached one (not evicted, not replaced by a reload)."""
        return self.get(loaded.key) is loaded

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def total_bytes(self) -> int:
        """Stored weight bytes of every cached model."""
        return sum(loaded.stored_bytes for loaded in self.models())

    def add(self, loaded: LoadedModel) -> None:
        with self._lock:
            self._models[loaded.key] = loaded

    def touch(self, loaded: LoadedModel) -> None:
        """Mark ``loaded`` most recently used."""
        with self._lock:
            if loaded.key in self._models:
                self._models.move_to_end(loaded.key)

    def pop_idle(self, key_or_path: str | Path) -> Optional[LoadedModel]:
        """Remove and return an idle model (None when it is not cached); in use, it stays and this raises."""
        with self._lock:
            loaded = self.get(key_or_path)
            if loaded is None:
                return None
            if loaded.active_requests:
                raise ModelInUseError(loaded)
            del self._models[loaded.key]
            return loaded

    def victims_for(self, needed_bytes: int, name: str) -> list[LoadedModel]:
        """Idle models to evict, least recently used first, so ``needed_bytes`` more fit the budget.

        Raises :class:`InsufficientMemoryError` when evicting every idle model would not be enough
        (nothing is evicted then). Empty without a budget.
        """
        if self.budget_gb is None:
            return []
        budget = int(self.budget_gb * GIB)
        with self._lock:
            used = self.total_bytes()
            victims = []
            for candidate in (m for m in self._models.values() if not m.active_requests):
                if used + needed_bytes <= budget:
                    break
                victims.append(candidate)
                used -= candidate.stored_bytes
            if used + needed_bytes > budget:
                raise InsufficientMemoryError(
                    required_gb=needed_bytes / GIB,
                    available_gb=(budget - used) / GIB,
                    headroom_gb=0.0,
                    level=f"cache budget {self.budget_gb:g} GiB for {name}",
                )
        return victims
