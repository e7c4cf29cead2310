"""Which runtime serves a model: the one place that knows both (torch and llama.cpp).

``"auto"`` (the default) picks llama.cpp on a CPU when the model folder holds a GGUF and
llama-cpp-python imports: on this kind of machine it decodes 5-7x faster than the torch runtime
and holds a fraction of its memory (benchmarks/llamacpp_compare.py). Everything else (CUDA/MPS,
bitsandbytes, Hugging Face folders without a GGUF, a model given as a module) runs on torch.
Both runtimes' loaders share one surface (``load_model``, ``requantize``, ``engine(loaded).submit``,
``check_level_available``, ``prepare_levels_in_background``, ``manager``): the :class:`Runtime`
protocol, so nothing above this module asks which one it has.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority
from langchain_adaptquant.errors import InvalidValueError

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "llamacpp")


class Runtime(Protocol):
    """What the chat model, the server and the CLI need of a runtime's loader."""

    manager: Any
    device: str

    def load_model(self, model_id_or_path: Any, model_size_params: Optional[float] = None,
                   task_priority: TaskPriority | str = TaskPriority.BALANCED,
                   force_quantization: Optional[QuantizationLevel | str] = None, tokenizer: Any = None,
                   on_switch: Optional[Callable[[Any], None]] = None,
                   on_decision: Optional[Callable[[str], None]] = None) -> Any: ...

    def requantize(self, loaded: Any, level: QuantizationLevel | str, reason: str = "requested") -> Any: ...

    def engine(self, loaded: Any) -> Any: ...

    def check_level_available(self, level: QuantizationLevel) -> None: ...

    def prepare_levels_in_background(self, loaded: Any, levels: Iterable[QuantizationLevel | str]) -> Any: ...

    def stats(self) -> list[dict[str, Any]]: ...

    def clear(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime that serves a model, and why (logged once per model and process)."""

    name: str
    reason: str


def check_runtime(value: Any) -> str:
    if value not in RUNTIMES:
        raise InvalidValueError("runtime", value, " or ".join(repr(r) for r in RUNTIMES))
    return str(value)


def _gguf_of(model: Any) -> Optional[Path]:
    """The GGUF of a model folder or a pulled catalog name; None for anything else (no torch import)."""
    if not isinstance(model, (str, Path)):
        return None
    from langchain_adaptquant.pretrained.store import local_model_folder
    from langchain_adaptquant.runtime.llamacpp.gguf_files import find_gguf

    folder = local_model_folder(model)
    return find_gguf(folder) if folder is not None else None


def choose_runtime(requested: str, model: Any, device: str) -> RuntimeChoice:
    """The runtime for ``model`` on ``device``; a clear error when an explicit choice cannot serve it."""
    from langchain_adaptquant.runtime.llamacpp import bindings

    requested = check_runtime(requested)
    if requested == "torch":
        return RuntimeChoice("torch", "runtime='torch'")
    gguf = _gguf_of(model)
    if requested == "llamacpp":
        if device != "cpu":
            raise InvalidValueError("runtime", "llamacpp", f"'torch' or 'auto' on {device} (this build of llama.cpp is CPU only)")
        if gguf is None:
            raise InvalidValueError("model", str(model), "a folder holding a GGUF file (or a pulled model) for runtime='llamacpp'")
        bindings.lib()  # the install hint when llama-cpp-python is missing
        return RuntimeChoice("llamacpp", "runtime='llamacpp'")
    if device != "cpu":
        return RuntimeChoice("torch", f"auto: {device} runs on torch")
    if gguf is None:
        return RuntimeChoice("torch", "auto: no GGUF in the model folder")
    if not bindings.available():
        return RuntimeChoice("torch", f"auto: the model has a GGUF but {bindings.unavailable_reason()}; serving on torch")
    return RuntimeChoice("llamacpp", f"auto: CPU and {gguf.name}")


_SHARED: dict[tuple[str, Optional[float]], Any] = {}
_SHARED_LOCK = threading.Lock()
_LOGGED: set[tuple[str, str]] = set()


def new_loader(runtime: str, manager: Any = None) -> Any:
    """A fresh loader of ``runtime`` around ``manager`` (None: that runtime's default manager)."""
    if runtime == "llamacpp":
        from langchain_adaptquant.runtime.llamacpp.loader import LlamaCppLoader

        return LlamaCppLoader(manager=manager)
    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

    return AdaptiveModelLoader(manager=manager)


def shared_loader(runtime: str, memory_budget_gb: Optional[float] = None) -> Any:
    """One loader (and manager) per runtime and budget per process: chat models on one model share one copy."""
    with _SHARED_LOCK:
        loader = _SHARED.get((runtime, memory_budget_gb))
        if loader is None:
            if runtime == "llamacpp":
                from langchain_adaptquant.control.manager import DynamicQuantizationManager

                manager = DynamicQuantizationManager(device="cpu", memory_budget_gb=memory_budget_gb)
            else:
                from langchain_adaptquant.runtime.loader import serving_manager

                manager = serving_manager(memory_budget_gb=memory_budget_gb)
            loader = _SHARED[(runtime, memory_budget_gb)] = new_loader(runtime, manager)
        return loader


def log_choice(model: Any, choice: RuntimeChoice) -> None:
    """One log line per model and runtime per process: which runtime serves it and why."""
    key = (str(model), choice.name)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info("%s is served by the %s runtime (%s)", model, choice.name, choice.reason)
