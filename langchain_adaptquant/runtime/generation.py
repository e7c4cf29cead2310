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
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: tuple[str, ...] = ()
    timeout_s: Optional[float] = None
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str  # "stop", "length", "cancelled" or "timeout"
    seconds: float
    #: Levels the forward passes of this answer ran at, in order (one entry unless a switch landed
    #: between two of its steps). Empty on the per-request path, which cannot tell.
    levels_used: tuple[str, ...] = ()
    #: (level, tokens produced at it) in order, e.g. (("fp16", 5), ("int2", 3)).
    level_runs: tuple[tuple[str, int], ...] = ()


class TextWatch:
    """Incremental decoding of generated ids with stop-string detection.

    ``emit()`` returns the text that is safe to show: never a prefix of a possible stop string,
    never a half-decoded multi-byte character.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], eos_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.eos_ids = eos_ids
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped_at: Optional[int] = None  # char index of the first stop string
        self.hit_eos = False

    def add(self, token_ids: Sequence[int]) -> None:
        for token in token_ids:
            if token in self.eos_ids:
                self.hit_eos = True
                return
            self.ids.append(int(token))
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if self.stop and self.stopped_at is None:
            hits = [self.text.find(s) for s in self.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.stopped_at = min(hits)

    @property
    def done(self) -> bool:
        return self.stopped_at is not None or self.hit_eos

    def final_text(self) -> str:
        return self.text[: self.stopped_at] if self.stopped_at is not None else self.text

    def emit(self, final: bool = False) -> str:
        text = self.final_text()
        limit = len(text)
        if not final:
            if text.endswith("\ufffd"):
                limit = len(text) - 1  # an unfinished multi-byte character
            for stop in self.stop:  # hold back a tail that might grow into a stop string
                for k in range(min(len(stop) - 1, limit), 0, -1):
                    if text[:limit].endswith(stop[:k]):
                        limit -= k
                        break
        piece = text[self.emitted : max(limit, self.emitted)]
        self.emitted = max(limit, self.emitted)
        return piece


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


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end an answer: the model's generation config and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


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
