"""One error shape for every endpoint: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

The ``openai`` client reads ``error.message`` from it; curl users get a sentence that names the bad
field and what is allowed, instead of FastAPI's bare ``detail`` list.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from langchain_adaptquant.errors import InsufficientMemoryError, InvalidValueError, ModelNotFoundError

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
          409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error", 503: "server_busy"}


#: FastAPI's detail when it cannot decode a JSON body at all (it is not UTF-8, say).
BODY_NOT_PARSED = "There was an error parsing the body"


class APIError(Exception):
    """An error an endpoint answers on purpose, with its status and the parameter at fault."""

    def __init__(self, status: int, message: str, kind: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or _TYPES.get(status, "server_error")
        self.param = param
        self.headers = headers
        self.extra = extra


def error_response(status: int, message: str, kind: Optional[str] = None, param: Optional[str] = None,
                   headers: Optional[dict[str, str]] = None, **extra: Any) -> JSONResponse:
    body = {"error": {"message": message, "type": kind or _TYPES.get(status, "server_error"), "param": param,
                      "code": status, **extra}}
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


_MISSING = object()


def _location(loc: Any, body: Any = _MISSING, missing: bool = False) -> str:
    """``messages.0.tool_call_id`` from pydantic's location, without the labels it adds for a union.

    A union member's errors carry its label (``messages.0.tool.tool_call_id``, ``stop.list[str]``),
    which the client never wrote: walking the body tells a label (no such key or index) from a field.
    """
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        if parts[0] != "body":
            body = _MISSING
        parts = parts[1:]
    node, kept = body, []
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        if node is _MISSING:
            kept.append(part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
            kept.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            kept.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and last and missing:
            kept.append(part)  # the field that is missing
        elif isinstance(part, str):
            continue  # a union label: the value is still the one at the previous part
        else:
            node = _MISSING
            kept.append(part)
    return ".".join(str(part) for part in kept) or "body"


def _choices(quoted: str) -> str:
    """``'a', 'b', 'c'`` (pydantic's list of tags) as ``'a', 'b' or 'c'``."""
    head, _, tail = quoted.rpartition(", ")
    return f"{head} or {tail}" if head else quoted


def describe_validation(errors: list[dict[str, Any]], body: Any = _MISSING) -> tuple[str, Optional[str]]:
    """A sentence naming each bad field and the first field's name (for ``param``)."""
    by_place: dict[str, list[str]] = {}
    first = None
    for error in errors:
        kind = error.get("type")
        if kind == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "not valid JSON")
            by_place.setdefault("", []).append(f"malformed JSON body: {detail}")
            first = first or "body"
            continue
        where = _location(error.get("loc", ()), body, missing=kind == "missing")
        message = str(error.get("msg", "invalid"))
        context = error.get("ctx") or {}
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            # a discriminated union (messages by role): name the tag field, the value and the choices
            where = f"{where}.{str(context.get('discriminator', '')).strip(chr(39))}"
            if kind == "union_tag_not_found":
                message = "field required"
            else:
                message = f"{context.get('tag')!r} is not allowed; it must be {_choices(str(context.get('expected_tags')))}"
        elif kind == "missing":
            message = "field required"
        elif kind == "extra_forbidden":
            message = "unknown field (not allowed here)"
        first = first or where
        if message not in by_place.setdefault(where, []):
            by_place[where].append(message)
    sentences = [("; ".join(messages) if not where else f"{where}: {', or '.join(messages)}")
                 for where, messages in by_place.items()]
    return "; ".join(sentences) or "invalid request body", first


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the one JSON shape; nothing leaks a stack trace to the client."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.param, error.headers, **error.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(list(error.errors()), error.body)
        return error_response(422, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 400 and message == BODY_NOT_PARSED:
            # FastAPI's answer to a body that is not text (not UTF-8): as malformed as bad JSON, so the same 422
            cause = error.__cause__
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else "not UTF-8 text"
            return error_response(422, f"malformed JSON body: {reason}", "invalid_request_error", "body")
        if error.status_code == 404 and message == "Not Found":
            message = "no such endpoint; see /docs for the API"
        return error_response(error.status_code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(InvalidValueError)
    async def _invalid(_: Request, error: InvalidValueError) -> JSONResponse:
        return error_response(422, str(error), "invalid_request_error", error.name)

    @app.exception_handler(InsufficientMemoryError)
    async def _memory(_: Request, error: InsufficientMemoryError) -> JSONResponse:
        return error_response(409, str(error), "insufficient_memory", None,
                              required_gb=round(error.required_gb, 3), available_gb=round(error.available_gb, 3),
                              headroom_gb=round(error.headroom_gb, 3), smallest_level=error.level)

    @app.exception_handler(ModelNotFoundError)
    async def _missing(_: Request, error: ModelNotFoundError) -> JSONResponse:
        return error_response(404, str(error), "model_not_found", "model")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(error).__name__}: {error}", "server_error")
