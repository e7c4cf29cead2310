"""The monitoring endpoints (docs/DYNAMIC_QUANTIZATION.md, section 4) under /api/v1/quantization, plus /healthz and /metrics.

Handlers are plain ``def``: FastAPI runs them in its thread pool, so a probe, a cache clear (a full
garbage collection) or reading /proc never stalls the event loop that streams tokens.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from langchain_adaptquant.control.resources import process_memory
from langchain_adaptquant.runtime.os_memory import file_backed_bytes
from langchain_adaptquant.server.context import Ctx, ServerContext
from langchain_adaptquant.server.errors import APIError
from langchain_adaptquant.server.schemas import (
    CacheResponse,
    CalculateRequest,
    CalculateResponse,
    ClearResponse,
    ErrorResponse,
    HealthResponse,
    MemoryResponse,
    StatusResponse,
)
from langchain_adaptquant.units import MIB as MB

RECENT_SWITCHES = 50

router = APIRouter()
quantization = APIRouter(prefix="/api/v1/quantization", tags=["quantization"])


def _served_summary(ctx: ServerContext) -> dict[str, Any]:
    loaded = ctx.loaded()
    return {
        "id": ctx.primary.id,
        "path": str(ctx.primary.folder),
        "loaded": loaded is not None,
        "level": loaded.level.value if loaded else None,
        "precision": loaded.precision if loaded else None,
        "backend": loaded.backend if loaded else None,
        "size_mb": round(loaded.stored_bytes / MB, 2) if loaded else None,
        "quality": loaded.quality.to_dict() if loaded and loaded.quality is not None else None,
    }


@quantization.get("/status", response_model=StatusResponse)
def status(ctx: Ctx) -> dict[str, Any]:
    """Device, load, memory, the level recommended for the served model now, cached models, recent switches."""
    ctx.sync_switches()
    loaded = ctx.loaded()
    body = ctx.manager.get_status(model_size_params=loaded.size if loaded else None, current_models=ctx.loader.stats())
    body["served_model"] = _served_summary(ctx)
    body["recent_switches"] = ctx.telemetry.switches()[-RECENT_SWITCHES:]
    body["telemetry"] = ctx.telemetry.summary()
    body["queue"] = {"in_flight": ctx.limiter.in_flight, "max_queue": ctx.limiter.limit}
    return body


@quantization.post(
    "/calculate", response_model=CalculateResponse,
    responses={
        409: {"model": ErrorResponse, "description": "does not fit even at the smallest level"},
        422: {"model": ErrorResponse, "description": "the body is not valid; the message names the field"},
    },
)
def calculate(body: CalculateRequest, ctx: Ctx) -> dict[str, Any]:
    """The level a model of ``model_size_params`` billion parameters would get if loaded now."""
    return ctx.manager.calculate_optimal_quantization(body.model_size_params, body.task_priority).to_dict()


@quantization.get("/memory", response_model=MemoryResponse)
def memory(ctx: Ctx) -> dict[str, Any]:
    """The policy's snapshot, this process's RSS/anonymous memory, and what each cached model stores."""
    snapshot = ctx.manager.snapshot()
    rss, anon = process_memory()
    models: list[dict[str, Any]] = []
    for loaded in ctx.loader.models():
        file_backed = file_backed_bytes(loaded.model, loaded.folder)
        models.append({
            "name": loaded.name,
            "level": loaded.level.value,
            "stored_mb": round(loaded.stored_bytes / MB, 2),
            "file_backed_mb": round(file_backed / MB, 2),
            "estimated_mb": round(loaded.size.estimated_bytes(loaded.level) / MB, 2),
        })
    return {
        "memory": snapshot.to_dict(),
        "process": {
            "rss_mb": round(rss / MB, 1),
            "anon_mb": round(anon / MB, 1),
            "file_backed_mb": round(sum(m["file_backed_mb"] for m in models), 2),
        },
        "models": models,
        "cached_total_mb": round(ctx.loader.cached_bytes() / MB, 2),
    }


@quantization.get("/cache", response_model=CacheResponse)
def cache(ctx: Ctx) -> dict[str, Any]:
    """Cached models (the loader's statistics)."""
    models = ctx.loader.stats()
    return {
        "models": models,
        "count": len(models),
        "total_size_mb": round(sum(m["size_mb"] for m in models), 2),
        "cache_budget_gb": ctx.loader.cache_budget_gb,
        "layer_cache": ctx.loader.layer_cache.stats(),
    }


@quantization.post("/cache/clear", response_model=ClearResponse)
def clear_cache(ctx: Ctx) -> dict[str, Any]:
    """Evict every idle model (emergency); models with requests in flight are kept. Needs the token if set."""
    ctx.sync_switches()  # keep the history of what is about to be evicted
    return ctx.loader.clear()


@router.get("/healthz", response_model=HealthResponse)
def healthz(ctx: Ctx) -> dict[str, Any]:
    loaded = ctx.loaded()
    return {"status": "ok", "model": ctx.primary.id, "loaded": loaded is not None,
            "level": loaded.level.value if loaded else None}


@router.get("/metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {}}},
    501: {"model": ErrorResponse, "description": "prometheus-client is not installed"},
})
def metrics(ctx: Ctx) -> Response:
    """Prometheus metrics of this app's private registry, refreshed from live state on every scrape."""
    if ctx.telemetry.metrics is None:
        raise APIError(501, "Prometheus export is off: install prometheus-client (the 'server' extra)")
    from prometheus_client import CONTENT_TYPE_LATEST

    ctx.sync_switches()
    snapshot = ctx.manager.snapshot()
    rss, _ = process_memory()
    ctx.telemetry.observe_memory(snapshot.used_percent, rss)
    ctx.telemetry.observe_levels((loaded.name, loaded.level.value) for loaded in ctx.loader.models())
    ctx.telemetry.metrics.active.set(ctx.manager.tracker.active)
    return Response(ctx.telemetry.prometheus_text(), media_type=CONTENT_TYPE_LATEST)


@quantization.get("/telemetry")
def telemetry(ctx: Ctx) -> dict[str, Any]:
    """The telemetry handler's summary and its latest call and switch records."""
    ctx.sync_switches()
    return {
        "summary": ctx.telemetry.summary(),
        "calls": [call.to_dict() for call in ctx.telemetry.calls()[-100:]],
        "switches": ctx.telemetry.switches()[-100:],
    }
