"""Request and response bodies of the REST API (pydantic), so bad input is refused with the field named.

Monitoring bodies forbid unknown fields (a typo such as ``task_prority`` is an error, not a silent
default). The OpenAI-compatible chat body ignores fields it does not use, as OpenAI-compatible
servers do, but refuses the ones it cannot honour (``n`` > 1) instead of pretending.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from langchain_adaptquant.control.levels import TaskPriority
from langchain_adaptquant.control.manager import QuantizationConfig

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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

    model_size_params: float = Field(gt=0, le=10_000, allow_inf_nan=False, description="Parameters in billions.")
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
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON object in a string, as OpenAI sends them.")


class ToolCallIn(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessageIn(BaseModel):
    """One message of the conversation; roles are those a chat template knows."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None

    @model_validator(mode="after")
    def _consistent(self) -> "ChatMessageIn":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a message with role 'tool' needs tool_call_id")
        if self.role in ("system", "user") and self.content is None:
            raise ValueError(f"a message with role {self.role!r} needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionDef(BaseModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TOOL_NAME.match(value):
            raise ValueError("tool names are 1-64 letters, digits, '_' or '-'")
        return value


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``: OpenAI's body; ``task_priority`` is this server's extension."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    tools: Optional[list[ToolDef]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    response_format: Optional[ResponseFormat] = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is supported.")
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
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        return [s for s in stops if s]

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> "ChatCompletionRequest":
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {tool.function.name for tool in self.tools or []}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools")
        return self

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
