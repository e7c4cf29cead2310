"""The dashboard in headless Chromium: it renders from /status, shows the level, and follows a switch.

Chromium comes from Debian (``make test`` installs it). Without it this test fails, loudly: a
dashboard nobody rendered is not tested.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from live_server import LiveServer

from langchain_adaptquant import AdaptiveModelLoader, DynamicQuantizationManager, ScriptedProbe
from langchain_adaptquant.server import create_app

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=3000",
)


def chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found is None:
        pytest.fail("headless Chromium is required for the dashboard test: `make test` installs it "
                    "(apt-get install -y chromium)")
    return found


def dump_dom(url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True, text=True, timeout=90,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no element #{element_id} in the page"
    return html.unescape(match.group(1)).strip()


def test_dashboard_renders_the_level_and_follows_a_switch(tiny_chat_dir):
    probe = ScriptedProbe(total_gb=64, used_percent=10)
    manager = DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    app = create_app(str(tiny_chat_dir), loader=loader, served_model_name="tiny-chat", preload=True)
    with LiveServer(app) as server:
        url = f"{server.url}/dashboard"
        before = dump_dom(url)
        assert text_of(before, "conn").startswith("live")  # the page fetched /status and rendered it
        assert text_of(before, "current-level") == "FP16"
        assert text_of(before, "served-id") == "tiny-chat"
        assert text_of(before, "gauge-text") == "10.0%"
        assert '<tr data-model="' in before and "no switches yet" in before
        assert "<script src=" not in before and "<link" not in before  # no external assets: works offline

        probe.set(72)
        loader.requantize(loader.get(tiny_chat_dir), "int4", reason="memory pressure (dashboard test)")
        after = dump_dom(url)
        assert text_of(after, "current-level") == "INT4"
        assert text_of(after, "gauge-text") == "72.0%"
        assert 'data-from="fp16" data-to="int4"' in after and "FP16 → INT4" in after
        assert "memory pressure (dashboard test)" in after
        assert "<circle" in after  # the switch is drawn on the inline SVG timeline
