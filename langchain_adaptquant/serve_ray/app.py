"""Serve applications of ChatAdaptQuant: from Python (``build_app``) or from a Serve config file.

``build_app`` is for ``serve.run`` in a script or ``adaptquant serve --ray``. For a cluster, a Serve
config file names :func:`app_builder` as its ``import_path`` and sets replicas, autoscaling, CPUs and
the budgets (``user_config``) in its ``deployments`` entry; :func:`serve_config` writes one from the
same settings, so ``serve deploy`` gets exactly what ``build_app`` would have deployed.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from langchain_adaptquant.serve_ray.dependency import import_ray
from langchain_adaptquant.serve_ray.settings import DEPLOYMENT_NAME, BudgetSettings, ReplicaSettings, ScalingSettings

_, serve = import_ray()

from langchain_adaptquant.serve_ray.replica import AdaptQuantReplica  # noqa: E402 - needs Ray

# ``@serve.deployment`` makes the class a Deployment (``.options``, ``.bind``); Ray's decorator typing
# does not carry that over, so the type checker sees it through Any.
_DEPLOYMENT: Any = AdaptQuantReplica

#: What a config file's ``import_path`` names.
IMPORT_PATH = "langchain_adaptquant.serve_ray:app_builder"


def build_app(
    replica: ReplicaSettings,
    scaling: Optional[ScalingSettings] = None,
    budgets: Optional[BudgetSettings] = None,
) -> Any:
    """A Serve ``Application`` (pass it to ``serve.run``): ``scaling`` replicas, each serving ``replica``."""
    scaling = scaling or ScalingSettings()
    budgets = budgets or BudgetSettings()
    scaling.check_budgets(budgets)
    options = scaling.deployment_options(replica)
    return _DEPLOYMENT.options(**options, user_config=budgets.to_user_config()).bind(replica.to_args())


def app_builder(args: Mapping[str, Any]) -> Any:
    """Serve's application builder: ``args`` are :class:`ReplicaSettings` fields from the config file.

    The file's ``deployments`` entry (named ``AdaptQuantReplica``) sets replicas or autoscaling,
    ``ray_actor_options`` and ``user_config``; Serve applies them over these defaults.
    """
    replica = ReplicaSettings.from_args(args)
    return _DEPLOYMENT.options(max_ongoing_requests=replica.max_queue).bind(replica.to_args())


def serve_config(
    replica: ReplicaSettings,
    scaling: Optional[ScalingSettings] = None,
    budgets: Optional[BudgetSettings] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "adaptquant",
    route_prefix: str = "/",
) -> dict[str, Any]:
    """A Serve config (``serve deploy``/``serve run`` YAML, as a dict) for these settings.

    The token is left out on purpose: config files end up in version control and in ``serve
    config``; replicas read ``ADAPTQUANT_TOKEN`` from their node's environment instead.
    """
    scaling = scaling or ScalingSettings()
    budgets = budgets or BudgetSettings()
    scaling.check_budgets(budgets)
    args = {key: value for key, value in replica.to_args().items() if key != "token"}
    deployment = {"name": DEPLOYMENT_NAME, **scaling.deployment_options(replica), "user_config": budgets.to_user_config()}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": name,
            "route_prefix": route_prefix,
            "import_path": IMPORT_PATH,
            "args": args,
            "deployments": [deployment],
        }],
    }
