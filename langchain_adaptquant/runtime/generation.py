"""Decoded text with stop strings, the settings and result of one answer, and the per-request path.

:class:`TextWatch` turns generated ids into text that is safe to show: stop strings are matched on
decoded text, so one spanning several tokens works (the answer ends as soon as it appears and is
cut before it). The engine (:mod:`langchain_adaptquant.runtime`) keeps one per sequence.

:func:`generate` is the per-request path the engine replaced: one ``model.generate`` (batch of 1)
per request, on the caller's thread. It stays as the baseline ``benchmarks/throughput.py``
measures the engine against, and as a reference the tests compare the engine with. Cancellation
and timeouts are stopping criteria there: generation ends at the next token.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from langchain_adaptquant.runtime.text import GenerationResult, TextWatch, eos_ids

__all__ = ["GenerationResult", "GenerationSettings", "TextWatch", "eos_ids", "generate"]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: tuple[str, ...] = ()
    timeout_s: Optional[float] = None
    extra: tuple[tuple[str, Any], ...] = ()


class _Criteria(StoppingCriteria):
    """Stops on a stop string, a cancel event or a deadline; records which."""

    def __init__(self, watch: TextWatch, prompt_len: int, cancel: threading.Event, deadline: Optional[float],
                 on_tokens: Optional[Callable[[TextWatch], None]]) -> None:
        self.watch = watch
        self.prompt_len = prompt_len
        self.cancel = cancel
        self.deadline = deadline
        self.on_tokens = on_tokens
        self.reason: Optional[str] = None
        self.seen = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[0, self.seen :].tolist()
        self.seen = input_ids.shape[1]
        self.watch.add(new)
        if self.on_tokens is not None:
            self.on_tokens(self.watch)
        if self.cancel.is_set():
            self.reason = "cancelled"
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            self.reason = "timeout"
        elif self.watch.stopped_at is not None:
            self.reason = "stop"
        stop = self.reason is not None
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def generate(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    settings: GenerationSettings,
    cancel: Optional[threading.Event] = None,
    on_tokens: Optional[Callable[[TextWatch], None]] = None,
) -> GenerationResult:
    """Run ``model.generate`` once; ``on_tokens`` sees the TextWatch after every step (streaming)."""
    started = time.perf_counter()
    cancel = cancel or threading.Event()
    eos = eos_ids(model, tokenizer)
    watch = TextWatch(tokenizer, settings.stop, eos)
    deadline = time.monotonic() + settings.timeout_s if settings.timeout_s else None
    prompt_len = input_ids.shape[1]
    criteria = _Criteria(watch, prompt_len, cancel, deadline, on_tokens)
    sample = settings.temperature is not None and settings.temperature > 0
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": sample,
        "stopping_criteria": StoppingCriteriaList([criteria]),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0),
        "stop_strings": None,  # a generation config's own are matched by TextWatch (the caller passes them in)
    }
    if sample:
        kwargs["temperature"] = settings.temperature
        if settings.top_p is not None:
            kwargs["top_p"] = settings.top_p
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kwargs.update(dict(settings.extra))
    with torch.no_grad():  # not inference_mode: quanto's packed tensors fail under it
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=torch.ones_like(input_ids).to(model.device),
            **kwargs,
        )
    generated = output[0, prompt_len:].tolist()
    if criteria.seen < output.shape[1]:  # the last token is not seen by criteria on a length stop
        watch.add(output[0, criteria.seen :].tolist())
        if on_tokens is not None:
            on_tokens(watch)
    if criteria.reason is not None:
        finish = criteria.reason
    elif watch.hit_eos:
        finish = "stop"
    else:
        finish = "length" if len(generated) >= settings.max_new_tokens else "stop"
    return GenerationResult(
        text=watch.final_text(),
        input_tokens=prompt_len,
        output_tokens=len(generated),  # an end-of-turn token the model generated counts too
        finish_reason=finish,
        seconds=time.perf_counter() - started,
    )
