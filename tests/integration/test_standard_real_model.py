"""LangChain's standard integration tests on a real instruction-tuned model: SmolLM2-135M-Instruct.

The embedded 8.9M model proves mechanics; this suite asks what a user asks: does a real small model
call tools and fill schemas through ``ChatAdaptQuant``? Tool calls and JSON answers are decoded under
a grammar (llguidance), so they always parse and match the schema. What remains excused below is what
the model itself cannot do, each with what it produced when we measured it.

Skipped when the model has not been pulled; ``make test`` pulls it (``adaptquant models pull smollm2-135m``).
"""

from __future__ import annotations

import functools

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe, pretrained
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.loader import AdaptiveModelLoader

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not pretrained.is_pulled("smollm2-135m"),
                       reason="SmolLM2-135M-Instruct not pulled: run `adaptquant models pull smollm2-135m`"),
]


@functools.lru_cache(maxsize=1)
def _loader() -> AdaptiveModelLoader:
    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=20), snapshot_ttl_s=0)
    return AdaptiveModelLoader(manager=manager, show_progress=False)


class TestSmolLM2Integration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatAdaptQuant]:
        return ChatAdaptQuant

    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2-135m", "loader": _loader(), "max_tokens": 64, "temperature": 0}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return str(pretrained.model_path("smollm2-135m"))
