"""The Serve deployment: each replica owns one adaptive model and serves the single-server app.

The replica's model, probe, manager and loader live in :class:`~.model.ReplicaModel`; this class
only wires it to Serve: ``__serve_build_asgi_app__`` hands Serve's ingress the FastAPI app of
``create_app`` (plus :mod:`routes`), ``reconfigure`` applies the budget from the deployment's
``user_config`` (first while the replica starts, before the model loads, then on every change),
and the health check refreshes the replica's Ray gauges.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Mapping

from langchain_adaptquant.serve_ray import routes
from langchain_adaptquant.serve_ray.dependency import import_ray
from langchain_adaptquant.serve_ray.model import ReplicaBudgetError, ReplicaModel
from langchain_adaptquant.serve_ray.settings import DEPLOYMENT_NAME, BudgetSettings, ReplicaSettings

ray, serve = import_ray()

from langchain_adaptquant.serve_ray.metrics import ReplicaGauges  # noqa: E402 - needs Ray

__all__ = ["AdaptQuantReplica", "ReplicaBudgetError"]

logger = logging.getLogger(__name__)


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

        replica_settings = ReplicaSettings.from_args(settings)
        torch.set_num_threads(replica_settings.torch_threads)  # replicas sharing a node share its cores
        self.model = ReplicaModel(replica_settings)
        rank = serve.get_replica_context().rank
        self.identity = _identity(rank.rank if rank is not None else 0)
        self.gauges = ReplicaGauges()

    def __serve_build_asgi_app__(self) -> Any:
        token = self.model.settings.token or os.environ.get("ADAPTQUANT_TOKEN") or None
        return routes.install(self.model.app(token), self)

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Serve calls this at start and on every ``user_config`` or rank change: apply the budget, re-decide."""
        budgets = BudgetSettings.from_user_config(user_config)
        number = rank.rank if rank is not None else self.identity.rank
        if number != self.identity.rank:
            self.identity = self.identity.model_copy(update={"rank": number})
        budget = budgets.for_rank(number)
        logger.info("replica %s (rank %d): memory budget %s", self.identity.replica_id, number,
                    f"{budget:g} GiB" if budget is not None else "none (node memory only)")
        record = await asyncio.to_thread(self.model.apply_budget, budget, number)
        if record is not None:
            logger.info("replica %s switched %s -> %s: %s", self.identity.replica_id, record.from_level,
                        record.to_level, record.reason)
        self.refresh_metrics()

    def check_health(self) -> None:
        """Serve's periodic health check doubles as the gauges' refresh while the replica is idle."""
        self.refresh_metrics()

    def report(self) -> dict[str, Any]:
        return self.model.report()

    def refresh_metrics(self) -> None:
        try:
            self.gauges.publish(self.model.sample())
        except Exception:  # noqa: BLE001 - a metrics hiccup must never fail a request
            logger.exception("could not refresh the replica's gauges")
