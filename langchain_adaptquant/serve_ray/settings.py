"""What a Ray Serve deployment of ChatAdaptQuant is made of, as three frozen, validated records.

* :class:`ReplicaSettings`: what every replica builds its app from (the deployment's init argument).
* :class:`BudgetSettings`: each replica's memory budget. It is the deployment's ``user_config``, so an
  operator can change it on a running deployment (``serve deploy`` with a new config) and each
  replica re-decides its level without a restart.
* :class:`ScalingSettings`: replicas or autoscaling on ongoing requests, and each replica's share of
  its node (``num_cpus``).

Nothing here imports Ray: the CLI and the tests check settings on a machine without it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from langchain_adaptquant.control.resources import validate_budget_gb
from langchain_adaptquant.errors import InvalidValueError

#: The deployment's name inside the Serve application (config files refer to it).
DEPLOYMENT_NAME = "AdaptQuantReplica"


def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidValueError(name, value, f"a whole number >= {minimum}")
    return value


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidValueError(name, value, "a finite number greater than 0")
    return float(value)


@dataclass(frozen=True)
class ReplicaSettings:
    """The app each replica serves: the same arguments as ``create_app``, plus torch's thread count."""

    model: str
    served_model_name: Optional[str] = None
    #: Bearer token for chat and cache/clear; None reads ``ADAPTQUANT_TOKEN`` on the replica's node.
    token: Optional[str] = None
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    #: Chat requests one replica runs at once; Serve's ``max_ongoing_requests`` is set to the same number.
    max_queue: int = 8
    #: torch intra-op threads per replica: replicas sharing a node should not oversubscribe its cores.
    torch_threads: int = 1
    #: Load the model while the replica starts, so the first request does not pay for it.
    preload: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidValueError("model", self.model, "a model folder (a non-empty string)")
        if self.served_model_name is not None and (not isinstance(self.served_model_name, str)
                                                   or not self.served_model_name.strip()):
            raise InvalidValueError("served_model_name", self.served_model_name, "None or a non-empty string")
        if self.token is not None and (not isinstance(self.token, str) or not self.token.strip()):
            raise InvalidValueError("token", "<hidden>", "None or a non-empty string")
        _whole("max_tokens_limit", self.max_tokens_limit, 1)
        _whole("default_max_tokens", self.default_max_tokens, 1)
        _whole("max_queue", self.max_queue, 1)
        _whole("torch_threads", self.torch_threads, 1)
        if not isinstance(self.preload, bool):
            raise InvalidValueError("preload", self.preload, "True or False")

    def to_args(self) -> dict[str, Any]:
        """JSON-friendly form: the deployment's init argument, also in a Serve config file."""
        return asdict(self)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ReplicaSettings":
        if not isinstance(args, Mapping):
            raise InvalidValueError("replica settings", args, "a mapping of ReplicaSettings fields")
        unknown = sorted(set(args) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidValueError("replica setting", unknown, f"one of {sorted(cls.__dataclass_fields__)}")
        return cls(**dict(args))


@dataclass(frozen=True)
class BudgetSettings:
    """Memory budget per replica, in GiB. The deployment's ``user_config``.

    A replica's budget counts that replica's own memory (its RSS) against it, as if it ran in its own
    container, and never promises more than its node has free; see
    :class:`~langchain_adaptquant.serve_ray.probe.ReplicaMemoryProbe`. ``memory_budgets_gb[i]`` is the
    budget of the replica with rank ``i``; replicas past the end of the list get ``memory_budget_gb``
    (None: no budget, the node's memory and cgroup limit only).
    """

    memory_budget_gb: Optional[float] = None
    memory_budgets_gb: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        validate_budget_gb(self.memory_budget_gb, name="memory_budget_gb")
        if isinstance(self.memory_budgets_gb, (str, bytes)) or not isinstance(self.memory_budgets_gb, (list, tuple)):
            raise InvalidValueError("memory_budgets_gb", self.memory_budgets_gb, "a list of GiB, one per replica rank")
        for index, value in enumerate(self.memory_budgets_gb):
            if value is None:
                raise InvalidValueError(f"memory_budgets_gb[{index}]", value, "a finite number of GiB greater than 0")
            validate_budget_gb(value, name=f"memory_budgets_gb[{index}]")
        object.__setattr__(self, "memory_budgets_gb", tuple(float(v) for v in self.memory_budgets_gb))

    def for_rank(self, rank: int) -> Optional[float]:
        """The budget of the replica with this rank."""
        if 0 <= rank < len(self.memory_budgets_gb):
            return self.memory_budgets_gb[rank]
        return self.memory_budget_gb

    def to_user_config(self) -> dict[str, Any]:
        return {"memory_budget_gb": self.memory_budget_gb, "memory_budgets_gb": list(self.memory_budgets_gb)}

    @classmethod
    def from_user_config(cls, config: Any) -> "BudgetSettings":
        """Read a deployment's ``user_config``; None means no budgets. Unknown keys are refused (typos)."""
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise InvalidValueError("user_config", config, "a mapping with memory_budget_gb and/or memory_budgets_gb")
        unknown = sorted(set(config) - {"memory_budget_gb", "memory_budgets_gb"})
        if unknown:
            raise InvalidValueError("user_config key", unknown, "'memory_budget_gb' or 'memory_budgets_gb'")
        return cls(config.get("memory_budget_gb"), config.get("memory_budgets_gb") or ())


@dataclass(frozen=True)
class ScalingSettings:
    """A fixed number of replicas, or autoscaling between ``min_replicas`` and ``max_replicas``.

    Autoscaling follows Serve's ongoing-requests signal: it adds replicas while the average replica
    has more than ``target_ongoing_requests`` requests in flight, and removes them when it has fewer.
    """

    #: A fixed number of replicas (None: 1, or autoscaling when min/max are given).
    replicas: Optional[int] = None
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    target_ongoing_requests: float = 2.0
    #: CPUs Ray reserves for each replica (fractions allowed: two replicas of 0.5 share one core).
    num_cpus: float = 1.0
    #: Requests waiting at each proxy once every replica has ``max_queue`` in flight; more get 503.
    max_queued_requests: int = 64
    #: Seconds the load must stay above / below target before a replica is added / removed.
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    #: Seconds of ongoing-request readings averaged for each autoscaling decision.
    look_back_period_s: float = 30.0

    def __post_init__(self) -> None:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if autoscaling:
            if self.replicas is not None:
                raise InvalidValueError("replicas", self.replicas,
                                        "None when min_replicas/max_replicas are given (they turn on autoscaling)")
            if self.min_replicas is None or self.max_replicas is None:
                raise InvalidValueError("min_replicas/max_replicas", (self.min_replicas, self.max_replicas),
                                        "both, for autoscaling (or neither, with replicas)")
            _whole("min_replicas", self.min_replicas, 0)
            _whole("max_replicas", self.max_replicas, 1)
            if self.min_replicas > self.max_replicas:
                raise InvalidValueError("min_replicas", self.min_replicas, f"at most max_replicas ({self.max_replicas})")
        else:
            if self.replicas is None:
                object.__setattr__(self, "replicas", 1)
            _whole("replicas", self.replicas, 1)
        _positive("target_ongoing_requests", self.target_ongoing_requests)
        _positive("num_cpus", self.num_cpus)
        _whole("max_queued_requests", self.max_queued_requests, 1)
        for name in ("upscale_delay_s", "downscale_delay_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidValueError(name, value, "a finite number of seconds >= 0")
        _positive("look_back_period_s", self.look_back_period_s)

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.autoscaling else self.replicas  # type: ignore[return-value]

    def check_budgets(self, budgets: BudgetSettings) -> None:
        """A budget list longer than the replicas that can run is a mistake, not a spare."""
        if len(budgets.memory_budgets_gb) > self.most_replicas:
            raise InvalidValueError(
                "memory_budgets_gb", list(budgets.memory_budgets_gb),
                f"at most {self.most_replicas} budget(s), one per replica that can run",
            )

    def check_queue(self, replica: ReplicaSettings) -> None:
        """Serve keeps ``max_queue`` requests in flight per replica; the target must be reachable."""
        if self.target_ongoing_requests > replica.max_queue:
            raise InvalidValueError(
                "target_ongoing_requests", self.target_ongoing_requests,
                f"at most max_queue ({replica.max_queue}), the requests one replica takes at once",
            )

    def deployment_options(self, replica: ReplicaSettings) -> dict[str, Any]:
        """Keyword arguments for ``serve.deployment(...).options``; also a config file's deployment entry."""
        self.check_queue(replica)
        options: dict[str, Any] = {
            "max_ongoing_requests": replica.max_queue,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s,
            }
        else:
            options["num_replicas"] = self.replicas
        return options
