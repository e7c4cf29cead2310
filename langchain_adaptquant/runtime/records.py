"""SwitchRecord: one change of level, as telemetry, stats and the server report it (no torch here).

Both runtimes write one per switch, successful or rolled back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from langchain_adaptquant.control.levels import QuantizationLevel, SwitchDirection, switch_direction


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
