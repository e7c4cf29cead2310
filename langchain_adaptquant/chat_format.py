"""LangChain messages <-> a Hugging Face chat template, and tool calls out of generated text.

Tools reach the model through the template's ``tools`` variable when the template uses it (the
Hermes/Qwen convention); otherwise they are described in a system message in the same convention,
so a model fine-tuned on either sees what it expects. Tool calls come back as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, or as a bare JSON object.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Optional, Sequence

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call

from langchain_adaptquant.errors import InvalidValueError

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
ROLES = {"system", "user", "assistant", "tool"}


def _content_text(message: BaseMessage) -> str:
    """Text of a message; content blocks other than text are refused, not silently dropped."""
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # carried by tool_calls
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidValueError("message content block", kind, "text blocks (this model reads text only)")
    return "".join(parts)


def to_chat_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Convert LangChain messages to the dicts ``apply_chat_template`` takes."""
    if not messages:
        raise InvalidValueError("messages", list(messages), "at least one message")
    converted: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            converted.append({"role": "system", "content": _content_text(message)})
        elif isinstance(message, HumanMessage):
            converted.append({"role": "user", "content": _content_text(message)})
        elif isinstance(message, AIMessage):
            entry: dict[str, Any] = {"role": "assistant", "content": _content_text(message)}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {"type": "function", "id": call.get("id"), "function": {"name": call["name"], "arguments": call["args"]}}
                    for call in message.tool_calls
                ]
            converted.append(entry)
        elif isinstance(message, ToolMessage):
            converted.append(
                {"role": "tool", "content": _content_text(message), "tool_call_id": message.tool_call_id, "name": message.name}
            )
        elif isinstance(message, ChatMessage) and message.role in ROLES:
            converted.append({"role": message.role, "content": _content_text(message)})
        else:
            kind = f"{type(message).__name__}" + (f"(role={message.role!r})" if isinstance(message, ChatMessage) else "")
            raise InvalidValueError(
                "message type", kind, "SystemMessage, HumanMessage, AIMessage, ToolMessage or ChatMessage with role "
                "system/user/assistant/tool",
            )
    return converted


def template_renders_tools(chat_template: Optional[str]) -> bool:
    return chat_template is not None and "tools" in chat_template


def tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """Describe tools in a system prompt for templates that have no ``tools`` variable."""
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "You may call functions to help with the request. The functions are listed in <tools></tools>:\n"
        f"<tools>\n{signatures}\n</tools>\n"
        'To call one, answer with <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call>.'
    )


def tool_choice_instruction(tool_choice: Any, tools: Sequence[dict[str, Any]]) -> Optional[str]:
    """A sentence that tells the model which tool it must call; None when it may choose."""
    if tool_choice in (None, "auto", "none", False):
        return None
    names = [t["function"]["name"] for t in tools]
    if tool_choice in ("any", "required", True):
        return f"You must answer with a <tool_call> to one of: {', '.join(names)}."
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else tool_choice
    return f"You must answer with a <tool_call> to {name}."


def forced_tool_name(tool_choice: Any, tools: Sequence[dict[str, Any]]) -> Optional[str]:
    """The one tool the model must call, when ``tool_choice`` (or a single tool with 'any') names it."""
    if isinstance(tool_choice, dict):
        return tool_choice.get("function", {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str) and tool_choice not in ("auto", "none", "any", "required"):
        return tool_choice
    if tool_choice in ("any", "required", True) and len(tools) == 1:
        return tools[0]["function"]["name"]
    return None


def validate_tool_choice(tool_choice: Any, tools: Sequence[dict[str, Any]]) -> None:
    names = {t["function"]["name"] for t in tools}
    name = forced_tool_name(tool_choice, tools)
    if name is not None and name not in names:
        raise InvalidValueError("tool_choice", tool_choice, f"'auto', 'none', 'any', 'required' or one of {sorted(names)}")
    if tool_choice is not None and not isinstance(tool_choice, (str, dict, bool)):
        raise InvalidValueError("tool_choice", tool_choice, "a string, a dict or a bool")


def _call_from_json(payload: Any) -> Optional[tuple[str, dict[str, Any]]]:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return None
    args = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError(f"arguments must be a JSON object, got {type(args).__name__}")
    return payload["name"], args


def parse_tool_calls(text: str, tool_names: Optional[set[str]] = None) -> tuple[str, list, list]:
    """Split generated text into (content, tool_calls, invalid_tool_calls)."""
    calls, invalid = [], []
    blocks = TOOL_CALL_RE.findall(text)
    if blocks:
        content = TOOL_CALL_RE.sub("", text).strip()
        candidates = blocks
    else:
        stripped = text.strip()
        if not (stripped.startswith("{") and stripped.endswith("}")):
            return text, [], []
        content, candidates = "", [stripped]
    for raw in candidates:
        call_id = f"call_{uuid.uuid4().hex[:12]}"
        try:
            parsed = _call_from_json(json.loads(raw))
        except (ValueError, TypeError) as error:
            invalid.append(invalid_tool_call(name=None, args=raw, id=call_id, error=f"not valid tool-call JSON: {error}"))
            continue
        if parsed is None or (tool_names is not None and parsed[0] not in tool_names):
            if not blocks:
                return text, [], []  # a bare JSON answer that is not a tool call is plain content
            invalid.append(invalid_tool_call(name=parsed[0] if parsed else None, args=raw, id=call_id, error="unknown tool"))
            continue
        calls.append(tool_call(name=parsed[0], args=parsed[1], id=call_id))
    return content, calls, invalid
