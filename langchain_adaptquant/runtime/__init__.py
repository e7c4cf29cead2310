"""The generation runtime: one engine per model that batches every request in flight.

The chat model talks to it through one narrow interface: ``engine.submit(GenerationRequest) ->
RequestHandle`` (a stream of text pieces, then a result; ``cancel()``; sync and async iteration).
Control (policy, manager) never imports this package: it receives KV-cache bytes as numbers.
"""

from typing import Any

from langchain_adaptquant.lazy import load_export

# names -> submodule, loaded on first use: the llama.cpp runtime's path never imports torch
_EXPORTS = {
    "EngineBusyError": "contract",
    "EngineClosedError": "contract",
    "EngineStats": "contract",
    "KVUsage": "contract",
    "EngineConfig": "engine",
    "GenerationEngine": "engine",
    "StepGate": "gate",
    "KVLayout": "kv",
    "kv_layout": "kv",
    "SAMPLING_OPTIONS": "requests",
    "GenerationRequest": "requests",
    "Progress": "requests",
    "RequestHandle": "requests",
    "Resume": "requests",
    "Sampling": "requests",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    return load_export(__name__, _EXPORTS, name, globals())
