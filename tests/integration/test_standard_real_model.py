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
from tiny_models import override_chat_folder

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe, pretrained
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not pretrained.is_pulled("smollm2-135m"),
                       reason="SmolLM2-135M-Instruct not pulled: run `adaptquant models pull smollm2-135m`"),
]


LOOPS = pytest.mark.xfail(
    reason="SmolLM2-135M loops inside JSON strings under greedy decoding, so the object never closes within "
    "the answer budget: asked for a cat joke it wrote {\"setup\": \"The cat was having a cat-themed party, and the "
    "cat was having a cat-themed party, ...\" to the 64-token limit (0 of 3 structured-output methods parsed; "
    "with repetition_penalty=1.2, 2 of 3 parsed, holding nonsense). The grammar fixes the shape, not this.",
    strict=False,
)
PROSE = pytest.mark.xfail(
    reason="with tool_choice='auto' SmolLM2-135M answers in prose instead of calling get_weather (measured: "
    "'The weather in San Francisco, CA, is typically described as a mix of warm and cool, ...'); the same "
    "tool forced or required is called correctly (test_tool_calling, test_tool_choice pass)",
    strict=False,
)


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
        return override_chat_folder()  # a different folder, so the override is seen in model_name

    # -- what the model cannot do (measured on SmolLM2-135M-Instruct, bf16 copy, greedy) ---------------
    # Forced and required tool calls pass: the grammar makes the call well-formed and the model picks
    # the right argument (magic_function(3) -> {"input": 3}). These remain.

    @LOOPS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    def test_structured_output(self, model: BaseChatModel, schema_type: str) -> None:
        super().test_structured_output(model, schema_type)

    @LOOPS
    @pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
    async def test_structured_output_async(self, model: BaseChatModel, schema_type: str) -> None:
        await super().test_structured_output_async(model, schema_type)

    @LOOPS
    def test_structured_output_pydantic_2_v1(self, model: BaseChatModel) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @LOOPS
    def test_structured_output_optional_param(self, model: BaseChatModel) -> None:
        super().test_structured_output_optional_param(model)

    @LOOPS
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @PROSE
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
