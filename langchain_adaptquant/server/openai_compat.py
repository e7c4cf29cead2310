"""OpenAI chat-completion bodies <-> LangChain messages, so any OpenAI client can talk to ChatAdaptQuant.

Only the translation lives here; the endpoint (limits, queue, streaming transport) is in ``app``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Mapping, Optional, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.server.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    SystemMessageIn,
    ToolMessageIn,
    UserMessageIn,
)

#: ChatAdaptQuant finish reasons that OpenAI clients do not know, mapped to the closest one they do.
_FINISH_REASONS = {"timeout": "length", "cancelled": "stop"}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def to_langchain(messages: Sequence[ChatMessageIn]) -> list[BaseMessage]:
    """OpenAI messages to LangChain ones; tool-call arguments must be JSON objects."""
    converted: list[BaseMessage] = []
    for index, message in enumerate(messages):
        text = message.text()
        if isinstance(message, SystemMessageIn):
            converted.append(SystemMessage(text))
        elif isinstance(message, UserMessageIn):
            converted.append(HumanMessage(text))
        elif isinstance(message, ToolMessageIn):
            converted.append(ToolMessage(text, tool_call_id=message.tool_call_id, name=message.name))
        else:
            calls = []
            for call in message.tool_calls or []:
                try:
                    args = json.loads(call.function.arguments or "{}")
                except json.JSONDecodeError as error:
                    raise InvalidValueError(
                        f"messages.{index}.tool_calls arguments", call.function.arguments, f"a JSON object ({error})"
                    ) from None
                if not isinstance(args, dict):
                    raise InvalidValueError(f"messages.{index}.tool_calls arguments", call.function.arguments, "a JSON object")
                calls.append({"name": call.function.name, "args": args, "id": call.id, "type": "tool_call"})
            converted.append(AIMessage(content=text, tool_calls=calls))
    return converted


def prompt_chars(request: ChatCompletionRequest) -> int:
    """Characters the client sent as conversation: message text plus tool-call arguments."""
    total = 0
    for message in request.messages:
        total += len(message.text())
        for call in message.tool_calls or []:
            total += len(call.function.arguments)
    return total


def generation_kwargs(request: ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    """Per-call options ChatAdaptQuant understands (``tools`` are bound separately)."""
    kwargs: dict[str, Any] = {"max_tokens": max_tokens}
    if request.temperature is not None:
        kwargs["temperature"] = request.temperature
    if request.top_p is not None:
        kwargs["top_p"] = request.top_p
    if request.stop:
        kwargs["stop"] = list(request.stop)
    if request.task_priority is not None:
        kwargs["task_priority"] = request.task_priority
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_object":
        kwargs["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        kwargs["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}} if schema else {"type": "json_object"}
    return kwargs


def tool_choice(request: ChatCompletionRequest) -> Any:
    choice = request.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.function.name}}


def finish_reason(raw: Optional[str]) -> str:
    return _FINISH_REASONS.get(raw or "stop", raw or "stop")


def tool_calls_out(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """LangChain tool calls -> OpenAI ``tool_calls`` (arguments as a JSON string)."""
    return [
        {
            "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False)},
        }
        for call in calls
    ]


def usage_out(usage: Optional[Mapping[str, Any]]) -> dict[str, int]:
    usage = usage or {}
    prompt, completion = int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension(meta: dict[str, Any]) -> dict[str, Any]:
    """What the adaptive model did for this answer, under the ``adaptquant`` key of the response."""
    memory = meta.get("memory") or {}
    return {
        "quantization_level": meta.get("quantization_level"),
        "precision": meta.get("precision"),
        "backend": meta.get("backend"),
        "decision_reason": meta.get("decision_reason"),
        "switches": meta.get("switches") or [],
        "generation_seconds": meta.get("generation_seconds"),
        "finish_reason": meta.get("finish_reason"),
        "switched_during_generation": bool(meta.get("switched_during_generation")),
        "levels_used": list(meta.get("levels_used") or []),  # the levels this answer's tokens came from
        "memory_used_percent": memory.get("used_percent"),
        "model_size_mb": meta.get("model_size_mb"),
    }


def fingerprint(meta: dict[str, Any]) -> Optional[str]:
    level = meta.get("quantization_level")
    return f"adaptquant-{level}" if level else None


def completion(message: AIMessage, model_id: str) -> dict[str, Any]:
    """A ``chat.completion`` body from the chat model's answer."""
    meta = dict(message.response_metadata or {})
    calls = tool_calls_out(message.tool_calls) if message.tool_calls else None
    content = message.content if isinstance(message.content, str) else str(message.content)
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content if (content or not calls) else None, "tool_calls": calls},
            "finish_reason": finish_reason(meta.get("finish_reason")),
            "logprobs": None,
        }],
        "usage": usage_out(message.usage_metadata),
        "system_fingerprint": fingerprint(meta),
        "adaptquant": extension(meta),
    }


class ChunkWriter:
    """Builds the ``data: {...}`` lines of one streamed completion (same id and timestamp throughout)."""

    def __init__(self, model_id: str, include_usage: bool) -> None:
        self.id = completion_id()
        self.created = int(time.time())
        self.model_id = model_id
        self.include_usage = include_usage

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id,
            "choices": choices, **extra,
        }
        if self.include_usage and "usage" not in body:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    def delta(self, delta: dict[str, Any], finish: Optional[str] = None, **extra: Any) -> bytes:
        return self._event([{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra)

    def role(self) -> bytes:
        return self.delta({"role": "assistant", "content": ""})

    def content(self, text: str) -> bytes:
        return self.delta({"content": text})

    def tool_calls(self, calls: list[dict[str, Any]]) -> bytes:
        out = tool_calls_out(calls)
        return self.delta({"tool_calls": [{"index": i, **call} for i, call in enumerate(out)]})

    def finish(self, meta: dict[str, Any]) -> bytes:
        return self.delta({}, finish_reason(meta.get("finish_reason")), system_fingerprint=fingerprint(meta),
                          adaptquant=extension(meta))

    def usage(self, usage: Optional[dict[str, Any]]) -> bytes:
        return self._event([], usage=usage_out(usage))

    @staticmethod
    def error(message: str, kind: str = "server_error", code: int = 500) -> bytes:
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return f"data: {json.dumps(body)}\n\n".encode()

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"
