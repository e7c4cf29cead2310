"""AdaptiveModelLoader on real (tiny, random-weight) transformers models."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from langchain_adaptquant import DynamicQuantizationManager, QuantizationLevel, ScriptedProbe
from langchain_adaptquant.backends.base import UnsupportedLevelError
from langchain_adaptquant.errors import (
    AdaptQuantError,
    InsufficientMemoryError,
    ModelNotFoundError,
    SwitchError,
    UnsupportedArchitectureError,
    WeightsError,
)
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader, quantizable_linears, serving_manager

FP16, INT8, INT4, INT2 = (QuantizationLevel.FP16, QuantizationLevel.INT8, QuantizationLevel.INT4, QuantizationLevel.INT2)
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 300, 12, 5]])


def make_loader(used_percent=10.0, **kwargs) -> AdaptiveModelLoader:
    probe = ScriptedProbe(total_gb=64, used_percent=used_percent)
    manager = serving_manager(probe=probe, snapshot_ttl_s=0)
    loader = AdaptiveModelLoader(manager=manager, show_progress=False, **kwargs)
    loader.probe = probe  # tests move memory with it
    return loader


def logits(loaded) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(PROMPT).logits.float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("arch_dir", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_estimate_is_within_ten_percent_of_stored_bytes_at_every_level(arch_dir, request):
    folder = request.getfixturevalue(arch_dir)
    loader = make_loader()
    loaded = loader.load_model(folder, force_quantization="fp16")
    for level in (FP16, INT8, INT4, INT2):
        loader.requantize(loaded, level)
        estimate = loaded.size.estimated_bytes(level)
        assert abs(loaded.stored_bytes - estimate) <= 0.10 * loaded.stored_bytes, (
            level, loaded.stored_bytes, estimate, loaded.backend_summary())


def test_switch_chain_in_place_and_back_to_identical_fp16(tiny_llama_dir):
    loader = make_loader()
    loaded = loader.load_model(tiny_llama_dir, force_quantization="fp16")
    model_object = loaded.model
    reference = logits(loaded)
    sizes = {FP16: loaded.stored_bytes}
    for level, min_cos in ((INT8, 0.99), (INT4, 0.9), (INT2, 0.3), (INT4, 0.9)):
        record = loader.requantize(loaded, level, reason="test chain")
        assert record.ok and record.to_level == level.value
        assert loaded.model is model_object  # in place: same model object, modules swapped
        assert loaded.level is level
        sizes[level] = loaded.stored_bytes
        assert cosine(logits(loaded), reference) > min_cos, level
    loader.requantize(loaded, FP16)
    assert torch.equal(logits(loaded), reference)  # an upgrade re-reads the source: bit-identical
    assert sizes[FP16] > sizes[INT8] > sizes[INT4] > sizes[INT2]
    assert [s.to_level for s in loaded.switches] == ["int8", "int4", "int2", "int4", "fp16"]
    assert set(loaded.layer_backends) == {name for name, _ in quantizable_linears(loaded.model)}


def test_cache_hit_reoptimizes_when_memory_rises(tiny_llama_dir):
    loader = make_loader(used_percent=10)
    loaded = loader.load_model(tiny_llama_dir, task_priority="quality")
    assert loaded.level is FP16
    loader.probe.set(90)
    again = loader.load_model(tiny_llama_dir, task_priority="quality")
    assert again is loaded and loaded.level is INT2
    assert loaded.access_count == 2
    assert "memory pressure" in loaded.switches[-1].reason


def test_requests_in_flight_finish_while_the_model_switches(tiny_llama_dir):
    loader = make_loader()
    loaded = loader.load_model(tiny_llama_dir, force_quantization="fp16")
    results, errors = [], []
    started = threading.Event()

    class Signal(torch.nn.Module):
        pass

    def generate():
        try:
            with loaded.in_use():
                started.set()
                for _ in range(3):
                    out = loaded.model.generate(PROMPT, max_new_tokens=24, do_sample=False, pad_token_id=0)
                    results.append(out)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    thread = threading.Thread(target=generate)
    thread.start()
    started.wait(10)
    for level in (INT8, INT4, FP16):
        loader.requantize(loaded, level)
    thread.join(120)
    assert not errors
    assert len(results) == 3
    for out in results:
        assert out.shape == (1, PROMPT.shape[1] + 24)
        assert int(out.min()) >= 0 and int(out.max()) < 512
    assert loaded.active_requests == 0 and loaded.level is FP16


def test_two_switches_of_one_model_never_overlap(tiny_llama_dir):
    loader = make_loader()
    loaded = loader.load_model(tiny_llama_dir, force_quantization="fp16")
    barrier = threading.Barrier(2)
    outcomes = []

    def switch(level):
        barrier.wait()
        outcomes.append(loader.requantize(loaded, level))

    threads = [threading.Thread(target=switch, args=(INT4,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # one did the switch, the other waited and found the level already set
    assert sorted(o is None for o in outcomes) == [False, True]
    assert loaded.level is INT4 and len(loaded.switches) == 1


def test_failed_switch_rolls_back_and_keeps_serving(tiny_llama_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    loader = make_loader()
    loaded = loader.load_model(folder, force_quantization="int8")
    before = logits(loaded)
    (folder / "model.safetensors").unlink()  # weights deleted from disk after load
    with pytest.raises(SwitchError, match="rolled back: .*removed since the model was loaded") as info:
        loader.requantize(loaded, FP16)
    assert info.value.level == "int8"
    assert loaded.level is INT8 and torch.equal(logits(loaded), before)
    assert "rolled back" in loaded.last_error
    assert loaded.switches[-1].ok is False
    assert loader.stats()[0]["last_error"] == loaded.last_error


def test_lru_eviction_respects_budget_and_requests_in_flight(tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    third = tmp_path / "third"
    shutil.copytree(tiny_llama_dir, third)
    probe_loader = make_loader()
    one = probe_loader.load_model(tiny_llama_dir, force_quantization="fp16").stored_bytes
    budget_gb = (2.5 * one) / 1024**3
    loader = make_loader(cache_budget_gb=budget_gb)
    a = loader.load_model(tiny_llama_dir, force_quantization="fp16")
    b = loader.load_model(tiny_qwen2_dir, force_quantization="int8")
    loader.load_model(tiny_llama_dir, force_quantization="fp16")  # touch a: b is now least recent
    loader.load_model(third, force_quantization="fp16")
    names = [m["path"] for m in loader.stats()]
    assert str(b.folder) not in names and str(a.folder) in names
    # the least recent model is in use: it is skipped, the next idle one goes
    with a.in_use():
        loader.load_model(tiny_qwen2_dir, force_quantization="int8")
        assert loader.get(a.key) is not None
    # nothing idle to evict and no room: a clear error, cache unchanged
    tight = make_loader(cache_budget_gb=(0.5 * one) / 1024**3)
    with pytest.raises(InsufficientMemoryError, match="cache budget"):
        tight.load_model(tiny_llama_dir, force_quantization="fp16")
    assert tight.stats() == []


def test_clear_frees_measured_memory(tiny_llama_dir):
    loader = make_loader()
    loaded = loader.load_model(tiny_llama_dir, force_quantization="int8")
    assert loader.stats()[0]["level"] == "int8"
    del loaded
    report = loader.clear()
    assert report["evicted"] == [str(tiny_llama_dir)] and loader.stats() == []
    assert "freed_anon_mb" in report


def test_model_object_is_written_once_to_a_local_cache(tmp_path):
    from tiny_models import TINY_CONFIGS
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    obj = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"]).to(torch.bfloat16)
    loader = make_loader(cache_dir=tmp_path)
    first = loader.load_model(obj, force_quantization="int4")
    folder = first.folder
    assert folder.parent == (tmp_path / "objects").resolve() and (folder / "model.safetensors").exists()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = make_loader(cache_dir=tmp_path).load_model(obj, force_quantization="int4")
    assert again.folder == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime


# -- bad input: a clear error and an unchanged cache ----------------------------------------------

def test_unknown_path(tmp_path):
    loader = make_loader()
    with pytest.raises(ModelNotFoundError, match="does-not-exist"):
        loader.load_model(tmp_path / "does-not-exist")
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        loader.load_model("nobody/no-such-model")
    assert loader.stats() == []


def test_folder_without_weights(tiny_llama_dir, tmp_path):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    loader = make_loader()
    with pytest.raises(WeightsError, match="no \\*.safetensors weights"):
        loader.load_model(tmp_path)
    assert loader.stats() == []


def test_corrupt_safetensors(tiny_llama_dir, tmp_path):
    shutil.copy(tiny_llama_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    loader = make_loader()
    with pytest.raises(WeightsError, match="cannot read weights"):
        loader.load_model(tmp_path)
    assert loader.stats() == []


@pytest.mark.parametrize("model_type", ["no-such-architecture", "t5"])
def test_unsupported_architecture(tiny_llama_dir, tmp_path, model_type):
    import json

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_llama_dir / "model.safetensors", tmp_path / "model.safetensors")
    loader = make_loader()
    with pytest.raises(UnsupportedArchitectureError):
        loader.load_model(tmp_path)
    assert loader.stats() == []


def test_forced_level_without_a_backend_names_the_available_ones(tiny_llama_dir, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # quanto not installed, and int2pack's
    monkeypatch.setitem(sys.modules, "torchao.quantization.quant_primitives", None)  # quantizer gone: no int2
    loader = make_loader()
    with pytest.raises(UnsupportedLevelError) as info:
        loader.load_model(tiny_llama_dir, force_quantization="int2")
    message = str(info.value)
    assert "'int2'" in message and "cpu" in message and "fp16" in message
    assert loader.stats() == []


def test_bad_level_and_priority(tiny_llama_dir):
    from langchain_adaptquant import InvalidValueError

    loader = make_loader()
    with pytest.raises(InvalidValueError, match="'int3'"):
        loader.load_model(tiny_llama_dir, force_quantization="int3")
    with pytest.raises(InvalidValueError, match="'fastest'"):
        loader.load_model(tiny_llama_dir, task_priority="fastest")
    assert loader.stats() == []


def test_switching_back_to_a_level_reads_the_layer_cache_bit_exactly(tiny_llama_dir, tmp_path, monkeypatch):
    from langchain_adaptquant.control.layer_plan import UNIFORM

    loader = make_loader(cache_dir=tmp_path, mixed_precision=UNIFORM)  # every layer at each level
    loaded = loader.load_model(tiny_llama_dir, force_quantization="fp16")
    layers = len(loaded.layer_backends)
    first = {}
    for level in (INT8, INT4, INT2):
        record = loader.requantize(loaded, level)
        assert record.layers_from_cache == 0  # a first visit quantizes from the weights
        first[level] = (logits(loaded), loaded.stored_bytes, loaded.backend_summary())
        assert loader.layer_cache.flush(timeout=60)
    assert loader.stats()[0]["layer_cache"] == {"int8": layers, "int4": layers, "int2": layers}
    import langchain_adaptquant.runtime.switcher as switcher_module  # the switcher builds and swaps layers

    dropped = []
    real_drop = switcher_module.drop_file_pages
    monkeypatch.setattr(switcher_module, "drop_file_pages", lambda t, r: (dropped.append(t.data_ptr()), real_drop(t, r)))
    for level in (INT4, INT8, FP16, INT2):
        dropped.clear()
        record = loader.requantize(loaded, level)
        # a layer read from the cache still lets go of its 16-bit source pages, as a quantized one does
        assert len(dropped) == (0 if level is FP16 else layers), level
        if level is FP16:
            assert record.layers_from_cache == 0  # 16-bit is read from the weights themselves
            continue
        assert record.layers_from_cache == layers and record.to_dict()["layers_from_cache"] == layers
        expected_logits, expected_bytes, expected_backends = first[level]
        assert torch.equal(logits(loaded), expected_logits)
        assert loaded.stored_bytes == expected_bytes and loaded.backend_summary() == expected_backends
    folder = loader.layer_cache.stats()["folder"]
    assert any(Path(folder).rglob("*.pt"))
    loader.evict(loaded.key)  # leaving the cache deletes its layers too
    assert loader.layer_cache.levels(loaded.key) == {} and not any(Path(folder).rglob("*.pt"))


def test_mixed_precision_keeps_its_int4_layers_in_place_when_going_to_int2(tiny_llama_dir, tmp_path):
    from langchain_adaptquant.control.layer_plan import DEFAULT_MIXED_PRECISION

    loader = make_loader(cache_dir=tmp_path, mixed_precision=DEFAULT_MIXED_PRECISION)
    loaded = loader.load_model(tiny_llama_dir, force_quantization="int4")
    kept = [name for name in loaded.layer_backends if name.endswith(("v_proj", "down_proj"))]
    modules = {name: loaded.model.get_submodule(name) for name in kept}
    loader.requantize(loaded, INT2)
    assert loaded.level is INT2
    assert {name: loaded.layer_levels[name] for name in kept} == {name: INT4 for name in kept}
    assert all(loaded.model.get_submodule(name) is modules[name] for name in kept)  # not requantized
    assert loaded.level_summary() == {"int4": len(kept), "int2": len(loaded.layer_backends) - len(kept)}
    estimate = loaded.size.estimated_bytes(INT2)
    assert abs(loaded.stored_bytes - estimate) <= 0.10 * loaded.stored_bytes
    assert loaded.to_dict()["layer_levels"] == loaded.level_summary()
    loader.requantize(loaded, FP16)
    assert set(loaded.layer_levels.values()) == {FP16}


def test_prepare_levels_makes_the_first_switch_a_read(tiny_llama_dir, tmp_path):
    loader = make_loader(cache_dir=tmp_path)
    loaded = loader.load_model(tiny_llama_dir, force_quantization="fp16")
    layers = len(loaded.layer_backends)
    before = logits(loaded)
    summary = loader.prepare_levels(loaded, ["int4", "fp16"])
    assert summary["int4"]["layers_written"] == layers and summary["fp16"]["layers_written"] == 0
    assert loaded.level is FP16 and torch.equal(logits(loaded), before)  # the serving model is untouched
    assert loader.prepare_levels(loaded, ["int4"])["int4"]["layers_already_cached"] == layers
    record = loader.requantize(loaded, INT4)
    assert record.layers_from_cache == layers
    reference = make_loader(layer_cache_gb=0).load_model(tiny_llama_dir, force_quantization="int4")
    assert torch.equal(logits(loaded), logits(reference))  # same layers as quantizing directly
    with pytest.raises(ValueError, match="int3"):
        loader.prepare_levels(loaded, ["int3"])
    with pytest.raises(AdaptQuantError, match="layer cache is off"):
        make_loader(layer_cache_gb=0).prepare_levels(reference, ["int8"])
