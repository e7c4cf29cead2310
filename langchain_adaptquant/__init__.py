"""langchain-adaptquant: a LangChain chat model that adapts its weight precision to memory and load."""

from langchain_adaptquant.assets import reference_model_path
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.errors import AdaptQuantError, InsufficientMemoryError, InvalidValueError
from langchain_adaptquant.levels import QuantizationLevel, TaskPriority
from langchain_adaptquant.load import LoadStats, LoadTracker
from langchain_adaptquant.loader import AdaptiveModelLoader, LoadedModel, SwitchRecord
from langchain_adaptquant.manager import DynamicQuantizationManager, QuantizationConfig, ReoptimizeDecision
from langchain_adaptquant.policy import Decision, PolicyConfig
from langchain_adaptquant.resources import CachedProbe, MemorySnapshot, ScriptedProbe, SystemMemoryProbe
from langchain_adaptquant.sizing import ModelSize, size_from_config, size_from_params

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
    "reference_model_path",
    "size_from_config",
    "size_from_params",
]
