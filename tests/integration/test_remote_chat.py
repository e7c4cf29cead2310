"""ChatAdaptQuant(base_url=...) and ChatOpenAI(base_url=...) against a real adaptquant server on 127.0.0.1.

The server serves the tiny chat model from a loader whose memory comes from a ScriptedProbe, so a
test can force a switch on the server and see it arrive in the remote client's response_metadata.
Greedy decoding makes the remote answer comparable, token for token, with the same model run
locally on the server's own loader.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from live_server import LiveServer

from langchain_adaptquant import AdaptiveModelLoader, ChatAdaptQuant, DynamicQuantizationManager, ScriptedProbe
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.remote import RemoteEndpointError, normalize_base_url
from langchain_adaptquant.server import create_app

TOKEN = "remote-test-token"
MODEL = "tiny-chat"
PROMPT = [HumanMessage("Say something about lists.")]
#: Keys a local ChatAdaptQuant puts in response_metadata that the server sends too.
SHARED_KEYS = {"model_name", "model_provider", "quantization_level", "precision", "backend", "decision_reason",
               "switches", "generation_seconds", "finish_reason", "switched_during_generation", "model_size_mb"}


@pytest.fixture(scope="module")
def live(tiny_chat_dir) -> Iterator[SimpleNamespace]:
    probe = ScriptedProbe(total_gb=64, used_percent=10)
    manager = DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    app = create_app(str(tiny_chat_dir), loader=loader, token=TOKEN, served_model_name=MODEL, preload=True)
    with LiveServer(app) as server:
        yield SimpleNamespace(url=server.url, probe=probe, loader=loader, folder=tiny_chat_dir)


@pytest.fixture()
def env(live) -> SimpleNamespace:
    """Relaxed memory and FP16 at the start of every test."""
    live.probe.set(10)
    loaded = live.loader.get(live.folder)
    if loaded.level.value != "fp16":
        live.loader.requantize(loaded, "fp16", reason="test reset")
    return live


def remote(env, **kwargs: Any) -> ChatAdaptQuant:
    return ChatAdaptQuant(base_url=env.url, api_key=TOKEN, max_tokens=12, **kwargs)


def local(env, **kwargs: Any) -> ChatAdaptQuant:
    """The same model on the server's own loader: what the remote answer must equal."""
    return ChatAdaptQuant(model=str(env.folder), loader=env.loader, max_tokens=12, **kwargs)


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_invoke_matches_the_local_model_and_carries_the_same_metadata(env):
    answer = remote(env).invoke(PROMPT)
    expected = local(env).invoke(PROMPT)
    assert isinstance(answer, AIMessage) and answer.content == expected.content and answer.content
    assert SHARED_KEYS <= set(answer.response_metadata)
    meta = answer.response_metadata
    assert meta["model_name"] == MODEL and meta["model_provider"] == "adaptquant"
    assert (meta["quantization_level"], meta["precision"], meta["backend"]) == ("fp16", "bfloat16", "cast")
    assert meta["memory"]["used_percent"] == 10.0 and meta["switches"] == []
    assert answer.usage_metadata == expected.usage_metadata


def test_stream_sync_and_async_agree_with_invoke_and_reach_callbacks(env):
    llm = remote(env)
    whole = llm.invoke(PROMPT).content
    handler = Tokens()
    chunks = list(llm.stream(PROMPT, config={"callbacks": [handler]}))
    assert "".join(c.content for c in chunks) == whole and len(chunks) > 2
    assert handler.tokens and "".join(handler.tokens) == whole
    last = chunks[-1]
    assert last.response_metadata["quantization_level"] == "fp16" and last.usage_metadata["output_tokens"] > 0

    async def run() -> tuple[str, str, dict]:
        answer = await llm.ainvoke(PROMPT)
        pieces = [chunk async for chunk in llm.astream(PROMPT)]
        return answer.content, "".join(p.content for p in pieces), pieces[-1].response_metadata

    import asyncio

    async_whole, async_streamed, meta = asyncio.run(run())
    assert async_whole == whole and async_streamed == whole and meta["finish_reason"] in ("stop", "length")


def test_streaming_flag_makes_invoke_stream(env):
    handler = Tokens()
    answer = remote(env, streaming=True).invoke(PROMPT, config={"callbacks": [handler]})
    assert answer.content == local(env).invoke(PROMPT).content and "".join(handler.tokens) == answer.content
    assert answer.response_metadata["quantization_level"] == "fp16"


def test_a_switch_on_the_server_reaches_the_remote_metadata(env):
    env.probe.set(90)
    answer = remote(env).invoke(PROMPT, task_priority="quality")
    meta = answer.response_metadata
    (switch,) = meta["switches"]
    assert (switch["from_level"], switch["to_level"], switch["direction"]) == ("fp16", "int2", "downgrade")
    assert meta["quantization_level"] == "int2" and "emergency" in meta["decision_reason"]
    assert meta["memory"]["used_percent"] == 90.0


def test_options_tools_and_tool_history_travel_to_the_server(env):
    stopped = remote(env).invoke(PROMPT, max_tokens=3)
    assert stopped.usage_metadata["output_tokens"] <= 3 and stopped.response_metadata["finish_reason"] in ("length", "stop")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}]
    history = [
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}]),
        ToolMessage("sunny, 21 C", tool_call_id="call_1"),
    ]
    # the same prompt renders on both sides only if tools, the tool call and its result all arrive intact
    got = remote(env).bind_tools(tools).invoke(history)
    expected = local(env).bind_tools(tools).invoke(history)
    assert got.content == expected.content and got.usage_metadata == expected.usage_metadata
    assert got.tool_calls == [] or [c["name"] for c in got.tool_calls] == [c["name"] for c in expected.tool_calls]


def test_the_token_is_required_and_errors_are_clear(env, monkeypatch):
    monkeypatch.delenv("ADAPTQUANT_TOKEN", raising=False)
    with pytest.raises(RemoteEndpointError, match="answered 401: missing bearer token") as info:
        ChatAdaptQuant(base_url=env.url + "/v1", model=MODEL).invoke(PROMPT)
    assert info.value.status_code == 401
    with pytest.raises(RemoteEndpointError, match="answered 404: model 'nope' is not served here"):
        remote(env).invoke(PROMPT, model="nope")
    with pytest.raises(RemoteEndpointError, match="answered 422"):
        remote(env).invoke(PROMPT, max_tokens=10**6)
    with pytest.raises(InvalidValueError, match="invalid option for a remote endpoint: \\['repetition_penalty'\\]"):
        remote(env).invoke(PROMPT, repetition_penalty=1.2)


def test_token_from_the_environment(env, monkeypatch):
    monkeypatch.setenv("ADAPTQUANT_TOKEN", TOKEN)
    assert ChatAdaptQuant(base_url=env.url, max_tokens=4).invoke(PROMPT).response_metadata["quantization_level"] == "fp16"


def test_unreachable_endpoint_and_bad_settings_are_refused():
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(RemoteEndpointError, match=f"cannot reach the adaptquant endpoint http://127.0.0.1:{port}/v1"):
        ChatAdaptQuant(base_url=f"http://127.0.0.1:{port}", model=MODEL).invoke(PROMPT)
    # construction errors arrive wrapped in pydantic's ValidationError (a ValueError), message intact
    with pytest.raises(ValueError, match="invalid base_url: 'ftp://host'"):
        ChatAdaptQuant(base_url="ftp://host")
    with pytest.raises(ValueError, match="invalid memory_budget_gb: 2.0; allowed: None with base_url"):
        ChatAdaptQuant(base_url="http://127.0.0.1:1", memory_budget_gb=2.0)
    with pytest.raises(ValueError, match="invalid force_quantization"):
        ChatAdaptQuant(base_url="http://127.0.0.1:1", force_quantization="int4")
    assert normalize_base_url("http://h:1/llm/") == "http://h:1/llm/v1"
    assert normalize_base_url("https://h/v1") == "https://h/v1"


def test_chat_openai_talks_to_the_same_endpoint(env):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is in the dev extra")
    llm = langchain_openai.ChatOpenAI(base_url=env.url + "/v1", api_key=TOKEN, model=MODEL, max_tokens=12,
                                      temperature=0, max_retries=0)
    answer = llm.invoke(PROMPT)
    assert answer.content == local(env).invoke(PROMPT).content
    assert answer.response_metadata["model_name"] == MODEL
    assert answer.response_metadata["system_fingerprint"] == "adaptquant-fp16"
    assert "".join(chunk.content for chunk in llm.stream(PROMPT)) == answer.content
