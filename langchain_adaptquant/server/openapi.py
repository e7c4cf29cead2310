"""The app's OpenAPI document, made to say exactly what this instance accepts and answers.

The request models state the fixed rules (roles, ranges, patterns). What depends on the app's
settings is filled in here, once per app: the largest ``max_tokens`` (``max_tokens_limit``), the
longest text (``max_prompt_chars``), the served model ids, the bearer token on protected paths
(401), and the guard's 400/413, which it can answer on any path before the route runs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from fastapi import FastAPI

from langchain_adaptquant.server.context import ServerContext

ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
BEARER = "bearerAuth"

#: JSON Schema keyword -> the types it bounds (an ``x-limit`` on an ``anyOf`` lands on that branch).
_KEYWORD_TYPES = {"maxLength": ("string",), "maximum": ("integer", "number")}


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


def _apply_limit(node: dict[str, Any], keyword: str, value: int) -> None:
    branches = [node] if node.get("type") in _KEYWORD_TYPES[keyword] else node.get("anyOf", [])
    for branch in branches:
        if branch.get("type") in _KEYWORD_TYPES[keyword]:
            branch[keyword] = value


def fill_limits(schema: dict[str, Any], limits: Any) -> None:
    """Replace every ``x-limit`` marker (``{"maxLength": "max_prompt_chars"}``) with the app's value."""
    for node in list(_nodes(schema)):
        marker = node.pop("x-limit", None)
        for keyword, setting in (marker or {}).items():
            _apply_limit(node, keyword, int(getattr(limits, setting)))


def _operations(schema: dict[str, Any], paths: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    wanted = None if paths is None else set(paths)
    for path, item in schema.get("paths", {}).items():
        if wanted is not None and path not in wanted:
            continue
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                yield operation


def describe_app(schema: dict[str, Any], ctx: ServerContext, protected: Iterable[str]) -> None:
    """Fill in what depends on ``ctx``: the limits, the model ids, the token and the guard's answers."""
    limits = ctx.limits
    fill_limits(schema, limits)
    components = schema.setdefault("components", {})
    request = components.get("schemas", {}).get("ChatCompletionRequest")
    if request is not None:
        properties = request["properties"]
        ids = [model.id for model in ctx.served()]
        properties["model"]["examples"] = ids
        properties["model"]["description"] = f"A model id from GET /v1/models ({', '.join(ids)}); any other name answers 404."
        properties["messages"]["description"] = (
            f"The conversation. Its text (contents plus tool-call arguments) may hold at most {limits.max_prompt_chars} "
            "characters in all (max_prompt_chars; 422 beyond)."
        )
        for name in ("max_tokens", "max_completion_tokens"):
            properties[name]["description"] = (
                f"At most {limits.max_tokens_limit} (max_tokens_limit); default {limits.default_max_tokens}."
            )
    for operation in _operations(schema):
        responses = operation.setdefault("responses", {})
        responses.setdefault("400", {"description": "invalid Content-Length header", "content": ERROR_BODY})
        responses.setdefault("413", {
            "description": f"the body is larger than {limits.max_body_bytes} bytes (max_body_bytes)",
            "content": ERROR_BODY,
        })
    if ctx.token_required:
        components.setdefault("securitySchemes", {})[BEARER] = {"type": "http", "scheme": "bearer"}
        for operation in _operations(schema, protected):
            operation["security"] = [{BEARER: []}]
            operation.setdefault("responses", {})["401"] = {
                "description": "the bearer token is missing or wrong", "content": ERROR_BODY,
            }


def install(app: FastAPI, ctx: ServerContext, protected: Iterable[str]) -> None:
    """Make ``app.openapi()`` (and /openapi.json, /docs) return the document for this instance."""
    build: Callable[[], dict[str, Any]] = app.openapi
    paths = tuple(protected)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # FastAPI's document, cached on the app; completed once, in place
            describe_app(schema, ctx, paths)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
