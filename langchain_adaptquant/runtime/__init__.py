"""The generation runtime: one engine per model that batches every request in flight.

The chat model talks to it through one narrow interface: ``engine.submit(GenerationRequest) ->
RequestHandle`` (a stream of text pieces, then a result; ``cancel()``; sync and async iteration).
Control (policy, manager) never imports this package: it receives KV-cache bytes as numbers.
"""

from langchain_adaptquant.runtime.engine import (
    EngineBusyError,
    EngineClosedError,
    EngineConfig,
    EngineStats,
    GenerationEngine,
    KVUsage,
)
from langchain_adaptquant.runtime.gate import StepGate
from langchain_adaptquant.runtime.kv import KVLayout, kv_layout
from langchain_adaptquant.runtime.requests import (
    SAMPLING_OPTIONS,
    GenerationRequest,
    Progress,
    RequestHandle,
    Resume,
    Sampling,
)

__all__ = [
    "SAMPLING_OPTIONS",
    "EngineBusyError",
    "EngineClosedError",
    "EngineConfig",
    "EngineStats",
    "GenerationEngine",
    "GenerationRequest",
    "KVLayout",
    "KVUsage",
    "Progress",
    "RequestHandle",
    "Resume",
    "Sampling",
    "StepGate",
    "kv_layout",
]
