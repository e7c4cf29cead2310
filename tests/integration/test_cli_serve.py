"""``adaptquant serve``, ``chat`` and the live ``demo`` on the tiny chat model, as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from langchain_adaptquant.cli.main import main
from langchain_adaptquant.server.security import check_bind, is_loopback

EXE = str(Path(sys.executable).with_name("adaptquant"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- refusals: clear message, exit status 2, nothing started --------------------------------------
def test_serve_refuses_a_non_loopback_address_without_a_token(capsys, tiny_chat_dir):
    code, _, err = run(capsys, "serve", "--model", str(tiny_chat_dir), "--host", "0.0.0.0")
    assert code == 2 and "refusing to bind '0.0.0.0' without a token" in err and "--token" in err


def test_serve_reports_a_port_in_use(capsys, tiny_chat_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "serve", "--model", str(tiny_chat_dir), "--port", str(port))
    assert code == 2 and f"port {port} on 127.0.0.1 is already in use" in err


def test_serve_reports_a_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "serve", "--model", str(tmp_path / "nothing-here"))
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--port", "70000"], "invalid --port '70000'"),
    (["serve", "--max-queue", "0"], "invalid --max-queue '0'"),
    (["demo", "--priority", "fastest"], "invalid task priority: 'fastest'"),
])
def test_bad_arguments_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_which_addresses_count_as_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))
    check_bind("0.0.0.0", "a-token")  # allowed with a token


# -- the real thing, in subprocesses (each pays the torch/transformers import) --------------------
@pytest.mark.slow
def test_serve_runs_requires_its_token_and_stops_on_ctrl_c(tiny_chat_dir):
    process = subprocess.Popen(
        [EXE, "serve", "--model", str(tiny_chat_dir), "--port", "0", "--token", "tok", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    try:
        seen, match = [], None
        for line in process.stdout:  # library warnings may come first
            seen.append(line)
            match = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
            if match:
                break
        assert match, "".join(seen)
        url = f"http://127.0.0.1:{match.group(1)}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).json()["loaded"]:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "server did not come up"
            time.sleep(0.2)
        body = {"model": tiny_chat_dir.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="tok", max_retries=0, timeout=60)
        answer = client.chat.completions.create(**body)
        assert answer.model_extra["adaptquant"]["quantization_level"] in ("fp16", "int8", "int4", "int2")
        assert httpx.get(f"{url}/dashboard", timeout=10).text.startswith("<!doctype html>")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0


@pytest.mark.slow
def test_chat_repl_streams_answers_and_quits(tiny_chat_dir):
    result = subprocess.run(
        [EXE, "chat", "--model", str(tiny_chat_dir), "--max-tokens", "5"],
        input="hello\n\nsecond question\n/quit\nnever read\n", capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "chatting with" in result.stdout and "/quit to exit" in result.stdout
    levels = re.findall(r"\[(fp16|int8|int4|int2) · (\d+) tokens · [\d.]+s", result.stdout)
    assert len(levels) == 2 and all(0 < int(tokens) <= 5 for _, tokens in levels)


def test_live_demo_runs_the_example_timeline_with_real_switches(capsys, tiny_chat_dir):
    started = time.monotonic()
    code, out, _ = run(capsys, "demo", "--model", str(tiny_chat_dir), "--max-tokens", "4")
    assert code == 0 and time.monotonic() - started < 60
    for clock in ("10:00", "10:15", "10:30", "10:45", "11:00"):
        assert clock in out
    assert "initial load" in out and "downgraded" in out and "upgraded" in out
    assert "fp16 -> int4 (downgrade)" in out  # measured switch lines
    # The tiny random model's INT4 measures below the balanced quality floor at 10:30, so at 10:45
    # (moderate memory, 2 requests: the matrix's INT4 is asked for by load, memory allows INT8)
    # the policy upgrades to INT8, then to 16-bit at 11:00.
    assert "int4 -> int8 (upgrade)" in out and "int8 -> fp16 (upgrade)" in out
    assert "telemetry: 11 calls, 0 errors" in out


def test_demo_without_the_model_is_a_clear_error(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "demo", "--model", str(tmp_path / "missing"))
    assert code == 2 and f"model path '{tmp_path / 'missing'}' does not exist" in err
    monkeypatch.setenv("ADAPTQUANT_CACHE_DIR", str(tmp_path))  # an empty store: nothing pulled
    code, _, err = run(capsys, "demo", "--model", "gemma3-270m")
    assert code == 2 and "run `adaptquant models pull gemma3-270m`" in err
