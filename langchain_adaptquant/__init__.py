"""langchain-adaptquant: a LangChain chat model that adapts its weight precision to memory and load.

Public names are imported lazily (PEP 562): ``import langchain_adaptquant`` costs next to nothing,
and ``import langchain_adaptquant.runtime.loader`` does not pull in the chat model and langchain-core.
Each name is imported from its submodule on first access, then cached in this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langchain_adaptquant.lazy import load_export
from langchain_adaptquant.quiet_start import quiet_third_party_notices

# torchao, torch and bitsandbytes log harmless notices when first imported (also by transformers,
# not only by our backends); filter exactly those before anything imports them.
quiet_third_party_notices()

if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from langchain_adaptquant.assets import reference_model_path
    from langchain_adaptquant.chat_model import ChatAdaptQuant
    from langchain_adaptquant.control.levels import QuantizationLevel, TaskPriority
    from langchain_adaptquant.control.load_tracker import LoadStats, LoadTracker
    from langchain_adaptquant.control.manager import DynamicQuantizationManager, QuantizationConfig, ReoptimizeDecision
    from langchain_adaptquant.control.policy import Decision, PolicyConfig
    from langchain_adaptquant.control.resources import CachedProbe, MemorySnapshot, ScriptedProbe, SystemMemoryProbe
    from langchain_adaptquant.control.sizing import ModelSize, size_from_config, size_from_params
    from langchain_adaptquant.errors import AdaptQuantError, InsufficientMemoryError, InvalidValueError
    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader, LoadedModel, SwitchRecord, serving_manager

#: Public name -> the submodule (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    "reference_model_path": "assets",
    "ChatAdaptQuant": "chat_model",
    "AdaptQuantError": "errors",
    "InsufficientMemoryError": "errors",
    "InvalidValueError": "errors",
    "QuantizationLevel": "control.levels",
    "TaskPriority": "control.levels",
    "LoadStats": "control.load_tracker",
    "LoadTracker": "control.load_tracker",
    "AdaptiveModelLoader": "runtime.loader",
    "LoadedModel": "runtime.loader",
    "SwitchRecord": "runtime.loader",
    "serving_manager": "runtime.loader",
    "DynamicQuantizationManager": "control.manager",
    "QuantizationConfig": "control.manager",
    "ReoptimizeDecision": "control.manager",
    "Decision": "control.policy",
    "PolicyConfig": "control.policy",
    "CachedProbe": "control.resources",
    "MemorySnapshot": "control.resources",
    "ScriptedProbe": "control.resources",
    "SystemMemoryProbe": "control.resources",
    "ModelSize": "control.sizing",
    "size_from_config": "control.sizing",
    "size_from_params": "control.sizing",
}

__all__ = [
    "AdaptQuantError",
    "AdaptiveModelLoader",
    "ChatAdaptQuant",
    "LoadedModel",
    "SwitchRecord",
    "CachedProbe",
    "Decision",
    "DynamicQuantizationManager",
    "InsufficientMemoryError",
    "InvalidValueError",
    "LoadStats",
    "LoadTracker",
    "MemorySnapshot",
    "ModelSize",
    "PolicyConfig",
    "QuantizationConfig",
    "QuantizationLevel",
    "ReoptimizeDecision",
    "ScriptedProbe",
    "SystemMemoryProbe",
    "TaskPriority",
    "serving_manager",
    "reference_model_path",
    "size_from_config",
    "size_from_params",
]


def __getattr__(name: str) -> Any:
    """Import a public name from its submodule on first use (PEP 562) and cache it here."""
    return load_export(__name__, _EXPORTS, name, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
