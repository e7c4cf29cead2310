"""Quantization levels and task priorities: the contract every other module speaks.

A level says how many bits a quantizable weight gets; which library stores them is a backend detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal, Optional, Union

from langchain_adaptquant.errors import InvalidValueError, choices


class QuantizationLevel(str, Enum):
    """Weight precision, from most to least precise. Parse user input with :meth:`parse`."""

    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"

    def __str__(self) -> str:  # "int4", not "QuantizationLevel.INT4", in messages and JSON
        return self.value

    @classmethod
    def parse(cls, value: Union[str, "QuantizationLevel"]) -> "QuantizationLevel":
        """Accept a level or its name in any case ("INT4", " int4 "); anything else is a clear error."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for level in cls:
                if level.value == key:
                    return level
        raise InvalidValueError("quantization level", value, choices(cls))

    @property
    def facts(self) -> "LevelFacts":
        return LEVEL_FACTS[self]

    @property
    def bits(self) -> int:
        return LEVEL_FACTS[self].bits

    @property
    def compression_vs_fp32(self) -> float:
        return LEVEL_FACTS[self].compression_vs_fp32

    @property
    def rank(self) -> int:
        """Higher is more precise: FP16=3 ... INT2=0. Lets the policy compare levels."""
        return len(LEVELS_BY_PRECISION) - 1 - LEVELS_BY_PRECISION.index(self)

    def precision(self, device: str = "cpu") -> str:
        """The dtype actually used: bfloat16 computes faster than float16 on CPUs, so FP16 means bf16 there."""
        if self is QuantizationLevel.FP16:
            return "bfloat16" if device == "cpu" else "float16"
        return self.value


class TaskPriority(str, Enum):
    """What the caller values most: quality keeps precision longer, speed gives it up sooner."""

    QUALITY = "quality"
    BALANCED = "balanced"
    SPEED = "speed"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Union[str, "TaskPriority"]) -> "TaskPriority":
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for priority in cls:
                if priority.value == key:
                    return priority
        raise InvalidValueError("task priority", value, choices(cls))


@dataclass(frozen=True)
class LevelFacts:
    """Nominal facts of a level. Real stored sizes come from ``sizing`` and are measured by backends."""

    bits: int
    compression_vs_fp32: float
    description: str


LEVEL_FACTS: dict[QuantizationLevel, LevelFacts] = {
    QuantizationLevel.FP16: LevelFacts(16, 2.0, "16-bit floats (bfloat16 on CPU); reference quality"),
    QuantizationLevel.INT8: LevelFacts(8, 4.0, "8-bit integer weights with per-channel scales"),
    QuantizationLevel.INT4: LevelFacts(4, 8.0, "4-bit integer weights with per-group scales"),
    QuantizationLevel.INT2: LevelFacts(2, 16.0, "2-bit integer weights with per-group scales; emergency"),
}

#: Most precise first. ``LEVELS_BY_PRECISION.index(level)`` grows as precision falls.
LEVELS_BY_PRECISION: tuple[QuantizationLevel, ...] = (
    QuantizationLevel.FP16,
    QuantizationLevel.INT8,
    QuantizationLevel.INT4,
    QuantizationLevel.INT2,
)


#: Which way a level change goes; ``load`` when there was no level before.
SwitchDirection = Literal["load", "downgrade", "upgrade", "keep"]


def switch_direction(before: Optional[QuantizationLevel], after: QuantizationLevel) -> SwitchDirection:
    """The direction of a change from ``before`` to ``after``: the one place that compares them for it."""
    if before is None:
        return "load"
    if after.rank < before.rank:
        return "downgrade"
    if after.rank > before.rank:
        return "upgrade"
    return "keep"
