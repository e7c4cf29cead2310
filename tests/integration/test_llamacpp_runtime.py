"""The llama.cpp runtime on the real SmolLM2-135M-Instruct GGUF: levels as GGUF files, the same chat
model surface, continuous batching, switches between decode steps with nothing lost, bad input.

Skipped (with the reason) when llama-cpp-python does not import or the model was not pulled;
``make test`` installs both, so CI runs these.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe, pretrained
from langchain_adaptquant.chat_model import ChatAdaptQuant
from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.runtime.llamacpp import bindings
from langchain_adaptquant.runtime.llamacpp.gguf_files import LEVEL_TYPES, GGUFError, LevelFiles, find_gguf, read_table
from langchain_adaptquant.runtime.llamacpp.loader import LlamaCppLoader
from langchain_adaptquant.runtime.llamacpp.weights import LlamaCppConfig
from langchain_adaptquant.runtime.requests import GenerationRequest, Sampling

pytestmark = [
    pytest.mark.skipif(not bindings.available(), reason=str(bindings.unavailable_reason())),
    pytest.mark.skipif(not pretrained.is_pulled("smollm2-135m"),
                       reason="SmolLM2-135M-Instruct not pulled: run `adaptquant models pull smollm2-135m`"),
]

LEVELS = list(QuantizationLevel)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return pretrained.model_path("smollm2-135m")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llamacpp-cache")


@pytest.fixture(scope="module")
def probe() -> ScriptedProbe:
    return ScriptedProbe(total_gb=64, used_percent=10)


@pytest.fixture(scope="module")
def loader(cache_dir, probe):
    manager = DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0, device="cpu")
    loader = LlamaCppLoader(manager=manager, cache_dir=cache_dir, show_progress=False,
                            config=LlamaCppConfig(n_ctx=4096, max_batch=16, threads=2))
    yield loader
    loader.clear()


@pytest.fixture(scope="module")
def loaded(loader):
    loaded = loader.load_model("smollm2-135m", force_quantization="fp16")
    loader.prepare_levels(loaded, LEVELS)  # every level file made once for the module
    return loaded


def _ids(loaded, text: str) -> tuple[int, ...]:
    chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
    return tuple(loaded.tokenizer(chat, add_special_tokens=False).input_ids)


def test_auto_picks_llama_cpp_for_a_gguf_on_cpu_and_torch_for_a_safetensors_folder(model_dir):
    from langchain_adaptquant.assets import reference_model_path

    assert ChatAdaptQuant(model=str(model_dir)).runtime_for().name == "llamacpp"
    assert ChatAdaptQuant(model="smollm2-135m").runtime_for().name == "llamacpp"
    choice = ChatAdaptQuant(model=str(reference_model_path())).runtime_for()
    assert choice.name == "torch" and "no GGUF" in choice.reason
    assert ChatAdaptQuant(model=str(model_dir), runtime="torch").runtime_for().name == "torch"


def test_every_level_is_its_gguf_type_and_the_estimate_is_within_5_percent(loaded):
    files: LevelFiles = loaded.files
    for level in LEVELS:
        path = files.path(level)
        assert path.is_file() and not list(path.parent.glob(".*.partial"))
        table = read_table(path)
        estimate = files.source_table.estimated_bytes(level)
        assert abs(estimate - table.tensor_bytes) <= 0.05 * table.tensor_bytes, (level, estimate, table.tensor_bytes)
        types = table.type_summary()
        assert max(types, key=types.__getitem__) in (LEVEL_TYPES[level], "Q4_0")  # Q2_K falls back to Q4_0 here
    sizes = [read_table(files.path(level)).tensor_bytes for level in LEVELS]
    assert sizes == sorted(sizes, reverse=True), sizes  # fewer bits, fewer bytes
    assert loaded.size.estimated_bytes(QuantizationLevel.INT8) == read_table(files.path(QuantizationLevel.INT8)).tensor_bytes


def test_the_chat_model_answers_through_llama_cpp_with_the_same_metadata(loader, loaded):
    llm = ChatAdaptQuant(model="smollm2-135m", loader=loader, max_tokens=24, temperature=0,
                         force_quantization="fp16")
    reply = llm.invoke(QUESTION)
    assert "Paris" in reply.content
    meta = reply.response_metadata
    assert meta["runtime"] == "llamacpp" and meta["backend"] == "llama.cpp" and meta["precision"] == "F16"
    assert meta["levels_used"] == ["fp16"] and meta["finish_reason"] == "stop"
    assert "Q4_1" in meta["source_format"]  # the pulled file's own precision is said, as on torch
    usage = reply.usage_metadata
    assert usage["input_tokens"] == len(_ids(loaded, QUESTION)) and 0 < usage["output_tokens"] <= 24
    streamed = "".join(chunk.content for chunk in llm.stream(QUESTION))
    assert streamed == reply.content  # greedy: the same answer, token by token


def test_a_stop_string_cuts_the_answer(loader, loaded):
    llm = ChatAdaptQuant(model="smollm2-135m", loader=loader, max_tokens=24, force_quantization="fp16")
    reply = llm.invoke(QUESTION, stop=["France"])
    assert "France" not in reply.content and reply.response_metadata["finish_reason"] == "stop"


def test_batched_answers_equal_the_answer_alone(loader, loaded):
    """Continuous batching shares one llama_decode; each sequence's KV stays its own."""
    engine = loader.engine(loaded)
    prompts = [_ids(loaded, f"Write one sentence about the number {n}.") for n in range(8)]
    alone = [engine.submit(GenerationRequest(p, 16)).result(timeout=600).text for p in prompts]
    handles = [engine.submit(GenerationRequest(p, 16)) for p in prompts]
    together = [h.result(timeout=600).text for h in handles]
    same = sum(a == b for a, b in zip(alone, together))
    assert same >= 7, list(zip(alone, together))  # at most one near-tie may flip (batched matmul order)
    assert engine.stats().max_batch_seen >= 8


def test_a_switch_with_16_requests_in_flight_loses_nothing(loader, loaded):
    engine = loader.engine(loaded)
    ids = _ids(loaded, "Tell me a story about a cat.")
    start = engine.stats().tokens
    handles = [engine.submit(GenerationRequest(ids, 48, sampling=Sampling(min_new_tokens=48))) for _ in range(16)]
    while engine.stats().tokens < start + 16 * 4:  # every answer under way before the first switch
        time.sleep(0.01)
    records = [loader.requantize(loaded, level, reason="test") for level in ("int8", "int2", "fp16")]
    results = [h.result(timeout=600) for h in handles]
    assert all(r.output_tokens == 48 and r.finish_reason == "length" for r in results)
    assert all(len(r.levels_used) >= 2 for r in results), [r.level_runs for r in results]
    assert all(record is not None and record.ok for record in records)
    assert loaded.level is QuantizationLevel.FP16 and engine.weights.level is QuantizationLevel.FP16
    assert loaded.switches[-1].stored_bytes_after == read_table(loaded.files.path(QuantizationLevel.FP16)).tensor_bytes


def test_memory_pressure_switches_between_steps_without_a_new_request(loader, loaded, probe):
    loaded.last_forced = None
    engine = loader.engine(loaded)
    ids = _ids(loaded, "Tell me a story about a dog.")
    start = engine.stats().tokens
    handle = engine.submit(GenerationRequest(ids, 96, sampling=Sampling(min_new_tokens=96)))
    try:
        while engine.stats().tokens < start + 4:  # the answer is under way at fp16 first
            time.sleep(0.01)
        probe.set(93.0)  # emergency band: the between-steps check takes the smallest level
        deadline = time.monotonic() + 300  # a hang guard, not a speed test
        while loaded.level is QuantizationLevel.FP16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loaded.level is QuantizationLevel.INT2
        result = handle.result(timeout=600)
        assert result.levels_used[0] == "fp16" and "int2" in result.levels_used and result.output_tokens == 96
    finally:
        probe.set(10.0)
        loaded.last_forced = QuantizationLevel.FP16
        loader.requantize(loaded, "fp16", reason="test done")


@pytest.mark.slow
def test_stress_200_requests_16_clients_live_switches_nothing_lost(loader, loaded):
    engine = loader.engine(loaded)
    prompts = [_ids(loaded, f"Name a color and the number {n}.") for n in range(4)]
    results, errors = [], []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(13):
            request = GenerationRequest(prompts[(k + i) % 4], 8, sampling=Sampling(min_new_tokens=8))
            try:
                result = engine.submit(request).result(timeout=300)
                with lock:
                    results.append((request, result))
            except Exception as error:  # noqa: BLE001 - counted and shown
                with lock:
                    errors.append(error)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for thread in threads:
        thread.start()
    switches = 0
    for level in ("int8", "int4", "int2", "fp16", "int4", "fp16"):
        time.sleep(0.3)
        switches += loader.requantize(loaded, level, reason="stress") is not None
    for thread in threads:
        thread.join(600)
    assert not errors and len(results) == 16 * 13
    assert switches >= 5
    groups: dict[tuple, list[str]] = {}
    for request, result in results:
        assert result.output_tokens == 8 and result.finish_reason == "length"
        assert sum(n for _, n in result.level_runs) == 8  # every token has one level
        if len(result.level_runs) == 1:  # produced at one level throughout
            groups.setdefault((request.prompt_ids, result.level_runs), []).append(result.text)
    # a sequence reading another's KV would answer differently from its twins at the same level
    for key, texts in groups.items():
        top = max(texts.count(text) for text in texts)
        assert top >= 0.8 * len(texts), (key[1], texts)
    assert sum(len(texts) for texts in groups.values()) >= 50
    assert engine.stats().active == 0 and engine.stats().waiting == 0


def test_bad_input_names_the_value_and_leaves_the_cache_usable(tmp_path, loader, loaded):
    from langchain_adaptquant.assets import reference_model_path

    with pytest.raises(InvalidValueError, match="GGUF"):
        ChatAdaptQuant(model=str(reference_model_path()), runtime="llamacpp").invoke("hi")
    with pytest.raises(ValueError, match="invalid runtime: 'vllm'; allowed: 'auto' or 'torch' or 'llamacpp'"):
        ChatAdaptQuant(runtime="vllm")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 8)
    shutil.copy(Path(loaded.folder) / "tokenizer.json", corrupt / "tokenizer.json")
    assert find_gguf(corrupt) == corrupt / "model.gguf"
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        loader.load_model(str(corrupt))
    assert loader.get(str(corrupt.resolve())) is None
    # a level file cut mid-write is never taken: it is found unreadable, removed and made again
    files = LevelFiles(find_gguf(Path(loaded.folder)), tmp_path / "cache", threads=2)
    files.folder.mkdir(parents=True)
    sixteen = QuantizationLevel.FP16
    (files.folder / files.path(sixteen).name).hardlink_to(loaded.files.path(sixteen))  # the good 16-bit file
    target = files.path(QuantizationLevel.INT8)
    target.write_bytes(loaded.files.path(QuantizationLevel.INT8).read_bytes()[: 1 << 20])  # cut mid-write
    with pytest.raises(GGUFError):
        read_table(target)
    assert files.ensure(QuantizationLevel.INT8) == target  # found unreadable, removed, made again
    assert read_table(target).tensor_bytes == read_table(loaded.files.path(QuantizationLevel.INT8)).tensor_bytes
    with pytest.raises(InvalidValueError, match="KV cache"):
        loader.engine(loaded).submit(GenerationRequest(_ids(loaded, "hi"), 10_000))
    reply = ChatAdaptQuant(model="smollm2-135m", loader=loader, max_tokens=8, force_quantization="fp16").invoke(QUESTION)
    assert reply.content  # still serving
