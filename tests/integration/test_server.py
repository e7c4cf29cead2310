"""The REST API and the OpenAI-compatible endpoint, against a real uvicorn server on 127.0.0.1.

The model is the tiny random chat model; memory comes from a ScriptedProbe so a test can force a
switch and then see it in /status, /metrics and the chat response. The OpenAI endpoint is driven
by the official ``openai`` client.
"""

from __future__ import annotations

import dataclasses
import json
import time
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import openai
import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from live_server import LiveServer

from langchain_adaptquant import AdaptiveModelLoader, DynamicQuantizationManager, ScriptedProbe
from langchain_adaptquant.server import create_app
from langchain_adaptquant.server.openai_compat import ChunkWriter, completion

TOKEN = "s3cret-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def live(tiny_chat_dir) -> Iterator[SimpleNamespace]:
    probe = ScriptedProbe(total_gb=64, used_percent=10)
    manager = DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    app = create_app(
        str(tiny_chat_dir), loader=loader, token=TOKEN, max_queue=1, max_tokens_limit=4000, max_prompt_chars=2000,
        max_body_bytes=20_000, served_model_name=MODEL, preload=True,
    )
    with LiveServer(app) as server:
        yield SimpleNamespace(url=server.url, probe=probe, manager=manager, loader=loader, app=app, folder=tiny_chat_dir,
                              http=httpx.Client(base_url=server.url, timeout=60))


@pytest.fixture()
def env(live) -> SimpleNamespace:
    """Each test starts with relaxed memory and the model loaded at FP16."""
    live.probe.set(10)
    loaded = live.loader.get(live.folder) or live.loader.load_model(str(live.folder))
    if loaded.level.value != "fp16":
        live.loader.requantize(loaded, "fp16", reason="test reset")
    return live


def client(live, api_key: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **overrides}


# -- monitoring ---------------------------------------------------------------------------------
def test_health_models_and_openapi(env):
    health = env.http.get("/healthz").json()
    assert health == {"status": "ok", "model": MODEL, "loaded": True, "level": "fp16"}
    models = client(env).models.list()
    assert [m.id for m in models.data] == [MODEL]
    paths = env.http.get("/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/models", "/api/v1/quantization/status", "/api/v1/quantization/calculate",
                 "/api/v1/quantization/memory", "/api/v1/quantization/cache", "/api/v1/quantization/cache/clear"):
        assert path in paths


def test_status_has_the_documented_shape_and_the_served_model(env):
    status = env.http.get("/api/v1/quantization/status").json()
    assert {"device", "active_requests", "memory", "recommended_level", "current_models"} <= set(status)
    assert set(status["memory"]) >= {"total_gb", "available_gb", "used_percent", "process_gb"}
    assert status["memory"]["used_percent"] == 10.0
    (model,) = status["current_models"]
    assert {"name", "size_mb", "access_count", "level"} <= set(model) and model["level"] == "fp16"
    assert status["served_model"]["id"] == MODEL and status["served_model"]["level"] == "fp16"
    assert status["queue"] == {"in_flight": 0, "max_queue": 1}
    assert status["recommended_level"] == "fp16"


def test_calculate_memory_and_cache(env):
    result = env.http.post("/api/v1/quantization/calculate", json={"model_size_params": 7.0, "task_priority": "Balanced"})
    assert result.status_code == 200
    data = result.json()
    assert {"level", "precision", "compression_ratio", "estimated_memory_gb", "config"} <= set(data)
    assert data["compression_ratio"].endswith("x") and data["level"] in ("fp16", "int8", "int4", "int2")
    memory = env.http.get("/api/v1/quantization/memory").json()
    assert memory["process"]["rss_mb"] > 0 and memory["process"]["anon_mb"] > 0
    (entry,) = memory["models"]
    assert entry["level"] == "fp16" and entry["stored_mb"] > 0 and "file_backed_mb" in entry
    cache = env.http.get("/api/v1/quantization/cache").json()
    assert cache["count"] == 1 and cache["models"][0]["level"] == "fp16" and cache["total_size_mb"] > 0
    assert cache["models"][0]["layer_cache"] == {}  # nothing quantized yet: nothing kept on disk
    assert set(cache["layer_cache"]) >= {"enabled", "layers", "mb", "budget_mb", "hits", "misses"}


@pytest.mark.parametrize(
    "body, status, needles",
    [
        ({"model_size_params": 5000}, 409, ["does not fit even at int2", "required_gb"]),
        ({"model_size_params": 7, "task_priority": "fast"}, 422, ["task_priority", "'fast'", "'quality'"]),
        ({"model_size_params": "seven"}, 422, ["model_size_params", "valid number"]),
        ({"model_size_params": -1}, 422, ["model_size_params", "greater than 0"]),
        ({}, 422, ["model_size_params: field required"]),
        ({"model_size_params": 7, "task_prority": "speed"}, 422, ["task_prority: unknown field"]),
    ],
)
def test_calculate_rejects_bad_input_with_a_clear_message(env, body, status, needles):
    response = env.http.post("/api/v1/quantization/calculate", json=body)
    assert response.status_code == status
    text = response.text
    for needle in needles:
        assert needle in text
    assert response.json()["error"]["message"]


def test_calculate_rejects_malformed_json(env):
    response = env.http.post("/api/v1/quantization/calculate", content=b'{"model_size_params": 7,',
                             headers={"content-type": "application/json"})
    assert response.status_code == 422 and "malformed JSON body" in response.json()["error"]["message"]


# -- OpenAI-compatible chat -----------------------------------------------------------------------
def test_openai_client_completion_and_stream_agree(env):
    c = client(env)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    response = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert response.object == "chat.completion" and response.model == MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert response.system_fingerprint == "adaptquant-fp16"
    extension = response.model_extra["adaptquant"]
    assert extension["quantization_level"] == "fp16" and extension["backend"] == "cast" and extension["switches"] == []

    stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == choice.message.content  # greedy decoding: the same answer, token by token
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens
    assert len({chunk.id for chunk in chunks}) == 1

    plain = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True))
    assert all(chunk.usage is None for chunk in plain) and plain[-1].choices[0].finish_reason == choice.finish_reason


def test_raw_sse_ends_with_done(env):
    with env.http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True), headers=AUTH) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_task_priority_extension(env):
    response = client(env).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2, extra_body={"task_priority": "speed"})
    assert "speed priority" in response.model_extra["adaptquant"]["decision_reason"]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client(env).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=2, extra_body={"task_priority": "fastest"})
    assert "task_priority" in str(info.value) and "'fastest'" in str(info.value)


def test_a_switch_shows_in_the_response_status_and_metrics(env):
    env.probe.set(90)
    response = client(env).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    extension = response.model_extra["adaptquant"]
    assert extension["quantization_level"] == "int2"
    (switch,) = extension["switches"]
    assert (switch["from_level"], switch["to_level"], switch["direction"], switch["ok"]) == ("fp16", "int2", "downgrade", True)

    status = env.http.get("/api/v1/quantization/status").json()
    assert status["served_model"]["level"] == "int2" and status["current_models"][0]["level"] == "int2"
    assert status["recent_switches"][-1]["at"] == switch["at"]
    assert status["telemetry"]["switches"]["downgrade"] >= 1

    metrics = env.http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    name = str(env.folder)
    assert f'adaptquant_quantization_bits{{model="{name}"}} 2.0' in text
    assert f'adaptquant_quantization_level{{level="int2",model="{name}"}} 1.0' in text
    assert 'adaptquant_memory_used_percent 90' in text
    downgrades = [line for line in text.splitlines()
                  if line.startswith('adaptquant_switches_total{direction="downgrade",outcome="ok"}')]
    assert downgrades and float(downgrades[0].split()[-1]) >= 1
    for metric in ("adaptquant_request_latency_seconds_count", 'adaptquant_tokens_total{kind="output"}',
                   "adaptquant_active_requests", "adaptquant_process_rss_bytes"):
        assert metric in text


def test_a_switch_made_outside_chat_reaches_status_once(env):
    loaded = env.loader.get(env.folder)
    before = len(env.http.get("/api/v1/quantization/status").json()["recent_switches"])
    record = env.loader.requantize(loaded, "int8", reason="operator asked")
    switches = env.http.get("/api/v1/quantization/status").json()["recent_switches"]
    switches_again = env.http.get("/api/v1/quantization/status").json()["recent_switches"]
    assert len(switches) == before + 1 == len(switches_again)
    assert switches[-1]["to_level"] == "int8" and switches[-1]["reason"] == "operator asked"
    assert switches[-1]["at"] == record.at


def test_tools_and_tool_messages_are_accepted(env):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    response = client(env).chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="auto",
                                                   max_tokens=4)
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.UnprocessableEntityError, match="not in tools"):
        client(env).chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=4,
                                            tool_choice={"type": "function", "function": {"name": "delete_files"}})


class _ToolCallingFake(GenericFakeChatModel):
    """Stands in for a model that answers with a tool call (the random tiny model cannot be made to)."""

    def bind_tools(self, tools: Any, *, tool_choice: Any = None, **kwargs: Any) -> Any:
        return self.bind(tools=tools, tool_choice=tool_choice)


def test_tool_calls_are_mapped_to_openai_format(env, tiny_chat_dir):
    app = create_app(str(tiny_chat_dir), loader=env.loader, served_model_name=MODEL)
    ctx = app.state.ctx
    answer = AIMessage(content="", tool_calls=[{"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_7"}],
                       response_metadata={"finish_reason": "tool_calls", "quantization_level": "int4"},
                       usage_metadata={"input_tokens": 5, "output_tokens": 3, "total_tokens": 8})
    fake = _ToolCallingFake(messages=iter([answer]))
    for name, served in list(ctx.models.items()):
        ctx.models[name] = dataclasses.replace(served, llm=fake)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    with LiveServer(app) as server:
        c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        response = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                             tools=tools, tool_choice="required")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call_7", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    assert response.usage.total_tokens == 8 and response.system_fingerprint == "adaptquant-int4"


def test_streamed_tool_calls_use_indexed_deltas():
    writer = ChunkWriter(MODEL, include_usage=False)
    event = json.loads(writer.tool_calls([{"name": "f", "args": {"x": 1}, "id": "call_1"}])[6:])
    (delta_call,) = event["choices"][0]["delta"]["tool_calls"]
    assert delta_call == {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    body = completion(AIMessage("hi", response_metadata={"finish_reason": "timeout"}), MODEL)
    assert body["choices"][0]["finish_reason"] == "length"  # a reason OpenAI clients know


# -- security and limits --------------------------------------------------------------------------
def test_token_is_required_for_chat_and_cache_clear(env):
    with pytest.raises(openai.AuthenticationError, match="invalid bearer token"):
        client(env, api_key="wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    missing = env.http.post("/v1/chat/completions", json=chat_body())
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]["message"]
    assert missing.headers["www-authenticate"] == "Bearer"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        refused = env.http.post("/api/v1/quantization/cache/clear", headers=headers)
        assert refused.status_code == 401
    assert env.http.get("/api/v1/quantization/cache").json()["count"] == 1  # nothing was evicted
    assert env.http.get("/api/v1/quantization/status").status_code == 200  # read-only monitoring stays open


def test_cache_clear_with_the_token_evicts_and_chat_reloads(env):
    cleared = env.http.post("/api/v1/quantization/cache/clear", headers=AUTH)
    assert cleared.status_code == 200
    body = cleared.json()
    assert body["evicted"] == [str(env.folder)] and body["kept_in_use"] == [] and "freed_rss_mb" in body
    assert env.http.get("/api/v1/quantization/cache").json()["count"] == 0
    assert env.http.get("/healthz").json()["loaded"] is False
    response = client(env).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert response.usage.completion_tokens > 0
    assert env.http.get("/api/v1/quantization/cache").json()["count"] == 1


@pytest.mark.parametrize(
    "body, status, needles",
    [
        (chat_body(messages=[{"role": "robot", "content": "hi"}]), 422,
         ["messages.0.role", "'system', 'user', 'assistant' or 'tool'"]),
        (chat_body(max_tokens=5000), 422, ["max_tokens is 5000", "at most 4000", "max_tokens_limit"]),
        (chat_body(max_tokens="many"), 422, ["max_tokens", "valid integer"]),
        (chat_body(max_tokens=0), 422, ["max_tokens", "greater than or equal to 1"]),
        (chat_body(messages=[{"role": "user", "content": "x" * 2001}]), 422, ["2001 characters", "max_prompt_chars"]),
        (chat_body(messages=[]), 422, ["messages"]),
        (chat_body(messages=[{"role": "tool", "content": "x"}]), 422, ["tool_call_id"]),
        (chat_body(n=2), 422, ["n"]),
        (chat_body(temperature=3), 422, ["temperature"]),
        (chat_body(model="/etc/passwd"), 404, ["'/etc/passwd' is not served here", MODEL]),
        (chat_body(model="other-model"), 404, ["not served here"]),
        ({"messages": [{"role": "user", "content": "hi"}]}, 422, ["model: field required"]),
    ],
)
def test_bad_chat_requests_are_refused_before_anything_runs(env, body, status, needles):
    requests_before = env.manager.tracker.stats().total
    models_before = [m.key for m in env.loader.models()]
    response = env.http.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for needle in needles:
        assert needle in message
    assert env.manager.tracker.stats().total == requests_before  # no generation started
    assert [m.key for m in env.loader.models()] == models_before  # nothing loaded or evicted


def test_malformed_json_and_oversized_bodies(env):
    malformed = env.http.post("/v1/chat/completions", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert malformed.status_code == 422 and "malformed JSON body" in malformed.json()["error"]["message"]
    big = chat_body(messages=[{"role": "user", "content": "x" * 30_000}])
    too_large = env.http.post("/v1/chat/completions", json=big, headers=AUTH)
    assert too_large.status_code == 413 and "max_body_bytes" in too_large.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}]}'

    chunked = env.http.post("/v1/chat/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert chunked.status_code == 413
    unauthorized_big = env.http.post("/v1/chat/completions", json=big)
    assert unauthorized_big.status_code == 401  # the token is checked before the body is even read


def test_full_queue_answers_503_and_frees_the_slot(env):
    with httpx.Client(base_url=env.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=chat_body(max_tokens=4000, stream=True), headers=AUTH) as held:
            assert held.status_code == 200
            events = held.iter_lines()  # keep the iterator: dropping it would close the stream
            next(events)  # the first event: the request holds the only slot now
            busy = env.http.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "max_queue=1" in busy.json()["error"]["message"]
    deadline = time.monotonic() + 20
    while env.http.get("/api/v1/quantization/status").json()["queue"]["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    loaded = env.loader.get(env.folder)
    while loaded.active_requests and time.monotonic() < deadline:
        time.sleep(0.05)  # the abandoned stream stops at its next token
    ok = env.http.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
    assert ok.status_code == 200 and loaded.active_requests == 0
    telemetry = env.http.get("/api/v1/quantization/status").json()["telemetry"]
    assert telemetry["cancelled"] >= 1 and telemetry["errors"] == 0 and telemetry["in_flight"] == 0


def test_create_app_refuses_bad_settings(tiny_chat_dir):
    from langchain_adaptquant.errors import InvalidValueError, ModelNotFoundError

    with pytest.raises(InvalidValueError, match="max_queue"):
        create_app(str(tiny_chat_dir), max_queue=0)
    with pytest.raises(ModelNotFoundError):
        create_app("/no/such/model")


def test_only_models_fixed_at_creation_are_served(env, tiny_chat_dir):
    app = create_app(str(tiny_chat_dir), loader=env.loader, served_model_name=MODEL,
                     model_allowlist={"tiny-alias": tiny_chat_dir})
    ctx = app.state.ctx
    assert [model.id for model in ctx.served()] == [MODEL, "tiny-alias"]
    assert ctx.resolve("tiny-alias").folder == ctx.resolve(MODEL).folder == ctx.resolve(str(tiny_chat_dir)).folder
    with pytest.raises(Exception, match="not served here"):
        ctx.resolve(str(tiny_chat_dir.parent))
