"""What both runtimes' model records and loaders do alike: requests in use, and a cached model's revisit.

A model record (torch's ``LoadedModel``, llama.cpp's ``LlamaCppModel``) counts the requests in flight
so a busy model is never evicted, and stops its engine when it leaves; a loader that finds a model
already loaded applies the call's forced level or lets the policy re-decide. One definition each.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority


class InUse:
    """Mixin for a model record with ``_count_lock``, ``active_requests``, ``last_access`` and ``engine``."""

    _count_lock: Any
    active_requests: int
    last_access: float
    engine: Any

    @contextmanager
    def in_use(self) -> Iterator[Any]:
        """Mark a request in flight on this model: it cannot be evicted meanwhile."""
        with self._count_lock:
            self.active_requests += 1
            self.last_access = time.time()
        try:
            yield self
        finally:
            with self._count_lock:
                self.active_requests -= 1

    def close_engine(self) -> None:
        """Stop the model's engine, if one was started (the model is leaving the cache)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()


def revisit(loader: Any, cached: Any, priority: TaskPriority, forced: Optional[QuantizationLevel],
            model_size_params: Optional[float], on_switch: Optional[Callable[[Any], None]],
            on_decision: Optional[Callable[[str], None]]) -> Any:
    """A call found ``cached`` loaded: count it, then switch to ``forced`` or let the policy re-decide."""
    cached.access_count += 1
    cached.last_access = time.time()
    cached.last_priority, cached.last_forced = priority, forced
    if forced is not None:
        reason = cached.last_decision_reason = f"forced to {forced.value}"
        record = loader.requantize(cached, forced, reason=reason) if forced is not cached.level else None
    else:
        record, reason = loader._reoptimize(cached, priority, model_size_params)
    if record is not None and on_switch is not None:
        on_switch(record)
    if on_decision is not None:
        on_decision(reason)
    return cached
