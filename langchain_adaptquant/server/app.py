"""``create_app``: the FastAPI app that serves one adaptive model and shows what it is doing.

Endpoints (OpenAPI at /docs and /openapi.json):

* ``GET /api/v1/quantization/status|memory|cache|telemetry``, ``POST .../calculate``, ``POST .../cache/clear``
* ``POST /v1/chat/completions`` (OpenAI-compatible, SSE streaming) and ``GET /v1/models``
* ``GET /healthz``, ``GET /metrics`` (Prometheus), ``GET /dashboard`` (live page, no external assets)

With a token, chat and cache/clear need ``Authorization: Bearer <token>``; read-only monitoring stays open.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse

from langchain_adaptquant.callbacks import TelemetryRecorder
from langchain_adaptquant.control.manager import DynamicQuantizationManager
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader
from langchain_adaptquant.server import chat, monitoring, openapi
from langchain_adaptquant.server.context import Allowlist, build_context
from langchain_adaptquant.server.errors import install_error_handlers
from langchain_adaptquant.server.security import GuardMiddleware

logger = logging.getLogger(__name__)

#: Paths that change state or spend compute: they need the token when one is configured.
PROTECTED_PATHS = ("/v1/chat/completions", "/api/v1/quantization/cache/clear")


def dashboard_html() -> str:
    return resources.files("langchain_adaptquant.server").joinpath("static/dashboard.html").read_text(encoding="utf-8")


def create_app(
    model: Optional[Union[str, Path]] = None,
    loader: Optional[AdaptiveModelLoader] = None,
    manager: Optional[DynamicQuantizationManager] = None,
    token: Optional[str] = None,
    max_queue: int = 16,
    max_tokens_limit: int = 1024,
    max_prompt_chars: int = 32_000,
    max_body_bytes: int = 1_000_000,
    model_allowlist: Allowlist = None,
    telemetry: Optional[TelemetryRecorder] = None,
    default_max_tokens: int = 256,
    served_model_name: Optional[str] = None,
    preload: bool = False,
) -> FastAPI:
    """Build the app for ``model`` (a local folder; default: the embedded reference model).

    ``loader``/``manager`` are shared with the caller (tests inject a scripted probe this way).
    ``model_allowlist`` names more folders chat may serve (a list, or a mapping id -> folder); every
    served model is resolved now, so no request can load a path of its choosing. ``max_queue``
    bounds chat requests in flight (more get 503). ``preload`` loads the model at start-up, so the
    first request does not pay for it.
    """
    ctx = build_context(
        model, loader, manager, token, max_queue, max_tokens_limit, max_prompt_chars, max_body_bytes,
        model_allowlist, telemetry, default_max_tokens, served_model_name,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if preload:
            loaded = await asyncio.to_thread(ctx.loader.load_model, ctx.primary.given)
            logger.info("serving %s at %s", ctx.primary.id, loaded.level.value)
        yield

    app = FastAPI(
        title="adaptquant",
        summary="An adaptive-precision local LLM: monitoring API, OpenAI-compatible chat, live dashboard.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, token=token, protected=PROTECTED_PATHS, max_body_bytes=max_body_bytes)
    app.include_router(monitoring.quantization)
    app.include_router(monitoring.router)
    app.include_router(chat.router)
    openapi.install(app, ctx, PROTECTED_PATHS)  # the document states this instance's limits and token
    page = dashboard_html()

    @app.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    @app.get("/", include_in_schema=False)
    def root() -> Any:
        return RedirectResponse("/dashboard")

    return app
