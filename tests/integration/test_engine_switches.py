"""Switches under a full batch: memory-forced downgrades land between steps, OOM retries resume streams."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from langchain_adaptquant import ChatAdaptQuant, DynamicQuantizationManager, PolicyConfig, ScriptedProbe
from langchain_adaptquant.chat_model import REQUANTIZE_EVENT
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader
from langchain_adaptquant.runtime import GenerationRequest

# memory-forced downgrades at once; load-only downgrades and upgrades never (so only the scripted
# memory, a retry or the test itself moves the level)
MEMORY_ONLY = PolicyConfig(upgrade_cooldown_s=3600, load_downgrade_delay_s=3600)
PROMPTS = [f"question {i}" for i in range(8)]


def make(folder, **kwargs):
    probe = ScriptedProbe(total_gb=8, used_percent=10)
    manager = DynamicQuantizationManager(probe=probe, policy=MEMORY_ONLY, snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False)
    llm = ChatAdaptQuant(model=str(folder), loader=loader, temperature=0, task_priority="quality", **kwargs)
    return llm, probe, manager, loader


class SwitchAfter:
    """Replays a switch: after this answer's ``tokens``-th token, requantize to ``level`` (between steps)."""

    def __init__(self, loader, loaded, tokens: int, level: str) -> None:
        self.loader, self.loaded, self.tokens, self.level = loader, loaded, tokens, level
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.tokens:  # runs in the engine thread after this step's forward
            self.loader.requantize(self.loaded, self.level, reason="replay")
        return scores


@pytest.mark.slow
def test_memory_forced_switch_lands_mid_batch_and_every_answer_matches_its_levels(tiny_chat_dir):
    llm, probe, manager, loader = make(tiny_chat_dir, max_tokens=40)
    llm.invoke("warm up")
    loaded = loader.models()[0]
    results: dict[str, object] = {}

    def client(prompt):
        results[prompt] = llm.invoke(prompt)

    threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while (loaded.engine.stats().active < len(PROMPTS) or loaded.engine.tokens < 3 * len(PROMPTS)) \
            and time.monotonic() < deadline:
        time.sleep(0.002)  # the whole batch is decoding
    assert loaded.engine.stats().active == len(PROMPTS)
    probe.set(92)  # no new request comes: the engine's between-steps check must act on it
    for thread in threads:
        thread.join(60)
    assert len(results) == len(PROMPTS)
    switch = [r for r in loaded.switches if r.to_level == "int2"]
    assert switch and "memory pressure" in switch[0].reason
    mixed = [m for m in results.values() if m.response_metadata["switched_during_generation"]]
    assert len(mixed) == len(PROMPTS)  # the switch landed while every one of them was mid-answer
    for message in mixed:
        meta = message.response_metadata
        assert meta["levels_used"] == ["fp16", "int2"]
        assert sum(n for _, n in meta["level_runs"]) == message.usage_metadata["output_tokens"]

    # every answer equals a solo replay of the same switch after the same number of tokens
    probe.set(10)
    for prompt, message in results.items():
        (first, before), (second, _) = message.response_metadata["level_runs"]
        replay = llm.invoke(prompt, force_quantization=first,
                            logits_processor=SwitchAfter(loader, loaded, before, second))
        assert replay.response_metadata["level_runs"][0] == [first, before]
        assert replay.content == message.content, prompt
    assert manager.tracker.stats().active == 0 and loaded.active_requests == 0


class OutOfMemoryAt:
    """Raises torch.OutOfMemoryError from inside the model's forward, once, at its ``at``-th call."""

    def __init__(self, model, at: int) -> None:
        self.at, self.calls = at, 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError("simulated: not enough memory for this step")

    def remove(self):
        self.handle.remove()


def _recorder():
    from langchain_core.callbacks import BaseCallbackHandler

    class Recorder(BaseCallbackHandler):
        def __init__(self):
            self.events, self.tokens = [], []

        def on_custom_event(self, name, data, **kwargs):
            self.events.append((name, data))

        def on_llm_new_token(self, token, **kwargs):
            self.tokens.append(token)

    return Recorder()


@pytest.mark.parametrize("mode", ["stream", "astream", "invoke"])
def test_out_of_memory_mid_stream_retries_one_level_lower_and_resumes(tiny_chat_dir, mode):
    llm, probe, manager, loader = make(tiny_chat_dir, max_tokens=16, model_kwargs={"min_new_tokens": 16})
    reference = llm.invoke("tell me")  # fp16, whole answer
    loaded = loader.models()[0]
    recorder = _recorder()
    config = {"callbacks": [recorder]}
    fault = OutOfMemoryAt(loaded.model, at=6)  # the prefill is call 1: five tokens come out at fp16 first
    try:
        if mode == "stream":
            chunks = list(llm.stream("tell me", config=config))
        elif mode == "astream":
            async def collect():
                return [chunk async for chunk in llm.astream("tell me", config=config)]
            chunks = asyncio.run(collect())
        else:
            chunks = None
            message = llm.invoke("tell me", config=config)
    finally:
        fault.remove()
    if chunks is not None:
        text = "".join(c.content for c in chunks)
        meta, usage = chunks[-1].response_metadata, chunks[-1].usage_metadata
        assert text == "".join(recorder.tokens)  # nothing streamed twice, nothing lost
    else:
        text, meta, usage = message.content, message.response_metadata, message.usage_metadata
    assert meta["levels_used"] == ["fp16", "int8"] and meta["level_runs"][0] == ["fp16", 5]
    assert usage["output_tokens"] == 16 and meta["finish_reason"] == "length"
    # the first five tokens are the fp16 answer's; the rest were produced at int8 after resuming
    first_five = loaded.engine.submit(GenerationRequest(
        tuple(loaded.tokenizer.apply_chat_template([{"role": "user", "content": "tell me"}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]), 5)).result(60).text
    loader.requantize(loaded, "fp16")
    assert text.startswith(first_five) and reference.content.startswith(first_five)
    (switch,) = meta["switches"]
    assert (switch["from_level"], switch["to_level"], switch["reason"]) == ("fp16", "int8", "out of memory during generation")
    if mode == "invoke":  # LangChain's stream()/astream() do not hand _stream a run manager to send events with
        assert [data for name, data in recorder.events if name == REQUANTIZE_EVENT] == [switch]
    assert manager.tracker.stats().active == 0 and loaded.active_requests == 0


def test_requests_failing_together_step_the_model_down_once(tiny_chat_dir):
    llm, probe, manager, loader = make(tiny_chat_dir, max_tokens=12, model_kwargs={"min_new_tokens": 12})
    llm.invoke("warm up")
    loaded = loader.models()[0]
    started = threading.Event()

    def mark(input_ids, scores):
        started.set()
        return scores

    async def both():
        return await asyncio.gather(*(llm.ainvoke(p, logits_processor=mark) for p in PROMPTS[:4]))

    fault = None

    def arm():
        nonlocal fault
        started.wait(30)
        while loaded.engine.stats().active < 4:
            time.sleep(0.001)
        fault = OutOfMemoryAt(loaded.model, at=1)  # the next decode step fails for the whole batch

    arming = threading.Thread(target=arm)
    arming.start()
    try:
        messages = asyncio.run(both())
    finally:
        arming.join()
        if fault is not None:
            fault.remove()
    assert loaded.level.value == "int8"  # one level down, not one per failed request
    assert all(m.response_metadata["levels_used"] == ["fp16", "int8"] for m in messages)
    assert all(m.usage_metadata["output_tokens"] == 12 for m in messages)
