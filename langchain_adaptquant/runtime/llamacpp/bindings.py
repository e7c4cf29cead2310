"""llama-cpp-python's low-level module, imported once, with llama.cpp's logging routed to ours.

llama.cpp prints every tensor it loads or quantizes to stderr; the callback here keeps warnings
and errors (to :mod:`logging`) and drops the rest, so a load or a level file is one log line.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from types import ModuleType
from typing import Any, Optional

from langchain_adaptquant.errors import AdaptQuantError

logger = logging.getLogger("langchain_adaptquant.llamacpp")

_LOCK = threading.Lock()
_MODULE: Optional[ModuleType] = None
_REASON: Optional[str] = None
_LOG_CALLBACK: Any = None  # kept alive: llama.cpp holds a raw pointer to it

# ggml_log_level (ggml.h): 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 continuation
_WARN, _ERROR = 3, 4


class LlamaCppUnavailableError(AdaptQuantError):
    """llama-cpp-python is not installed or does not import on this machine."""


def _route_logs(module: ModuleType) -> None:
    global _LOG_CALLBACK

    @module.llama_log_callback
    def forward(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level in (_WARN, _ERROR):
            message = text.decode("utf-8", "replace").rstrip()
            if message:
                logger.log(logging.ERROR if level == _ERROR else logging.WARNING, "llama.cpp: %s", message)

    _LOG_CALLBACK = forward
    module.llama_log_set(forward, ctypes.c_void_p(0))


def _load() -> None:
    global _MODULE, _REASON
    with _LOCK:
        if _MODULE is not None or _REASON is not None:
            return
        try:
            import llama_cpp  # noqa: PLC0415 - optional, heavy: only when the runtime is used

            _route_logs(llama_cpp)
            llama_cpp.llama_backend_init()
            _MODULE = llama_cpp
        except Exception as error:  # noqa: BLE001 - ImportError, or a shared library that fails to load
            _REASON = f"llama-cpp-python does not import here ({type(error).__name__}: {error})"


def available() -> bool:
    """Whether llama-cpp-python imports on this machine (tried once per process)."""
    _load()
    return _MODULE is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _REASON


def lib() -> ModuleType:
    """The ``llama_cpp`` module; a clear error naming the fix when it is missing."""
    _load()
    if _MODULE is None:
        raise LlamaCppUnavailableError(
            f"{_REASON}; install it with `pip install 'langchain-adaptquant[llamacpp]'` (compiles llama.cpp once) "
            "or use runtime='torch'")
    return _MODULE
