"""ChatAdaptQuant refuses a memory budget or manager that its loader or manager would silently override."""

from __future__ import annotations

import pytest

from langchain_adaptquant import AdaptiveModelLoader, ChatAdaptQuant, DynamicQuantizationManager, ScriptedProbe


def _manager(budget=None):
    return DynamicQuantizationManager(probe=ScriptedProbe(total_gb=16, used_percent=10), memory_budget_gb=budget)


def _loader(tmp_path, manager=None):
    return AdaptiveModelLoader(manager=manager or _manager(), cache_dir=tmp_path, show_progress=False,
                               layer_cache_gb=0, measure_quality=False)


def test_a_budget_next_to_a_loader_is_refused_with_the_loaders_own(tmp_path):
    with pytest.raises(ValueError, match=r"invalid memory_budget_gb: 2\.0; allowed: None with loader= "
                                         r"\(its manager has memory_budget_gb=None"):
        ChatAdaptQuant(loader=_loader(tmp_path), memory_budget_gb=2.0)
    with pytest.raises(ValueError, match=r"its manager has memory_budget_gb=4\.0"):
        ChatAdaptQuant(loader=_loader(tmp_path, _manager(4.0)), memory_budget_gb=2.0)


def test_a_budget_next_to_a_manager_is_refused_unless_it_is_the_managers(tmp_path):
    with pytest.raises(ValueError, match=r"invalid memory_budget_gb: 2\.0; allowed: None with manager= "
                                         r"\(its manager has memory_budget_gb=3\.0"):
        ChatAdaptQuant(manager=_manager(3.0), memory_budget_gb=2.0)
    same = _manager(2.0)
    llm = ChatAdaptQuant(manager=same, memory_budget_gb=2.0)  # says the same thing twice: no conflict
    assert llm._loader().manager is same and llm._loader().manager.memory_budget_gb == 2.0


def test_a_second_manager_next_to_a_loader_is_refused(tmp_path):
    loader = _loader(tmp_path)
    with pytest.raises(ValueError, match=r"invalid manager: 'DynamicQuantizationManager'; allowed: None with "
                                         r"loader= \(the loader's own manager decides\)"):
        ChatAdaptQuant(loader=loader, manager=_manager())
    llm = ChatAdaptQuant(loader=loader, manager=loader.manager)  # the loader's very manager is fine
    assert llm._loader() is loader


def test_a_budget_alone_reaches_the_shared_loaders_manager():
    llm = ChatAdaptQuant(memory_budget_gb=1.5)
    assert llm._loader().manager.memory_budget_gb == 1.5


class _Missing:
    """Wraps a backend as if its library were not installed here."""

    @staticmethod
    def of(backend_class):
        return type(f"Missing{backend_class.__name__}", (backend_class,), {"available": lambda self: False})()


def test_a_loader_refuses_a_manager_that_offers_levels_no_backend_stores(tmp_path):
    from langchain_adaptquant.backends.int2pack import Int2PackBackend
    from langchain_adaptquant.backends.quanto import QuantoBackend
    from langchain_adaptquant.backends.registry import replaced_backend
    from langchain_adaptquant.runtime.loader import serving_manager

    with replaced_backend(_Missing.of(Int2PackBackend)), replaced_backend(_Missing.of(QuantoBackend)):
        # INT2 has no backend now; a manager built without the catalog would still choose it
        with pytest.raises(ValueError, match=r"invalid manager: 'a manager offering int2 on cpu'.*serving_manager"):
            _loader(tmp_path, _manager())
        served = serving_manager(probe=ScriptedProbe(total_gb=16, used_percent=10))
        assert "int2" not in [level.value for level in served.available_levels]
        assert _loader(tmp_path, served).manager is served


def test_a_loader_refuses_a_mixed_precision_that_is_not_a_plan_and_keeps_its_own(tmp_path):
    from langchain_adaptquant.control.layer_plan import UNIFORM

    with pytest.raises(TypeError, match="mixed_precision must be a MixedPrecision, got str"):
        AdaptiveModelLoader(manager=_manager(), cache_dir=tmp_path, mixed_precision="uniform")
    loader = _loader(tmp_path)
    before = loader.mixed_precision
    with pytest.raises(TypeError, match="mixed_precision must be a MixedPrecision, got dict"):
        loader.mixed_precision = {}
    assert loader.mixed_precision is before and loader.switcher.mixed_precision is before
    loader.mixed_precision = UNIFORM  # a plan writes through to the switcher that uses it
    assert loader.switcher.mixed_precision is UNIFORM
