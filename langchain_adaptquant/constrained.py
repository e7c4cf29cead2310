"""Grammar-constrained decoding of tool calls and JSON answers, with llguidance.

A 135M-parameter model knows roughly what a tool call looks like but slips on the details: a missing
brace, a made-up key, a string where the schema wants an integer. Constraining decoding removes that
whole class of failure: at each step, tokens the grammar cannot accept get ``-inf``, so what comes
out always parses and matches the tool's JSON schema. Whether the *values* are right stays the
model's business.

Why llguidance: it is the grammar engine llama.cpp, vLLM and SGLang use, compiles a JSON schema in
milliseconds, needs no GPU or torch.compile, and ships as one dependency-free wheel (MIT). xgrammar
would pull Triton on Linux; lm-format-enforcer is pure Python and slower per token.

The grammars follow the Hermes convention :mod:`chat_format` parses back:
``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from langchain_adaptquant.errors import InvalidValueError

#: The JSON layout small chat models were trained on: ``{"a": 1, "b": 2}``.
_SEPARATORS = (", ", ": ")
#: Largest JSON nesting and item counts stay the schema's business; this only bounds runaway objects.
_FREE_OBJECT = {"type": "object"}


def available() -> bool:
    """Whether llguidance imports here (an optional dependency: the ``grammar`` extra)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def _json_grammar(schema: dict[str, Any]) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_json_schema(_schema_for_lark(schema))


def _lark_string(text: str) -> str:
    return json.dumps(text)


def closed_objects(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever an object lists its properties and says
    nothing about others: a tool takes the arguments it declares (OpenAI's strict mode does the same),
    and a small model left free invents extra keys (``{"input": 3, "type": "integer"}``)."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties"):  # maps of name -> schema
        if isinstance(closed.get(key), dict):
            closed[key] = {name: closed_objects(sub) for name, sub in closed[key].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):  # lists of schemas
        if isinstance(closed.get(key), list):
            closed[key] = [closed_objects(sub) for sub in closed[key]]
    for key in ("items", "additionalProperties", "not"):  # one schema
        if isinstance(closed.get(key), dict):
            closed[key] = closed_objects(closed[key])
    if isinstance(closed.get("properties"), dict) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def tool_call_schema(tools: Sequence[dict[str, Any]], name: Optional[str] = None) -> dict[str, Any]:
    """JSON schema of one call: ``{"name": <one of the tools>, "arguments": <that tool's parameters>}``."""
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = closed_objects(function.get("parameters") or {"type": "object", "properties": {}})
        options.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    if not options:
        raise InvalidValueError("tool_choice", name, f"one of {[t['function']['name'] for t in tools]}")
    return options[0] if len(options) == 1 else {"anyOf": options}


@dataclass(frozen=True)
class CallTags:
    """How the grammar names ``<tool_call>`` and ``</tool_call>``: as text, or as the single added token
    a tokenizer has for it (Hermes-trained vocabularies). A grammar engine never builds a special
    token out of characters, so the literal must match what the tokenizer really emits."""

    open: str = json.dumps("<tool_call>")
    close: str = json.dumps("</tool_call>")
    open_is_token: bool = False

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> "CallTags":
        added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}

        def ref(tag: str) -> str:
            return f"<[{added[tag]}]>" if tag in added else json.dumps(tag)

        return cls(ref("<tool_call>"), ref("</tool_call>"), "<tool_call>" in added)


def tool_call_grammar(tools: Sequence[dict[str, Any]], name: Optional[str] = None, prefill: str = "",
                      tags: CallTags = CallTags()) -> str:
    """Lark grammar for exactly one Hermes tool call, continuing after ``prefill`` (text already in the prompt).

    With a forced tool, the chat model pre-fills ``<tool_call>\\n{"name": "X", "arguments": `` so the
    grammar only has the arguments' schema and the closing text left to enforce.
    """
    if prefill:
        if name is None:
            raise InvalidValueError("prefill", prefill, "only with a forced tool name")
        arguments = tool_call_schema(tools, name)["properties"]["arguments"]
        return (f"start: args {_lark_string('}' + chr(10))} {tags.close}\n"
                f"args: %json {json.dumps(_schema_for_lark(arguments))}\n")
    schema = tool_call_schema(tools, name)
    return (f"start: {tags.open} {_lark_string(chr(10))} call {_lark_string(chr(10))} {tags.close}\n"
            f"call: %json {json.dumps(_schema_for_lark(schema))}\n")


def optional_tool_calls_grammar(tools: Sequence[dict[str, Any]], tags: CallTags = CallTags()) -> str:
    """Lark grammar for ``tool_choice="auto"``: free text, but any ``<tool_call>`` the model opens must be a
    valid call. A textual opening tag is a lazy lexeme (the grammar engages the moment the text reaches
    it); a tag that is one special token cannot occur inside text, so it simply starts a call."""
    schema = json.dumps(_schema_for_lark(tool_call_schema(tools)))
    body = f"{_lark_string(chr(10))} args {_lark_string(chr(10))} {tags.close}"
    if tags.open_is_token:
        opening = f"call: TEXT {tags.open} {body}\n"
    else:
        opening = f"call: call_open {body}\ncall_open[lazy]: TEXT {tags.open}\n"
    return "%llguidance {}\nstart: call* TEXT\n" + opening + "TEXT: /(.|\\n)*/\n" + f"args: %json {schema}\n"


def _schema_for_lark(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with our separators attached, as llguidance's ``x-guidance`` options."""
    return {**schema, "x-guidance": {"item_separator": _SEPARATORS[0], "key_separator": _SEPARATORS[1],
                                      "whitespace_flexible": False}}


def json_grammar(schema: Optional[dict[str, Any]]) -> str:
    """Grammar for one JSON value matching ``schema`` (any JSON object when None: JSON mode)."""
    return _json_grammar(dict(schema) if schema else dict(_FREE_OBJECT))


# -- tokenizers: converting one costs ~1 s, so each tokenizer object is converted once ------------------
_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Any, eos_ids: Sequence[int]) -> Any:
    from llguidance.hf import from_tokenizer

    with _LOCK:
        found = _LL_TOKENIZERS.get(tokenizer)
        if found is None:
            eos = sorted(set(int(i) for i in eos_ids)) or None
            found = _LL_TOKENIZERS[tokenizer] = from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos)
        return found


@dataclass(frozen=True)
class Grammar:
    """A grammar to decode under, in llguidance's format (Lark or its JSON): typed call data for the runtime."""

    text: str
    purpose: str  # "tool call" / "json" -- for error messages and metadata


class GrammarProcessor:
    """Hugging Face ``LogitsProcessor`` for one sequence: forbids tokens the grammar cannot accept.

    Called with the ids so far (prompt + generated) and the next-token scores; it feeds the newly
    generated ids to the matcher, then masks. Once the grammar is complete only end-of-sequence is
    allowed, so generation stops right after the closing tag. Not thread-safe: one per generation.
    """

    def __init__(self, grammar: Grammar, tokenizer: Any, eos_ids: Sequence[int], prompt_length: int) -> None:
        from llguidance import LLMatcher

        if not eos_ids:
            raise InvalidValueError("eos_ids", list(eos_ids), "at least one end-of-sequence token id")
        self.grammar = grammar
        self.eos_ids = sorted(set(int(i) for i in eos_ids))
        self.prompt_length = prompt_length
        self._matcher = LLMatcher(_ll_tokenizer(tokenizer, self.eos_ids), grammar.text, log_level=0)
        if self._matcher.is_error():
            raise InvalidValueError(f"{grammar.purpose} grammar", grammar.text[:200], self._matcher.get_error())
        self._consumed = 0
        self._vocab = len(tokenizer)

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""

    def accepting(self) -> bool:
        return self._matcher.is_accepting()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[0, self.prompt_length + self._consumed:].tolist()
        for token in generated:
            self._consumed += 1
            if token in self.eos_ids:
                continue
            self._matcher.consume_token(int(token))
        allowed = self._allowed(scores.shape[-1])
        return scores.masked_fill(~allowed, float("-inf"))

    def _allowed(self, width: int) -> torch.Tensor:
        allowed = torch.zeros(width, dtype=torch.bool)
        if self._matcher.is_error() or self._matcher.is_stopped():
            allowed[self.eos_ids] = True  # finished (or lost): end the answer; the parser reports what came out
            return allowed.unsqueeze(0)
        bits = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        mask = ((bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).bool()
        size = min(width, mask.numel())
        allowed[:size] = mask[:size]
        if self._matcher.is_accepting():
            allowed[self.eos_ids] = True
        return allowed.unsqueeze(0)
