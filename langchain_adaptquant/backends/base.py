"""The one interface every quantization library is wrapped in, and the errors backends raise.

A backend turns one fresh 16-bit ``nn.Linear`` into a module that stores its weight at a level and
computes in the model's 16-bit dtype. Optional libraries are imported inside methods only, so a
missing library makes :meth:`QuantizationBackend.available` false instead of breaking package import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.control.resources import DEVICES, validate_device
from langchain_adaptquant.errors import AdaptQuantError, choices

#: Device types the package knows how to serve on (defined with the probes that read their memory).
DEVICE_TYPES: tuple[str, ...] = DEVICES

LevelLike = Union[QuantizationLevel, str]
DeviceLike = Union[str, torch.device]


class BackendError(AdaptQuantError):
    """A backend failed to quantize or run a layer; the registry falls back to the next backend."""


class UnsupportedLevelError(AdaptQuantError):
    """No available backend stores this level on this device.

    Build it as ``UnsupportedLevelError(level, device, available_levels)`` and the message names all
    three; a single string argument is taken as a ready-made message.
    """

    def __init__(
        self,
        level: Union[LevelLike, str],
        device: Optional[DeviceLike] = None,
        available: Optional[Iterable[LevelLike]] = None,
    ) -> None:
        if device is None:
            self.level, self.device = None, None
            self.available: tuple[QuantizationLevel, ...] = ()
            super().__init__(str(level))
            return
        self.level = QuantizationLevel.parse(level)
        self.device = str(device)
        self.available = tuple(QuantizationLevel.parse(v) for v in (available or ()))
        there = choices(self.available) if self.available else "none"
        super().__init__(
            f"quantization level {self.level.value!r} has no available backend on device "
            f"{self.device!r}; levels available there: {there}"
        )


def device_type(device: DeviceLike) -> str:
    """'cuda:1' -> 'cuda'. Anything we do not serve on is a clear error (see ``validate_device``)."""
    return validate_device(device)


def compute_dtype(device: DeviceLike) -> torch.dtype:
    """The 16-bit dtype activations use: bfloat16 on CPU (fast there), float16 on GPUs."""
    return getattr(torch, QuantizationLevel.FP16.precision(device_type(device)))


def linear_with(weight: torch.Tensor, bias: Optional[torch.Tensor], device: DeviceLike,
                dtype: torch.dtype) -> nn.Linear:
    """A frozen Linear holding ``weight`` and ``bias`` cast to ``dtype`` on ``device``.

    Built on the meta device and then given the tensors, so no throwaway random weight is allocated
    (a quantizer works on this copy and the caller's layer stays intact if it fails).
    """
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(weight.detach().to(device=device, dtype=dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    return linear


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_linear(linear: nn.Module) -> str:
    """'Linear(in=768, out=1000, bias=True)' for error messages."""
    return (
        f"Linear(in={getattr(linear, 'in_features', '?')}, out={getattr(linear, 'out_features', '?')}, "
        f"bias={getattr(linear, 'bias', None) is not None})"
    )


class QuantizationBackend(ABC):
    """One quantization library behind a small, uniform interface.

    Subclasses implement :meth:`_import`, :meth:`supports`, :meth:`_quantize` and optionally
    :meth:`shape_problem`. :meth:`quantize_linear` is the template that checks, wraps library
    failures into :class:`BackendError` and smoke-tests the result, so a layer that a kernel
    cannot run fails here (where the registry can fall back) rather than in the middle of a request.
    The input Linear is never modified on failure: backends build the new module beside it.
    """

    name: str = "base"

    # -- what this backend can do ------------------------------------------------------------
    def available(self) -> bool:
        """Whether the library imports here. Never raises: a broken install just means 'no'."""
        try:
            self._import()
        except Exception:  # ImportError, but also a library that fails while importing
            return False
        return True

    def _import(self) -> None:  # noqa: B027 - an optional hook: most backends need no import
        """Import the optional library (raising when it is missing). Default: nothing needed."""

    @abstractmethod
    def supports(self, level: LevelLike, device: DeviceLike = "cpu") -> bool:
        """Whether this backend can store ``level`` on ``device`` at all (library presence aside)."""

    def shape_problem(
        self, linear: nn.Linear, level: LevelLike, device: DeviceLike = "cpu"
    ) -> Optional[str]:
        """Why this layer's shape cannot be taken at ``level`` (None: it can). Kernels have limits."""
        return None

    def settings(self, level: QuantizationLevel, device: DeviceLike = "cpu") -> dict[str, Any]:
        """The arguments this backend stores ``level`` with on ``device``, as JSON (``/calculate``,
        the CLI): the library's own names where it has a config, so a reader can reproduce it."""
        return {"backend": self.name, "weights": level.value, "compute_dtype": _dtype_name(compute_dtype(device))}

    def warms_up(self, level: QuantizationLevel, device_kind: str) -> bool:
        """Whether each new module does one-off work on its first forward (bitsandbytes repacks NF4
        on AVX512-BF16 CPUs): then every module is smoke-tested, so that happens here, not mid-request."""
        return False

    def accepts(self, linear: nn.Linear, level: LevelLike, device: DeviceLike = "cpu") -> bool:
        """Whether this particular layer can be quantized here (shape limits of the kernels)."""
        return self.shape_problem(linear, level, device) is None

    # -- doing it ---------------------------------------------------------------------------
    def quantize_linear(
        self, linear: nn.Linear, level: LevelLike, device: DeviceLike = "cpu"
    ) -> nn.Module:
        """Return a module holding ``linear``'s weight at ``level`` on ``device``.

        The result takes and returns activations in :func:`compute_dtype` of the device and is in
        eval mode. Raises :class:`BackendError` for anything that goes wrong inside the library.
        """
        level = QuantizationLevel.parse(level)
        kind = device_type(device)
        if not isinstance(linear, nn.Linear):
            raise BackendError(f"{self.name}: expected an nn.Linear, got {type(linear).__name__}")
        if not self.supports(level, kind):
            raise BackendError(f"{self.name} does not support {level.value} on {kind}")
        problem = self.shape_problem(linear, level, kind)
        if problem is not None:
            raise BackendError(f"{self.name} cannot take {describe_linear(linear)} at {level.value}: {problem}")
        proof = (level, kind, str(device), linear.in_features, linear.out_features, linear.bias is not None)
        try:
            self._import()
            with torch.no_grad():
                module = self._quantize(linear, level, device)
                module.eval()
                module.requires_grad_(False)
                if self.warms_up(level, kind) or proof not in self._proven:
                    self._smoke_test(module, linear.in_features, compute_dtype(device), device)
        except BackendError:
            raise
        except Exception as exc:  # the libraries raise RuntimeError, AssertionError, ValueError...
            raise BackendError(
                f"{self.name} failed on {describe_linear(linear)} at {level.value} on {kind}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._proven.add(proof)  # set.add is atomic under the GIL
        return module

    @property
    def _proven(self) -> set[tuple]:
        """(level, device, in, out, bias) whose forward already ran once: the same kernel path again
        needs no new smoke test. A quanto INT2 forward costs ~4 ms per layer, a third of its switch."""
        return self.__dict__.setdefault("_proven_shapes", set())

    @abstractmethod
    def _quantize(self, linear: nn.Linear, level: QuantizationLevel, device: DeviceLike) -> nn.Module:
        """Build the quantized module (called under ``torch.no_grad``, library already imported)."""

    @staticmethod
    def _smoke_test(module: nn.Module, in_features: int, dtype: torch.dtype, device: DeviceLike) -> None:
        """One decode-sized forward: surfaces kernels that reject the layer, and lets libraries that
        repack weights on first use (bitsandbytes nf4 on AVX512-BF16 CPUs) do it now, not mid-request.
        """
        probe = torch.zeros(1, in_features, dtype=dtype, device=device)
        out = module(probe)
        if out.dtype != dtype:
            raise BackendError(f"forward returned {out.dtype}, expected {dtype}")

    def stored_bytes(self, module: nn.Module) -> int:
        """Bytes this module really stores (quantized data, scales, zeros, bias)."""
        from langchain_adaptquant.runtime.accounting import stored_bytes

        return stored_bytes(module)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
