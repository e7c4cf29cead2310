"""Mixed precision per layer: which Linear layers keep one level more than the model's level.

Why: at 2 bits the layers of a small model are not equally fragile. llama.cpp's k-quants keep the
attention value projection and the MLP down projection at more bits in their 2-3 bit types, and
the first and last transformer blocks matter most; ``benchmarks/quality.py`` measures those
choices on SmolLM2-135M (perplexity, probe answers, bytes). A :class:`MixedPrecision` names the
layers that get one level more, so a model "at INT2" stores most layers at 2 bits and a few at 4.

Pure functions of layer names and a frozen config: the loader, sizing and the benchmarks share them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION, QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def block_index(layer: str) -> Optional[int]:
    """The transformer block a Linear belongs to ('model.layers.3.mlp.down_proj' -> 3), None outside blocks."""
    found = _BLOCK.search(layer)
    return int(found.group(1)) if found else None


def one_level_up(level: QuantizationLevel) -> QuantizationLevel:
    """The next more precise level (16-bit stays 16-bit)."""
    index = LEVELS_BY_PRECISION.index(level)
    return LEVELS_BY_PRECISION[max(0, index - 1)]


@dataclass(frozen=True)
class MixedPrecision:
    """Layers that keep one level more when the model is at one of ``at_levels``.

    A layer is kept when its block is among the first ``first_blocks`` or last ``last_blocks``, or
    its name ends with one of ``kinds`` (e.g. ``"v_proj"``, ``"down_proj"``). The block rule applies
    only while it keeps at most a quarter of the blocks: on a 2-block model "first and last" would be
    the whole model, and the level would store nothing at its own bits.
    """

    at_levels: frozenset[QuantizationLevel] = frozenset()
    first_blocks: int = 0
    last_blocks: int = 0
    kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.first_blocks < 0 or self.last_blocks < 0:
            raise InvalidValueError("mixed precision blocks", (self.first_blocks, self.last_blocks), "counts >= 0")
        object.__setattr__(self, "at_levels", frozenset(QuantizationLevel.parse(v) for v in self.at_levels))
        object.__setattr__(self, "kinds", tuple(self.kinds))

    @property
    def active(self) -> bool:
        return bool(self.at_levels) and bool(self.first_blocks or self.last_blocks or self.kinds)

    def keeps(self, layer: str, blocks: int) -> bool:
        """Whether ``layer`` is one the rule keeps a level higher (in a model of ``blocks`` blocks)."""
        if any(layer == kind or layer.endswith("." + kind) for kind in self.kinds):
            return True
        index = block_index(layer)
        if index is None or self.first_blocks + self.last_blocks > blocks // 4:
            return False
        return index < self.first_blocks or index >= blocks - self.last_blocks

    def level_for(self, layer: str, level: QuantizationLevel, blocks: int) -> QuantizationLevel:
        """The level ``layer`` is stored at when the model is at ``level``."""
        if level in self.at_levels and self.keeps(layer, blocks):
            return one_level_up(level)
        return level

    def describe(self) -> str:
        if not self.active:
            return "uniform"
        parts = []
        if self.first_blocks or self.last_blocks:
            parts.append(f"first {self.first_blocks}/last {self.last_blocks} blocks")
        if self.kinds:
            parts.append("+".join(self.kinds))
        levels = ",".join(sorted(level.value for level in self.at_levels))
        return f"{' and '.join(parts)} one level up at {levels}"


UNIFORM = MixedPrecision()
#: The default, chosen with benchmarks/quality.py on SmolLM2-135M (see docs section 6): at INT2 the
#: v/down projections and the first and last blocks stay at INT4.
DEFAULT_MIXED_PRECISION = MixedPrecision(
    at_levels=frozenset({QuantizationLevel.INT2}), first_blocks=1, last_blocks=1, kinds=("v_proj", "down_proj"),
)


def count_blocks(layers: Iterable[str]) -> int:
    """Number of transformer blocks, from the highest block index among ``layers`` (0 when none)."""
    indices = [i for i in (block_index(name) for name in layers) if i is not None]
    return max(indices) + 1 if indices else 0


def plan_levels(layers: Iterable[str], level: QuantizationLevel | str, rule: MixedPrecision) -> dict[str, QuantizationLevel]:
    """Level of every layer when the model is at ``level``."""
    level = QuantizationLevel.parse(level)
    names = list(layers)
    blocks = count_blocks(names)
    return {name: rule.level_for(name, level, blocks) for name in names}
