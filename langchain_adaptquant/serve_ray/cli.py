"""The ``--ray`` part of ``adaptquant serve``: its flags, their checks, and the call into ``local``.

Everything is checked before Ray is imported, so a bad value is reported the same way with or
without Ray installed, and a missing Ray is reported only for a command that would otherwise run.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

from langchain_adaptquant.cli.argtypes import positive_number, whole_number
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.serve_ray.settings import BudgetSettings, ReplicaSettings, ScalingSettings
from langchain_adaptquant.server.security import check_bind

#: Flags that only mean something with --ray (their defaults are None, so "given" is visible).
RAY_ONLY = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
            "downscale_delay_s", "num_cpus_per_replica", "torch_threads", "ray_address", "ray_num_cpus")
#: Flags that steer autoscaling, so they need --min-replicas/--max-replicas.
AUTOSCALING_ONLY = ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")


def budget_list(value: str) -> tuple[float, ...]:
    """``--memory-budget-gb``: one number of GiB, or (with --ray) one per replica rank, comma-separated."""
    parts = [part.strip() for part in value.split(",")]
    budgets = []
    for part in parts:
        try:
            number = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid --memory-budget-gb {value!r}: expected GiB, e.g. 4, or one per replica with --ray, e.g. 4,1.5"
            ) from None
        if not math.isfinite(number) or number <= 0:
            raise argparse.ArgumentTypeError(f"invalid --memory-budget-gb {value!r}: every budget must be greater than 0")
        budgets.append(number)
    return tuple(budgets)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray Serve (with --ray)")
    group.add_argument("--ray", action="store_true",
                       help="serve on Ray Serve: one adaptive model per replica (needs the 'ray' extra)")
    group.add_argument("--replicas", type=whole_number("replicas"), default=None, help="a fixed number of replicas (default 1)")
    group.add_argument("--min-replicas", type=whole_number("min-replicas", 0), default=None,
                       help="autoscaling: fewest replicas (with --max-replicas)")
    group.add_argument("--max-replicas", type=whole_number("max-replicas"), default=None, help="autoscaling: most replicas")
    group.add_argument("--target-ongoing-requests", type=positive_number("target-ongoing-requests"), default=None,
                       help="autoscaling: requests in flight per replica to aim for (default 2)")
    group.add_argument("--upscale-delay-s", type=positive_number("upscale-delay-s", zero=True), default=None,
                       help="autoscaling: seconds load must stay above target before a replica is added (default 30)")
    group.add_argument("--downscale-delay-s", type=positive_number("downscale-delay-s", zero=True), default=None,
                       help="autoscaling: seconds load must stay below target before one is removed (default 600)")
    group.add_argument("--num-cpus-per-replica", type=positive_number("num-cpus-per-replica"), default=None,
                       help="CPUs Ray reserves per replica, fractions allowed (default 1)")
    group.add_argument("--torch-threads", type=whole_number("torch-threads"), default=None,
                       help="torch threads per replica (default: its whole CPUs, at least 1)")
    group.add_argument("--ray-address", default=None,
                       help="join a running cluster ('auto' on one of its nodes) instead of starting a local one")
    group.add_argument("--ray-num-cpus", type=whole_number("ray-num-cpus"), default=None,
                       help="CPUs of the local cluster (default: all of this machine's)")


def check_plain_serve(args: argparse.Namespace) -> Optional[float]:
    """Without --ray: refuse Ray-only flags and budget lists; the single budget otherwise."""
    given = [name for name in RAY_ONLY if getattr(args, name, None) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InvalidValueError("serve flags", flags, "add --ray to use them (they configure Ray Serve replicas)")
    budgets = args.memory_budget_gb
    if budgets is not None and len(budgets) > 1:
        raise InvalidValueError("--memory-budget-gb", ",".join(f"{b:g}" for b in budgets),
                                "one budget; a budget per replica needs --ray")
    return budgets[0] if budgets else None


def settings_from_args(args: argparse.Namespace, model: str, token: Optional[str]) -> tuple[
        ReplicaSettings, ScalingSettings, BudgetSettings]:
    num_cpus = args.num_cpus_per_replica if args.num_cpus_per_replica is not None else 1.0
    autoscaling = args.min_replicas is not None or args.max_replicas is not None
    if autoscaling and args.replicas is not None:
        raise InvalidValueError("--replicas", args.replicas, "left out with --min-replicas/--max-replicas (autoscaling)")
    if autoscaling and (args.min_replicas is None or args.max_replicas is None):
        missing = "--max-replicas" if args.max_replicas is None else "--min-replicas"
        raise InvalidValueError(missing, None, "a whole number: autoscaling needs both --min-replicas and --max-replicas")
    for name in AUTOSCALING_ONLY:
        if not autoscaling and getattr(args, name) is not None:
            raise InvalidValueError("--" + name.replace("_", "-"), getattr(args, name),
                                    "left out without --min-replicas/--max-replicas (it steers autoscaling)")
    replica = ReplicaSettings(
        model=model, token=token, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit,
        torch_threads=args.torch_threads or max(1, int(num_cpus)), preload=not args.no_preload,
    )
    scaling = ScalingSettings(
        replicas=None if autoscaling else (args.replicas or 1),
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests or 2.0, num_cpus=num_cpus,
        **{name: getattr(args, name) for name in ("upscale_delay_s", "downscale_delay_s") if getattr(args, name) is not None},
    )
    given: Sequence[float] = args.memory_budget_gb or ()
    budgets = BudgetSettings(memory_budget_gb=given[0]) if len(given) == 1 else BudgetSettings(memory_budgets_gb=tuple(given))
    scaling.check_budgets(budgets)
    scaling.check_queue(replica)
    return replica, scaling, budgets


def run(args: argparse.Namespace, model: str, token: Optional[str]) -> int:
    """``adaptquant serve --ray``: check everything, then deploy and serve until stopped."""
    from langchain_adaptquant.runtime.weights import resolve_model_folder
    from langchain_adaptquant.serve_ray.dependency import import_ray

    resolve_model_folder(model)  # a missing model is an error before any cluster starts
    replica, scaling, budgets = settings_from_args(args, model, token)
    check_bind(args.host, token)

    import_ray()  # RayNotInstalledError names the extra
    from langchain_adaptquant.serve_ray.local import ClusterSettings, serve_on_ray

    cluster = ClusterSettings(address=args.ray_address, num_cpus=args.ray_num_cpus, host=args.host, port=args.port)
    return serve_on_ray(replica, scaling, budgets, cluster)
