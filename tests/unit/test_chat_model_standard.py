"""LangChain's standard unit tests for ChatAdaptQuant (no model is loaded: construction is lazy)."""

from __future__ import annotations

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests
from pydantic import ValidationError

from langchain_adaptquant import InvalidValueError
from langchain_adaptquant.chat_model import ChatAdaptQuant


class TestChatAdaptQuantStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatAdaptQuant]:
        return ChatAdaptQuant

    @property
    def chat_model_params(self) -> dict:
        return {"model": "/models/not-loaded-until-first-use", "temperature": 0}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True


def test_defaults_point_at_the_pulled_real_model_else_the_embedded_one_and_nothing_loads(tmp_path, monkeypatch):
    from langchain_adaptquant.assets import reference_model_path
    from langchain_adaptquant.pretrained import store

    monkeypatch.setenv("ADAPTQUANT_CACHE_DIR", str(tmp_path))
    assert ChatAdaptQuant().model == str(reference_model_path())  # nothing pulled here
    pulled = store.model_dir("smollm2-135m")
    pulled.mkdir(parents=True)
    (pulled / "config.json").write_text("{}")
    (pulled / store.SOURCE_FILE).write_text("{}")  # what a completed pull leaves last
    llm = ChatAdaptQuant()
    assert llm.model == str(pulled)
    assert llm._llm_type == "adaptquant"
    params = llm._get_ls_params(stop=["x"])
    assert params["ls_provider"] == "adaptquant" and params["ls_stop"] == ["x"] and params["ls_max_tokens"] == 256


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"task_priority": "fastest"}, "'fastest'"),
        ({"force_quantization": "int3"}, "'int3'"),
        ({"memory_budget_gb": 0}, "memory_budget_gb"),
    ],
)
def test_bad_settings_name_the_value(kwargs, needle):
    with pytest.raises(ValidationError, match=needle):
        ChatAdaptQuant(**kwargs)


def test_unconvertible_tool_is_a_clear_error():
    llm = ChatAdaptQuant(model="/nowhere")
    with pytest.raises(InvalidValueError, match="invalid tool"):
        llm.bind_tools([42])
    with pytest.raises(InvalidValueError, match="tool_choice"):
        llm.bind_tools([{"type": "function", "function": {"name": "f", "parameters": {}}}], tool_choice="g")
    with pytest.raises(InvalidValueError, match="method"):
        llm.with_structured_output({"title": "x", "type": "object", "properties": {}}, method="xml")


def test_unknown_model_path_fails_on_first_use_naming_it():
    from langchain_adaptquant.errors import ModelNotFoundError

    llm = ChatAdaptQuant(model="/definitely/missing-model")
    with pytest.raises(ModelNotFoundError, match="/definitely/missing-model"):
        llm.invoke("hello")


def test_empty_messages_and_bad_call_options_fail_before_loading():
    llm = ChatAdaptQuant(model="/definitely/missing-model")  # would fail on load: these fail first
    with pytest.raises(InvalidValueError, match="at least one message"):
        llm.invoke([])
    with pytest.raises(InvalidValueError, match="max_tokens"):
        llm.invoke("hi", max_tokens=0)
    with pytest.raises(InvalidValueError, match="temperature"):
        llm.invoke("hi", temperature=-1)
