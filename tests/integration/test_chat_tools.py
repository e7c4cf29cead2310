"""Tool calling and structured output, end to end on a real model whose next tokens are forced.

A tiny model cannot be relied on to *choose* the right tool call, so a logits processor forces the
text it emits. Everything else is real: the chat template renders the tools, ``generate`` runs,
stop strings and the end-of-turn token end it, and the output is parsed into tool calls and
structured objects. (What a capable model would choose is LangChain's standard tests' business.)
"""

from __future__ import annotations

import asyncio
from typing import Literal, Optional

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from pydantic import BaseModel, Field
from transformers import LogitsProcessor, LogitsProcessorList

from langchain_adaptquant import ChatAdaptQuant, DynamicQuantizationManager, ScriptedProbe
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader


class ForcedText(LogitsProcessor):
    """Make the model emit exactly ``text`` and then its end-of-turn token."""

    def __init__(self, tokenizer, text: str) -> None:
        self.ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        self.start: Optional[int] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        forced = self.ids[min(input_ids.shape[1] - self.start, len(self.ids) - 1)]
        scores = torch.full_like(scores, -float("inf"))
        scores[:, forced] = 0.0
        return scores


class Joke(BaseModel):
    """A joke to tell the user."""

    setup: str = Field(description="question to set up a joke")
    punchline: str = Field(description="answer to resolve the joke")


def magic_function(input: int) -> int:
    """Applies a magic function to an input."""
    return input + 2


@pytest.fixture(scope="module")
def llm(tiny_chat_dir):
    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=10), snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    # free writing: these tests force the exact text (also broken calls) to prove the parsing side
    model = ChatAdaptQuant(model=str(tiny_chat_dir), loader=loader, max_tokens=96, constrained_decoding=False)
    model.invoke("warm up")
    return model


def forced(llm, text: str) -> dict:
    tokenizer = llm._loader().models()[0].tokenizer
    return {"logits_processor": LogitsProcessorList([ForcedText(tokenizer, text)])}


CALL = '<tool_call>{"name": "magic_function", "arguments": {"input": 3}}</tool_call>'


def test_tools_reach_the_prompt(llm):
    plain = llm.invoke("hi", **forced(llm, "ok"))
    with_tools = llm.bind_tools([magic_function]).invoke("hi", **forced(llm, "ok"))
    # the template rendered the tool's JSON schema: the prompt grew by its tokens
    assert with_tools.usage_metadata["input_tokens"] > plain.usage_metadata["input_tokens"] + 20


def test_hermes_tool_call_becomes_tool_calls(llm):
    message = llm.bind_tools([magic_function]).invoke("What is magic_function(3)?", **forced(llm, CALL))
    assert message.tool_calls == [
        {"name": "magic_function", "args": {"input": 3}, "id": message.tool_calls[0]["id"], "type": "tool_call"}
    ]
    assert message.content == "" and message.response_metadata["finish_reason"] == "tool_calls"


def test_plain_json_fallback(llm):
    message = llm.bind_tools([magic_function]).invoke(
        "call it", **forced(llm, '{"name": "magic_function", "arguments": {"input": 5}}'))
    assert message.tool_calls[0]["args"] == {"input": 5}


def test_forced_tool_choice_prefills_the_call(llm):
    # with tool_choice naming the tool, the prompt already holds '<tool_call>{"name": ..., "arguments": '
    message = llm.bind_tools([magic_function], tool_choice="magic_function").invoke(
        "go", **forced(llm, '{"input": 7}}</tool_call>'))
    assert message.tool_calls[0]["name"] == "magic_function" and message.tool_calls[0]["args"] == {"input": 7}


def test_streamed_tool_call_aggregates(llm):
    chunks = list(llm.bind_tools([magic_function]).stream("What is magic_function(3)?", **forced(llm, CALL)))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.tool_calls[0]["name"] == "magic_function" and merged.tool_calls[0]["args"] == {"input": 3}
    assert merged.usage_metadata["output_tokens"] > 0


def test_tool_message_round_trip(llm):
    first = llm.bind_tools([magic_function]).invoke("What is magic_function(3)?", **forced(llm, CALL))
    history = [
        HumanMessage("What is magic_function(3)?"),
        first,
        ToolMessage("5", tool_call_id=first.tool_calls[0]["id"], name="magic_function"),
    ]
    answer = llm.bind_tools([magic_function]).invoke(history, **forced(llm, "The answer is 5."))
    assert answer.content == "The answer is 5." and not answer.tool_calls


def test_invalid_call_is_reported_not_raised(llm):
    message = llm.bind_tools([magic_function]).invoke("x", **forced(llm, "<tool_call>{broken</tool_call>"))
    assert not message.tool_calls and message.invalid_tool_calls[0]["error"].startswith("not valid tool-call JSON")


@pytest.mark.parametrize(
    "method, text",
    [
        ("function_calling", '{"setup": "Why?", "punchline": "Because."}}</tool_call>'),
        ("json_schema", '"setup": "Why?", "punchline": "Because."}'),
        ("json_mode", '"setup": "Why?", "punchline": "Because."}'),
    ],
)
def test_structured_output_methods(llm, method, text):
    schema = Joke if method != "json_mode" else None
    runnable = llm.with_structured_output(schema, method=method)
    result = runnable.invoke("Tell me a joke", **forced(llm, text))
    if schema is None:
        assert result == {"setup": "Why?", "punchline": "Because."}
    else:
        assert result == Joke(setup="Why?", punchline="Because.")


def test_structured_output_dict_schema_and_include_raw(llm):
    # include_raw wraps the model in a map that does not pass call kwargs on: force via model_kwargs
    def scripted(text):
        return llm.model_copy(update={"model_kwargs": forced(llm, text)})

    schema = {"title": "Joke", "description": "A joke", "type": "object",
              "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}}}
    raw = scripted('{"setup": "a", "punchline": "b"}}</tool_call>').with_structured_output(
        schema, method="function_calling", include_raw=True).invoke("joke")
    assert raw["parsed"] == {"setup": "a", "punchline": "b"} and raw["parsing_error"] is None
    assert isinstance(raw["raw"], AIMessage)
    bad = scripted("nope").with_structured_output(Joke, method="json_mode", include_raw=True).invoke("joke")
    assert bad["parsed"] is None and bad["parsing_error"] is not None
    assert bad["raw"].content == "{nope"  # json mode pre-fills the opening brace


def test_async_structured_output(llm):
    result = asyncio.run(llm.with_structured_output(Joke, method="json_schema").ainvoke(
        "joke", **forced(llm, '"setup": "x", "punchline": "y"}')))
    assert result == Joke(setup="x", punchline="y")


def test_multi_token_stop_string(llm):
    message = llm.invoke("say it", stop=["STOP here"], **forced(llm, "Hello world STOP here and more"))
    assert message.content == "Hello world " and message.response_metadata["finish_reason"] == "stop"
    chunks = list(llm.stream("say it", stop=["STOP here"], **forced(llm, "Hello world STOP here and more")))
    assert "".join(c.content for c in chunks) == "Hello world "


# -- under a grammar: a random-weight model's calls and JSON always parse and match the schema ----------
class Switch(BaseModel):
    """Turn a device on or off."""

    device: Literal["lamp", "fan", "radio"]
    on: bool


def set_mode(mode: Literal["eco", "normal", "boost"], verbose: bool) -> str:
    """Set the machine's mode."""
    return mode


@pytest.fixture(scope="module")
def constrained_llm(llm):
    pytest.importorskip("llguidance")
    return llm.model_copy(update={"constrained_decoding": True, "max_tokens": 48})


@pytest.mark.parametrize("choice", ["set_mode", "any"])
def test_a_random_model_under_the_grammar_always_makes_a_valid_call(constrained_llm, llm, choice):
    prompts = ["set it", "what now?", "boost please", "hello", "mode?"]
    for prompt in prompts:
        message = constrained_llm.bind_tools([set_mode], tool_choice=choice).invoke(prompt)
        assert len(message.tool_calls) == 1 and not message.invalid_tool_calls, message
        call = message.tool_calls[0]
        assert call["name"] == "set_mode" and call["args"]["mode"] in ("eco", "normal", "boost")
        assert isinstance(call["args"]["verbose"], bool) and set(call["args"]) == {"mode", "verbose"}
        assert message.response_metadata["finish_reason"] == "tool_calls"
    # the same random model writing freely does not manage it (which is why the grammar is there)
    free = [llm.bind_tools([set_mode], tool_choice=choice).invoke(p) for p in prompts]
    assert sum(1 for m in free if m.tool_calls) < len(prompts)


def test_structured_output_under_the_grammar_parses_every_time(constrained_llm):
    for method in ("function_calling", "json_schema"):
        runnable = constrained_llm.with_structured_output(Switch, method=method)
        for prompt in ("lamp on", "turn off the fan", "radio"):
            result = runnable.invoke(prompt)
            assert isinstance(result, Switch), (method, prompt, result)


def test_streamed_call_under_the_grammar_aggregates(constrained_llm):
    chunks = list(constrained_llm.bind_tools([set_mode], tool_choice="any").stream("go"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert merged.tool_calls[0]["name"] == "set_mode" and merged.tool_calls[0]["args"]["mode"] in ("eco", "normal", "boost")


# -- under a grammar with a budget: a model that loops inside a string still ends its JSON ---------------
class Looping(LogitsProcessor):
    """A model that never stops talking: ``text``'s tokens always score highest where the grammar
    (applied first) allows them, as SmolLM2-135M repeats "the cat was a cat, and the cat ..." forever."""

    def __init__(self, tokenizer, text: str) -> None:
        self.ids = tokenizer(text, add_special_tokens=False).input_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.ids] += 1000.0  # -inf (masked) stays -inf
        scores[:, self.ids[0]] += 1.0
        return scores


class Report(BaseModel):
    """A short report."""

    title: str
    words: list[str]
    score: int


@pytest.mark.parametrize("max_tokens", [80, 128])  # keys are spelled out here: the shortest call is 44-53 tokens
def test_a_model_looping_in_a_string_still_ends_its_json(constrained_llm, max_tokens):
    tokenizer = constrained_llm._loader().models()[0].tokenizer
    model = constrained_llm.model_copy(update={
        "max_tokens": max_tokens, "model_kwargs": {"logits_processor": Looping(tokenizer, "o")}})
    for schema in (Joke, Report):
        for method in ("function_calling", "json_schema"):
            raw = model.with_structured_output(schema, method=method, include_raw=True).invoke("tell me")
            assert raw["parsing_error"] is None and isinstance(raw["parsed"], schema), (schema, method, raw)
            assert raw["raw"].usage_metadata["output_tokens"] <= max_tokens
    mode = model.with_structured_output(None, method="json_mode", include_raw=True).invoke("tell me")
    assert mode["parsing_error"] is None and isinstance(mode["parsed"], dict), mode
    # the same looping model without the grammar's budget rule: the string never closes
    free = constrained_llm.model_copy(update={"max_tokens": max_tokens, "constrained_decoding": False,
                                              "model_kwargs": {"logits_processor": Looping(tokenizer, "o")}})
    raw = free.with_structured_output(Joke, method="json_schema", include_raw=True).invoke("tell me")
    assert raw["parsing_error"] is not None and raw["raw"].response_metadata["finish_reason"] == "length"
