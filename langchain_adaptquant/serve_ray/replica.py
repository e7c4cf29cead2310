"""The Serve deployment: each replica owns one adaptive model and serves the single-server app.

A replica builds its own probe, manager (policy, load tracker) and loader, so it decides from its
own node's memory, its own budget and its own requests in flight; nothing is shared between
replicas. Serve's ingress runs the FastAPI app of ``create_app`` unchanged (OpenAI-compatible chat,
monitoring, /metrics, dashboard), plus :mod:`routes`. The budget arrives through ``reconfigure``
(the deployment's ``user_config``): first while the replica starts, before the model is loaded,
then whenever an operator changes it; each time the replica re-decides its level at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import Any, Mapping, Optional

from langchain_adaptquant.errors import AdaptQuantError, InsufficientMemoryError
from langchain_adaptquant.loader import AdaptiveModelLoader, LoadedModel
from langchain_adaptquant.manager import DynamicQuantizationManager
from langchain_adaptquant.resources import GIB
from langchain_adaptquant.serve_ray import routes
from langchain_adaptquant.serve_ray.dependency import import_ray
from langchain_adaptquant.serve_ray.probe import ReplicaMemoryProbe
from langchain_adaptquant.serve_ray.settings import DEPLOYMENT_NAME, BudgetSettings, ReplicaSettings
from langchain_adaptquant.weights import resolve_model_folder

ray, serve = import_ray()

from langchain_adaptquant.serve_ray.metrics import ReplicaGauges, ReplicaSample  # noqa: E402 - needs Ray

logger = logging.getLogger(__name__)


class ReplicaBudgetError(AdaptQuantError):
    """The replica's budget leaves no room for the model at any level: the replica cannot start."""


def _identity(rank: int) -> routes.ReplicaIdentity:
    context = serve.get_replica_context()
    return routes.ReplicaIdentity(
        replica_id=context.replica_id.unique_id,
        rank=rank,
        node_id=ray.get_runtime_context().get_node_id(),
        node_ip=ray.util.get_node_ip_address(),
        deployment=context.deployment,
        application=context.app_name,
        pid=os.getpid(),
    )


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class AdaptQuantReplica:
    """One adaptive model behind the shared FastAPI app; ``settings`` is :meth:`ReplicaSettings.to_args`."""

    def __init__(self, settings: Mapping[str, Any]) -> None:
        import torch

        self.settings = ReplicaSettings.from_args(settings)
        torch.set_num_threads(self.settings.torch_threads)  # replicas sharing a node share its cores
        self.folder = resolve_model_folder(self.settings.model)  # a missing model stops the replica here
        rank = serve.get_replica_context().rank
        self.identity = _identity(rank.rank if rank is not None else 0)
        self.probe = ReplicaMemoryProbe()
        self.manager = DynamicQuantizationManager(probe=self.probe)
        self.loader = AdaptiveModelLoader(manager=self.manager, show_progress=False)
        self.gauges = ReplicaGauges()
        self.served_id = self.settings.served_model_name or self.folder.name

    def __serve_build_asgi_app__(self) -> Any:
        from langchain_adaptquant.server.app import create_app

        settings = self.settings
        token = settings.token or os.environ.get("ADAPTQUANT_TOKEN") or None
        app = create_app(
            settings.model, loader=self.loader, token=token, max_queue=settings.max_queue,
            max_tokens_limit=settings.max_tokens_limit, default_max_tokens=settings.default_max_tokens,
            served_model_name=self.served_id, preload=False,  # loaded in reconfigure, once the budget is known
        )
        return routes.install(app, self)

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Serve calls this at start and on every ``user_config`` or rank change: apply the budget, re-decide."""
        budgets = BudgetSettings.from_user_config(user_config)
        number = rank.rank if rank is not None else self.identity.rank
        if number != self.identity.rank:
            self.identity = dataclasses.replace(self.identity, rank=number)
        budget = budgets.for_rank(number)
        self.probe.set_budget(budget)
        self.manager.probe.invalidate()
        logger.info("replica %s (rank %d): memory budget %s", self.identity.replica_id, number,
                    f"{budget:g} GiB" if budget is not None else "none (node memory only)")
        await asyncio.to_thread(self._adapt, budget)
        self.refresh_metrics()

    def _adapt(self, budget: Optional[float]) -> None:
        loaded = self.loader.get(self.folder)
        if loaded is not None:
            record = self.loader.reoptimize(loaded)
            if record is not None:
                logger.info("replica %s switched %s -> %s: %s", self.identity.replica_id, record.from_level,
                            record.to_level, record.reason)
            return
        if not self.settings.preload:
            return
        try:
            loaded = self.loader.load_model(self.settings.model)
        except InsufficientMemoryError as error:
            own = self.manager.snapshot().process_rss_bytes / GIB
            raise ReplicaBudgetError(
                f"replica rank {self.identity.rank}: memory budget {budget} GiB leaves no room for "
                f"{self.served_id} at any level (the replica itself already uses {own:.2f} GiB): {error}; "
                "raise its entry in memory_budget_gb/memory_budgets_gb"
            ) from None
        logger.info("replica %s loaded %s at %s (%s)", self.identity.replica_id, self.served_id,
                    loaded.level.value, loaded.last_decision_reason)

    def check_health(self) -> None:
        """Serve's periodic health check doubles as the gauges' refresh while the replica is idle."""
        self.refresh_metrics()

    # -- what routes and gauges show ---------------------------------------------------------------
    def _loaded(self) -> Optional[LoadedModel]:
        return self.loader.get(self.folder)

    def report(self) -> dict[str, Any]:
        import torch

        loaded = self._loaded()
        return {
            "memory_budget_gb": self.probe.memory_budget_gb,
            "torch_threads": torch.get_num_threads(),
            "model": self.served_id,
            "loaded": loaded is not None,
            "level": loaded.level.value if loaded else None,
            "precision": loaded.precision if loaded else None,
            "backend": loaded.backend if loaded else None,
            "available_levels": [level.value for level in self.manager.available_levels],
            "memory": self.manager.snapshot().to_dict(),
            "requests_in_flight": self.manager.tracker.active,
            "switches": [record.to_dict() for record in loaded.switches] if loaded else [],
        }

    def refresh_metrics(self) -> None:
        try:
            loaded = self._loaded()
            snapshot = self.manager.snapshot()
            budget = self.probe.memory_budget_gb
            self.gauges.publish(ReplicaSample(
                model=self.served_id,
                level_bits=loaded.level.bits if loaded else None,
                memory_used_percent=round(snapshot.used_percent, 2),
                memory_budget_bytes=int(budget * GIB) if budget is not None else 0,
                process_rss_bytes=snapshot.process_rss_bytes,
                requests_in_flight=self.manager.tracker.active,
                switches=len(loaded.switches) if loaded else 0,
            ))
        except Exception:  # noqa: BLE001 - a metrics hiccup must never fail a request
            logger.exception("could not refresh the replica's gauges")
