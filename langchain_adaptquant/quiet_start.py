"""Keep the quantization libraries' import-time noise out of a normal start, and let it back in on DEBUG.

Importing the backends' libraries on this kind of machine logs lines that say nothing about our
service: torchao's CUDA-only extensions that cannot load on a CPU build (``Failed to load
..._C_mxfp8 / _C_cutlass_90a``), torch's deprecation notice for torchao's Enum pytree registrations
(``<enum ...> is an Enum subclass ...``), and bitsandbytes' optional hub kernel that offline CPU
machines never have (``Failed to load CPU gemm_4bit_forward from kernels-community``). All three
come through :mod:`logging` (torchao and bitsandbytes with ``logger.warning``, torch through its
``torch.utils._pytree`` logger), so a filter on exactly those loggers, matching exactly those
messages, removes them and nothing else: our own warnings, and any other warning of those
libraries, still show.

They pass again when our package logs at DEBUG (``adaptquant --verbose``, or
``logging.getLogger("langchain_adaptquant").setLevel(logging.DEBUG)``) or when
``ADAPTQUANT_VERBOSE=1`` is set.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

#: Logger of this package whose DEBUG level lets the library notices through.
PACKAGE_LOGGER = "langchain_adaptquant"
VERBOSE_ENV = "ADAPTQUANT_VERBOSE"


@dataclass(frozen=True)
class KnownNotice:
    """One third-party start-up message: the logger that emits it and text that identifies it."""

    logger: str
    contains: tuple[str, ...]
    why_harmless: str


KNOWN_NOTICES: tuple[KnownNotice, ...] = (
    KnownNotice("torchao", ("Failed to load", "_C_"),
                "torchao's CUDA/SM90 extensions (_C_mxfp8, _C_cutlass_90a) cannot load with a CPU torch"),
    KnownNotice("torch.utils._pytree", ("is an Enum subclass and is now natively supported",),
                "torch 2.13 deprecation notice for torchao's own Enum registrations"),
    KnownNotice("bitsandbytes.backends.cpu.ops", ("Failed to load CPU gemm_4bit_forward from kernels-community",),
                "bitsandbytes' optional hub kernel; offline it uses its built-in CPU path"),
)


def verbose() -> bool:
    """Whether library notices should show: our logger at DEBUG, or ADAPTQUANT_VERBOSE=1."""
    if os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    return logging.getLogger(PACKAGE_LOGGER).isEnabledFor(logging.DEBUG)


class _KnownNoticeFilter(logging.Filter):
    """Drops the known notices of one logger unless :func:`verbose`; every other record passes."""

    def __init__(self, notices: tuple[KnownNotice, ...]) -> None:
        super().__init__()
        self.notices = notices

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose():
            return True
        try:
            text = record.getMessage()
        except Exception:  # a record whose arguments do not format is not one of ours to judge
            return True
        return not any(all(part in text for part in notice.contains) for notice in self.notices)


_FILTERS: dict[str, _KnownNoticeFilter] = {}


def quiet_third_party_notices() -> None:
    """Install the filters (idempotent). Call before the libraries are imported: they log at import."""
    for name in {notice.logger for notice in KNOWN_NOTICES}:
        if name in _FILTERS:
            continue
        notices = tuple(n for n in KNOWN_NOTICES if n.logger == name)
        _FILTERS[name] = _KnownNoticeFilter(notices)
        logging.getLogger(name).addFilter(_FILTERS[name])
