"""The memory one replica may count on: its own budget, and never more than its node has free.

``memory_budget_gb`` on a single server measures the whole machine's use against the budget (it acts
like the machine's memory.max). That is wrong for replicas sharing a node: each would see its
neighbours' memory as its own and all of them would shrink together. A replica's budget instead
counts the replica's own resident memory against it, the way a per-replica container limit would,
and is capped by what the node (host RAM or its cgroup limit, via psutil) still has free, so a
crowded node still pushes every replica on it down.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Optional

from langchain_adaptquant.control.resources import (
    GIB,
    MemoryProbe,
    MemorySnapshot,
    SystemMemoryProbe,
    validate_budget_gb,
)

#: ``limit_source`` of a snapshot whose total is the replica's budget.
REPLICA_LIMIT = "replica budget"


def replica_snapshot(node: MemorySnapshot, budget_bytes: Optional[int]) -> MemorySnapshot:
    """``node`` seen from a replica holding ``budget_bytes`` (None: the node's own snapshot).

    total = min(budget, node total); available = min(budget - own RSS, node available), >= 0.
    """
    if budget_bytes is None:
        return node
    own = node.process_rss_bytes
    total = min(budget_bytes, node.total_bytes)
    within_budget = max(budget_bytes - own, 0)
    available = max(min(within_budget, node.available_bytes, total), 0)
    source = REPLICA_LIMIT if within_budget <= node.available_bytes else node.limit_source
    return dataclasses.replace(
        node,
        total_bytes=total,
        available_bytes=available,
        used_percent=100.0 * (total - available) / total,
        limit_source=source,
    )


class ReplicaMemoryProbe:
    """A probe for one replica; its budget can change while it serves (the deployment's user_config)."""

    def __init__(self, node: Optional[MemoryProbe] = None, memory_budget_gb: Optional[float] = None) -> None:
        self.node = node or SystemMemoryProbe()
        self.device = getattr(self.node, "device", "cpu")
        self._lock = threading.Lock()
        self._budget_gb: Optional[float] = None
        self.set_budget(memory_budget_gb)

    @property
    def memory_budget_gb(self) -> Optional[float]:
        return self._budget_gb

    def set_budget(self, memory_budget_gb: Optional[float]) -> None:
        budget = validate_budget_gb(memory_budget_gb, name="memory_budget_gb")
        with self._lock:
            self._budget_gb = budget

    def __call__(self) -> MemorySnapshot:
        budget = self._budget_gb
        return replica_snapshot(self.node(), None if budget is None else int(budget * GIB))
