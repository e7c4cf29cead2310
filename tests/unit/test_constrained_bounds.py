"""Constrained answers end: free strings are bounded, and the processor closes the JSON within the budget.

A small model under greedy decoding loops inside a JSON string until the token budget runs out. Here
a scripted "model" does exactly that (it always prefers one letter, or one digit) through the
embedded reference model's real tokenizer, and every answer, whatever the budget, still parses as
JSON that matches its schema: the closing quote, braces and tag come before the last token.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from langchain_adaptquant import chat_format, constrained  # noqa: E402

JOKE = {"type": "object", "properties": {"setup": {"type": "string"}, "punchline": {"type": "string"}},
        "required": ["setup", "punchline"]}
NESTED = {"type": "object", "required": ["count", "tags", "items"], "properties": {
    "count": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "items": {"type": "array", "minItems": 1,
              "items": {"type": "object", "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"}},
                        "required": ["name", "ok"]}}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                            "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                                                           "required": ["location"]}}}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from langchain_adaptquant.assets import reference_model_path

    return AutoTokenizer.from_pretrained(str(reference_model_path()))


def _decode(tokenizer, grammar: constrained.Grammar, prefer: str, budget: int) -> tuple[str, bool, "constrained.GrammarProcessor"]:
    """Greedy decoding of a "model" that always scores ``prefer``'s tokens highest, a quote next (so it
    opens strings with one) and end-of-turn lowest: (text, whether it ended by length, the processor)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
    processor = constrained.GrammarProcessor(grammar, tokenizer, [eos], prompt_length=len(prompt))
    preferred = tokenizer(prefer, add_special_tokens=False).input_ids
    quote = tokenizer('"', add_special_tokens=False).input_ids + tokenizer(' "', add_special_tokens=False).input_ids
    ids = list(prompt)
    for _ in range(budget):
        scores = torch.linspace(0, 1, len(tokenizer)).unsqueeze(0)  # no ties: a deterministic order
        scores[0, quote] = 5.0
        scores[0, preferred] = 10.0
        scores[0, eos] = -10.0
        token = int(processor(torch.tensor([ids]), scores).argmax())
        if token == eos:
            return tokenizer.decode(ids[len(prompt):]), False, processor
        ids.append(token)
    return tokenizer.decode(ids[len(prompt):]), True, processor


@pytest.mark.parametrize("budget", [16, 20, 32, 64, 200])
def test_a_model_looping_in_a_string_still_answers_valid_json(tokenizer, budget):
    grammar = constrained.Grammar(constrained.json_grammar(JOKE, budget), "json", max_tokens=budget)
    text, _, _ = _decode(tokenizer, grammar, "a", budget)
    jsonschema.validate(json.loads(text), JOKE)
    # without the budget rule the same model never leaves the first string
    unbounded = constrained.Grammar(constrained.json_grammar(JOKE), "json")
    text, by_length, _ = _decode(tokenizer, unbounded, "a", budget)
    assert by_length and text.startswith('{"setup": "aaaa') and text.count('"') == 3


@pytest.mark.parametrize("budget", [36, 48, 96])  # the shortest valid answer is 33 tokens here
@pytest.mark.parametrize("prefer", ["a", "1", "[", "{"])
def test_nested_objects_arrays_and_numbers_close_in_time(tokenizer, budget, prefer):
    grammar = constrained.Grammar(constrained.json_grammar(NESTED, budget), "json", max_tokens=budget)
    text, _, _ = _decode(tokenizer, grammar, prefer, budget)
    jsonschema.validate(json.loads(text), NESTED)


@pytest.mark.parametrize("budget", [12, 24, 64])
def test_json_mode_closes_too(tokenizer, budget):
    grammar = constrained.Grammar(constrained.json_grammar(None, budget), "json", max_tokens=budget)
    for prefer in ("a", '{"', "["):
        text, _, _ = _decode(tokenizer, grammar, prefer, budget)
        assert isinstance(json.loads(text), dict), text


def test_max_length_from_the_schema_is_honoured(tokenizer):
    schema = {"type": "object", "properties": {"code": {"type": "string", "maxLength": 5},
                                               "note": {"type": "string", "minLength": 3}},
              "required": ["code", "note"]}
    budget = 64
    text, _, _ = _decode(tokenizer, constrained.Grammar(constrained.json_grammar(schema, budget), "json",
                                                        max_tokens=budget), "a", budget)
    value = json.loads(text)
    assert value["code"] == "aaaaa"  # the looping model is stopped at the schema's 5 characters
    assert 3 <= len(value["note"]) <= constrained.default_string_chars(budget, 2)


def test_the_closing_is_forced_exactly_when_needed(tokenizer):
    budget = 20
    text, by_length, processor = _decode(
        tokenizer, constrained.Grammar(constrained.json_grammar(JOKE), "json", max_tokens=budget), "a", budget)
    assert by_length and json.loads(text)["setup"].startswith("aaa")  # no maxLength: the budget rule closed it
    assert 0 < processor.forced_steps < budget
    # a budget too small for the shortest answer still ends in the grammar's direction (no crash)
    text, by_length, _ = _decode(
        tokenizer, constrained.Grammar(constrained.json_grammar(JOKE), "json", max_tokens=4), "a", 4)
    assert by_length and text.startswith('{"setup')


@pytest.mark.parametrize("budget", [12, 24, 64])
def test_forced_tool_call_arguments_end_with_the_closing_tag(tokenizer, budget):
    tags = constrained.CallTags.for_tokenizer(tokenizer)
    prefill = '<tool_call>\n{"name": "get_weather", "arguments": '
    grammar = constrained.Grammar(constrained.tool_call_grammar([WEATHER], "get_weather", prefill, tags, budget),
                                  "tool call", max_tokens=budget)
    text, _, _ = _decode(tokenizer, grammar, "a", budget)
    assert text.endswith("}}\n</tool_call>")
    _, calls, invalid = chat_format.parse_tool_calls(prefill + text, {"get_weather"})
    assert not invalid and calls[0]["name"] == "get_weather" and isinstance(calls[0]["args"]["location"], str)


def test_auto_opens_a_call_only_when_it_can_be_finished(tokenizer):
    tags = constrained.CallTags.for_tokenizer(tokenizer)
    assert tags.open_is_token  # one token: a "model" that prefers it opens a call at once

    def answer(budget: int) -> str:
        grammar = constrained.Grammar(constrained.optional_tool_calls_grammar([WEATHER], tags, budget), "tool call",
                                      max_tokens=budget)
        return _decode(tokenizer, grammar, "<tool_call>", budget)[0]

    assert "<tool_call>" not in answer(8)  # a call needs more than 8 tokens: the tag stays masked
    text = answer(48)
    _, calls, invalid = chat_format.parse_tool_calls(text, {"get_weather"})
    assert len(calls) == 1 and not invalid and text.startswith("<tool_call>"), text  # opened at once, and closed


def test_bounded_schema_defaults_come_from_the_budget():
    bounded = constrained.bounded_schema(NESTED, 64)
    chars = constrained.default_string_chars(64, 2)  # tags' items and each item's name
    assert chars == 48 and constrained.default_max_items(64) == 8
    assert bounded["properties"]["tags"] == {"type": "array", "items": {"type": "string", "maxLength": chars},
                                             "maxItems": 8}
    assert bounded["properties"]["items"]["maxItems"] == 8
    assert bounded["properties"]["items"]["items"]["properties"]["name"]["maxLength"] == chars
    assert "maxLength" not in json.dumps(NESTED)  # the input is not modified
    assert constrained.bounded_schema(NESTED, None) is NESTED
    kept = constrained.bounded_schema({"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 500}, "b": {"type": "string", "minLength": 300},
        "c": {"enum": ["x", "y"], "type": "string"}, "d": {"type": "string", "pattern": "^[a-z]+$"},
        "e": {"type": "array", "minItems": 20}}}, 64)["properties"]
    assert kept["a"]["maxLength"] == 500  # the schema's own bound wins over the default
    assert kept["b"]["maxLength"] == 300  # a default never contradicts minLength
    assert "maxLength" not in kept["c"] and "maxLength" not in kept["d"]  # bounded, or a regex to respect
    assert kept["e"]["maxItems"] == 20
    free = constrained.bounded_schema({"type": "object"}, 64)  # JSON mode: keys and values bounded too
    assert free["maxProperties"] == 8 and list(free["patternProperties"]) == ["^.{0,48}$"]


def test_nested_definitions_survive_the_call_wrapper(tokenizer):
    """A pydantic schema's ``$ref: #/$defs/X`` is rebased once the parameters sit inside a call's schema."""
    inner = {"type": "object", "properties": {"x": {"$ref": "#/$defs/Inner"}}, "required": ["x"],
             "$defs": {"Inner": {"type": "object", "properties": {"y": {"type": "integer"}}, "required": ["y"]}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": inner}}, WEATHER]
    tags = constrained.CallTags.for_tokenizer(tokenizer)
    for grammar in (constrained.tool_call_grammar(tools[:1], tags=tags), constrained.tool_call_grammar(tools, tags=tags),
                    constrained.optional_tool_calls_grammar(tools, tags)):
        processor = constrained.GrammarProcessor(constrained.Grammar(grammar, "tool call"), tokenizer, [2], 0)
        assert not processor.error
    schema = constrained.tool_call_schema(tools)
    assert schema["anyOf"][0]["properties"]["arguments"]["properties"]["x"]["$ref"] == \
        "#/anyOf/0/properties/arguments/$defs/Inner"
