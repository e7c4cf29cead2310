"""ChatAdaptQuant on Ray Serve: one adaptive model per replica, each adapting to its own node.

Needs the ``ray`` extra (``pip install 'langchain-adaptquant[ray]'``). Settings and the replica's
memory probe and model (``ReplicaModel``) import without Ray; the Serve parts (``build_app``, ``app_builder``, ``serve_config``,
``serve_on_ray``, ``AdaptQuantReplica``) load Ray on first use and raise
:class:`RayNotInstalledError`, naming the extra, when it is missing.

    from ray import serve
    from langchain_adaptquant.serve_ray import ReplicaSettings, ScalingSettings, build_app

    serve.run(build_app(ReplicaSettings(model="/models/smollm2"), ScalingSettings(min_replicas=1, max_replicas=4)))

A Serve config file uses ``import_path: langchain_adaptquant.serve_ray:app_builder``.
"""

from __future__ import annotations

from typing import Any

from langchain_adaptquant.lazy import load_export
from langchain_adaptquant.serve_ray.dependency import RayNotInstalledError, import_ray
from langchain_adaptquant.serve_ray.probe import ReplicaMemoryProbe, replica_snapshot
from langchain_adaptquant.serve_ray.settings import (
    DEPLOYMENT_NAME,
    BudgetSettings,
    ReplicaSettings,
    ScalingSettings,
)

#: Names loaded on first use (they pull in torch), and the submodule each lives in.
_LAZY = {"ReplicaModel": "model", "ReplicaBudgetError": "model"}
#: Names that need Ray, and the submodule each lives in.
_NEED_RAY = {
    "build_app": "app",
    "app_builder": "app",
    "serve_config": "app",
    "IMPORT_PATH": "app",
    "AdaptQuantReplica": "replica",
    "serve_on_ray": "local",
    "ClusterSettings": "local",
}

__all__ = [
    "DEPLOYMENT_NAME",
    "BudgetSettings",
    "RayNotInstalledError",
    "ReplicaMemoryProbe",
    "ReplicaSettings",
    "ScalingSettings",
    "import_ray",
    "replica_snapshot",
    *_LAZY,
    *_NEED_RAY,
]


def __getattr__(name: str) -> Any:
    if name in _NEED_RAY:
        import_ray()  # the clear error first, before a submodule's own import fails
    return load_export(__name__, {**_LAZY, **_NEED_RAY}, name, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
