"""serve_ray without a cluster: settings, the per-replica memory view, the CLI's checks, and Ray missing.

Ray's absence is simulated honestly: a subprocess whose import system refuses ``ray`` (a meta-path
finder), so the real import statements run and fail as they would on a machine without the extra.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from langchain_adaptquant.cli.main import main
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.control.resources import GIB, ScriptedProbe, SystemMemoryProbe
from langchain_adaptquant.serve_ray import BudgetSettings, ReplicaMemoryProbe, ReplicaSettings, ScalingSettings
from langchain_adaptquant.serve_ray.probe import REPLICA_LIMIT, replica_snapshot

BLOCK_RAY = """
import importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoRay())
"""


def run_without_ray(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_RAY + code], capture_output=True, text=True, timeout=180)


# -- Ray missing ------------------------------------------------------------------------------------
def test_without_ray_the_serve_parts_name_the_extra_and_settings_still_work():
    done = run_without_ray(
        "import langchain_adaptquant.serve_ray as sr\n"
        "sr.ScalingSettings(min_replicas=1, max_replicas=3)\n"  # pure settings need no Ray
        "try:\n"
        "    from langchain_adaptquant.serve_ray import build_app\n"
        "except sr.RayNotInstalledError as error:\n"
        "    assert isinstance(error, ImportError)\n"
        "    print('ERROR', error)\n"
        "try:\n"
        "    import langchain_adaptquant.serve_ray.replica\n"
        "except sr.RayNotInstalledError as error:\n"
        "    print('ERROR', error)\n"
    )
    assert done.returncode == 0, done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2
    for line in errors:
        assert "Ray Serve is not installed (No module named 'ray')" in line
        assert "the 'ray' extra: pip install 'langchain-adaptquant[ray]'" in line


def test_without_ray_the_cli_exits_2_naming_the_extra():
    done = run_without_ray(
        "import sys\nfrom langchain_adaptquant.cli.main import main\n"
        "sys.exit(main(['serve', '--ray', '--replicas', '2']))\n"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "adaptquant: error: Ray Serve is not installed" in done.stderr
    assert "pip install 'langchain-adaptquant[ray]'" in done.stderr


# -- settings ---------------------------------------------------------------------------------------
def test_budgets_by_rank_and_user_config_round_trip():
    budgets = BudgetSettings(memory_budget_gb=6, memory_budgets_gb=[4, 1.5])
    assert [budgets.for_rank(rank) for rank in range(4)] == [4.0, 1.5, 6.0, 6.0]
    assert BudgetSettings.from_user_config(budgets.to_user_config()) == budgets
    assert BudgetSettings.from_user_config(None) == BudgetSettings()
    assert BudgetSettings().for_rank(0) is None


@pytest.mark.parametrize("config, needle", [
    ({"memory_budgets_gb": [4, 0]}, "invalid memory_budgets_gb[1]: 0"),
    ({"memory_budgets_gb": [4, None]}, "invalid memory_budgets_gb[1]: None"),
    ({"memory_budgets_gb": "4,2"}, "invalid memory_budgets_gb: '4,2'"),
    ({"memory_budget_gb": -1}, "invalid memory_budget_gb: -1"),
    ({"memory_budget": 4}, "invalid user_config key: ['memory_budget']"),
    ([4, 2], "invalid user_config: [4, 2]"),
])
def test_bad_user_config_is_refused_by_name(config, needle):
    with pytest.raises(InvalidValueError) as info:
        BudgetSettings.from_user_config(config)
    assert needle in str(info.value)


def test_scaling_options_fixed_and_autoscaling():
    replica = ReplicaSettings(model="/m", max_queue=6)
    fixed = ScalingSettings(replicas=2, num_cpus=0.5).deployment_options(replica)
    assert fixed == {"num_replicas": 2, "max_ongoing_requests": 6, "max_queued_requests": 64,
                     "ray_actor_options": {"num_cpus": 0.5}}
    assert ScalingSettings().replicas == 1
    auto = ScalingSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=3)
    options = auto.deployment_options(replica)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3.0,
                                             "upscale_delay_s": 30.0, "downscale_delay_s": 600.0,
                                             "look_back_period_s": 30.0}
    assert auto.most_replicas == 4


@pytest.mark.parametrize("kwargs, needle", [
    ({"replicas": 0}, "invalid replicas: 0"),
    ({"replicas": 2, "min_replicas": 1, "max_replicas": 3}, "invalid replicas: 2"),
    ({"replicas": None, "min_replicas": 1}, "invalid min_replicas/max_replicas: (1, None)"),
    ({"replicas": None, "min_replicas": 3, "max_replicas": 2}, "invalid min_replicas: 3; allowed: at most max_replicas (2)"),
    ({"target_ongoing_requests": 0}, "invalid target_ongoing_requests: 0"),
    ({"num_cpus": -0.5}, "invalid num_cpus: -0.5"),
    ({"look_back_period_s": 0}, "invalid look_back_period_s: 0"),
])
def test_bad_scaling_is_refused_by_name(kwargs, needle):
    with pytest.raises(InvalidValueError) as info:
        ScalingSettings(**kwargs)
    assert needle in str(info.value)


def test_budget_list_and_target_must_fit_the_deployment():
    with pytest.raises(InvalidValueError, match=r"invalid memory_budgets_gb: \[4.0, 2.0, 1.0\]; allowed: at most 2"):
        ScalingSettings(replicas=2).check_budgets(BudgetSettings(memory_budgets_gb=(4, 2, 1)))
    with pytest.raises(InvalidValueError, match=r"invalid target_ongoing_requests: 9; allowed: at most max_queue \(8\)"):
        ScalingSettings(replicas=None, min_replicas=1, max_replicas=2, target_ongoing_requests=9).check_queue(
            ReplicaSettings(model="/m"))
    with pytest.raises(InvalidValueError, match="invalid replica setting: \\['modle'\\]"):
        ReplicaSettings.from_args({"modle": "/m"})
    with pytest.raises(InvalidValueError, match="invalid torch_threads: 0"):
        ReplicaSettings(model="/m", torch_threads=0)


# -- a replica's view of memory ---------------------------------------------------------------------
def test_replica_budget_counts_the_replicas_own_memory_not_the_node():
    node = ScriptedProbe(total_gb=64, used_percent=50, process_gb=1.0)()  # the node is half full
    seen = replica_snapshot(node, int(4 * GIB))
    assert seen.total_bytes == 4 * GIB and seen.available_bytes == 3 * GIB  # 4 GiB budget - 1 GiB own RSS
    assert seen.used_percent == pytest.approx(25.0) and seen.limit_source == REPLICA_LIMIT
    assert replica_snapshot(node, None) is node


def test_a_crowded_node_caps_every_replica_on_it():
    node = ScriptedProbe(total_gb=64, used_percent=99, process_gb=1.0)()  # 0.64 GiB left on the node
    seen = replica_snapshot(node, int(8 * GIB))
    assert seen.available_bytes == node.available_bytes and seen.limit_source == node.limit_source
    assert seen.used_percent > 90


def test_a_budget_below_the_replicas_own_memory_leaves_nothing():
    node = ScriptedProbe(total_gb=64, used_percent=10, process_gb=1.0)()
    seen = replica_snapshot(node, int(0.5 * GIB))
    assert seen.available_bytes == 0 and seen.used_percent == 100.0


def test_the_probe_reads_this_process_and_takes_a_new_budget():
    node = SystemMemoryProbe()
    probe = ReplicaMemoryProbe(node)
    first = probe()
    assert first.limit_source in ("host", "cgroup")  # no budget: the node's own view
    budget_gb = (first.process_rss_bytes + GIB) / GIB  # room for 1 GiB more than this process holds now
    probe.set_budget(budget_gb)
    snapshot = probe()
    assert snapshot.total_bytes == int(budget_gb * GIB)
    if node().available_bytes > 2 * GIB:  # the node is not the tighter limit
        assert snapshot.limit_source == REPLICA_LIMIT
        assert abs(snapshot.available_bytes - GIB) < 128 * 2**20  # RSS moves a little between two reads
    with pytest.raises(InvalidValueError, match="invalid memory_budget_gb: 0"):
        probe.set_budget(0)
    assert probe.memory_budget_gb == budget_gb  # a refused budget changes nothing


# -- the CLI refuses before anything starts ---------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["serve", "--replicas", "2"], "add --ray to use them"),
    (["serve", "--memory-budget-gb", "4,1.5"], "a budget per replica needs --ray"),
    (["serve", "--ray", "--min-replicas", "3", "--max-replicas", "2"], "invalid min_replicas: 3"),
    (["serve", "--ray", "--min-replicas", "1"], "autoscaling needs both --min-replicas and --max-replicas"),
    (["serve", "--ray", "--replicas", "2", "--max-replicas", "3", "--min-replicas", "1"], "invalid --replicas: 2"),
    (["serve", "--ray", "--target-ongoing-requests", "2"], "it steers autoscaling"),
    (["serve", "--ray", "--replicas", "2", "--memory-budget-gb", "4,2,1"], "at most 2 budget(s)"),
    (["serve", "--ray", "--host", "0.0.0.0"], "refusing to bind '0.0.0.0' without a token"),
])
def test_serve_ray_refuses_bad_flags_with_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--ray", "--replicas", "0"], "invalid --replicas '0'"),
    (["serve", "--ray", "--num-cpus-per-replica", "nan"], "invalid --num-cpus-per-replica 'nan'"),
    (["serve", "--memory-budget-gb", "4,x"], "invalid --memory-budget-gb '4,x'"),
])
def test_serve_ray_flag_types(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and needle in capsys.readouterr().err
