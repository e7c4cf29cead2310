"""Reliability under load, real memory pressure and faults (issue: never crash, never corrupt)."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
import time

import psutil
import pytest

from langchain_adaptquant import ChatAdaptQuant, DynamicQuantizationManager, PolicyConfig, ScriptedProbe
from langchain_adaptquant.backends.quanto import QuantoBackend
from langchain_adaptquant.backends.registry import (
    preference,
    available_levels,
    get_backend,
    register_backend,
    unregister_backend,
)
from langchain_adaptquant.errors import SwitchError
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader
from langchain_adaptquant.units import GIB

FAST = PolicyConfig(upgrade_cooldown_s=0.3, load_downgrade_delay_s=0.3)


def _stress_module():
    return importlib.import_module("benchmarks.stress")  # the repository root is on pytest's pythonpath


def make_llm(folder, probe=None, policy=FAST, **kwargs):
    probe = probe or ScriptedProbe(total_gb=8, used_percent=10)
    manager = DynamicQuantizationManager(probe=probe, policy=policy, snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    return ChatAdaptQuant(model=str(folder), loader=loader, temperature=0, **kwargs), probe, manager, loader


@pytest.mark.slow
def test_two_hundred_requests_from_sixteen_clients_while_levels_swing(tiny_chat_dir):
    stress = _stress_module()
    llm, probe, manager, loader = make_llm(tiny_chat_dir, max_tokens=6)
    reference = stress.reference_answers(llm, [level.value for level in available_levels("cpu")])
    # the engine serves these 200 answers in a few seconds (the per-request path took ~15 s), so
    # memory swings every 0.2 s to put several switches under them
    report = stress.run_load(llm, probe, requests=200, threads=8, tasks=8, swing_every_s=0.2)
    summary = report.summary()
    assert summary["requests"] == 200  # nothing lost
    assert summary["unexpected_failures"] == 0 and summary["ok"] == 200, [o for o in report.outcomes if not o.ok][:3]
    assert summary["switches"] >= 3 and len(summary["levels"]) >= 2
    assert stress.mismatches(report, reference) == []  # a switch never corrupts an answer at one level
    checked = [o for o in report.outcomes if o.ok and not o.switched_during_generation]
    assert len(checked) >= 20, f"only {len(checked)} answers were produced at one level"
    assert all(len(o.levels_used) == 1 for o in checked)
    assert manager.tracker.stats().active == 0 and loader.models()[0].active_requests == 0


BALLAST = """
import sys
block = bytearray(int(sys.argv[1]))
for i in range(0, len(block), 4096):  # touch every page so it is really resident
    block[i] = 1
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.mark.slow
def test_real_ballast_downgrades_then_freeing_it_upgrades(tiny_chat_dir):
    loader = AdaptiveModelLoader(manager=DynamicQuantizationManager(device="cpu"), show_progress=False)
    loader.load_model(tiny_chat_dir, force_quantization="fp16")  # resident before memory is measured
    for _ in range(5):  # other processes may move the machine's memory meanwhile: settle first
        vm = psutil.virtual_memory()
        budget = (vm.total - vm.available) / GIB / 0.30  # what is in use now is 30% of the budget: relaxed
        manager = DynamicQuantizationManager(device="cpu", memory_budget_gb=budget, policy=FAST, snapshot_ttl_s=0)
        if manager.snapshot().used_percent < 36:
            break
    ballast_gb = 0.64 * budget  # pushes use to about 94% of the budget: emergency
    assert ballast_gb < vm.available / GIB - 2, "not enough free memory on this machine for the ballast"
    loader.manager = manager
    llm = ChatAdaptQuant(model=str(tiny_chat_dir), loader=loader, max_tokens=2, task_priority="quality")
    first = llm.invoke("hi").response_metadata
    assert first["quantization_level"] == "fp16", (first["decision_reason"], first["memory"])

    # a plain Python child (no torch) holds the ballast: only its bytes move the machine's memory
    child = subprocess.Popen([sys.executable, "-c", BALLAST, str(int(ballast_gb * GIB))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        snap = manager.snapshot()
        assert snap.limit_source == "budget" and snap.used_percent > 85, snap
        pressured = llm.invoke("hi").response_metadata
        assert pressured["quantization_level"] == "int2"
        # a downgrade forced by memory; near the top even int2 may not leave the headroom, and then the
        # loaded model shrinks to its smallest level and keeps serving
        assert "memory pressure" in pressured["decision_reason"] or "nothing fits" in pressured["decision_reason"]
        assert snap.used_bytes <= snap.total_bytes  # the switch came before model plus ballast exceeded it
    finally:
        child.communicate("go\n", timeout=30)
    time.sleep(FAST.upgrade_cooldown_s + 0.2)
    deadline = time.monotonic() + 10
    meta = {"quantization_level": "int2"}
    while meta["quantization_level"] == "int2" and time.monotonic() < deadline:
        meta = llm.invoke("hi").response_metadata
        time.sleep(0.1)
    # upgraded after the cooldown; how far depends on what the rest of the machine uses by then (a
    # shared CI machine measured 58% projected once: moderate, where headroom can settle on int4)
    assert meta["quantization_level"] in ("fp16", "int8", "int4"), meta["decision_reason"]
    assert "upgrade" in meta["decision_reason"], meta["decision_reason"]


class FailingQuanto(QuantoBackend):
    """The real quanto backend (the only one with int2), failing on every third layer it takes."""

    def __init__(self) -> None:
        self.calls = 0

    def _quantize(self, linear, level, device):
        self.calls += 1
        if self.calls % 3 == 0:  # every third layer: each switch to int2 fails part-way
            raise RuntimeError("simulated kernel failure")
        return super()._quantize(linear, level, device)


def test_backend_error_mid_switch_rolls_back_and_serving_continues(tiny_chat_dir):
    llm, probe, manager, loader = make_llm(tiny_chat_dir, max_tokens=4)
    before = llm.invoke("hello")
    assert before.response_metadata["quantization_level"] == "fp16"
    failing = FailingQuanto()
    saved = copy.deepcopy(preference)
    register_backend(failing)  # replaces "quanto" ...
    int2pack = get_backend("int2pack")
    unregister_backend("int2pack")  # ... and without int2pack no other backend can take int2
    try:
        loaded = loader.models()[0]
        with pytest.raises(SwitchError, match="rolled back"):
            loader.requantize(loaded, "int2")
        assert failing.calls >= 3 and loaded.level.value == "fp16"
        probe.set(92)  # the policy now asks for int2; the switch fails inside the call and is logged
        after = llm.invoke("hello")
    finally:
        register_backend(QuantoBackend())
        register_backend(int2pack)
        preference.clear()
        preference.update(saved)
    assert after.response_metadata["quantization_level"] == "fp16"
    assert after.content == before.content  # rolled back to exactly the same weights
    assert loader.stats()[0]["last_error"] and "simulated kernel failure" in loader.stats()[0]["last_error"]
    failed = after.response_metadata["switches"]
    assert failed and failed[-1]["ok"] is False


def test_weights_deleted_after_load_keep_serving_at_current_level(tiny_chat_dir, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_chat_dir, folder)
    llm, probe, manager, loader = make_llm(folder, max_tokens=4)
    probe.set(92)
    assert llm.invoke("x").response_metadata["quantization_level"] == "int2"
    (folder / "model.safetensors").unlink()
    probe.set(10)
    time.sleep(FAST.upgrade_cooldown_s + 0.1)
    message = llm.invoke("x")  # the upgrade fails (weights gone) but the answer comes at int2
    assert message.response_metadata["quantization_level"] == "int2"
    assert "removed since the model was loaded" in loader.stats()[0]["last_error"]
