"""The chat model's recovery paths on a real (tiny, random-weight) model and the real engine.

* Out of memory mid-generation: a logits processor raises ``torch.OutOfMemoryError`` inside a real
  engine step (once), the engine fails that request, and ``ChatAdaptQuant`` retries one level lower
  (``_Answer.retry``), reporting the switch. Sync and async paths.
* ``prepare_levels``: after the background preparation, the layer cache holds the levels, and the
  policy's later memory-forced switch reads its layers from there instead of quantizing them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler

from langchain_adaptquant import DynamicQuantizationManager, ScriptedProbe
from langchain_adaptquant.chat_model import REQUANTIZE_EVENT, ChatAdaptQuant
from langchain_adaptquant.runtime.loader import AdaptiveModelLoader


class OutOfMemoryOnce:
    """A logits processor whose first call runs out of memory, as a real allocation would."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, input_ids: Any, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (raised by the test)")
        return scores


class Events(BaseCallbackHandler):
    def __init__(self) -> None:
        self.switches: list[dict[str, Any]] = []

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == REQUANTIZE_EVENT:
            self.switches.append(data)


def _chat(tiny_chat_dir, tmp_path, **kwargs):
    probe = ScriptedProbe(total_gb=64, used_percent=10)  # relaxed: the policy wants fp16
    loader = AdaptiveModelLoader(manager=DynamicQuantizationManager(probe=probe, snapshot_ttl_s=0),
                                 show_progress=False, cache_dir=tmp_path, measure_quality=False)
    return ChatAdaptQuant(model=str(tiny_chat_dir), loader=loader, max_tokens=6, **kwargs), loader, probe


def _assert_retried_one_level_lower(message, processor, events, loader):
    meta = message.response_metadata
    assert processor.calls > 1  # the engine ran the processor again after the retry
    assert 0 < message.usage_metadata["output_tokens"] <= 6 and meta["finish_reason"] in ("stop", "length")
    (switch,) = meta["switches"]
    assert (switch["from_level"], switch["to_level"]) == ("fp16", "int8") and switch["ok"]
    assert switch["direction"] == "downgrade" and "out of memory" in switch["reason"]
    assert meta["levels_used"][-1] == "int8"  # the answer's tokens came from the lower level
    assert [(e["from_level"], e["to_level"]) for e in events.switches] == [("fp16", "int8")]
    (loaded,) = loader.models()
    assert loaded.level.value == "int8" and loaded.active_requests == 0


def test_out_of_memory_during_generation_retries_one_level_lower(tiny_chat_dir, tmp_path):
    llm, loader, _ = _chat(tiny_chat_dir, tmp_path)
    assert llm.invoke("hi").response_metadata["quantization_level"] == "fp16"
    processor, events = OutOfMemoryOnce(), Events()
    message = llm.invoke("hi", logits_processor=processor, config={"callbacks": [events]})
    _assert_retried_one_level_lower(message, processor, events, loader)


def test_async_out_of_memory_retries_one_level_lower(tiny_chat_dir, tmp_path):
    llm, loader, _ = _chat(tiny_chat_dir, tmp_path)
    assert llm.invoke("hi").response_metadata["quantization_level"] == "fp16"
    processor, events = OutOfMemoryOnce(), Events()
    message = asyncio.run(llm.ainvoke("hi", logits_processor=processor, config={"callbacks": [events]}))
    _assert_retried_one_level_lower(message, processor, events, loader)


def test_out_of_memory_without_retries_left_reaches_the_caller(tiny_chat_dir, tmp_path):
    llm, loader, _ = _chat(tiny_chat_dir, tmp_path, max_retries=0)
    with pytest.raises(torch.OutOfMemoryError, match="raised by the test"):
        llm.invoke("hi", logits_processor=OutOfMemoryOnce())
    (loaded,) = loader.models()
    assert loaded.level.value == "fp16" and loaded.active_requests == 0  # nothing switched, nothing held
    assert llm.invoke("hi").response_metadata["switches"] == []  # and the model still serves


def test_prepared_levels_are_read_back_by_the_policys_later_switch(tiny_chat_dir, tmp_path):
    llm, loader, probe = _chat(tiny_chat_dir, tmp_path, prepare_levels=["int4", "int2"])
    assert llm.invoke("hi").response_metadata["quantization_level"] == "fp16"
    (loaded,) = loader.models()
    thread = loader.prepare_levels_in_background(loaded, ["int4", "int2"])  # the one the first call started
    assert thread is not None
    thread.join(300)
    assert not thread.is_alive()
    cached = loader.layer_cache.levels(loaded.key)
    assert set(cached) == {"int4", "int2"} and cached["int4"] == len(loaded.layer_backends)
    assert loaded.level.value == "fp16"  # preparing never switches the serving model
    probe.set(97)  # memory pressure: the next call's decision downgrades at once
    meta = llm.invoke("hi").response_metadata
    (switch,) = meta["switches"]
    assert switch["from_level"] == "fp16" and switch["to_level"] in ("int4", "int2") and switch["ok"]
    assert switch["layers_from_cache"] == len(loaded.layer_backends)  # every layer was read, none quantized
    assert meta["quantization_level"] == switch["to_level"]
