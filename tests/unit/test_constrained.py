"""Grammar-constrained decoding: the grammars accept exactly the tool calls and JSON the schemas allow.

Walks the embedded model's real tokenizer through llguidance token by token (no model needed): a
valid call passes every step, the first wrong token is masked to -inf, and end-of-sequence is allowed
exactly when the grammar is complete.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")

from langchain_adaptquant import constrained  # noqa: E402
from langchain_adaptquant.errors import InvalidValueError  # noqa: E402

MAGIC = {"type": "function", "function": {"name": "magic_function", "description": "magic",
                                          "parameters": {"type": "object", "properties": {"input": {"type": "integer"}},
                                                         "required": ["input"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                            "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                                           "required": ["location"]}}}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from langchain_adaptquant.assets import reference_model_path

    return AutoTokenizer.from_pretrained(str(reference_model_path()))


def _walk(tokenizer, grammar: str, text: str):
    """Feed ``text``'s tokens one by one; return (index of the first masked token or None, eos allowed at the end)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    processor = constrained.GrammarProcessor(constrained.Grammar(grammar, "test"), tokenizer, [eos], prompt_length=0)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    width = len(tokenizer)
    for index in range(len(ids) + 1):
        scores = processor(torch.tensor([ids[:index]]), torch.zeros(1, width))
        if index < len(ids) and not torch.isfinite(scores[0, ids[index]]):
            return tokenizer.decode(ids[:index]), False
    return None, bool(torch.isfinite(scores[0, eos]))


def test_forced_call_after_prefill_takes_only_schema_valid_arguments(tokenizer):
    prefill = '<tool_call>\n{"name": "magic_function", "arguments": '
    grammar = constrained.tool_call_grammar([MAGIC], "magic_function", prefill, constrained.CallTags.for_tokenizer(tokenizer))
    assert _walk(tokenizer, grammar, '{"input": 3}}\n</tool_call>') == (None, True)
    blocked, _ = _walk(tokenizer, grammar, '{"input": "three"}}\n</tool_call>')
    assert blocked is not None and blocked.startswith('{"input":') and "three" not in blocked  # no string here
    blocked, _ = _walk(tokenizer, grammar, '{"input": 3, "type": "integer"}}')
    assert blocked is not None and blocked.startswith('{"input": 3')  # no undeclared keys


def test_required_call_among_tools_names_one_of_them(tokenizer):
    tags = constrained.CallTags.for_tokenizer(tokenizer)
    assert tags.open_is_token  # the embedded model's vocabulary has <tool_call> as one added token
    grammar = constrained.tool_call_grammar([MAGIC, WEATHER], tags=tags)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>'
    assert _walk(tokenizer, grammar, call) == (None, True)
    blocked, _ = _walk(tokenizer, grammar, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert blocked is not None and blocked.startswith('<tool_call>\n{"name": "get_')
    blocked, _ = _walk(tokenizer, grammar, "I think it is sunny.")
    assert blocked == ""  # text instead of the required call is masked from the first token


def test_auto_allows_plain_text_or_a_valid_call_but_not_a_broken_one(tokenizer):
    grammar = constrained.optional_tool_calls_grammar([WEATHER], constrained.CallTags.for_tokenizer(tokenizer))
    assert _walk(tokenizer, grammar, "It is sunny in Paris today.") == (None, True)
    call = 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"location": "SF"}}\n</tool_call>'
    assert _walk(tokenizer, grammar, call) == (None, True)
    blocked, _ = _walk(tokenizer, grammar, 'Let me look.<tool_call>\n{"name": "get_weather", "arguments": {"city": "SF"}}')
    assert blocked is not None and "arguments" in blocked


def test_textual_tags_for_vocabularies_without_a_tool_call_token(tokenizer):
    """SmolLM2's vocabulary has no <tool_call> token: the tags are text, the opening one a lazy lexeme."""
    tags = constrained.CallTags()
    assert not tags.open_is_token and tags.open == '"<tool_call>"'
    grammar = constrained.optional_tool_calls_grammar([WEATHER], tags)
    assert "call_open[lazy]" in grammar and grammar.count('"<tool_call>"') == 1


def test_json_mode_and_schema(tokenizer):
    assert _walk(tokenizer, constrained.json_grammar(None), '{"a": [1, 2], "b": "x"}') == (None, True)
    assert _walk(tokenizer, constrained.json_grammar(None), "[1, 2]")[0] == ""  # JSON mode means an object
    schema = {"type": "object", "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
              "required": ["setup", "punchline"]}
    assert _walk(tokenizer, constrained.json_grammar(schema), '{"setup": "a", "punchline": "b"}') == (None, True)
    incomplete = _walk(tokenizer, constrained.json_grammar(schema), '{"setup": "a"')
    assert incomplete == (None, False)  # not done yet: end-of-sequence stays masked


def test_closed_objects_closes_declared_objects_only():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
                                               "free": {"type": "object"},
                                               "open": {"type": "object", "properties": {}, "additionalProperties": True}},
              "$defs": {"Inner": {"type": "object", "properties": {"y": {"type": "string"}}}}}
    closed = constrained.closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False  # a property named "properties"
    assert "additionalProperties" not in closed["properties"]["properties"]["properties"]  # the map itself untouched
    assert "additionalProperties" not in closed["properties"]["free"]  # lists no properties: left open
    assert closed["properties"]["open"]["additionalProperties"] is True  # an explicit choice is kept
    assert closed["$defs"]["Inner"]["additionalProperties"] is False
    assert json.dumps(schema).count("additionalProperties") == 1  # the input is not modified


def test_bad_input_is_named(tokenizer):
    with pytest.raises(InvalidValueError, match="tool_choice"):
        constrained.tool_call_schema([MAGIC], "missing_tool")
    with pytest.raises(InvalidValueError, match="prefill"):
        constrained.tool_call_grammar([MAGIC], None, prefill="<tool_call>")
    with pytest.raises(InvalidValueError, match="eos_ids"):
        constrained.GrammarProcessor(constrained.Grammar(constrained.json_grammar(None), "json"), tokenizer, [], 0)
    with pytest.raises(InvalidValueError, match="test grammar"):
        constrained.GrammarProcessor(constrained.Grammar("start: (((", "test"), tokenizer, [2], 0)
