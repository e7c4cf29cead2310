"""Count the bytes a model really stores, whatever library quantized it.

``model.get_memory_footprint()`` multiplies each parameter's element count by its *nominal* element
size, so a torchao or quanto weight (a tensor subclass that reports bf16) counts as 16-bit, and the
scales bitsandbytes keeps beside its weights are missed. Here we walk down to the plain tensors
that own memory:

* tensor subclasses are unwrapped with ``__tensor_flatten__`` (recursively: quanto's packed data
  is itself a subclass);
* side tensors hung on parameters or modules are included (bitsandbytes ``quant_state`` with its
  absmax/code/nested state, ``Int8Params.CB/SCB``, ``Linear8bitLt.state``);
* every storage is counted once, and only the bytes its tensors actually cover, so tied weights,
  views and slices of one big memory-mapped buffer are neither double-counted nor inflated.

Meta tensors hold nothing and count zero.
"""

from __future__ import annotations

import enum
import types
from typing import Any, Iterator, Union

import torch
from torch import nn

#: How deep to follow plain Python objects hanging off a module or parameter (QuantState ->
#: nested QuantState -> tensor is 2); bounded so a stray reference cannot walk a whole program.
_OBJECT_DEPTH = 3
_ATOMS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device, enum.Enum, type,
          types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType)


def stored_bytes(obj: Union[nn.Module, torch.Tensor]) -> int:
    """Bytes held by a module (parameters, buffers and side tensors, all submodules) or a tensor."""
    ledger = _Ledger()
    if isinstance(obj, nn.Module):
        for module in obj.modules():
            ledger.add_all(_module_tensors(module))
    elif isinstance(obj, torch.Tensor):
        ledger.add_all(_leaf_tensors(obj, set(), _OBJECT_DEPTH))
    else:
        raise TypeError(f"stored_bytes needs an nn.Module or a torch.Tensor, got {type(obj).__name__}")
    return ledger.total()


def stored_bytes_by_module(model: nn.Module) -> dict[str, int]:
    """Bytes per module name, counting each module's own tensors only ('' is the root).

    A tensor shared by several modules (tied embeddings) is charged to the first one in
    ``named_modules()`` order, so the values add up to :func:`stored_bytes` of the model.
    Modules that hold nothing are left out.
    """
    ledger = _Ledger()
    result: dict[str, int] = {}
    for name, module in model.named_modules():
        before = ledger.total()
        ledger.add_all(_module_tensors(module))
        added = ledger.total() - before
        if added:
            result[name] = added
    return result


# -- finding the tensors -----------------------------------------------------------------------


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Plain tensors owned directly by ``module`` (not its children)."""
    seen: set[int] = set()
    for tensor in list(module._parameters.values()) + list(module._buffers.values()):
        if tensor is not None:
            yield from _leaf_tensors(tensor, seen, _OBJECT_DEPTH)
    # Public attributes that are not parameters/buffers: bitsandbytes keeps ``state`` (CB/SCB) and
    # ``quant_state`` here; some models keep tensors as plain attributes. nn.Module's own
    # bookkeeping lives in underscore names, which we skip.
    for key, value in vars(module).items():
        if not key.startswith("_"):
            yield from _object_tensors(value, seen, _OBJECT_DEPTH)


def _leaf_tensors(tensor: torch.Tensor, seen: set[int], depth: int) -> Iterator[torch.Tensor]:
    """The storage-owning tensors behind ``tensor`` (itself, or its flattened inner tensors)."""
    if id(tensor) in seen:
        return
    seen.add(id(tensor))
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:  # wrapper subclass: the memory is in the inner tensors
        names, _ = flatten()
        for name in names:
            inner = getattr(tensor, name, None)
            if isinstance(inner, torch.Tensor):
                yield from _leaf_tensors(inner, seen, depth)
        return
    yield tensor
    if type(tensor) not in (torch.Tensor, nn.Parameter):  # e.g. Params4bit, Int8Params
        for key, value in vars(tensor).items():
            if not key.startswith("_"):
                yield from _object_tensors(value, seen, depth)


def _object_tensors(value: Any, seen: set[int], depth: int) -> Iterator[torch.Tensor]:
    """Tensors reachable from a plain Python value, a few levels deep; never into other modules."""
    if isinstance(value, torch.Tensor):
        yield from _leaf_tensors(value, seen, depth)
        return
    if depth <= 0 or isinstance(value, (nn.Module, *_ATOMS)) or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    elif hasattr(value, "__dict__"):
        items = [v for k, v in vars(value).items() if not k.startswith("_")]
    else:
        return
    for item in items:
        yield from _object_tensors(item, seen, depth - 1)


# -- counting storages once --------------------------------------------------------------------


class _Ledger:
    """Byte ranges per storage; a storage's count is the union of the ranges its tensors cover."""

    def __init__(self) -> None:
        self._ranges: dict[Any, list[tuple[int, int]]] = {}
        self._total = 0

    def add_all(self, tensors: Iterator[torch.Tensor]) -> None:
        for tensor in tensors:
            self.add(tensor)

    def add(self, tensor: torch.Tensor) -> None:
        if tensor.is_meta or tensor.numel() == 0:
            return
        itemsize = tensor.element_size()
        try:
            storage = tensor.untyped_storage()
            key: Any = (tensor.device, storage.data_ptr())
            start = tensor.storage_offset() * itemsize
            span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()) if stride > 0)
            end = min(start + span * itemsize, storage.nbytes()) if storage.nbytes() else start + span * itemsize
        except (RuntimeError, NotImplementedError, TypeError):  # a subclass without real storage
            key, start, end = ("object", id(tensor)), 0, tensor.numel() * itemsize
        ranges = self._ranges.setdefault(key, [])
        before = _union_length(ranges)
        ranges.append((int(start), int(end)))
        merged = _merge(ranges)
        self._ranges[key] = merged
        self._total += _union_length(merged) - before

    def total(self) -> int:
        return self._total


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _union_length(ranges: list[tuple[int, int]]) -> int:
    return sum(end - start for start, end in ranges)
