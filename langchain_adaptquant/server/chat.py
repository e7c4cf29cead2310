"""OpenAI-compatible ``/v1/chat/completions`` and ``/v1/models`` over the app's ChatAdaptQuant.

Generation runs in the model's engine thread, which decodes all requests in flight as one batch;
``ainvoke``/``astream`` only wait on it, so the event loop keeps answering /status and streaming
other clients' tokens. A request is checked against the app's limits
before it takes a queue slot, and the slot is given back however the request ends (done, error,
client gone).
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from langchain_core.messages import AIMessage

from langchain_adaptquant.errors import AdaptQuantError, InvalidValueError
from langchain_adaptquant.runtime import EngineBusyError
from langchain_adaptquant.server import openai_compat
from langchain_adaptquant.server.context import Ctx, ServedModel, ServerContext
from langchain_adaptquant.server.errors import APIError
from langchain_adaptquant.server.schemas import ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelList

logger = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])


class _Slot:
    """A queue slot that is released exactly once."""

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._held = False

    def acquire(self) -> None:
        if not self._ctx.limiter.try_acquire():
            limit = self._ctx.limiter.limit
            raise APIError(503, f"server busy: {limit} chat request(s) already in flight (max_queue={limit}); "
                                "retry later", "server_busy", headers={"Retry-After": "1"})
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._ctx.limiter.release()


class _ClosingStream(StreamingResponse):
    """A streaming response that always closes its iterator and runs ``on_close``, even if the client left early."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._iterator = content
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._iterator.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()


def _check_limits(ctx: ServerContext, body: ChatCompletionRequest) -> int:
    limits = ctx.limits
    requested = body.requested_max_tokens()
    # both, though max_completion_tokens wins: a bound the schema states is never passed over in silence
    for field, value in (("max_tokens", body.max_tokens), ("max_completion_tokens", body.max_completion_tokens)):
        if value is not None and value > limits.max_tokens_limit:
            raise APIError(422, f"{field} is {value}; this server allows at most {limits.max_tokens_limit} "
                                "(max_tokens_limit)", param=field)
    chars = openai_compat.prompt_chars(body)
    if chars > limits.max_prompt_chars:
        raise APIError(422, f"messages hold {chars} characters; this server allows at most {limits.max_prompt_chars} "
                            "(max_prompt_chars)", param="messages")
    return requested or limits.default_max_tokens


def _runnable(served: ServedModel, body: ChatCompletionRequest) -> Any:
    if not body.tools:
        return served.llm
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    return served.llm.bind_tools(tools, tool_choice=openai_compat.tool_choice(body))


@router.get("/v1/models", response_model=ModelList)
def list_models(ctx: Ctx) -> dict[str, Any]:
    """The models this server serves (fixed when it started)."""
    return {"object": "list", "data": [
        {"id": model.id, "object": "model", "created": ctx.created, "owned_by": "adaptquant"} for model in ctx.served()
    ]}


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "a completion, or an SSE stream when stream=true"},
        404: {"model": ErrorResponse, "description": "the model is not served here"},
        409: {"model": ErrorResponse, "description": "the model does not fit in memory even at its smallest level"},
        422: {"model": ErrorResponse, "description": "the request is not valid (the message names the field and what "
                                                     "is allowed), or the prompt with its tools does not fit the "
                                                     "model's context"},
        503: {"model": ErrorResponse, "description": "max_queue chat requests are in flight; retry after Retry-After"},
    },
)
async def chat_completions(body: ChatCompletionRequest, ctx: Ctx) -> Any:
    """OpenAI chat completion on the adaptive model; ``task_priority`` (extension) steers the level choice."""
    served = ctx.resolve(body.model)
    max_tokens = _check_limits(ctx, body)
    messages = openai_compat.to_langchain(body.messages)
    kwargs = openai_compat.generation_kwargs(body, max_tokens)
    try:
        runnable = _runnable(served, body)
    except InvalidValueError as error:
        raise APIError(422, str(error), param="tools") from None
    config = {"callbacks": [ctx.handler], "run_name": "chat.completions"}
    slot = _Slot(ctx)
    slot.acquire()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = openai_compat.ChunkWriter(served.id, include_usage)
        stream = _sse(runnable.astream(messages, config=config, **kwargs), writer)
        return _ClosingStream(stream, slot.release, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        message: AIMessage = await runnable.ainvoke(messages, config=config, **kwargs)
    except EngineBusyError as error:  # the engine's own queue bound (behind max_queue, normally never hit)
        raise APIError(503, f"server busy: {error}", "server_busy", headers={"Retry-After": "1"}) from None
    finally:
        slot.release()
    return JSONResponse(openai_compat.completion(message, served.id))


async def _sse(chunks: AsyncIterator[Any], writer: openai_compat.ChunkWriter) -> AsyncIterator[bytes]:
    """Chat-model chunks -> SSE events; an error after the first byte becomes an ``error`` event."""
    yield writer.role()
    meta: dict[str, Any] = {}
    usage: Optional[dict[str, Any]] = None
    calls: list[dict[str, Any]] = []
    try:
        async for chunk in chunks:
            if chunk.content:
                yield writer.content(chunk.content if isinstance(chunk.content, str) else str(chunk.content))
            if chunk.response_metadata.get("finish_reason"):
                meta = dict(chunk.response_metadata)
                usage = dict(chunk.usage_metadata or {})
                calls = list(chunk.tool_calls or [])
    except EngineBusyError as error:
        yield writer.error(f"server busy: {error}", "server_busy", 503)
        return
    except (AdaptQuantError, ValueError) as error:
        yield writer.error(str(error), "invalid_request_error", 422)
        return
    except Exception as error:  # noqa: BLE001 - the status line is gone; the client learns it in-band
        logger.exception("stream failed")
        yield writer.error(f"generation failed: {type(error).__name__}: {error}")
        return
    finally:
        await _close(chunks)
    if calls:
        yield writer.tool_calls(calls)
    yield writer.finish(meta)
    if writer.include_usage:
        yield writer.usage(usage)
    yield writer.done()


async def _close(chunks: AsyncIterator[Any]) -> None:
    close: Optional[Callable[[], Awaitable[None]]] = getattr(chunks, "aclose", None)
    if close is not None:
        await close()
