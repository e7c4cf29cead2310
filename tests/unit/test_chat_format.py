"""Message conversion, tool-call parsing and stop-string handling (no model needed)."""

import pytest
from langchain_core.messages import AIMessage, ChatMessage, FunctionMessage, HumanMessage, SystemMessage, ToolMessage
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import PreTrainedTokenizerFast

from langchain_adaptquant import InvalidValueError
from langchain_adaptquant.chat_format import (
    forced_tool_name,
    parse_tool_calls,
    to_chat_dicts,
    tool_choice_instruction,
    tools_system_prompt,
    validate_tool_choice,
)
from langchain_adaptquant.runtime.generation import TextWatch

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "add", "description": "Add", "parameters": {"type": "object", "properties": {}}}},
]


def test_messages_convert_with_tool_round_trip():
    call = {"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_1", "type": "tool_call"}
    dicts = to_chat_dicts([
        SystemMessage("be brief"),
        HumanMessage("weather?"),
        AIMessage("", tool_calls=[call]),
        ToolMessage("sunny", tool_call_id="call_1", name="get_weather"),
        ChatMessage(role="user", content=[{"type": "text", "text": "thanks"}]),
    ])
    assert [d["role"] for d in dicts] == ["system", "user", "assistant", "tool", "user"]
    assert dicts[2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert dicts[3]["tool_call_id"] == "call_1" and dicts[4]["content"] == "thanks"


def test_bad_messages_are_clear_errors():
    with pytest.raises(InvalidValueError, match="at least one message"):
        to_chat_dicts([])
    with pytest.raises(InvalidValueError, match="FunctionMessage"):
        to_chat_dicts([FunctionMessage(content="x", name="f")])
    with pytest.raises(InvalidValueError, match="role='critic'"):
        to_chat_dicts([ChatMessage(role="critic", content="x")])
    with pytest.raises(InvalidValueError, match="'image_url'"):
        to_chat_dicts([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])])


def test_hermes_tool_calls_are_parsed():
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls, invalid = parse_tool_calls(text, {"get_weather"})
    assert content == "Let me check." and not invalid
    assert calls[0]["name"] == "get_weather" and calls[0]["args"] == {"city": "Oslo"} and calls[0]["id"].startswith("call_")


def test_bare_json_fallback_and_invalid_calls():
    _, calls, _ = parse_tool_calls('{"name": "add", "parameters": {"a": 1}}', {"add"})
    assert calls[0]["args"] == {"a": 1}
    content, calls, invalid = parse_tool_calls('{"answer": 42}', {"add"})
    assert content == '{"answer": 42}' and not calls and not invalid  # JSON that is no call stays content
    _, calls, invalid = parse_tool_calls("<tool_call>{not json</tool_call>", {"add"})
    assert not calls and invalid[0]["error"].startswith("not valid tool-call JSON")
    _, calls, invalid = parse_tool_calls('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', {"add"})
    assert not calls and invalid[0]["name"] == "nope"
    assert parse_tool_calls("plain words", {"add"}) == ("plain words", [], [])


def test_tool_choice_handling():
    assert forced_tool_name("add", TOOLS) == "add"
    assert forced_tool_name({"type": "function", "function": {"name": "add"}}, TOOLS) == "add"
    assert forced_tool_name("any", TOOLS) is None and forced_tool_name("any", TOOLS[:1]) == "get_weather"
    assert tool_choice_instruction("auto", TOOLS) is None
    assert "get_weather, add" in tool_choice_instruction("required", TOOLS)
    with pytest.raises(InvalidValueError, match="'multiply'"):
        validate_tool_choice("multiply", TOOLS)
    assert "<tools>" in tools_system_prompt(TOOLS) and "<tool_call>" in tools_system_prompt(TOOLS)


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"])
    tok.train_from_iterator(["the cat sat on the mat. END of story. naïve café"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def feed(watch, tokenizer, text):
    shown = []
    for token in tokenizer(text, add_special_tokens=False).input_ids:
        watch.add([token])
        shown.append(watch.emit())
        if watch.done:
            break
    shown.append(watch.emit(final=True))
    return "".join(shown)


def test_multi_token_stop_string_is_honoured_and_never_leaks(tokenizer):
    watch = TextWatch(tokenizer, ["END of"], eos_ids={tokenizer.eos_token_id})
    shown = feed(watch, tokenizer, "the cat sat. END of story")
    assert watch.stopped_at is not None
    assert shown == watch.final_text() == "the cat sat. "


def test_eos_ends_and_multibyte_text_is_whole(tokenizer):
    watch = TextWatch(tokenizer, [], eos_ids={tokenizer.eos_token_id})
    shown = feed(watch, tokenizer, "naïve café")
    assert shown == "naïve café"
    watch.add([tokenizer.eos_token_id])
    assert watch.hit_eos and watch.done
