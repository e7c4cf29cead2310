"""The generation engine on a real (tiny, random-weight) model: batching, streaming, stops, limits, switches."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe
from langchain_adaptquant.runtime import generation
from langchain_adaptquant.backends.registry import available_levels
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader
from langchain_adaptquant.runtime import (
    EngineBusyError,
    EngineClosedError,
    EngineConfig,
    GenerationEngine,
    GenerationRequest,
    KVUsage,
    Sampling,
)

TEXTS = ("What is a list?", "Explain dictionaries.", "How do I open a file?", "What does len return?",
         "Describe a tuple.", "hi")


@pytest.fixture(scope="module")
def loaded(tiny_chat_dir):
    loader = AdaptiveModelLoader(manager=DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=10),
                                                                    snapshot_ttl_s=0), show_progress=False)
    model = loader.load_model(str(tiny_chat_dir), force_quantization="fp16")
    yield loader, model
    loader.clear()


def prompt_ids(tokenizer, text):
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)
    return tuple(rendered["input_ids"])


def new_engine(loaded_model, **config):
    return GenerationEngine(loaded_model.model, loaded_model.tokenizer, gate=loaded_model.gate,
                            level_of=lambda: loaded_model.level.value, config=EngineConfig(**config), name="test")


@pytest.mark.parametrize("level", [level.value for level in available_levels("cpu")])
@pytest.mark.parametrize("attention", ["row", "bucket"])
def test_answers_do_not_depend_on_their_batch_company_at_every_level(loaded, level, attention):
    loader, model = loaded
    loader.requantize(model, level)
    prompts = [prompt_ids(model.tokenizer, text) for text in TEXTS]
    settings = generation.GenerationSettings(max_new_tokens=20)
    engine = new_engine(model, max_batch=8, attention=attention)
    try:
        alone = [engine.submit(GenerationRequest(p, 20)).result(60).text for p in prompts]
        handles = [engine.submit(GenerationRequest(p, 20)) for p in prompts * 3]  # 18 requests, 8 at a time
        together = [h.result(60) for h in handles]
    finally:
        engine.close()
    assert [r.text for r in together] == alone * 3  # rows joined and left around each of them
    assert engine.max_batch_seen == 8 and all(r.levels_used == (level,) for r in together)
    if attention == "row":  # the step loop decodes exactly as model.generate does
        assert alone == [generation.generate(model.model, model.tokenizer, torch.tensor([p]), settings).text
                         for p in prompts]


def forcing(tokenizer, prompt_len, text):
    """A per-request HF-style logits processor that makes its own row emit ``text``, then end of turn."""
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    def force(input_ids, scores):
        out = torch.full_like(scores, -float("inf"))
        out[:, ids[min(input_ids.shape[1] - prompt_len, len(ids) - 1)]] = 0.0
        return out

    return force


def test_streams_stop_strings_and_processors_are_per_sequence(loaded):
    _, model = loaded
    tokenizer = model.tokenizer
    p = prompt_ids(tokenizer, "tell me")
    engine = new_engine(model)
    try:
        full = engine.submit(GenerationRequest(p, 24)).result(60)
        stopped = engine.submit(GenerationRequest(p, 40, stop=("STOP here",),
                                                  logits_processor=forcing(tokenizer, len(p), "Hello world STOP here and more")))
        steered = engine.submit(GenerationRequest(p, 40, logits_processor=forcing(tokenizer, len(p), "Hello world")))
        plain = engine.submit(GenerationRequest(p, 24))
        pieces = list(stopped)
        results = stopped.result(60), steered.result(60), plain.result(60)
    finally:
        engine.close()
    assert results[0].text == "Hello world " and results[0].finish_reason == "stop"
    assert "".join(pieces) == "Hello world "  # no prefix of the multi-token stop string leaked into the stream
    assert results[1].text == "Hello world" and results[1].finish_reason == "stop"  # its end-of-turn token
    assert results[2].text == full.text  # the neighbours' stops and processors did not touch it


def test_async_iteration_cancel_timeout_and_the_bounded_queue(loaded):
    _, model = loaded
    p = prompt_ids(model.tokenizer, "go on")
    engine = new_engine(model, max_batch=2, max_waiting=3)
    try:
        async def consume():
            handle = engine.submit(GenerationRequest(p, 12))
            return "".join([piece async for piece in handle]), handle.result(0)

        text, result = asyncio.run(consume())
        assert text == result.text and result.output_tokens == 12 and result.finish_reason == "length"

        long_a = engine.submit(GenerationRequest(p, 100_000))
        long_b = engine.submit(GenerationRequest(p, 100_000, deadline=time.monotonic() + 1.0))
        while engine.stats().active < 2:  # both decoding: the batch (max_batch=2) is full
            time.sleep(0.005)
        queued = [engine.submit(GenerationRequest(p, 4)) for _ in range(3)]  # batch full: these wait
        with pytest.raises(EngineBusyError, match="max_waiting=3"):
            engine.submit(GenerationRequest(p, 4))
        queued[0].cancel()  # never starts
        assert queued[0].result(10).finish_reason == "cancelled" and queued[0].result(0).output_tokens == 0
        assert long_b.result(30).finish_reason == "timeout"
        cancelled_at = time.monotonic()
        long_a.cancel()
        assert long_a.result(10).finish_reason == "cancelled"
        assert time.monotonic() - cancelled_at < 2.0  # at the next step boundary
        assert [q.result(30).finish_reason for q in queued[1:]] == ["length", "length"]
        deadline = time.monotonic() + 5
        while (engine.in_flight or engine.kv_usage().reserved_bytes) and time.monotonic() < deadline:
            time.sleep(0.01)  # results are handed out before the worker drops the rows
        assert engine.in_flight == 0 and engine.kv_usage() == KVUsage(0, 0)
    finally:
        engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit(GenerationRequest(p, 4))


def test_sampling_is_reproducible_per_seed_and_rejects_what_it_cannot_honour(loaded):
    _, model = loaded
    p = prompt_ids(model.tokenizer, "sample")
    engine = new_engine(model)
    try:
        def run(**options):
            return engine.submit(GenerationRequest(p, 16, sampling=Sampling(**options))).result(60).text

        greedy = run()
        assert run(temperature=0.8, top_k=1, seed=1) == greedy  # top-1 sampling is greedy
        assert run(temperature=1.2, top_p=0.9, seed=7) == run(temperature=1.2, top_p=0.9, seed=7)
        assert isinstance(run(repetition_penalty=1.3), str)
        assert len(engine.submit(GenerationRequest(p, 6, sampling=Sampling(min_new_tokens=6))).result(60).text) >= 0
    finally:
        engine.close()
    with pytest.raises(ValueError, match="num_beams"):
        Sampling.from_options({"num_beams": 4})
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=1.5)


def test_a_switch_lands_between_steps_and_the_answer_reports_its_levels(loaded):
    loader, model = loaded
    loader.requantize(model, "fp16")
    p = prompt_ids(model.tokenizer, "switch")
    engine = new_engine(model, max_batch=4)
    produced = threading.Event()

    def watch(input_ids, scores):
        if input_ids.shape[1] - len(p) >= 5:
            produced.set()
        return scores

    try:
        handles = [engine.submit(GenerationRequest(p, 40, logits_processor=watch)) for _ in range(4)]
        assert produced.wait(30)
        loader.requantize(model, "int8")  # waits for the step in progress, none starts meanwhile
        results = [h.result(60) for h in handles]
    finally:
        engine.close()
    for result in results:
        assert result.levels_used == ("fp16", "int8")
        (first, early), (second, late) = result.level_runs
        assert early >= 5 and early + late == result.output_tokens


def test_kv_bytes_are_counted_while_sequences_run(loaded):
    _, model = loaded
    p = prompt_ids(model.tokenizer, "kv")
    engine = new_engine(model)
    layout = engine.layout
    started = threading.Event()

    def mark(input_ids, scores):
        started.set()
        return scores

    try:
        handles = [engine.submit(GenerationRequest(p, 64, sampling=Sampling(min_new_tokens=64), logits_processor=mark))
                   for _ in range(3)]
        assert started.wait(30)
        deadline = time.monotonic() + 30
        while engine.stats().active < 3 and time.monotonic() < deadline:
            time.sleep(0.001)  # all three prefilled into the batch
        usage = engine.kv_usage()
        assert usage.reserved_bytes >= 3 * layout.bytes_for(len(p) + 64)  # prompt + longest answer, each
        assert 0 < usage.resident_bytes <= usage.reserved_bytes
        for handle in handles:
            handle.result(60)
    finally:
        engine.close()


def test_a_model_with_sliding_window_layers_runs_one_sequence_per_step(tiny_chat_dir, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_chat_dir / name).exists():
            shutil.copy(tiny_chat_dir / name, tmp_path / name)
    loader = AdaptiveModelLoader(manager=DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=10),
                                                                    snapshot_ttl_s=0), show_progress=False)
    model = loader.load_model(str(tmp_path), force_quantization="fp16")
    engine = new_engine(model)
    prompts = [prompt_ids(model.tokenizer, text) for text in TEXTS[:3]]
    settings = generation.GenerationSettings(max_new_tokens=20)  # longer than the window: sliding layers crop
    try:
        expected = [generation.generate(model.model, model.tokenizer, torch.tensor([p]), settings).text for p in prompts]
        results = [h.result(60) for h in [engine.submit(GenerationRequest(p, 20)) for p in prompts]]
    finally:
        engine.close()
        loader.clear()
    assert not engine.row_batching and engine.max_batch_seen == 1
    assert [r.text for r in results] == expected
