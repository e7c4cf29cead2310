"""LangChain's standard integration tests, run for real against the embedded reference model.

A 10M-parameter model trained on Python docstrings knows little, so tests that need the model to
*know* something (answer arithmetic, fill a schema with the right values) are excused below, each
with its reason. Mechanics are never excused: invoke, stream, async, batch, usage, stop sequences,
message types and tool-message round trips run and must pass.
"""

from __future__ import annotations

import functools

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests
from tiny_models import override_chat_folder

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe, reference_model_path
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

pytestmark = pytest.mark.slow

KNOWS = pytest.mark.xfail(
    reason="needs a model that knows which arguments or JSON values to produce; a 10M-parameter "
    "docstring model cannot (mechanics: tests/integration/test_chat_tools.py)",
    strict=False,
)

@functools.lru_cache(maxsize=1)
def _loader() -> AdaptiveModelLoader:
    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=20), snapshot_ttl_s=0)
    return AdaptiveModelLoader(manager=manager, show_progress=False)


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
        return override_chat_folder()

    # -- excused: these need the model to *know* what to put in a JSON object or an agent step ----
    # Grammar-constrained decoding (langchain_adaptquant.constrained) makes forced, required and
    # no-argument tool calls well-formed even from the embedded ~10M docstring model, and closes
    # structured output within the 24-token budget (free strings bounded, the closing forced in
    # time), so those standard tests run unexcused. What remains needs knowledge: which keys a
    # schema-less JSON answer should have, an agent's next step. The same mechanics are tested
    # with scripted tokens in tests/integration/test_chat_tools.py. strict=False: a lucky pass
    # is not a failure.

    @KNOWS
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @KNOWS
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)

    @KNOWS
    def test_unicode_tool_call_integration(self, model: BaseChatModel, **kwargs) -> None:
        super().test_unicode_tool_call_integration(model, **kwargs)
