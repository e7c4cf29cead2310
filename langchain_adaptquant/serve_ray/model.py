"""One replica's adaptive model, without Ray: a budget goes in, a level is decided, its state comes out.

The Serve deployment (:mod:`replica`) only wires this to Serve's hooks; keeping it free of Ray lets
the tests drive a replica's decisions in-process, and keeps one place that knows what a replica owns:
its own probe, manager (policy and load tracker) and loader. Nothing is shared between replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from langchain_adaptquant.control.resources import GIB, MemoryProbe
from langchain_adaptquant.errors import AdaptQuantError, InsufficientMemoryError
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader, LoadedModel, SwitchRecord, serving_manager
from langchain_adaptquant.runtime.weights import resolve_model_folder
from langchain_adaptquant.serve_ray.probe import ReplicaMemoryProbe
from langchain_adaptquant.serve_ray.settings import ReplicaSettings


class ReplicaBudgetError(AdaptQuantError):
    """The replica's budget leaves no room for the model at any level: the replica cannot start."""


@dataclass(frozen=True)
class ReplicaSample:
    """One reading of a replica, as its gauges publish it."""

    model: str
    level_bits: Optional[int]  # None while the model is not loaded
    memory_used_percent: float
    memory_budget_bytes: int  # 0: no budget (the node's memory only)
    process_rss_bytes: int
    requests_in_flight: int
    switches: int


class ReplicaModel:
    """The model a replica serves, the memory it may use, and what it decided."""

    def __init__(self, settings: ReplicaSettings, node: Optional[MemoryProbe] = None) -> None:
        """``node`` probes the node (default: psutil and the cgroup limit); the budget is applied on top."""
        self.settings = settings
        self.folder = resolve_model_folder(settings.model)  # a missing model stops the replica here
        self.served_id = settings.served_model_name or self.folder.name
        self.probe = ReplicaMemoryProbe(node)
        self.manager = serving_manager(probe=self.probe)
        self.loader = AdaptiveModelLoader(manager=self.manager, show_progress=False)

    def app(self, token: Optional[str]) -> Any:
        """The single-server FastAPI app over this replica's loader (the model loads in :meth:`apply_budget`)."""
        from langchain_adaptquant.server.app import create_app

        settings = self.settings
        return create_app(
            settings.model, loader=self.loader, token=token, max_queue=settings.max_queue,
            max_tokens_limit=settings.max_tokens_limit, default_max_tokens=settings.default_max_tokens,
            served_model_name=self.served_id, preload=False,
        )

    def loaded(self) -> Optional[LoadedModel]:
        return self.loader.get(self.folder)

    def apply_budget(self, budget_gb: Optional[float], rank: int = 0) -> Optional[SwitchRecord]:
        """Take a new budget and re-decide now: the first time load the model (when ``preload``), later switch it."""
        self.probe.set_budget(budget_gb)
        self.manager.probe.invalidate()
        loaded = self.loaded()
        if loaded is not None:
            return self.loader.reoptimize(loaded)
        if not self.settings.preload:
            return None
        try:
            self.loader.load_model(self.settings.model)
        except InsufficientMemoryError as error:
            own = self.manager.snapshot().process_rss_bytes / GIB
            raise ReplicaBudgetError(
                f"replica rank {rank}: memory budget {budget_gb} GiB leaves no room for {self.served_id} at any "
                f"level (the replica itself already uses {own:.2f} GiB): {error}; raise its entry in "
                "memory_budget_gb/memory_budgets_gb"
            ) from None
        return None

    def report(self) -> dict[str, Any]:
        """The replica route's body, less the identity the deployment adds."""
        import torch

        loaded = self.loaded()
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

    def sample(self) -> ReplicaSample:
        loaded = self.loaded()
        snapshot = self.manager.snapshot()
        budget = self.probe.memory_budget_gb
        return ReplicaSample(
            model=self.served_id,
            level_bits=loaded.level.bits if loaded else None,
            memory_used_percent=round(snapshot.used_percent, 2),
            memory_budget_bytes=int(budget * GIB) if budget is not None else 0,
            process_rss_bytes=snapshot.process_rss_bytes,
            requests_in_flight=self.manager.tracker.active,
            switches=len(loaded.switches) if loaded else 0,
        )
