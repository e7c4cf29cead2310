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


def _location(loc: Any) -> str:
    parts = [str(part) for part in loc if part not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, Optional[str]]:
    """A sentence naming each bad field and the first field's name (for ``param``)."""
    sentences, first = [], None
    for error in errors:
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "not valid JSON")
            sentences.append(f"malformed JSON body: {detail}")
            first = first or "body"
            continue
        where = _location(error.get("loc", ()))
        first = first or where
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "missing":
            message = "field required"
        elif error.get("type") == "extra_forbidden":
            message = "unknown field (not allowed here)"
        sentences.append(f"{where}: {message}")
    return "; ".join(sentences) or "invalid request body", first


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the one JSON shape; nothing leaks a stack trace to the client."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error.status, error.message, error.kind, error.param, error.headers, **error.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation(list(error.errors()))
        return error_response(422, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
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
