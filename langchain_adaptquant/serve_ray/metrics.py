"""Per-replica gauges in Ray's metrics pipeline, so one Prometheus scrape of the cluster shows each node's levels.

``ray.serve.metrics`` adds the ``deployment``, ``replica`` and ``application`` tags, and Ray adds
``NodeAddress``; Ray exports them (prefixed ``ray_``) on every node's metrics port. The app's own
``/metrics`` route still serves the single-server metrics of whichever replica answered.
"""

from __future__ import annotations

from ray.serve.metrics import Gauge

from langchain_adaptquant.serve_ray.model import ReplicaSample

PREFIX = "adaptquant_replica"


class ReplicaGauges:
    """Created once per replica (Ray metrics must not be re-registered per request)."""

    def __init__(self) -> None:
        self.bits = Gauge(f"{PREFIX}_quantization_bits",
                          description="Weight precision the replica serves at, in bits (16/8/4/2).", tag_keys=("model",))
        self.memory_used = Gauge(f"{PREFIX}_memory_used_percent",
                                 description="Memory in use as this replica's policy sees it (budget or node), percent.")
        self.budget = Gauge(f"{PREFIX}_memory_budget_bytes",
                            description="The replica's memory budget in bytes; 0 when it has none.")
        self.rss = Gauge(f"{PREFIX}_process_rss_bytes", description="Resident memory of the replica process.")
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", description="Chat-model calls running in the replica.")
        self.switches = Gauge(f"{PREFIX}_switches", description="Precision switches of the served model so far.",
                              tag_keys=("model",))

    def publish(self, sample: ReplicaSample) -> None:
        tags = {"model": sample.model}
        if sample.level_bits is not None:
            self.bits.set(sample.level_bits, tags=tags)
        self.switches.set(sample.switches, tags=tags)
        self.memory_used.set(sample.memory_used_percent)
        self.budget.set(sample.memory_budget_bytes)
        self.rss.set(sample.process_rss_bytes)
        self.in_flight.set(sample.requests_in_flight)
