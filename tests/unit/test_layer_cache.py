"""LayerCache: quantized layers written to disk and read back bit-exactly, within a budget, never on RAM."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from langchain_adaptquant.runtime.accounting import stored_bytes
from langchain_adaptquant.backends.registry import all_backends
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.runtime.layer_cache import LayerCache, filesystem_type, validate_layer_cache_gb
from langchain_adaptquant.control.levels import QuantizationLevel

INT8, INT4 = QuantizationLevel.INT8, QuantizationLevel.INT4


def linear(out_features: int = 64, in_features: int = 128, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=True).to(torch.bfloat16)
    return layer.requires_grad_(False)


def backend_levels() -> list[tuple[str, QuantizationLevel]]:
    pairs = []
    for backend in all_backends():
        for level in (QuantizationLevel.INT8, QuantizationLevel.INT4, QuantizationLevel.INT2):
            if backend.available() and backend.supports(level, "cpu"):
                pairs.append((backend.name, level))
    return pairs


@pytest.mark.parametrize(("backend_name", "level"), backend_levels(), ids=lambda v: getattr(v, "value", v))
def test_every_backend_round_trips_bit_exactly(tmp_path, backend_name, level):
    from langchain_adaptquant.backends.registry import get_backend

    module = get_backend(backend_name).quantize_linear(linear(), level, "cpu")
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = module(x)
    cache = LayerCache(tmp_path, budget_gb=1)
    assert cache.store("m", level, "layer.0", backend_name, module)
    back, backend = cache.load("m", level, "layer.0", "cpu")
    assert backend == backend_name and type(back) is type(module) and back is not module
    with torch.no_grad():
        assert torch.equal(back(x), expected)
    assert stored_bytes(back) == stored_bytes(module)
    assert cache.stats()["hits"] == 1 and cache.levels("m") == {level.value: 1}


def test_misses_budget_and_sixteen_bit(tmp_path):
    from langchain_adaptquant.backends.registry import quantize_linear_with_fallback

    module, backend = quantize_linear_with_fallback(linear(), INT8, "cpu")
    tiny = LayerCache(tmp_path / "tiny", budget_gb=stored_bytes(module) / 2 / 2**30)
    assert tiny.load("m", INT8, "layer.0", "cpu") is None and tiny.misses == 1
    assert tiny.store("m", INT8, "layer.0", backend, module) is False  # over the budget: skipped
    assert tiny.skipped_writes == 1 and tiny.used_bytes == 0
    roomy = LayerCache(tmp_path / "roomy", budget_gb=1)
    assert roomy.store("m", QuantizationLevel.FP16, "layer.0", "cast", linear()) is False  # the source is 16-bit
    assert roomy.stats()["layers"] == 0


def test_unreadable_file_is_forgotten_not_raised(tmp_path):
    from langchain_adaptquant.backends.registry import quantize_linear_with_fallback

    module, backend = quantize_linear_with_fallback(linear(), INT8, "cpu")
    cache = LayerCache(tmp_path, budget_gb=1)
    cache.store("m", INT8, "layer.0", backend, module)
    path = next(Path(cache.stats()["folder"]).rglob("*.pt"))
    path.write_bytes(b"not a torch file")
    assert cache.load("m", INT8, "layer.0", "cpu") is None
    assert not cache.has("m", INT8, "layer.0") and not path.exists()


def test_background_writes_skip_layers_already_swapped_out(tmp_path, monkeypatch):
    from langchain_adaptquant.backends.registry import quantize_linear_with_fallback

    cache = LayerCache(tmp_path, budget_gb=1)
    kept, backend = quantize_linear_with_fallback(linear(seed=1), INT4, "cpu")
    gone, _ = quantize_linear_with_fallback(linear(seed=2), INT4, "cpu")
    probe = weakref.ref(gone)
    start_writer = cache._ensure_writer
    monkeypatch.setattr(cache, "_ensure_writer", lambda: None)  # queue both before the writer runs
    cache.store_later("m", INT4, "gone", backend, gone)
    cache.store_later("m", INT4, "kept", backend, kept)
    del gone  # swapped out again before its turn
    assert probe() is None  # the queue held only a weak reference
    start_writer()
    assert cache.flush(timeout=30)
    assert cache.has("m", INT4, "kept") and not cache.has("m", INT4, "gone")
    assert cache.writes == 1


def test_forget_close_and_dead_process_folders(tmp_path):
    from langchain_adaptquant.backends.registry import quantize_linear_with_fallback

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{dead.stdout.strip()}-leftover"
    stale.mkdir()
    (stale / "x.pt").write_bytes(b"old")
    cache = LayerCache(tmp_path, budget_gb=1)
    assert not stale.exists()  # its process is gone
    folder = Path(cache.stats()["folder"])
    assert folder.name.startswith(f"{os.getpid()}-") and (folder.stat().st_mode & 0o777) == 0o700
    module, backend = quantize_linear_with_fallback(linear(), INT8, "cpu")
    cache.store("a", INT8, "l", backend, module)
    cache.store("b", INT8, "l", backend, module)
    assert cache.forget("a") > 0 and cache.levels("a") == {} and cache.levels("b") == {"int8": 1}
    cache.close()
    assert not folder.exists() and not cache.enabled and cache.load("b", INT8, "l", "cpu") is None


def test_off_and_memory_backed_file_systems(tmp_path):
    off = LayerCache(tmp_path, budget_gb=0)
    assert not off.enabled and "layer_cache_gb=0" in off.disabled_reason
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_type(shm) not in ("tmpfs", "ramfs"):
        pytest.skip("no memory-backed /dev/shm here")
    on_ram = LayerCache(shm / f"adaptquant-test-{os.getpid()}", budget_gb=1)
    assert not on_ram.enabled and "memory" in on_ram.disabled_reason


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "2", True])
def test_bad_budget_names_the_value(bad):
    with pytest.raises(InvalidValueError, match="layer_cache_gb") as info:
        validate_layer_cache_gb(bad)
    assert "0 (off)" in str(info.value)


@pytest.mark.parametrize("name, bad", [("layer_cache_gb", -0.5), ("cache_budget_gb", 0), ("cache_budget_gb", "1")])
def test_loader_budgets_name_their_own_argument(tmp_path, name, bad):
    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

    with pytest.raises(InvalidValueError, match=f"invalid {name}: "):
        AdaptiveModelLoader(cache_dir=tmp_path, show_progress=False, **{name: bad})
    assert not (tmp_path / "layers").exists() or not any((tmp_path / "layers").iterdir())  # nothing half-made


def test_writes_wait_while_a_switch_holds_them(tmp_path):
    from langchain_adaptquant.backends.registry import quantize_linear_with_fallback

    cache = LayerCache(tmp_path, budget_gb=1)
    module, backend = quantize_linear_with_fallback(linear(), INT8, "cpu")
    with cache.writes_held():
        cache.store_later("m", INT8, "l", backend, module)
        assert cache.flush(timeout=0.5) is False  # still held
        assert not cache.has("m", INT8, "l")
    assert cache.flush(timeout=30) and cache.has("m", INT8, "l")
