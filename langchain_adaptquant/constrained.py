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

An answer must also *end*. A small model under greedy decoding loops inside a JSON string ("the cat
was having a cat-themed party, and the cat was having ...") until the token budget runs out, and a
grammar alone only says what may come next, not that the end comes in time. Two layers fix that:

* :func:`bounded_schema` gives every free string a ``maxLength`` (the schema's own where it has one,
  else a share of the token budget, in characters) and every array a ``maxItems``, and replaces free
  values (``{}``, ``{"type": "object"}``: JSON mode) by a depth-limited bounded JSON value. The model
  is then made to close its strings itself, early enough to write the other fields.
* :class:`GrammarProcessor` knows the token budget and, at every step, the number of tokens a short
  completion from here needs (walked on a copy of the matcher: see :class:`_Closer`). Candidates
  that would leave less budget than that are masked, and once the budget left equals that number only
  the completion's next token is allowed: the closing quote, brace, bracket and tag come before the
  last token, so the JSON is valid whenever generation stops by length.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from langchain_adaptquant.errors import InvalidValueError

#: The JSON layout small chat models were trained on: ``{"a": 1, "b": 2}``.
_SEPARATORS = (", ", ": ")
#: JSON mode: any object (bounded by :func:`bounded_schema` when the token budget is known).
_FREE_OBJECT = {"type": "object"}
#: Characters per token assumed when a token budget becomes a string length (English BPE text: 3-5).
_CHARS_PER_TOKEN = 3
#: Shortest default ``maxLength``, whatever the budget.
_MIN_STRING_CHARS = 8
#: Tokens per array item assumed when a token budget becomes a default ``maxItems``.
_TOKENS_PER_ITEM = 8
#: Nesting levels of a free JSON value (JSON mode) before only scalars are allowed.
_FREE_DEPTH = 3


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


def _free_value(depth: int, chars: int, items: int) -> dict[str, Any]:
    """Any JSON value, with strings of at most ``chars`` characters, arrays of at most ``items`` items and
    containers nested at most ``depth`` deep (then scalars only)."""
    scalars: list[dict[str, Any]] = [{"type": "string", "maxLength": chars}, {"type": "number"},
                                     {"type": "boolean"}, {"type": "null"}]
    if depth <= 0:
        return {"anyOf": scalars}
    return {"anyOf": scalars + [{"type": "array", "items": _free_value(depth - 1, chars, items), "maxItems": items},
                                _free_object(depth - 1, chars, items)]}


def _free_object(depth: int, chars: int, items: int) -> dict[str, Any]:
    # keys are bounded too (llguidance has no ``propertyNames``: a key pattern does the same)
    return {"type": "object", "patternProperties": {f"^.{{0,{chars}}}$": _free_value(depth, chars, items)},
            "additionalProperties": False, "maxProperties": items}


def _is_free(schema: Any) -> bool:
    """A schema that allows any JSON value, or any object: nothing in it bounds a string."""
    if schema is True or schema == {}:
        return True
    if not isinstance(schema, dict) or set(schema) - {"type", "title", "description", "additionalProperties"}:
        return False
    return schema.get("type") == "object" and schema.get("additionalProperties", True) is True


def _count_strings(schema: Any, seen: int = 0) -> int:
    """How many free strings one instance of ``schema`` may hold at once (alternatives count the largest)."""
    if seen > 8 or not isinstance(schema, dict):
        return 0
    if _is_free(schema):
        return 2
    if schema.get("type") == "string" or (isinstance(schema.get("type"), list) and "string" in schema["type"]):
        return 0 if any(k in schema for k in ("enum", "const")) else 1
    count = 0
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            count += sum(_count_strings(sub, seen + 1) for sub in schema[key].values())
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            count += max((_count_strings(sub, seen + 1) for sub in schema[key]), default=0)
    for key in ("allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            count += sum(_count_strings(sub, seen + 1) for sub in schema[key])
    for key in ("items", "additionalProperties"):
        count += _count_strings(schema.get(key), seen + 1)
    return count


def default_string_chars(max_tokens: int, strings: int = 1) -> int:
    """Default ``maxLength`` of each of ``strings`` free strings in an answer of ``max_tokens`` tokens:
    together they get half the budget (the other half is the keys, separators and closing structure),
    at :data:`_CHARS_PER_TOKEN` characters a token."""
    return max(_MIN_STRING_CHARS, max_tokens * _CHARS_PER_TOKEN // (2 * max(1, strings)))


def default_max_items(max_tokens: int) -> int:
    """Default ``maxItems`` of an array in an answer of ``max_tokens`` tokens."""
    return max(1, max_tokens // _TOKENS_PER_ITEM)


def bounded_schema(schema: Any, max_tokens: Optional[int]) -> Any:
    """The schema with every free string, array and value bounded, so an answer of ``max_tokens``
    tokens can close them (unchanged when ``max_tokens`` is None).

    * A string without ``maxLength`` (and without ``enum``, ``const``, ``pattern`` or ``format``, which
      bound it or whose regex a length could make unsatisfiable) gets
      :func:`default_string_chars`; a ``maxLength`` the schema gives is kept. ``minLength`` wins over the
      default (a default never makes a schema unsatisfiable).
    * An array without ``maxItems`` gets :func:`default_max_items` (at least its ``minItems``).
    * A free value (``{}``, ``true``, ``{"type": "object"}`` with no properties: JSON mode) becomes a
      bounded JSON value nested at most :data:`_FREE_DEPTH` deep, keys and strings bounded too.

    These bounds steer the model to close its strings itself; the guarantee that the answer closes in
    time is :class:`GrammarProcessor`'s (numbers, for one, stay unbounded here).
    """
    if max_tokens is None:
        return schema
    chars = default_string_chars(max_tokens, _count_strings(schema))
    items = default_max_items(max_tokens)
    return _bound(schema, chars, items, top=True)


def _bound(schema: Any, chars: int, items: int, top: bool = False) -> Any:
    if _is_free(schema):
        depth = _FREE_DEPTH if top else _FREE_DEPTH - 1
        if schema is True or schema == {}:
            return _free_value(depth, chars, items)
        return {**schema, **_free_object(depth, chars, items)}
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(out.get(key), dict):
            out[key] = {name: _bound(sub, chars, items) for name, sub in out[key].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_bound(sub, chars, items) for sub in out[key]]
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict) or (key == "items" and out.get(key) is True):
            out[key] = _bound(out[key], chars, items)
    declared = out.get("type")
    types: list[Any] = list(declared) if isinstance(declared, list) else [declared]
    if "string" in types and not any(k in out for k in ("maxLength", "enum", "const", "pattern", "format")):
        out["maxLength"] = max(chars, int(out.get("minLength", 0)))
    if "array" in types and "maxItems" not in out:
        out["maxItems"] = max(items, int(out.get("minItems", 0)))
    return out


def _rebase_refs(schema: Any, base: str) -> Any:
    """``schema`` with its document-relative ``$ref`` pointers moved under ``base`` (a JSON pointer such as
    ``#/properties/arguments``): a tool's parameters keep their ``$defs`` once nested in a call's schema."""
    if isinstance(schema, list):
        return [_rebase_refs(sub, base) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _rebase_refs(value, base) for key, value in schema.items()}
    ref = out.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    return out


def _parameters(function: dict[str, Any], max_tokens: Optional[int]) -> dict[str, Any]:
    """A tool's parameters as the grammar takes them: objects closed, free strings and arrays bounded."""
    return bounded_schema(closed_objects(function.get("parameters") or {"type": "object", "properties": {}}), max_tokens)


def tool_call_schema(tools: Sequence[dict[str, Any]], name: Optional[str] = None,
                     max_tokens: Optional[int] = None) -> dict[str, Any]:
    """JSON schema of one call: ``{"name": <one of the tools>, "arguments": <that tool's parameters>}``.

    Each tool's parameters are bounded for a ``max_tokens`` answer (:func:`bounded_schema`), and their
    ``$ref`` pointers (pydantic's ``#/$defs/...``) rebased to where the parameters now sit."""
    options: list[dict[str, Any]] = []
    matching = [tool for tool in tools if name is None or tool["function"]["name"] == name]
    for tool in matching:
        function = tool["function"]
        base = "#/properties/arguments" if len(matching) == 1 else f"#/anyOf/{len(options)}/properties/arguments"
        parameters = _rebase_refs(_parameters(function, max_tokens), base)
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
                      tags: CallTags = CallTags(), max_tokens: Optional[int] = None) -> str:
    """Lark grammar for exactly one Hermes tool call, continuing after ``prefill`` (text already in the prompt).

    With a forced tool, the chat model pre-fills ``<tool_call>\\n{"name": "X", "arguments": `` so the
    grammar only has the arguments' schema and the closing text left to enforce. ``max_tokens`` (the
    answer's budget) bounds free strings and arrays: :func:`bounded_schema`.
    """
    if prefill:
        if name is None:
            raise InvalidValueError("prefill", prefill, "only with a forced tool name")
        tool_call_schema(tools, name)  # raises when no tool has that name
        arguments = _parameters(next(t["function"] for t in tools if t["function"]["name"] == name), max_tokens)
        return (f"start: args {_lark_string('}' + chr(10))} {tags.close}\n"
                f"args: %json {json.dumps(_schema_for_lark(arguments))}\n")
    schema = tool_call_schema(tools, name, max_tokens)
    return (f"start: {tags.open} {_lark_string(chr(10))} call {_lark_string(chr(10))} {tags.close}\n"
            f"call: %json {json.dumps(_schema_for_lark(schema))}\n")


def optional_tool_calls_grammar(tools: Sequence[dict[str, Any]], tags: CallTags = CallTags(),
                                max_tokens: Optional[int] = None) -> str:
    """Lark grammar for ``tool_choice="auto"``: free text, but any ``<tool_call>`` the model opens must be a
    valid call. A textual opening tag is a lazy lexeme (the grammar engages the moment the text reaches
    it); a tag that is one special token cannot occur inside text, so it simply starts a call."""
    schema = json.dumps(_schema_for_lark(tool_call_schema(tools, max_tokens=max_tokens)))
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


def json_grammar(schema: Optional[dict[str, Any]], max_tokens: Optional[int] = None) -> str:
    """Grammar for one JSON value matching ``schema`` (any JSON object when None: JSON mode), its free
    strings and arrays bounded for a ``max_tokens`` answer (:func:`bounded_schema`).

    A schema's objects are closed as a tool's are (:func:`closed_objects`): left open, SmolLM2-135M
    spends the budget on keys it invents (``"description": ...`` after a joke's punchline)."""
    return _json_grammar(bounded_schema(closed_objects(dict(schema)) if schema else dict(_FREE_OBJECT), max_tokens))


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
    """A grammar to decode under, in llguidance's format (Lark or its JSON): typed call data for the runtime.

    ``max_tokens`` is the answer's token budget: with it, :class:`GrammarProcessor` closes the answer
    before the budget ends (None: no budget rule, as before)."""

    text: str
    purpose: str  # "tool call" / "json" -- for error messages and metadata
    max_tokens: Optional[int] = None


#: Texts a short completion prefers, best first, where each is one token of the vocabulary. Inside a
#: string: close it (with its container when that may close), then close containers, go on to the next
#: required key or item, then the shortest values. A text that is not one token is left out; when
#: none is allowed, the allowed token with the lowest id is taken (in a byte-level BPE vocabulary: a
#: single byte), which keeps a pattern or an enum moving.
_CLOSING_TEXTS = ('"}', '"]', '"', '}}', ']}', '}]', '}', ']', ',', '""', '[]', '{}', '0', 'null', 'true', 'false',
                  ' ""', ' []', ' {}', ' 0', ' null', ' true', ' false')
#: Where a value starts (``""`` or `` ""`` is allowed, which it never is inside a string), ``]`` and ``}``
#: are structure, not text: an empty array or object closes at once, else the shortest value. (The
#: space-led texts are for values after ``": "``, where the space is not yet written.)
_VALUE_START_TEXTS = (']', '}', '""', ' ""', '[]', ' []', '{}', ' {}', '0', ' 0', 'null', ' null', 'true', ' true',
                      'false', ' false')
#: How far a completion is walked before giving up (a pattern string with no bound can run forever).
_CLOSING_WALK = 256
#: Candidates checked against the budget at each step (the highest-scored ones: greedy's pick is the first).
_CHECKED_CANDIDATES = 8
#: Within this many tokens of slack, only checked candidates stay allowed (sampling included).
_GUARD_WINDOW = 16


class _Closer:
    """A short token path from a matcher state to the end of its grammar, walked on a copy of the matcher:
    the tokens the grammar forces (llguidance's fast-forward tokens), else the first allowed token of
    :data:`_CLOSING_TEXTS` (:data:`_VALUE_START_TEXTS` where a value starts), else the allowed token
    with the lowest id. Not always the shortest path, but a real one, token for token: its length is an
    upper bound on what closing costs from that state."""

    def __init__(self, tokenizer: Any, eos_ids: Sequence[int]) -> None:
        self.eos = set(eos_ids)

        def single(texts: Sequence[str]) -> list[int]:
            found: list[int] = []
            for text in texts:
                ids = tokenizer.encode(text, add_special_tokens=False)
                if len(ids) == 1 and ids[0] not in self.eos and ids[0] not in found:
                    found.append(int(ids[0]))
            return found

        self.preferred = single(_CLOSING_TEXTS)
        self.at_value = single(_VALUE_START_TEXTS)
        self.empty_strings = single(['""', ' ""'])

    def path(self, matcher: Any, limit: int) -> tuple[list[int], bool]:
        """(tokens, closed): the path from ``matcher``'s state, and whether it reaches the end within
        ``limit`` tokens. ``matcher`` itself is not changed."""
        walker = matcher.deep_copy()
        tokens: list[int] = []
        while True:
            if walker.is_accepting():
                return tokens, True
            if walker.is_error() or walker.is_stopped() or len(tokens) >= limit:
                return tokens, False
            forced = walker.compute_ff_tokens()
            if forced:
                forced = forced[: limit - len(tokens)]
                walker.consume_tokens(forced)
                tokens.extend(forced)
                continue
            mask = walker.compute_bitmask()
            at_value = any(mask[t >> 3] >> (t & 7) & 1 for t in self.empty_strings)
            order = self.at_value if at_value else self.preferred
            token = next((t for t in order if mask[t >> 3] >> (t & 7) & 1), None)
            if token is None:
                token = self._lowest(mask)
                if token is None:
                    return tokens, False
            walker.consume_token(token)
            tokens.append(token)

    def _lowest(self, mask: bytes) -> Optional[int]:
        start = 0
        while True:
            rest = mask[start:].lstrip(b"\0")
            if not rest:
                return None
            index = len(mask) - len(rest)
            byte = mask[index]
            for bit in range(8):
                if byte >> bit & 1 and index * 8 + bit not in self.eos:
                    return index * 8 + bit
            start = index + 1


class GrammarProcessor:
    """Hugging Face ``LogitsProcessor`` for one sequence: forbids tokens the grammar cannot accept, and
    closes the answer before its token budget ends.

    Called with the ids so far (prompt + generated) and the next-token scores; it feeds the newly
    generated ids to the matcher, then masks. Once the grammar is complete only end-of-sequence is
    allowed, so generation stops right after the closing tag. Not thread-safe: one per generation.

    **The budget rule** (when ``max_new_tokens`` or the grammar's ``max_tokens`` is given). Why the
    processor and not the grammar alone: a schema's ``maxLength`` counts characters, not tokens (a
    token is 1-16 characters, a non-ASCII character several tokens); numbers have no length bound; an
    open object may still owe required keys; a Lark rule's ``max_tokens`` bounds one lexeme, not the
    answer; and llguidance's own token limits stop the parser where it is, unfinished. Only the matcher's
    state at each step knows what closing still costs. So, with ``left`` tokens left (this one included):

    1. :class:`_Closer` walks a completion from the current state on a copy of the matcher: ``need``
       tokens that end the grammar (closing quote, ``}``, ``]``, required keys, the closing tag).
    2. With slack (``need < left``) the highest-scored candidates (:data:`_CHECKED_CANDIDATES`;
       greedy's pick is the first) are each consumed on a copy: one whose own completion would not fit
       in ``left - 1`` tokens is masked, so the model cannot step into an opening it could not close (a
       new key, a nested object, a tool call under ``auto``). Within :data:`_GUARD_WINDOW` tokens of
       slack only checked candidates (and the completion's next token) stay allowed.
    3. Without slack (``need == left``) only the completion's next token, and candidates that still
       end in time, are allowed: from here the closing is written, and ends on the grammar's end.
    4. Below the walk's ``need`` (a budget shorter than the walk's completion, whose tokens are not
       always the fewest: the model's own tokens may each cover more text) the checked candidate whose
       completion is the shortest is taken: best effort, an answer cut this short may still be invalid.

    By induction the state after every allowed token can still be closed within the tokens left, so
    the text is valid when the budget ends, whichever way it ends, given a budget that holds the
    shortest answer at all. This holds for greedy decoding always, and for sampling unless a token
    ranked below the checked candidates, drawn with more than :data:`_GUARD_WINDOW` tokens of slack,
    raises the completion's cost by more than that slack. The walk is cheap (a mask costs ~10-50
    microseconds; a copy ~2), and a candidate that keeps the current completion valid (a letter inside
    a string) is checked by replaying it, without new masks. A state whose completion the walk cannot
    find within :data:`_CLOSING_WALK` tokens (an unbounded ``pattern``) gets no budget rule. The prompt's
    context window can cut an answer shorter than ``max_new_tokens``; the processor counts only the
    budget it was given.
    """

    def __init__(self, grammar: Grammar, tokenizer: Any, eos_ids: Sequence[int], prompt_length: int,
                 max_new_tokens: Optional[int] = None) -> None:
        from llguidance import LLMatcher

        if not eos_ids:
            raise InvalidValueError("eos_ids", list(eos_ids), "at least one end-of-sequence token id")
        self.grammar = grammar
        self.eos_ids = sorted(set(int(i) for i in eos_ids))
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else grammar.max_tokens
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool) or self.max_new_tokens <= 0):
            raise InvalidValueError("max_new_tokens", self.max_new_tokens, "an integer greater than 0, or None")
        self._matcher = LLMatcher(_ll_tokenizer(tokenizer, self.eos_ids), grammar.text, log_level=0)
        if self._matcher.is_error():
            raise InvalidValueError(f"{grammar.purpose} grammar", grammar.text[:200], self._matcher.get_error())
        self._consumed = 0
        self._vocab = len(tokenizer)
        self._closer = _Closer(tokenizer, self.eos_ids) if self.max_new_tokens is not None else None
        self._path: list[int] = []  # the completion from the current state, once walked
        self._path_fresh = False
        #: steps at which the budget rule forced the completion's token (for tests and diagnostics)
        self.forced_steps = 0

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
            if self._path_fresh and self._path and self._path[0] == token:
                self._path = self._path[1:]  # the completion's own token: the rest of it still closes
            else:
                self._path_fresh = False
            self._matcher.consume_token(int(token))
        # the masking runs in numpy: a torch op on a vocabulary-wide CPU tensor enters an OpenMP region,
        # which on a busy 2-core machine waits milliseconds for its threads (measured: 7-23 ms per op
        # against 0.1 ms in numpy), every step
        values = np.where(self._allowed(scores.shape[-1]), scores[0].detach().float().cpu().numpy(), -np.inf)
        if self._closer is not None and not (self._matcher.is_error() or self._matcher.is_stopped()):
            left = (self.max_new_tokens or 0) - (input_ids.shape[1] - self.prompt_length)
            values = self._within_budget(values, max(1, left))
        return torch.from_numpy(values.astype(np.float32, copy=False)).unsqueeze(0).to(scores.device, scores.dtype)

    def _allowed(self, width: int) -> np.ndarray:
        allowed = np.zeros(width, dtype=bool)
        if self._matcher.is_error() or self._matcher.is_stopped():
            allowed[self.eos_ids] = True  # finished (or lost): end the answer; the parser reports what came out
            return allowed
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        size = min(width, bits.size)
        allowed[:size] = bits[:size].astype(bool)
        if self._matcher.is_accepting():
            allowed[self.eos_ids] = True
        return allowed

    # -- the budget rule ----------------------------------------------------------------------------
    def _completion(self, left: int) -> tuple[list[int], bool]:
        if self._path_fresh:
            return self._path, True
        assert self._closer is not None
        path, closed = self._closer.path(self._matcher, min(_CLOSING_WALK, left))
        if closed:
            self._path, self._path_fresh = path, True
        return path, closed

    def _fits(self, token: int, path: list[int], room: int) -> bool:
        """Whether, after ``token``, the grammar can still be ended within ``room`` tokens."""
        if token in self.eos_ids or (path and token == path[0]):
            return True
        assert self._closer is not None
        trial = self._matcher.deep_copy()
        if not trial.consume_token(token):
            return False
        replay = trial.deep_copy()  # most candidates (text inside a string) leave the completion as it was
        if len(path) <= room and replay.try_consume_tokens(path) == len(path) and replay.is_accepting():
            return True
        _, closed = self._closer.path(trial, room)
        return closed

    def _within_budget(self, values: np.ndarray, left: int) -> np.ndarray:
        """``values`` (the scores, already masked by the grammar) with the budget rule applied."""
        path, closed = self._completion(left)
        if not closed and len(path) < left:
            return values  # no completion found within the walk (a pattern that runs on): no rule
        count = min(_CHECKED_CANDIDATES, values.size)
        best = np.argpartition(-values, count - 1)[:count]
        top = [int(t) for t in best[np.argsort(-values[best], kind="stable")] if values[t] != -np.inf]
        if not closed or len(path) >= left:
            return self._tight(values, top, path, closed, left)
        checked = [path[0]] if path else list(self.eos_ids)  # complete now (free text under "auto"): may end
        rejected: list[int] = []
        for token in top:
            (checked if self._fits(token, path, left - 1) else rejected).append(token)
        if left - len(path) <= _GUARD_WINDOW:
            return self._only(values, checked, count=False)
        if rejected:
            values = values.copy()
            values[rejected] = -np.inf
        return values

    def _tight(self, values: np.ndarray, top: list[int], path: list[int], closed: bool, left: int) -> np.ndarray:
        """No slack: the completion needs every token left, or more. Allowed: the model's candidates that
        still end in time, with the completion's next token; when none does (the walk's completion is
        longer than the budget: its tokens are not always the fewest), the one that ends soonest."""
        fitting = [path[0]] if closed else []
        best, best_cost = path[0], (len(path) if closed else _CLOSING_WALK + 1)
        over = not closed or len(path) > left
        for token in top:
            if token == path[0] or token in self.eos_ids:
                continue
            if not over:
                if self._fits(token, path, left - 1):
                    fitting.append(token)
                continue
            cost = self._cost_after(token, min(_CLOSING_WALK, best_cost))
            if cost is not None and 1 + cost <= left:
                fitting.append(token)
            if cost is not None and 1 + cost < best_cost:
                best, best_cost = token, 1 + cost
        return self._only(values, fitting if fitting else [best])

    def _cost_after(self, token: int, limit: int) -> Optional[int]:
        """Tokens the walk needs to end the grammar after ``token`` (None: more than ``limit``)."""
        assert self._closer is not None
        trial = self._matcher.deep_copy()
        if not trial.consume_token(token):
            return None
        path, closed = self._closer.path(trial, limit)
        return len(path) if closed else None

    def _only(self, values: np.ndarray, tokens: list[int], count: bool = True) -> np.ndarray:
        """``values`` with every token but ``tokens`` at -inf (a forced token keeps a finite score)."""
        if count:
            self.forced_steps += 1
        out = np.full_like(values, -np.inf)
        kept = values[tokens]
        out[tokens] = np.where(np.isfinite(kept), kept, 0.0)
        return out
