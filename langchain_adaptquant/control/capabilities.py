"""What the storage layer can do on a device, as control sees it: a catalog passed in, never imported.

The manager needs two facts it cannot derive from numbers: which levels some installed backend
stores on this device, and that backend's settings (shown by ``/calculate`` and the CLI). Control
does not import the backends to learn them; whoever wires the service hands the manager a
:class:`LevelCatalog` (the backend registry's is
:func:`langchain_adaptquant.backends.registry.backend_catalog`). Without one the manager reasons
from numbers alone: every level, no backend settings (:class:`FixedLevels`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from langchain_adaptquant.control.levels import LEVELS_BY_PRECISION, QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError, choices


@runtime_checkable
class LevelCatalog(Protocol):
    """The levels a device offers and the settings of the backend that would store each."""

    def levels(self, device: str) -> Sequence[QuantizationLevel]:
        """Levels some backend stores on ``device``, most precise first."""
        ...

    def settings(self, level: QuantizationLevel, device: str) -> dict[str, Any]:
        """The first-choice backend's settings for ``level`` on ``device``, in its library's terms;
        empty when none stores it there."""
        ...


@dataclass(frozen=True)
class FixedLevels:
    """A catalog from numbers alone: the same levels on every device and no backend settings.

    The manager's default, and what decision replays use: they ask "what would the policy choose",
    not "what is installed here".
    """

    offered: tuple[QuantizationLevel, ...] = LEVELS_BY_PRECISION

    def __post_init__(self) -> None:
        parsed = tuple(QuantizationLevel.parse(level) for level in self.offered)
        ordered = tuple(level for level in LEVELS_BY_PRECISION if level in parsed)  # most precise first
        if not ordered:
            raise InvalidValueError("offered levels", self.offered, "at least one of " + choices(LEVELS_BY_PRECISION))
        object.__setattr__(self, "offered", ordered)

    def levels(self, device: str) -> Sequence[QuantizationLevel]:
        return self.offered

    def settings(self, level: QuantizationLevel, device: str) -> dict[str, Any]:
        return {}
