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
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe, reference_model_path
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.loader import AdaptiveModelLoader

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

    # -- excused: these need the model to *know* what to put in a tool call or a JSON object -----
    # The embedded model (~10M parameters, trained on docstrings) emits the <tool_call> format when
    # asked, but cannot fill `magic_function`'s `input: 3`, a joke's setup and punchline, or an
    # agent's next step. The same mechanics (tools rendered into the template, calls parsed into
    # AIMessage.tool_calls, streamed tool-call chunks, tool-message round trips, all three
    # structured-output methods, tool_choice) are tested with scripted tokens on a real model in
    # tests/integration/test_chat_tools.py. strict=False: a lucky pass is not a failure.

    @KNOWS
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_tool_calling(self, model: BaseChatModel) -> None:
        super().test_tool_calling(model)

    @KNOWS
    async def test_tool_calling_async(self, model: BaseChatModel) -> None:
        await super().test_tool_calling_async(model)

    @KNOWS
    def test_bind_runnables_as_tools(self, model: BaseChatModel) -> None:
        super().test_bind_runnables_as_tools(model)

    @KNOWS
    def test_tool_choice(self, model: BaseChatModel) -> None:
        super().test_tool_choice(model)

    @KNOWS
    def test_tool_calling_with_no_arguments(self, model: BaseChatModel) -> None:
        super().test_tool_calling_with_no_arguments(model)

    @KNOWS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model: BaseChatModel, schema_type: str) -> None:
        super().test_structured_output(model, schema_type)

    @KNOWS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model: BaseChatModel, schema_type: str) -> None:
        await super().test_structured_output_async(model, schema_type)

    @KNOWS
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @KNOWS
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

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
