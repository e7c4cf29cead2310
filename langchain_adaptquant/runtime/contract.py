"""What every runtime's engine answers with, without torch: its errors, KV bytes and statistics.

Both engines (torch's ``GenerationEngine``, llama.cpp's ``LlamaCppEngine``) raise and return these,
so the server, the chat model and the policy read one shape whichever runtime serves.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from langchain_adaptquant.errors import AdaptQuantError

logger = logging.getLogger("langchain_adaptquant.runtime.engine")


class EngineBusyError(AdaptQuantError):
    """The engine's queue is full: the caller should retry later (the server answers 503)."""


class EngineClosedError(AdaptQuantError):
    """The engine was closed (its model evicted) before this request finished."""


@dataclass(frozen=True)
class KVUsage:
    """KV-cache bytes of one engine, for the policy's projected memory."""

    resident_bytes: int  # held now (already part of the process's memory)
    reserved_bytes: int  # what sequences in flight and queued will hold at their longest


@dataclass(frozen=True)
class EngineStats:
    active: int
    waiting: int
    steps: int
    tokens: int
    max_batch_seen: int
    kv: KVUsage
    row_batching: bool

    def to_dict(self) -> dict[str, Any]:
        return {"active": self.active, "waiting": self.waiting, "steps": self.steps, "tokens": self.tokens,
                "max_batch_seen": self.max_batch_seen, "row_batching": self.row_batching,
                "kv_resident_mb": round(self.kv.resident_bytes / 2**20, 2),
                "kv_reserved_mb": round(self.kv.reserved_bytes / 2**20, 2)}


class BetweenSteps:
    """Mixin: the engine's between-steps hook (the loader's policy check), at most every
    ``config.boundary_every_s``, and never allowed to stop generation."""

    on_boundary: Optional[Callable[[Any], None]]
    config: Any
    name: str
    _last_boundary: float

    def _boundary(self) -> None:
        if self.on_boundary is None:
            return
        now = time.monotonic()
        if now - self._last_boundary < self.config.boundary_every_s:
            return
        self._last_boundary = now
        try:
            self.on_boundary(self)
        except Exception:  # noqa: BLE001 - the policy's check must never stop generation
            logger.exception("between-steps hook of %s failed", self.name)
