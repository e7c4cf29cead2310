"""Typed errors, so callers can tell bad input from a machine that is out of memory."""

from __future__ import annotations

from typing import Any, Iterable


class AdaptQuantError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidValueError(AdaptQuantError, ValueError):
    """A value given by the caller is not allowed; the message names it and what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name = name
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {name}: {value!r}; allowed: {allowed}")


class InsufficientMemoryError(AdaptQuantError, MemoryError):
    """Even the smallest level does not fit: carries the numbers that led to it."""

    def __init__(self, required_gb: float, available_gb: float, headroom_gb: float, level: str) -> None:
        self.required_gb = required_gb
        self.available_gb = available_gb
        self.headroom_gb = headroom_gb
        self.level = level
        super().__init__(
            f"model does not fit even at {level}: needs {required_gb:.3f} GB, "
            f"{available_gb:.3f} GB available minus {headroom_gb:.3f} GB headroom"
        )


def choices(values: Iterable[Any]) -> str:
    """Render allowed values for an error message: 'a', 'b' or 'c'."""
    items = [repr(getattr(v, "value", v)) for v in values]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


class ModelNotFoundError(AdaptQuantError, FileNotFoundError):
    """The model is neither a local folder nor in the Hugging Face cache (nothing is downloaded)."""


class WeightsError(AdaptQuantError):
    """The model's folder has no safetensors weights, or they cannot be read (corrupt, deleted)."""


class UnsupportedArchitectureError(AdaptQuantError, ValueError):
    """transformers has no causal-LM class for this config."""


class SwitchError(AdaptQuantError):
    """A requantization failed; the model was rolled back and still serves at ``level``."""

    def __init__(self, message: str, level: str) -> None:
        self.level = level
        super().__init__(message)


class PullError(AdaptQuantError):
    """A pretrained model could not be fetched, checked or converted; nothing was installed."""


class ChecksumError(PullError):
    """A downloaded or given file is not the one the catalog pins (corrupt, truncated or replaced)."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(f"{what} has sha256 {actual}, expected {expected}: refusing it (corrupt, truncated or not the pinned file)")
