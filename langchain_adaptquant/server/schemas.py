"""Request and response bodies of the REST API (pydantic), so bad input is refused with the field named.

Monitoring bodies forbid unknown fields (a typo such as ``task_prority`` is an error, not a silent
default). The OpenAI-compatible chat body ignores fields it does not use, as OpenAI-compatible
servers do, but refuses the ones it cannot honour (``n`` > 1) instead of pretending.

The JSON Schema these models produce (served at /openapi.json) is the contract: messages are a
union by ``role``, numbers and booleans are strict JSON types (``"3"`` is not 3), and every bound
the server checks is stated, those of the app's settings filled in per app (``server/openapi.py``).
tests/integration/test_schema_fuzz.py holds the server to it with schemathesis.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import JsonDict

from langchain_adaptquant.control.levels import TaskPriority
from langchain_adaptquant.control.manager import QuantizationConfig

#: A tool name, matched whole (``fullmatch``: Python's ``$`` would let a trailing newline through).
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_NAME_PATTERN = f"^{TOOL_NAME.pattern}$"  # the same rule in the schema (ECMA regex)


def _priority(value: Any) -> Any:
    """Accept any case ("Balanced"); anything else fails with the allowed values in the message."""
    if value is None or isinstance(value, TaskPriority):
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be one of 'quality', 'balanced' or 'speed', not {type(value).__name__}")
    return TaskPriority.parse(value)


# -- monitoring ---------------------------------------------------------------------------------
class CalculateRequest(BaseModel):
    """``POST /api/v1/quantization/calculate``: which level would a model of this size get now?"""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_size_params: float = Field(gt=0, le=10_000, allow_inf_nan=False, strict=True,
                                     description="Parameters in billions.")
    task_priority: TaskPriority = Field(default=TaskPriority.BALANCED, description="quality, balanced or speed.")

    @field_validator("task_priority", mode="before")
    @classmethod
    def _check_priority(cls, value: Any) -> Any:
        return _priority(value)


class CalculateResponse(QuantizationConfig):
    """The manager's answer as it is: the body is defined once, by ``manager.QuantizationConfig``."""


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[int, str]] = None


class ErrorResponse(BaseModel):
    """Every error, OpenAI-style, so the ``openai`` client shows the message."""

    model_config = ConfigDict(extra="allow")

    error: ErrorBody


class ModelEntry(BaseModel):
    """One cached model in ``status``/``cache``: the documented name, size_mb and access_count, and more."""

    model_config = ConfigDict(extra="allow")

    name: str
    level: str
    precision: str
    size_mb: float
    access_count: int
    active_requests: int
    switches: int


class StatusResponse(BaseModel):
    """The documented status shape (device, active_requests, memory, recommended_level, current_models) and more."""

    model_config = ConfigDict(extra="allow")

    device: str
    active_requests: int
    memory: dict[str, Any]
    recommended_level: Optional[str]
    recommendation_reason: str
    current_models: list[ModelEntry]
    served_model: dict[str, Any]
    recent_switches: list[dict[str, Any]]
    telemetry: dict[str, Any]
    queue: dict[str, int]


class MemoryResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    memory: dict[str, Any]
    process: dict[str, float]
    models: list[dict[str, Any]]
    cached_total_mb: float


class CacheResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    models: list[ModelEntry]
    count: int
    total_size_mb: float
    cache_budget_gb: Optional[float]
    layer_cache: dict[str, Any] = {}


class ClearResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    evicted: list[str]
    kept_in_use: list[str]
    freed_rss_mb: float
    freed_anon_mb: float
    rss_mb: float


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    loaded: bool
    level: Optional[str]


# -- OpenAI-compatible chat ---------------------------------------------------------------------
#: Limits that depend on the app's settings are stated per app: ``openapi.fill_limits`` replaces
#: each ``x-limit`` marker with the real bound (``maxLength`` of a text, ``maximum`` of a count).
PROMPT_TEXT: JsonDict = {"x-limit": {"maxLength": "max_prompt_chars"}}
TOKEN_COUNT: JsonDict = {"x-limit": {"maximum": "max_tokens_limit"}}


def _integral(value: Any) -> Any:
    """JSON's ``2.0`` is the integer 2 (JSON Schema says so); anything else is left to strict validation."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: A count >= 1 as JSON Schema counts integers: 3 or 3.0, never "3" or true (the schema says ``integer``).
#: The bounds come before the validator, so that pydantic writes them into the schema.
Count = Annotated[int, Field(strict=True, ge=1), BeforeValidator(_integral)]
#: A number, never "0.5" or true.
JSONFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
#: true or false, never 1 or "yes".
JSONBool = Annotated[bool, Field(strict=True)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(json_schema_extra=PROMPT_TEXT)


Content = Union[str, list[TextPart]]


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(
        description="The arguments as a JSON object in a string, as OpenAI sends them (empty means {}); anything "
                    "else is refused (422).",
        json_schema_extra={"contentMediaType": "application/json", "contentSchema": {"type": "object"}, **PROMPT_TEXT},
    )


class ToolCallIn(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Optional[str] = None

    def text(self) -> str:
        content: Optional[Content] = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part.text for part in content)


class _NoToolCalls(_Message):
    tool_calls: None = Field(default=None, description="Only assistant messages carry tool_calls.")

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _no_calls(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("only assistant messages carry tool_calls")
        return value


class SystemMessageIn(_NoToolCalls):
    role: Literal["system"]
    content: Content = Field(json_schema_extra=PROMPT_TEXT)


class UserMessageIn(_NoToolCalls):
    role: Literal["user"]
    content: Content = Field(json_schema_extra=PROMPT_TEXT)


class AssistantMessageIn(_Message):
    role: Literal["assistant"]
    content: Optional[Content] = Field(default=None, json_schema_extra=PROMPT_TEXT)
    tool_calls: Optional[list[ToolCallIn]] = None


class ToolMessageIn(_NoToolCalls):
    role: Literal["tool"]
    content: Optional[Content] = Field(default=None, json_schema_extra=PROMPT_TEXT)
    tool_call_id: str = Field(min_length=1, description="The id of the assistant's tool call this answers.")


#: One message of the conversation, by ``role`` (the roles a chat template knows); a ``tool``
#: message needs ``tool_call_id``, system and user messages need ``content``.
ChatMessageIn = Annotated[
    Union[SystemMessageIn, UserMessageIn, AssistantMessageIn, ToolMessageIn], Field(discriminator="role")
]


class FunctionDef(BaseModel):
    name: str = Field(json_schema_extra={"pattern": TOOL_NAME_PATTERN})
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[JSONBool] = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOOL_NAME.fullmatch(value):
            raise ValueError(f"tool names are 1-64 letters, digits, '_' or '-', not {value!r}")
        return value


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str = Field(json_schema_extra={"pattern": TOOL_NAME_PATTERN},
                      description="The name of one of the request's tools.")


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: JSONBool = False


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``: only ``schema`` steers the answer; ``name`` and the rest are accepted."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


MAX_STOPS = 16


def _bound_arrays(schema: dict[str, Any], max_items: int) -> None:
    """``maxItems`` on the list branch of an ``anyOf`` (``stop``: a string or a list of them)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "array":
            branch["maxItems"] = max_items


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's body; ``task_priority`` is this server's extension.

    Fields this server does not use are ignored; ``n`` > 1 is refused instead of pretended.
    """

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model: str = Field(description="A model id from GET /v1/models; any other name answers 404.")
    messages: list[ChatMessageIn] = Field(
        min_length=1,
        description="The conversation. Its text (contents plus tool-call arguments) may hold at most the server's "
                    "max_prompt_chars characters in all (422 beyond).",
    )
    max_tokens: Optional[Count] = Field(default=None, json_schema_extra=TOKEN_COUNT)
    max_completion_tokens: Optional[Count] = Field(default=None, json_schema_extra=TOKEN_COUNT)
    temperature: Optional[Annotated[JSONFloat, Field(ge=0, le=2)]] = None
    top_p: Optional[Annotated[JSONFloat, Field(gt=0, le=1)]] = None
    stop: Optional[Union[str, list[str]]] = Field(
        default=None, description=f"A stop string or up to {MAX_STOPS} of them.",
        json_schema_extra=lambda schema: _bound_arrays(schema, MAX_STOPS),
    )
    stream: JSONBool = False
    stream_options: Optional[StreamOptions] = None
    tools: Optional[list[ToolDef]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(
        default=None, description="A named tool_choice must name one of tools (422 otherwise)."
    )
    response_format: Optional[ResponseFormat] = None
    n: Annotated[int, Field(strict=True, ge=1, le=1), BeforeValidator(_integral)] = Field(
        default=1, description="Only one choice per request is supported."
    )
    task_priority: Optional[TaskPriority] = Field(
        default=None, description="Extension: quality, balanced or speed (how readily precision is given up)."
    )

    @field_validator("task_priority", mode="before")
    @classmethod
    def _check_priority(cls, value: Any) -> Any:
        return _priority(value)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, not {len(stops)}")
        return [s for s in stops if s]

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value: Any, info: ValidationInfo) -> Any:
        """A named choice must be one of ``tools`` (validated before it; skipped when they were invalid)."""
        if isinstance(value, NamedToolChoice) and "tools" in info.data:
            names = {tool.function.name for tool in info.data["tools"] or []}
            if value.function.name not in names:
                raise ValueError(f"tool_choice names {value.function.name!r}, which is not in tools ({sorted(names)})")
        return value

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adaptquant"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str]
    tool_calls: Optional[list[ToolCallOut]] = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """OpenAI's ``chat.completion``; ``adaptquant`` carries level, backend, reason and switches."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: Optional[str] = None
    adaptquant: dict[str, Any]
