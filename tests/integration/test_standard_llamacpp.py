"""LangChain's standard integration tests on SmolLM2-135M-Instruct served by the llama.cpp runtime.

The same suite as ``test_standard_real_model`` (torch), inherited with its excuses, so both runtimes
answer to one set of expectations; only the loader differs. Skipped when llama-cpp-python does not
import or the model was not pulled.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import test_standard_real_model as torch_suite

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe, pretrained
from langchain_adaptquant.runtime.llamacpp import bindings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not bindings.available(), reason=str(bindings.unavailable_reason())),
    pytest.mark.skipif(not pretrained.is_pulled("smollm2-135m"),
                       reason="SmolLM2-135M-Instruct not pulled: run `adaptquant models pull smollm2-135m`"),
]


@functools.lru_cache(maxsize=1)
def _loader():
    from langchain_adaptquant.runtime.llamacpp.loader import LlamaCppLoader

    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=64, used_percent=20), snapshot_ttl_s=0,
                                         device="cpu")
    return LlamaCppLoader(manager=manager, show_progress=False)


@functools.lru_cache(maxsize=1)
def _second_folder() -> str:
    """The pulled model under another path (links, no copy): an override the suite can see in model_name."""
    source = pretrained.model_path("smollm2-135m")
    folder = Path(tempfile.mkdtemp(prefix="adaptquant-llamacpp-override-"))
    for item in source.iterdir():
        (folder / item.name).symlink_to(item, target_is_directory=item.is_dir())
    return str(folder)


class TestSmolLM2LlamaCpp(torch_suite.TestSmolLM2Integration):
    @property
    def chat_model_params(self) -> dict:
        return {"model": "smollm2-135m", "loader": _loader(), "max_tokens": 64, "temperature": 0}

    @property
    def model_override_value(self) -> str:
        return _second_folder()
