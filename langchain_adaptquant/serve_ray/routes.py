"""What a replica adds to the shared app: who answered, and one route that shows this replica's state.

Behind Serve's proxy every request may land on another replica, so each response names its replica
(``X-AdaptQuant-Replica``, ``-Rank``, ``-Node`` headers), and ``GET /api/v1/quantization/replica``
reports the answering replica's budget, level, memory and switches. The rest of the API (status,
memory, metrics, chat) is the single-server app unchanged, answered by whichever replica got it.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, Protocol

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict

REPLICA_HEADER = "x-adaptquant-replica"
RANK_HEADER = "x-adaptquant-replica-rank"
NODE_HEADER = "x-adaptquant-node"


class ReplicaIdentity(BaseModel):
    """Where a replica runs; the rank can change when Serve reassigns ranks (then a new record is made)."""

    model_config = ConfigDict(frozen=True)

    replica_id: str
    rank: int
    node_id: str
    node_ip: str
    deployment: str
    application: str
    pid: int


class ReplicaResponse(ReplicaIdentity):
    """``GET /api/v1/quantization/replica``: the answering replica (its identity), its budget and what it decided."""

    model_config = ConfigDict(frozen=False, extra="allow", protected_namespaces=())

    memory_budget_gb: Optional[float]
    torch_threads: int
    model: str
    loaded: bool
    level: Optional[str]
    precision: Optional[str]
    backend: Optional[str]
    available_levels: list[str]
    memory: dict[str, Any]
    requests_in_flight: int
    switches: list[dict[str, Any]]


class ReplicaView(Protocol):
    """What the routes need from the replica object (see ``replica.AdaptQuantReplica``)."""

    identity: ReplicaIdentity

    def report(self) -> dict[str, Any]: ...

    def refresh_metrics(self) -> None: ...


router = APIRouter(tags=["ray"])


@router.get("/api/v1/quantization/replica", response_model=ReplicaResponse)
def replica_report(request: Request) -> dict[str, Any]:
    """The replica that answered: identity, budget, level, the memory its policy sees, its switches."""
    view: ReplicaView = request.app.state.replica
    return {**view.identity.model_dump(), **view.report()}


class ReplicaHeaders:
    """ASGI middleware: name the replica on every HTTP response and refresh its gauges as requests end."""

    def __init__(self, app: Any, view: ReplicaView) -> None:
        self.app = app
        self.view = view

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]],
                      send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        identity = self.view.identity

        async def named_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(REPLICA_HEADER.encode(), identity.replica_id.encode()),
                            (RANK_HEADER.encode(), str(identity.rank).encode()),
                            (NODE_HEADER.encode(), identity.node_id.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, named_send)
        finally:
            self.view.refresh_metrics()


def install(app: FastAPI, view: ReplicaView) -> FastAPI:
    """Add the replica route and headers to an app made by ``create_app`` (before it starts)."""
    app.state.replica = view
    app.include_router(router)
    app.add_middleware(ReplicaHeaders, view=view)
    return app
