"""One replica's decisions in-process (no Ray): its budget against its own memory, on the reference model.

The node is a ScriptedProbe reporting a 64 GiB node at 10% and this replica at 0.5 GiB, so the
decisions are the same on any machine; the budget is applied on top by the replica's own probe, as
in a Serve replica.
"""

from __future__ import annotations

import pytest

from langchain_adaptquant import reference_model_path
from langchain_adaptquant.control.resources import GIB, ScriptedProbe
from langchain_adaptquant.serve_ray.model import ReplicaBudgetError, ReplicaModel
from langchain_adaptquant.serve_ray.probe import REPLICA_LIMIT
from langchain_adaptquant.serve_ray.settings import ReplicaSettings


def replica(preload: bool = True) -> ReplicaModel:
    node = ScriptedProbe(total_gb=64, used_percent=10, process_gb=0.5)
    return ReplicaModel(ReplicaSettings(model=str(reference_model_path()), served_model_name="ref", preload=preload),
                        node=node)


def test_a_roomy_budget_loads_high_and_a_starved_one_shrinks_the_resident_model():
    model = replica()
    assert model.apply_budget(4.0) is None and model.loaded().level.value == "fp16"  # 0.5 of 4 GiB: relaxed
    report = model.report()
    assert (report["memory_budget_gb"], report["level"], report["switches"]) == (4.0, "fp16", [])
    assert report["memory"]["limit_source"] == REPLICA_LIMIT and report["memory"]["used_percent"] == 12.5
    sample = model.sample()
    assert (sample.level_bits, sample.memory_budget_bytes, sample.switches) == (16, 4 * GIB, 0)

    smallest = model.manager.available_levels[-1]
    record = model.apply_budget(0.25, rank=1)  # below what the replica itself holds: nothing fits
    assert record is not None and record.ok and (record.from_level, record.to_level) == ("fp16", smallest.value)
    assert "nothing fits" in record.reason and model.loaded().level is smallest
    assert model.report()["memory"]["used_percent"] == 100.0 and model.sample().switches == 1
    assert model.apply_budget(0.25, rank=1) is None  # already at the smallest level: nothing more to do


def test_a_budget_with_no_room_at_start_refuses_to_start_with_the_numbers():
    with pytest.raises(ReplicaBudgetError) as info:
        replica().apply_budget(0.25, rank=3)
    message = str(info.value)
    assert message.startswith("replica rank 3: memory budget 0.25 GiB leaves no room for ref at any level")
    assert "already uses 0.50 GiB" in message and "raise its entry in memory_budget_gb/memory_budgets_gb" in message


def test_without_preload_the_budget_waits_for_the_first_request():
    model = replica(preload=False)
    assert model.apply_budget(4.0) is None and model.loaded() is None
    assert model.report()["loaded"] is False and model.sample().level_bits is None
