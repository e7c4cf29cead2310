"""Reliability through the REST chat endpoint: load while levels swing, and clients that vanish."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import httpx
import pytest
from live_server import LiveServer

from langchain_adaptquant import AdaptiveModelLoader, DynamicQuantizationManager, PolicyConfig, ScriptedProbe
from langchain_adaptquant.server import create_app

pytestmark = pytest.mark.slow
SWING = (10.0, 70.0, 92.0, 30.0)


@pytest.fixture(scope="module")
def live(tiny_chat_dir):
    probe = ScriptedProbe(total_gb=8, used_percent=10)
    manager = DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0,
                                         policy=PolicyConfig(upgrade_cooldown_s=0.3, load_downgrade_delay_s=0.3))
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    app = create_app(str(tiny_chat_dir), loader=loader, max_queue=64, served_model_name="tiny", preload=True)
    with LiveServer(app) as server:
        yield server.url, probe, manager, loader


def body(prompt: str, **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 6, "temperature": 0, **extra}


def test_two_hundred_rest_requests_from_sixteen_clients_during_switches(live):
    url, probe, manager, loader = live
    prompts = [f"question {i}" for i in range(5)]
    reference: dict[str, dict[str, str]] = {}
    with httpx.Client(base_url=url, timeout=120) as http:
        for used in (10.0, 70.0, 92.0, 10.0):  # one request at a time: the answer at each level the policy picks
            probe.set(used)
            time.sleep(0.35)  # past the test policy's cooldown
            for prompt in prompts:
                data = http.post("/v1/chat/completions", json=body(prompt)).json()
                level = data["adaptquant"]["quantization_level"]
                reference.setdefault(level, {})[prompt] = data["choices"][0]["message"]["content"]
    assert len(reference) >= 3
    done = threading.Event()

    def swing():
        i = 0
        while not done.wait(0.15):
            probe.set(SWING[i % len(SWING)])
            i += 1

    async def clients():
        results = []
        tickets = iter(range(200))
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            async def client():
                for n in tickets:
                    prompt = prompts[n % len(prompts)]
                    response = await http.post("/v1/chat/completions", json=body(prompt))
                    results.append((prompt, response))
            await asyncio.gather(*(client() for _ in range(16)))
        return results

    swinger = threading.Thread(target=swing)
    swinger.start()
    try:
        results = asyncio.run(clients())
    finally:
        done.set()
        swinger.join()
    assert len(results) == 200
    statuses = Counter(r.status_code for _, r in results)
    assert statuses == {200: 200}, statuses
    levels = Counter()
    compared = 0
    for prompt, response in results:
        data = response.json()
        info = data["adaptquant"]
        levels[info["quantization_level"]] += 1
        expected = reference.get(info["quantization_level"], {}).get(prompt)
        if expected is not None and not info["switched_during_generation"]:
            assert data["choices"][0]["message"]["content"] == expected
            compared += 1
    assert compared >= 50, f"only {compared} answers could be checked against a reference"
    assert len(levels) >= 2
    assert sum(len(m.switches) for m in loader.models()) >= 3
    assert manager.tracker.stats().active == 0 and loader.models()[0].active_requests == 0


def test_client_that_disconnects_mid_stream_stops_generation(live):
    url, probe, manager, loader = live
    probe.set(10)
    loaded = loader.models()[0]
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body("go on", max_tokens=1000, stream=True)) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break  # one token arrived: now hang up
        gone_at = time.monotonic()
    while (loaded.active_requests or manager.tracker.stats().active) and time.monotonic() - gone_at < 10:
        time.sleep(0.02)
    stopped_after = time.monotonic() - gone_at
    assert loaded.active_requests == 0 and manager.tracker.stats().active == 0
    assert stopped_after < 1.0, f"generation went on {stopped_after:.2f}s after the client left"
