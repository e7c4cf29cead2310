"""ChatAdaptQuant against a remote adaptquant endpoint: ``adaptquant serve``, or Ray Serve's proxy.

The endpoint speaks OpenAI's chat-completions protocol and adds an ``adaptquant`` object to each
answer (level, backend, decision reason, switches...). This module turns requests into that protocol
and answers back into the AIMessages a local ChatAdaptQuant returns, with the same
``response_metadata`` keys wherever the server sent them, so code written against the local model
keeps working when the model moves to another machine. httpx does the HTTP (a dependency of
langchain-core already; declared by this package because this module imports it).
"""

from __future__ import annotations

import json
import threading
from typing import Any, AsyncIterator, Iterator, Mapping, Optional, cast
from urllib.parse import urlparse

import httpx
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_openai_messages
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers.openai_tools import make_invalid_tool_call, parse_tool_call
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from langchain_adaptquant.control.levels import TaskPriority
from langchain_adaptquant.errors import AdaptQuantError, InvalidValueError

#: Seconds an HTTP call may wait for the server when the chat model sets no ``timeout``.
DEFAULT_TIMEOUT_S = 300.0
#: Per-call options a remote endpoint understands; anything else is refused rather than dropped.
CALL_OPTIONS = ("model", "max_tokens", "temperature", "top_p", "stop", "task_priority", "tools", "tool_choice",
                "response_format")
#: Fields that configure a local model; with ``base_url`` they would silently do nothing.
LOCAL_ONLY_FIELDS = ("loader", "manager", "memory_budget_gb", "prepare_levels", "force_quantization")
#: Response headers the Ray Serve deployment adds (see ``serve_ray.routes``).
REPLICA_HEADERS = {"x-adaptquant-replica": "id", "x-adaptquant-replica-rank": "rank", "x-adaptquant-node": "node"}


class RemoteEndpointError(AdaptQuantError):
    """The endpoint could not be reached, or answered with an error (``status_code``, its message)."""

    def __init__(self, message: str, status_code: Optional[int] = None, kind: Optional[str] = None) -> None:
        self.status_code = status_code
        self.kind = kind
        super().__init__(message)


def normalize_base_url(url: Any) -> str:
    """``http(s)://host:port[/prefix]`` with ``/v1`` at the end (added when missing), no trailing slash."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidValueError("base_url", url, "an http(s) URL of an adaptquant endpoint, e.g. http://127.0.0.1:8000/v1")
    parsed = urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InvalidValueError("base_url", url, "an http(s) URL of an adaptquant endpoint, e.g. http://127.0.0.1:8000/v1")
    base = url.strip().rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def check_fields(llm: Any) -> None:
    """Refuse local-model settings next to ``base_url``: the remote endpoint's policy decides."""
    normalize_base_url(llm.base_url)
    for name in LOCAL_ONLY_FIELDS:
        value = getattr(llm, name)
        if value is not None:
            raise InvalidValueError(name, value if name not in ("loader", "manager") else type(value).__name__,
                                    "None with base_url: the remote endpoint picks and switches the level")
    if llm.model_kwargs:
        raise InvalidValueError("model_kwargs", llm.model_kwargs, "empty with base_url (the endpoint sets generation)")


def tool_choice_out(choice: Any) -> Any:
    """ChatAdaptQuant's tool_choice (a name, 'any', True, a dict) -> OpenAI's."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if choice in ("any", True):
        return "required"
    if isinstance(choice, str):
        return {"type": "function", "function": {"name": choice}}
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") or choice.get("name")
        return {"type": "function", "function": {"name": name}}
    raise InvalidValueError("tool_choice", choice, "a tool name, 'auto', 'none', 'any', 'required', True or a dict")


def request_body(llm: Any, model: str, messages: list[BaseMessage], stop: Optional[list[str]],
                 kwargs: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    """The chat-completions body for this call; unknown options are an error naming them."""
    unknown = sorted(set(kwargs) - set(CALL_OPTIONS))
    if unknown:
        raise InvalidValueError("option for a remote endpoint", unknown, f"one of {list(CALL_OPTIONS)}")
    max_tokens = kwargs.get("max_tokens", llm.max_tokens)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise InvalidValueError("max_tokens", max_tokens, "an integer greater than 0")
    body: dict[str, Any] = {"model": model, "messages": convert_to_openai_messages(messages), "max_tokens": max_tokens}
    temperature = kwargs.get("temperature", llm.temperature)
    if temperature is not None:
        body["temperature"] = temperature
    top_p = kwargs.get("top_p", llm.top_p)
    if top_p is not None:
        body["top_p"] = top_p
    stops = list(llm.stop or []) + list(stop or []) + list(kwargs.get("stop") or [])
    if stops:
        body["stop"] = stops
    body["task_priority"] = TaskPriority.parse(kwargs.get("task_priority", llm.task_priority)).value
    if kwargs.get("tools"):
        body["tools"] = kwargs["tools"]
        choice = tool_choice_out(kwargs.get("tool_choice"))
        if choice is not None:
            body["tool_choice"] = choice
    if kwargs.get("response_format"):
        body["response_format"] = kwargs["response_format"]
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def response_metadata(extension: Optional[Mapping[str, Any]], model: str, finish_reason: Optional[str],
                      headers: Mapping[str, str], fingerprint: Optional[str] = None) -> dict[str, Any]:
    """The local model's ``response_metadata`` keys, filled from the server's ``adaptquant`` object."""
    ext = dict(extension or {})
    meta: dict[str, Any] = {"model_name": model, "model_provider": "adaptquant"}
    for key in ("quantization_level", "precision", "backend", "decision_reason", "switches", "generation_seconds",
                "switched_during_generation", "model_size_mb"):
        if ext.get(key) is not None:
            meta[key] = ext[key]
    if ext.get("memory_used_percent") is not None:
        meta["memory"] = {"used_percent": ext["memory_used_percent"]}
    meta["finish_reason"] = ext.get("finish_reason") or finish_reason or "stop"
    if fingerprint:
        meta["system_fingerprint"] = fingerprint
    replica = {name: headers[header] for header, name in REPLICA_HEADERS.items() if header in headers}
    if replica:
        meta["replica"] = replica
    return meta


def usage(data: Optional[Mapping[str, Any]]) -> Optional[UsageMetadata]:
    if not data:
        return None
    prompt, completion = int(data.get("prompt_tokens") or 0), int(data.get("completion_tokens") or 0)
    return UsageMetadata(input_tokens=prompt, output_tokens=completion, total_tokens=prompt + completion)


def _tool_calls(raw: Optional[list[dict[str, Any]]]) -> tuple[list[Any], list[Any]]:
    calls, invalid = [], []
    for item in raw or []:
        try:
            calls.append(parse_tool_call(item, return_id=True))
        except Exception as error:  # noqa: BLE001 - a malformed call is reported, not raised
            invalid.append(make_invalid_tool_call(item, str(error)))
    return calls, invalid


def message_from_completion(body: Mapping[str, Any], headers: Mapping[str, str]) -> AIMessage:
    """A ``chat.completion`` body -> the AIMessage a local ChatAdaptQuant would have returned."""
    choice = body["choices"][0]
    message = choice.get("message") or {}
    calls, invalid = _tool_calls(message.get("tool_calls"))
    return AIMessage(
        content=message.get("content") or "",
        tool_calls=calls,
        invalid_tool_calls=invalid,
        usage_metadata=usage(body.get("usage")),
        response_metadata=response_metadata(body.get("adaptquant"), body.get("model", ""), choice.get("finish_reason"),
                                            headers, body.get("system_fingerprint")),
        id=body.get("id"),
    )


def _result(message: AIMessage) -> ChatResult:
    finish = message.response_metadata["finish_reason"]
    return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": finish})])


def _merged(merged: Optional[ChatGenerationChunk]) -> ChatResult:
    """A streamed answer as one result (``streaming=True`` on invoke)."""
    if merged is None:
        raise RemoteEndpointError("the endpoint streamed nothing")
    message = cast(AIMessageChunk, merged.message)
    return _result(AIMessage(content=message.content, usage_metadata=message.usage_metadata,
                             response_metadata=message.response_metadata, tool_calls=message.tool_calls))


def _error_from(response: httpx.Response, base_url: str) -> RemoteEndpointError:
    try:
        error = response.json().get("error") or {}
        message, kind = error.get("message") or response.text, error.get("type")
    except (ValueError, AttributeError):
        message, kind = response.text[:500], None
    return RemoteEndpointError(f"{base_url} answered {response.status_code}: {message}", response.status_code, kind)


class _StreamState:
    """Folds SSE events into chunks: text as it comes, the final chunk with metadata and usage."""

    def __init__(self, base_url: str, headers: Mapping[str, str]) -> None:
        self.base_url = base_url
        self.headers = headers
        self.model = ""
        self.finish: Optional[str] = None
        self.extension: Optional[dict[str, Any]] = None
        self.fingerprint: Optional[str] = None
        self.usage: Optional[dict[str, Any]] = None
        self.calls: list[dict[str, Any]] = []
        self.done = False

    def feed(self, line: str) -> Optional[ChatGenerationChunk]:
        """One SSE line; returns a text chunk when it carried text."""
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "error" in event:
            error = event["error"] or {}
            raise RemoteEndpointError(f"{self.base_url} failed mid-stream: {error.get('message')}", error.get("code"),
                                      error.get("type"))
        self.model = event.get("model") or self.model
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            self.calls += delta.get("tool_calls") or []
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                self.extension = event.get("adaptquant")
                self.fingerprint = event.get("system_fingerprint")
            if delta.get("content"):
                return ChatGenerationChunk(message=AIMessageChunk(content=delta["content"]))
        return None

    def final(self) -> ChatGenerationChunk:
        if not self.done and self.finish is None:
            raise RemoteEndpointError(f"{self.base_url} closed the stream before it finished")
        calls, invalid = _tool_calls(self.calls)
        message = AIMessageChunk(
            content="",
            tool_call_chunks=[tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
                              for i, c in enumerate(calls)],
            usage_metadata=usage(self.usage),
            response_metadata=response_metadata(self.extension, self.model, self.finish, self.headers, self.fingerprint),
            chunk_position="last",
        )
        if invalid:
            message.invalid_tool_calls = invalid
        finish = message.response_metadata["finish_reason"]
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": finish})


class RemoteChat:
    """The HTTP side of a ChatAdaptQuant with ``base_url``; one per chat model (a pooled sync client)."""

    def __init__(self, base_url: str, api_key: Optional[str], timeout_s: Optional[float]) -> None:
        self.base_url = normalize_base_url(base_url)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout_s or DEFAULT_TIMEOUT_S, connect=10.0)
        self._client: Optional[httpx.Client] = None
        self._lock = threading.Lock()
        self._default_model: Optional[str] = None

    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=self.timeout)
            return self._client

    def _async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=self.timeout)

    def _unreachable(self, error: Exception) -> RemoteEndpointError:
        return RemoteEndpointError(f"cannot reach the adaptquant endpoint {self.base_url}: {type(error).__name__}: {error}")

    # -- which model ------------------------------------------------------------------------------
    def _known_model(self, llm: Any, kwargs: Mapping[str, Any]) -> Optional[str]:
        """The per-call model, the one set on the chat model, or the endpoint's first one once fetched."""
        if isinstance(kwargs.get("model"), str):
            return kwargs["model"]
        if "model" in llm.model_fields_set:
            return llm.model
        return self._default_model

    def _first_served(self, response: httpx.Response) -> str:
        if response.status_code >= 400:
            raise _error_from(response, self.base_url)
        served = response.json().get("data") or []
        if not served:
            raise RemoteEndpointError(f"{self.base_url} serves no model")
        self._default_model = served[0]["id"]
        return self._default_model

    def model_for(self, llm: Any, kwargs: Mapping[str, Any]) -> str:
        known = self._known_model(llm, kwargs)
        if known is not None:
            return known
        try:
            return self._first_served(self.client().get("/models"))
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None

    async def amodel_for(self, llm: Any, kwargs: Mapping[str, Any]) -> str:
        known = self._known_model(llm, kwargs)
        if known is not None:
            return known
        try:
            async with self._async_client() as client:
                return self._first_served(await client.get("/models"))
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None

    # -- sync -------------------------------------------------------------------------------------
    def generate(self, llm: Any, messages: list[BaseMessage], stop: Optional[list[str]], run_manager: Any,
                 kwargs: Mapping[str, Any]) -> ChatResult:
        if llm.streaming and not kwargs.get("tools"):
            merged: Optional[ChatGenerationChunk] = None
            for chunk in self.stream(llm, messages, stop, run_manager, kwargs):
                merged = chunk if merged is None else merged + chunk
            return _merged(merged)
        body = request_body(llm, self.model_for(llm, kwargs), messages, stop, kwargs, stream=False)
        try:
            response = self.client().post("/chat/completions", json=body)
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None
        if response.status_code >= 400:
            raise _error_from(response, self.base_url)
        return _result(message_from_completion(response.json(), response.headers))

    def stream(self, llm: Any, messages: list[BaseMessage], stop: Optional[list[str]], run_manager: Any,
               kwargs: Mapping[str, Any]) -> Iterator[ChatGenerationChunk]:
        body = request_body(llm, self.model_for(llm, kwargs), messages, stop, kwargs, stream=True)
        try:
            with self.client().stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_from(response, self.base_url)
                state = _StreamState(self.base_url, response.headers)
                for line in response.iter_lines():
                    chunk = state.feed(line)
                    if chunk is not None:
                        if run_manager:
                            run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                        yield chunk
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None
        yield state.final()

    # -- async ------------------------------------------------------------------------------------
    async def agenerate(self, llm: Any, messages: list[BaseMessage], stop: Optional[list[str]], run_manager: Any,
                        kwargs: Mapping[str, Any]) -> ChatResult:
        if llm.streaming and not kwargs.get("tools"):
            merged: Optional[ChatGenerationChunk] = None
            async for chunk in self.astream(llm, messages, stop, run_manager, kwargs):
                merged = chunk if merged is None else merged + chunk
            return _merged(merged)
        model = await self.amodel_for(llm, kwargs)
        body = request_body(llm, model, messages, stop, kwargs, stream=False)
        try:
            async with self._async_client() as client:
                response = await client.post("/chat/completions", json=body)
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None
        if response.status_code >= 400:
            raise _error_from(response, self.base_url)
        return _result(message_from_completion(response.json(), response.headers))

    async def astream(self, llm: Any, messages: list[BaseMessage], stop: Optional[list[str]], run_manager: Any,
                      kwargs: Mapping[str, Any]) -> AsyncIterator[ChatGenerationChunk]:
        model = await self.amodel_for(llm, kwargs)
        body = request_body(llm, model, messages, stop, kwargs, stream=True)
        try:
            async with self._async_client() as client:
                async with client.stream("POST", "/chat/completions", json=body) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise _error_from(response, self.base_url)
                    state = _StreamState(self.base_url, response.headers)
                    async for line in response.aiter_lines():
                        chunk = state.feed(line)
                        if chunk is not None:
                            if run_manager:
                                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                            yield chunk
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None
        yield state.final()
