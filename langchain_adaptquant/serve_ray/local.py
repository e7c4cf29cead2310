"""``adaptquant serve --ray``: deploy on a Ray cluster (a local one by default) and serve until stopped.

With no address a single-node cluster is started here and shut down on exit. With an address
(``auto`` on a node of a running cluster, or ``ray://head:10001``) the app joins that cluster, and
on exit only the app is deleted: the cluster belongs to its operator.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from typing import Optional

from langchain_adaptquant.serve_ray.dependency import import_ray
from langchain_adaptquant.serve_ray.settings import BudgetSettings, ReplicaSettings, ScalingSettings
from langchain_adaptquant.server.security import check_bind

ray, serve = import_ray()

from langchain_adaptquant.serve_ray.app import build_app  # noqa: E402 - needs Ray


@dataclass(frozen=True)
class ClusterSettings:
    """Where to run: an existing cluster's address, or a local one with this many CPUs (None: all)."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    host: str = "127.0.0.1"
    port: int = 8000
    name: str = "adaptquant"
    route_prefix: str = "/"


def free_port(host: str) -> int:
    from langchain_adaptquant.server.run import bind_socket

    sock = bind_socket(host, 0)
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def check_port(host: str, port: int) -> int:
    """The port Serve's proxy will bind (0 picks a free one); a clear error if it is taken."""
    from langchain_adaptquant.server.run import bind_socket

    if port == 0:
        return free_port(host)
    bind_socket(host, port).close()  # PortUnavailableError names the port and what to do
    return port


def _stop_on_sigterm(stop: threading.Event) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())


def serve_on_ray(
    replica: ReplicaSettings,
    scaling: Optional[ScalingSettings] = None,
    budgets: Optional[BudgetSettings] = None,
    cluster: Optional[ClusterSettings] = None,
    stop: Optional[threading.Event] = None,
) -> int:
    """Deploy and block until Ctrl-C, SIGTERM or ``stop`` is set; returns the exit status."""
    scaling = scaling or ScalingSettings()
    budgets = budgets or BudgetSettings()
    cluster = cluster or ClusterSettings()
    check_bind(cluster.host, replica.token)
    scaling.check_budgets(budgets)
    scaling.check_queue(replica)
    app = build_app(replica, scaling, budgets)
    local = cluster.address is None
    port = check_port(cluster.host, cluster.port) if local else cluster.port
    stop = stop or threading.Event()
    _stop_on_sigterm(stop)
    if local:
        ray.init(num_cpus=cluster.num_cpus, include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=cluster.address)
    try:
        serve.start(http_options={"host": cluster.host, "port": port})
        serve.run(app, name=cluster.name, route_prefix=cluster.route_prefix)
        shown = f"[{cluster.host}]" if ":" in cluster.host else cluster.host
        count = (f"{scaling.min_replicas}-{scaling.max_replicas} replicas (autoscaling, target "
                 f"{scaling.target_ongoing_requests:g} ongoing requests)") if scaling.autoscaling \
            else f"{scaling.replicas} replica(s)"
        where = "a local Ray cluster" if local else f"the Ray cluster at {cluster.address}"
        print(f"adaptquant: serving {replica.served_model_name or replica.model} on {where}, {count}, "
              f"at http://{shown}:{port}{cluster.route_prefix.rstrip('/')}", flush=True)
        print("adaptquant: per-replica state at /api/v1/quantization/replica; Ctrl-C stops", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        _shut_down(cluster, local)


def _shut_down(cluster: ClusterSettings, local: bool) -> None:
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(cluster.name)
    finally:
        ray.shutdown()
        print("adaptquant: stopped", flush=True)
