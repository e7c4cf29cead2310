"""ChatAdaptQuant on a real single-node Ray cluster: two replicas, two budgets, each picking its own level.

One module-scoped cluster (2 CPUs, dashboard on 127.0.0.1 for ``serve deploy``) hosts the deployment,
deployed as an operator would: a Serve config file written by ``serve_config`` and sent with Ray's
own ``serve deploy``. Every request goes through Serve's HTTP proxy on 127.0.0.1; the replica that
answered is read from the response headers. Then one replica's budget is tightened with a second
``serve deploy`` (a user_config change: same replicas, no restart): that replica switches at once,
the other keeps its level. The fixture shuts Serve and Ray down and checks no Ray process is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import httpx
import psutil
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: the 'ray' extra (pip install 'langchain-adaptquant[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed: the 'ray' extra")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from ray import serve  # noqa: E402

from langchain_adaptquant import ChatAdaptQuant, reference_model_path  # noqa: E402
from langchain_adaptquant.serve_ray import (  # noqa: E402
    BudgetSettings,
    ReplicaSettings,
    ScalingSettings,
    serve_config,
)
from langchain_adaptquant.serve_ray.local import free_port  # noqa: E402
from langchain_adaptquant.serve_ray.probe import REPLICA_LIMIT  # noqa: E402

pytestmark = pytest.mark.slow

TOKEN = "ray-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "reference"
APP = "adaptquant"
ROOMY_GB, TIGHT_GB, STARVED_GB = 4.0, 2.0, 0.25  # a replica uses ~0.5 GiB: 0.25 leaves no room at any level
SERVE_CLI = str(Path(sys.executable).with_name("serve"))


def wait_for(what: str, check: Callable[[], Any], timeout: float = 240.0, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[SimpleNamespace]:
    http_port, dashboard_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    others = {p.pid for p in psutil.Process().children(recursive=True)}  # not Ray's: left alone
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
             log_to_driver=False, configure_logging=False, _system_config={"metrics_report_interval_ms": 1000})
    node = ray._private.worker.global_worker.node
    roots = [p for p in psutil.Process().children(recursive=True) if p.pid not in others]  # gcs, raylet, ...
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{http_port}", dashboard=f"http://127.0.0.1:{dashboard_port}",
            metrics=f"http://127.0.0.1:{node.metrics_export_port}/metrics", folder=tmp_path_factory.mktemp("serve"),
            http=httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=120),
        )
    finally:
        started = set(roots)  # and everything they started since: workers, the proxy, every replica
        for root in roots:
            try:
                started.update(root.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        _, alive = psutil.wait_procs(list(started), timeout=30)
        left = [p for p in alive if _alive(p)]
        for process in left:
            process.kill()
        assert not left, f"Ray processes left after shutdown: {[(p.pid, p.name()) for p in left]}"


def deploy(cluster: SimpleNamespace, budgets: BudgetSettings) -> None:
    """``serve deploy`` of the config file an operator would keep (token from the replicas' environment)."""
    replica = ReplicaSettings(model=str(reference_model_path()), served_model_name=MODEL, max_queue=4)
    config = serve_config(replica, ScalingSettings(replicas=2, num_cpus=0.5), budgets, port=int(cluster.url.rsplit(":", 1)[1]),
                          name=APP)
    config["applications"][0]["runtime_env"] = {"env_vars": {"ADAPTQUANT_TOKEN": TOKEN}}
    path = cluster.folder / "serve_config.json"  # YAML is a superset of JSON: serve deploy reads it as is
    path.write_text(json.dumps(config, indent=2))
    done = subprocess.run([SERVE_CLI, "deploy", str(path), "-a", cluster.dashboard], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def app_running() -> bool:
    status = serve.status().applications.get(APP)
    return status is not None and status.status == "RUNNING"


def replicas_seen(cluster: SimpleNamespace, want: int = 2, tries: int = 60) -> dict[int, dict[str, Any]]:
    """GET the replica route through the proxy until every replica answered; keyed by rank."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(tries):
        response = cluster.http.get("/api/v1/quantization/replica")
        assert response.status_code == 200, response.text
        body = response.json()
        assert response.headers["x-adaptquant-replica"] == body["replica_id"]
        seen[body["rank"]] = body
        if len(seen) == want:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered in {tries} requests")


def chat_burst(cluster: SimpleNamespace, count: int = 8) -> dict[str, set[str]]:
    """``count`` concurrent chat completions through the proxy: the levels each replica answered at."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about lists."}], "max_tokens": 8}

    def one(_: int) -> tuple[str, str]:
        response = cluster.http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        return response.headers["x-adaptquant-replica"], response.json()["adaptquant"]["quantization_level"]

    levels: dict[str, set[str]] = {}
    for _ in range(5):  # Serve's router may send a whole burst to one replica; a few bursts reach both
        with ThreadPoolExecutor(count) as pool:
            for replica, level in pool.map(one, range(count)):
                levels.setdefault(replica, set()).add(level)
        if len(levels) == 2:
            return levels
    raise AssertionError(f"only {sorted(levels)} answered")


def metric_values(text: str, name: str) -> dict[str, float]:
    """replica tag (Ray) or model label (ours) -> value of ``name``."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                values[sample.labels.get("replica") or sample.labels.get("model", "")] = sample.value
    return values


def test_two_replicas_each_choose_their_own_level(cluster):
    deploy(cluster, BudgetSettings(memory_budgets_gb=(ROOMY_GB, TIGHT_GB)))
    wait_for("the application to run", app_running)
    before = replicas_seen(cluster)
    roomy, tight = before[0], before[1]
    assert (roomy["memory_budget_gb"], tight["memory_budget_gb"]) == (ROOMY_GB, TIGHT_GB)
    assert roomy["replica_id"] != tight["replica_id"] and roomy["pid"] != tight["pid"]
    for replica in (roomy, tight):  # each replica: its own model, budget, process memory and threads
        assert replica["loaded"] and replica["level"] in replica["available_levels"]
        assert replica["memory"]["limit_source"] == REPLICA_LIMIT and replica["torch_threads"] == 1
        assert replica["switches"] == []
    smallest = tight["available_levels"][-1]
    assert tight["level"] != smallest, "the tight replica must start above the smallest level to show a switch"

    levels = chat_burst(cluster)
    assert levels == {roomy["replica_id"]: {roomy["level"]}, tight["replica_id"]: {tight["level"]}}

    # the operator tightens rank 1's budget: a user_config change, applied in place
    deploy(cluster, BudgetSettings(memory_budgets_gb=(ROOMY_GB, STARVED_GB)))
    wait_for("rank 1 to get its new budget",
             lambda: replicas_seen(cluster)[1]["memory_budget_gb"] == STARVED_GB and app_running())
    after = replicas_seen(cluster)
    assert {after[0]["replica_id"], after[1]["replica_id"]} == {roomy["replica_id"], tight["replica_id"]}, "restarted"
    assert after[0]["level"] == roomy["level"] and after[0]["switches"] == []
    (switch,) = after[1]["switches"]
    assert (switch["from_level"], switch["to_level"], switch["ok"]) == (tight["level"], smallest, True)
    assert "nothing fits" in switch["reason"]
    assert after[1]["level"] == smallest and after[1]["memory"]["used_percent"] == 100.0

    levels = chat_burst(cluster)
    assert levels == {roomy["replica_id"]: {roomy["level"]}, tight["replica_id"]: {smallest}}
    print(f"\nrank 0 ({ROOMY_GB} GiB): {roomy['level']} throughout; rank 1: {tight['level']} at {TIGHT_GB} GiB, "
          f"{smallest} at {STARVED_GB} GiB ({switch['reason']})")

    # an operator's view: Ray's Prometheus export names each replica's level, and each replica's own /metrics
    bits = {"fp16": 16, "int8": 8, "int4": 4, "int2": 2}
    exported = wait_for("Ray to export the replica gauges", lambda: (
        (found := metric_values(httpx.get(cluster.metrics, timeout=10).text, "ray_adaptquant_replica_quantization_bits"))
        and found.get(tight["replica_id"]) == bits[smallest] and roomy["replica_id"] in found and found), timeout=60)
    assert exported[roomy["replica_id"]] == bits[roomy["level"]]
    own = {}
    for _ in range(40):
        response = cluster.http.get("/metrics")
        own[response.headers["x-adaptquant-replica"]] = metric_values(response.text, "adaptquant_quantization_bits")
        if len(own) == 2:
            break
    assert set(own[tight["replica_id"]].values()) == {bits[smallest]}
    assert set(own[roomy["replica_id"]].values()) == {bits[roomy["level"]]}


def test_langchain_clients_through_the_proxy(cluster):
    wait_for("the application to run", app_running)
    levels = {body["replica_id"]: body["level"] for body in replicas_seen(cluster).values()}
    llm = ChatAdaptQuant(base_url=cluster.url, api_key=TOKEN, max_tokens=8)
    for _ in range(6):
        answer = llm.invoke("Tell me about tuples.")
        replica = answer.response_metadata["replica"]["id"]
        assert answer.response_metadata["quantization_level"] == levels[replica]
    chunks = list(llm.stream("Tell me about tuples."))
    assert chunks[-1].response_metadata["quantization_level"] == levels[chunks[-1].response_metadata["replica"]["id"]]
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the dev extra")
    openai_llm = langchain_openai.ChatOpenAI(base_url=cluster.url + "/v1", api_key=TOKEN, model=MODEL, max_tokens=8,
                                             max_retries=0)
    assert openai_llm.invoke("Tell me about tuples.").response_metadata["system_fingerprint"].startswith("adaptquant-")


def running_replicas(app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None or "AdaptQuantReplica" not in status.deployments:
        return 0
    return status.deployments["AdaptQuantReplica"].replica_states.get("RUNNING", 0)


def test_cli_serve_ray_autoscales_on_the_cluster_and_removes_only_its_app(cluster):
    """``adaptquant serve --ray --ray-address`` with autoscaling: load adds a replica; Ctrl-C deletes the app only."""
    import queue
    import signal
    import threading

    serve.delete(APP)  # the config-file app of the tests above; the CLI deploys its own under the same name
    port = cluster.url.rsplit(":", 1)[1]
    address = ray._private.worker.global_worker.node.address
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("adaptquant")), "serve", "--ray", "--ray-address", address, "--port", port,
         "--model", str(reference_model_path()),  # the fast fixture, not the pulled default model
         "--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1", "--upscale-delay-s", "0",
         "--num-cpus-per-replica", "0.5", "--token", TOKEN, "--max-queue", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not any("adaptquant: serving" in line for line in seen):
            assert process.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
            except queue.Empty:
                raise AssertionError("no 'serving' line:\n" + "".join(seen)) from None
        banner = next(line for line in seen if "adaptquant: serving" in line)
        assert f"at http://127.0.0.1:{port}" in banner and address in banner
        assert "1-2 replicas (autoscaling, target 1 ongoing requests)" in banner
        assert running_replicas(APP) == 1
        body = {"model": "reference-llama", "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 96}
        assert cluster.http.post("/v1/chat/completions", json=body).status_code == 401  # the token holds through Serve
        stop = time.monotonic() + 150

        def keep_busy(_: int) -> int:
            sent = 0
            while time.monotonic() < stop and running_replicas(APP) < 2:
                assert cluster.http.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
                sent += 1
            return sent

        with ThreadPoolExecutor(4) as pool:  # 4 in flight against a target of 1 per replica
            sent = sum(pool.map(keep_busy, range(4)))
        assert running_replicas(APP) == 2, f"no second replica after {sent} requests"
        ranks = {body["rank"] for body in replicas_seen(cluster).values()}
        assert ranks == {0, 1}
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            process.kill()
    time.sleep(0.5)
    while not lines.empty():
        seen.append(lines.get())
    assert "adaptquant: stopped" in "".join(seen)
    assert APP not in serve.status().applications  # its app is gone; the cluster still answers
