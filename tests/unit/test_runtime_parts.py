"""The engine's small parts on their own: KV sizing from configs, the step gate, requests and handles."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

from langchain_adaptquant import InvalidValueError
from langchain_adaptquant.runtime.generation import GenerationResult
from langchain_adaptquant.runtime import GenerationRequest, KVLayout, RequestHandle, Sampling, StepGate, kv_layout


def test_kv_bytes_per_token_from_a_llama_config_like_smollm2():
    config = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                         head_dim=64, intermediate_size=1536, vocab_size=512)
    layout = kv_layout(config)
    assert layout == KVLayout(layers=30, kv_heads=3, head_dim=64, dtype_bytes=2)
    assert layout.bytes_per_token == 30 * 3 * 64 * 2 * 2 == 23040
    assert layout.bytes_for(100) == 100 * 23040 and layout.bytes_for(0) == 0


def test_kv_layout_without_head_dim_or_kv_heads_and_with_sliding_windows():
    no_head_dim = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=256, vocab_size=512)
    no_head_dim.head_dim = None
    no_head_dim.num_key_value_heads = None
    assert kv_layout(no_head_dim) == KVLayout(layers=2, kv_heads=4, head_dim=64)
    qwen = Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=256,
                       vocab_size=512, sliding_window=4096, use_sliding_window=False)
    assert kv_layout(qwen).sliding_layers == 0  # a window in the config that is not used counts for nothing
    gemma = Gemma3TextConfig(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                             hidden_size=640, sliding_window=512, vocab_size=512)
    layout = kv_layout(gemma, dtype_bytes=4)
    assert layout.sliding_layers == sum(t == "sliding_attention" for t in gemma.layer_types) > 0
    full, sliding = layout.layers - layout.sliding_layers, layout.sliding_layers
    per_layer = 2 * 1 * 256 * 4
    assert layout.bytes_for(100) == 6 * 100 * per_layer  # shorter than the window: every layer grows
    assert layout.bytes_for(2000) == (full * 2000 + sliding * 512) * per_layer  # sliding layers stop at it


def test_kv_layout_of_a_config_without_layers_is_a_clear_error():
    class Odd:
        hidden_size = 8

    with pytest.raises(InvalidValueError, match="num_hidden_layers"):
        kv_layout(Odd())


def test_a_switch_waits_for_the_step_in_progress_and_no_step_starts_while_it_waits():
    gate = StepGate()
    log: list[str] = []
    in_step, release = threading.Event(), threading.Event()

    def step(name, hold=None):
        with gate.step():
            log.append(f"{name} start")
            if hold is not None:
                in_step.set()
                hold.wait(5)
            log.append(f"{name} end")

    def switch():
        with gate.exclusive():
            log.append("switch start")
            time.sleep(0.05)
            log.append("switch end")

    first = threading.Thread(target=step, args=("step1", release))
    first.start()
    assert in_step.wait(5)
    switcher = threading.Thread(target=switch)
    switcher.start()
    while not gate.switch_pending:
        time.sleep(0.001)
    second = threading.Thread(target=step, args=("step2",))  # arrives while the switch waits
    second.start()
    time.sleep(0.05)
    assert log == ["step1 start"]  # neither the switch nor a new step started
    release.set()
    for thread in (first, switcher, second):
        thread.join(5)
    assert log == ["step1 start", "step1 end", "switch start", "switch end", "step2 start", "step2 end"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"seed": 1.5}, "seed"),
])
def test_sampling_values_are_checked_by_name(kwargs, needle):
    with pytest.raises(InvalidValueError, match=needle):
        Sampling(**kwargs)


def test_sampling_options_from_model_kwargs():
    assert Sampling.from_options({"do_sample": False, "temperature": 0.7}).greedy
    assert Sampling.from_options({"do_sample": True}).temperature == 1.0
    assert Sampling.from_options({"temperature": 0.5, "top_k": 5}).plain_greedy is False
    assert Sampling().plain_greedy and not Sampling(min_new_tokens=2).plain_greedy
    with pytest.raises(InvalidValueError, match="num_beams.*one of temperature"):
        Sampling.from_options({"num_beams": 2})


def test_request_checks_its_fields():
    with pytest.raises(InvalidValueError, match="prompt_ids"):
        GenerationRequest((), 4)
    with pytest.raises(InvalidValueError, match="max_new_tokens"):
        GenerationRequest((1,), 0)
    with pytest.raises(InvalidValueError, match="logits_processor"):
        GenerationRequest((1,), 4, logits_processor="nope")


def _result(text: str) -> GenerationResult:
    return GenerationResult(text=text, input_tokens=1, output_tokens=2, finish_reason="length", seconds=0.1)


def test_handle_streams_pieces_to_a_thread_and_to_an_event_loop():
    handle = RequestHandle(GenerationRequest((1,), 4))

    def produce():
        for piece in ("a", "b", "c"):
            time.sleep(0.01)
            handle._emit(piece)
        handle._finish(_result("abcd"), tail="d")

    threading.Thread(target=produce).start()
    assert list(handle) == ["a", "b", "c", "d"] and handle.result(1).text == "abcd"

    again = RequestHandle(GenerationRequest((1,), 4))

    async def consume():
        threading.Thread(target=lambda: [time.sleep(0.02), again._emit("x"), again._finish(_result("x"))]).start()
        return [piece async for piece in again]

    assert asyncio.run(consume()) == ["x"]


def test_handle_raises_the_engine_error_after_the_pieces_it_got():
    handle = RequestHandle(GenerationRequest((1,), 4))
    handle._emit("a")
    handle._fail(MemoryError("out"))
    pieces = []
    with pytest.raises(MemoryError, match="out"):
        for piece in handle:
            pieces.append(piece)
    assert pieces == ["a"]
    with pytest.raises(TimeoutError):
        RequestHandle(GenerationRequest((1,), 4)).result(timeout=0.01)
