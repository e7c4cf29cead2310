"""The model cache: LRU order, who may leave for a budget, and that a model in use never leaves."""

from __future__ import annotations

import pytest

from langchain_adaptquant import InsufficientMemoryError, InvalidValueError, QuantizationLevel
from langchain_adaptquant.control.sizing import size_of
from langchain_adaptquant.runtime.loaded_model import LoadedModel
from langchain_adaptquant.runtime.model_cache import ModelCache, ModelInUseError
from langchain_adaptquant.units import MIB


def _entry(tmp_path, name: str, stored_mb: int) -> LoadedModel:
    """A cache entry as the loader records it; the cache only reads its key, size and request count."""
    folder = tmp_path / name
    folder.mkdir()
    return LoadedModel(
        key=str(folder.resolve()), name=name, folder=folder, source=None, model=None, tokenizer=None,
        level=QuantizationLevel.FP16, device="cpu", size=size_of(0.001), layer_backends={},
        stored_bytes=stored_mb * MIB, load_seconds=0.0,
    )


def test_victims_are_the_least_recently_used_idle_models_and_only_as_many_as_needed(tmp_path):
    cache = ModelCache(budget_gb=300 / 1024)  # 300 MiB
    a, b, c = (_entry(tmp_path, n, 100) for n in "abc")
    for entry in (a, b, c):
        cache.add(entry)
    cache.touch(a)  # order now b, c, a
    assert [m.name for m in cache.models()] == ["b", "c", "a"]
    assert cache.victims_for(0, "x") == []
    assert [m.name for m in cache.victims_for(100 * MIB, "x")] == ["b"]
    with b.in_use():  # b is busy: c goes first, then a
        assert [m.name for m in cache.victims_for(150 * MIB, "x")] == ["c", "a"]
    assert cache.total_bytes() == 300 * MIB and len(cache.models()) == 3  # choosing evicts nothing


def test_a_model_too_big_even_after_evicting_every_idle_one_is_refused_with_the_numbers(tmp_path):
    cache = ModelCache(budget_gb=200 / 1024)
    a, b = _entry(tmp_path, "a", 100), _entry(tmp_path, "b", 100)
    cache.add(a)
    cache.add(b)
    with a.in_use(), pytest.raises(InsufficientMemoryError, match="cache budget 0.195312 GiB for big") as info:
        cache.victims_for(150 * MIB, "big")
    assert info.value.required_gb == pytest.approx(150 / 1024)
    assert [m.name for m in cache.models()] == ["a", "b"]


def test_pop_idle_removes_an_idle_model_and_refuses_a_busy_one(tmp_path):
    cache = ModelCache()
    a = _entry(tmp_path, "a", 10)
    cache.add(a)
    assert cache.get(tmp_path / "a") is a and cache.holds(a)  # by path as well as by key
    with a.in_use():
        with pytest.raises(ModelInUseError, match=r"'a' has 1 request\(s\) in flight") as info:
            cache.pop_idle(a.key)
        assert info.value.loaded is a and cache.holds(a)
    assert cache.pop_idle(a.key) is a
    assert cache.pop_idle(a.key) is None and not cache.holds(a) and cache.models() == []


def test_without_a_budget_nothing_is_chosen_and_a_bad_budget_is_named(tmp_path):
    cache = ModelCache()
    cache.add(_entry(tmp_path, "a", 10**6))
    assert cache.victims_for(10**12, "huge") == []
    with pytest.raises(InvalidValueError, match="cache_budget_gb"):
        ModelCache(budget_gb=-1)
