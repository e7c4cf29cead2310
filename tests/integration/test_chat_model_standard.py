"""LangChain's standard integration tests, run for real against the embedded reference model.

A 10M-parameter model trained on Python docstrings knows little, so tests that need the model to
*know* something (answer arithmetic, fill a schema with the right values) are excused below, each
with its reason. Mechanics are never excused: invoke, stream, async, batch, usage, stop sequences,
message types and tool-message round trips run and must pass.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe, reference_model_path
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.loader import AdaptiveModelLoader

pytestmark = pytest.mark.slow


@functools.lru_cache(maxsize=1)
def _loader() -> AdaptiveModelLoader:
    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=20), snapshot_ttl_s=0)
    return AdaptiveModelLoader(manager=manager, show_progress=False)


@functools.lru_cache(maxsize=1)
def _second_model() -> str:
    from tiny_models import build_tiny_chat

    return str(build_tiny_chat(Path(tempfile.mkdtemp(prefix="adaptquant-override-"))))


class TestChatAdaptQuantIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatAdaptQuant]:
        return ChatAdaptQuant

    @property
    def chat_model_params(self) -> dict:
        return {"model": str(reference_model_path()), "loader": _loader(), "max_tokens": 24, "temperature": 0}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return _second_model()
