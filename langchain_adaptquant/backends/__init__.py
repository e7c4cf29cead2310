"""Quantization backends: one small interface, one module per library, a measured preference order.

Import cost is small: the optional libraries (bitsandbytes, torchao, optimum-quanto) are imported
only when a backend is asked whether it is available or to quantize something. Their known
start-up notices are filtered by the package's ``__init__`` (see :mod:`langchain_adaptquant.quiet_start`).
"""

from langchain_adaptquant.backends.base import (
    BackendError,
    QuantizationBackend,
    UnsupportedLevelError,
    compute_dtype,
    device_type,
)
from langchain_adaptquant.backends.registry import (
    MEASURED_PREFERENCE,
    all_backends,
    available_backends,
    available_levels,
    backend_preference,
    get_backend,
    preference,
    quantize_linear_with_fallback,
    register_backend,
    unregister_backend,
)

__all__ = [
    "MEASURED_PREFERENCE",
    "BackendError",
    "QuantizationBackend",
    "UnsupportedLevelError",
    "all_backends",
    "available_backends",
    "available_levels",
    "backend_preference",
    "compute_dtype",
    "device_type",
    "get_backend",
    "preference",
    "quantize_linear_with_fallback",
    "register_backend",
    "unregister_backend",
]
