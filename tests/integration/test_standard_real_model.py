"""LangChain's standard integration tests on a real instruction-tuned model: SmolLM2-135M-Instruct.

The embedded 8.9M model proves mechanics; this suite asks what a user asks: does a real small model
call tools and fill schemas through ``ChatAdaptQuant``? Tool calls and JSON answers are decoded under
a grammar (llguidance), so they always parse, match the schema and end within the token budget. What
remains excused below is what the model itself cannot do, each with what it produced when we measured it.

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


ONE_KEY = pytest.mark.xfail(
    reason="JSON mode gives the grammar no schema, and SmolLM2-135M closes the object after its first key: asked "
    "for a cat joke with 'setup' and 'punchline' keys it wrote {\"setup\": \"The cat was trying to make a "
    "cat-friendly home, \"} (the string cut at the 48-character default bound; unbounded, it ended the sentence "
    "and closed the same way: {\"setup\": \"... but it was too late.\"}). The JSON is complete and parses; "
    "the missing punchline is the model's choice (with a schema, json_schema and function_calling pass).",
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
    # the right argument (magic_function(3) -> {"input": 3}). Structured output passes too: the model
    # still loops inside strings ("The cat was a cat, and the cat was a cat, and it"), but the grammar
    # bounds each free string (maxLength from the token budget) and closes the JSON before the budget
    # ends (constrained.GrammarProcessor), so every answer parses. These remain.

    @ONE_KEY
    def test_json_mode(self, model: BaseChatModel) -> None:
        super().test_json_mode(model)

    @PROSE
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
