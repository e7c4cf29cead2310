import os
import threading
from pathlib import Path

import psutil
import pytest

from langchain_adaptquant import CachedProbe, InvalidValueError, ScriptedProbe, SystemMemoryProbe
from langchain_adaptquant.control.resources import GIB, apply_budget, read_cgroup_limit


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_and_usage_without_inactive_file(tmp_path):
    write(tmp_path / "memory.max", f"{4 * GIB}\n")
    write(tmp_path / "memory.current", f"{3 * GIB}\n")
    write(tmp_path / "memory.stat", f"anon 100\ninactive_file {GIB}\nactive_file 5\n")
    limit = read_cgroup_limit(tmp_path)
    assert (limit.limit_bytes, limit.usage_bytes, limit.version) == (4 * GIB, 2 * GIB, 2)


def test_cgroup_v2_unlimited_is_none(tmp_path):
    write(tmp_path / "memory.max", "max\n")
    assert read_cgroup_limit(tmp_path) is None


def test_cgroup_v1_limit(tmp_path):
    write(tmp_path / "memory" / "memory.limit_in_bytes", f"{2 * GIB}\n")
    write(tmp_path / "memory" / "memory.usage_in_bytes", f"{GIB}\n")
    limit = read_cgroup_limit(tmp_path)
    assert (limit.limit_bytes, limit.usage_bytes, limit.version) == (2 * GIB, GIB, 1)
    write(tmp_path / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "no limit"
    assert read_cgroup_limit(tmp_path) is None


def test_system_probe_uses_a_tighter_cgroup(tmp_path):
    write(tmp_path / "memory.max", f"{2 * GIB}\n")
    write(tmp_path / "memory.current", f"{GIB}\n")
    snap = SystemMemoryProbe(device="cpu", cgroup_root=tmp_path)()
    assert snap.limit_source == "cgroup"
    assert snap.total_bytes == 2 * GIB
    assert snap.available_bytes <= GIB
    assert snap.host_total_bytes == psutil.virtual_memory().total


def test_system_probe_reads_this_process():
    snap = SystemMemoryProbe(device="cpu", cgroup_root="/nonexistent")()
    rss = psutil.Process(os.getpid()).memory_info().rss
    assert snap.limit_source == "host"
    assert abs(snap.process_rss_bytes - rss) < 256 * 1024**2
    assert 0 < snap.process_anon_bytes <= snap.process_rss_bytes
    assert 0 < snap.used_percent < 100
    assert snap.device == "cpu" and snap.device_total_bytes is None
    data = snap.to_dict()
    assert data["used_percent"] == round(snap.used_percent, 1) and data["total_gb"] > 0


def test_budget_acts_like_a_memory_limit():
    vm = psutil.virtual_memory()
    used_gb = (vm.total - vm.available) / GIB
    budget = used_gb + 2.0
    snap = SystemMemoryProbe(device="cpu", memory_budget_gb=budget, cgroup_root="/nonexistent")()
    assert snap.limit_source == "budget"
    assert snap.total_bytes == int(budget * GIB)
    assert snap.available_bytes / GIB == pytest.approx(2.0, abs=0.3)
    assert apply_budget(100, 60, None) == (100, 60)
    assert apply_budget(10 * GIB, 6 * GIB, 8.0) == (8 * GIB, 4 * GIB)
    assert apply_budget(10 * GIB, 1 * GIB, 8.0) == (8 * GIB, 0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "8", True])
def test_bad_budget_is_rejected(bad):
    with pytest.raises(InvalidValueError, match="memory_budget_gb"):
        SystemMemoryProbe(device="cpu", memory_budget_gb=bad)


def test_bad_device_is_rejected():
    with pytest.raises(InvalidValueError, match="'cpu', 'cuda', 'cuda:N' or 'mps'"):
        SystemMemoryProbe(device="tpu")


def test_cached_probe_probes_once_per_ttl_even_from_threads():
    clock = [0.0]
    base = ScriptedProbe(total_gb=16, used_percent=30)
    cached = CachedProbe(base, ttl_s=0.05, clock=lambda: clock[0])
    threads = [threading.Thread(target=lambda: [cached() for _ in range(100)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert base.calls == 1 and cached.probes == 1
    base.set(80)
    assert cached().used_percent == pytest.approx(30)  # still cached
    clock[0] += 0.05
    assert cached().used_percent == pytest.approx(80)
    assert base.calls == 2
    cached.invalidate()
    cached()
    assert base.calls == 3


def test_scripted_probe_follows_its_script_and_validates():
    probe = ScriptedProbe(total_gb=10, script=[10, 20])
    assert [round(probe().used_percent) for _ in range(3)] == [10, 20, 20]
    with pytest.raises(InvalidValueError, match="used_percent"):
        probe.set(101)
    budgeted = ScriptedProbe(total_gb=10, used_percent=20, memory_budget_gb=4)()
    assert budgeted.total_bytes == 4 * GIB and budgeted.used_percent == pytest.approx(50)


_STATUS_CHILD = """
import json
from langchain_adaptquant.control.resources import process_status, reset_peak_rss

before = process_status()
block = bytearray(64 * 2**20)
for i in range(0, len(block), 4096):  # touch every page: resident, anonymous
    block[i] = 1
held = process_status()
del block
reset = reset_peak_rss()
after = process_status()
print(json.dumps({"before": vars(before), "held": vars(held), "after": vars(after), "reset": reset}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc figures")
def test_process_status_sees_a_touched_allocation_and_its_peak_resets():
    # a fresh interpreter: in the long-lived test process the allocator may serve the block from
    # pages an earlier test freed but kept resident, and then anonymous memory does not move
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _STATUS_CHILD], capture_output=True, text=True, check=True).stdout
    figures = json.loads(out)
    before, held, after = figures["before"], figures["held"], figures["after"]
    assert held["anon"] - before["anon"] > 56 * 2**20
    assert held["peak_rss"] >= held["rss"] >= held["anon"]
    assert figures["reset"]
    assert after["peak_rss"] < held["peak_rss"]  # the peak now starts from the smaller current RSS
