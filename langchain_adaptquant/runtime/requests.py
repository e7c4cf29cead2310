"""What a caller hands the engine (a frozen request) and what it gets back (a handle).

A :class:`RequestHandle` is the only channel between the engine's worker thread and a caller:
text pieces as they become safe to show (never a prefix of a stop string), then one
:class:`~langchain_adaptquant.runtime.text.GenerationResult` or one error. Threads iterate it,
asyncio tasks ``async for`` it; neither runs torch work, so the engine owns the cores.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Optional

from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.runtime.text import GenerationResult

#: A Hugging Face ``LogitsProcessor``-style callable for one sequence:
#: ``(input_ids LongTensor[1, t], scores FloatTensor[1, vocab]) -> FloatTensor[1, vocab]``,
#: where ``input_ids`` are the prompt plus the tokens generated so far.
LogitsProcessor = Callable[[Any, Any], Any]

#: Generation options the engine honours, besides ``max_new_tokens`` and stop strings.
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "repetition_penalty", "min_new_tokens", "do_sample", "seed")


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. Greedy (argmax) unless ``temperature`` > 0."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    min_new_tokens: int = 0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        _check_number("temperature", self.temperature, low=0.0, allowed="None or a finite number >= 0")
        _check_number("top_p", self.top_p, low=0.0, high=1.0, open_low=True, allowed="None or a number in (0, 1]")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise InvalidValueError("top_k", self.top_k, "None or an integer >= 1")
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, open_low=True,
                      allowed="None or a finite number > 0 (1.0 means no penalty)")
        if isinstance(self.min_new_tokens, bool) or not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise InvalidValueError("min_new_tokens", self.min_new_tokens, "an integer >= 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidValueError("seed", self.seed, "None or an integer")

    @property
    def greedy(self) -> bool:
        return not self.temperature

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: what the engine can do for many rows at once."""
        return self.greedy and self.repetition_penalty in (None, 1.0) and self.min_new_tokens == 0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Sampling":
        """From ``model_kwargs``-style options; an option the engine cannot honour is an error, not ignored."""
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unknown:
            raise InvalidValueError(
                "generation option", unknown[0] if len(unknown) == 1 else unknown,
                "one of " + ", ".join(SAMPLING_OPTIONS) + " (plus max_tokens, stop and logits_processor)",
            )
        values = dict(options)
        do_sample = values.pop("do_sample", None)
        if do_sample is not None and not isinstance(do_sample, bool):
            raise InvalidValueError("do_sample", do_sample, "True or False")
        if do_sample is False:
            values["temperature"] = None  # greedy, whatever temperature says
        elif do_sample is True and not values.get("temperature"):
            values["temperature"] = 1.0
        return cls(**values)


def _check_number(name: str, value: Any, low: float, allowed: str, high: Optional[float] = None,
                  open_low: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidValueError(name, value, allowed)
    if value < low or (open_low and value == low) or (high is not None and value > high):
        raise InvalidValueError(name, value, allowed)


@dataclass(frozen=True)
class Resume:
    """Tokens an earlier attempt already produced for this answer (retry after running out of memory).

    The engine prefills them after the prompt and goes on from there: nothing already streamed is
    sent again, and a stop string spanning the boundary is still found.
    """

    ids: tuple[int, ...]
    emitted_chars: int
    runs: tuple[tuple[str, int], ...]  # (level, tokens) the earlier attempt produced
    seconds: float


@dataclass(frozen=True)
class GenerationRequest:
    """One answer to generate: prompt token ids and how to decode."""

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    deadline: Optional[float] = None  # time.monotonic() after which the answer ends with "timeout"
    logits_processor: Optional[LogitsProcessor] = None
    resume: Optional[Resume] = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidValueError("prompt_ids", self.prompt_ids, "at least one token id")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidValueError("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if self.logits_processor is not None and not callable(self.logits_processor):
            raise InvalidValueError("logits_processor", self.logits_processor,
                                    "None or a callable (input_ids [1, t], scores [1, vocab]) -> scores")

    @property
    def input_ids(self) -> tuple[int, ...]:
        """What the engine prefills: the prompt, then any tokens a previous attempt produced."""
        return self.prompt_ids + (self.resume.ids if self.resume else ())

    @property
    def remaining_tokens(self) -> int:
        return self.max_new_tokens - (len(self.resume.ids) if self.resume else 0)


@dataclass(frozen=True)
class Progress:
    """What a request produced so far: enough to resume it elsewhere."""

    ids: tuple[int, ...]
    emitted_chars: int
    runs: tuple[tuple[str, int], ...]  # (level, tokens produced at it), in order
    seconds: float

    @property
    def last_level(self) -> Optional[str]:
        return self.runs[-1][0] if self.runs else None

    def resume(self) -> Resume:
        return Resume(ids=self.ids, emitted_chars=self.emitted_chars, runs=self.runs, seconds=self.seconds)


class RequestHandle:
    """The caller's side of one request: a stream of text pieces, then a result (or an error).

    Iterating (``for piece in handle`` or ``async for piece in handle``) yields pieces and ends
    when the answer is complete; it raises the engine's error if generation failed. ``result()``
    waits for the end. ``cancel()`` stops generation at the next step boundary.
    """

    def __init__(self, request: GenerationRequest, wake: Callable[[], None] = lambda: None) -> None:
        self.request = request
        self.submitted_at = time.monotonic()
        self._wake = wake
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self._read = 0
        self._result: Optional[GenerationResult] = None
        self._error: Optional[BaseException] = None
        self._cancelled = False
        resume = request.resume
        start = Progress(resume.ids, resume.emitted_chars, resume.runs, resume.seconds) if resume else Progress((), 0, (), 0.0)
        self._progress_of: Callable[[], Progress] = lambda: start  # the engine points it at the live sequence
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- engine side ----------------------------------------------------------------------------
    def _notify(self) -> None:
        for loop, event in self._async_waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # that loop is closed: its consumer is gone
        self._cond.notify_all()

    def _emit(self, piece: str) -> None:
        with self._cond:
            self._pieces.append(piece)
            self._notify()

    def _finish(self, result: GenerationResult, tail: str = "") -> None:
        with self._cond:
            if tail:
                self._pieces.append(tail)
            self._result = result
            self._notify()

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._notify()

    # -- caller side ----------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    def cancel(self) -> None:
        """Stop at the next step boundary (a queued request never starts); the result says 'cancelled'."""
        self._cancelled = True
        self._wake()

    def progress(self) -> Progress:
        """Tokens produced so far, the text already handed out and the levels used (to resume after an error)."""
        with self._cond:
            return self._progress_of()

    def _next(self) -> tuple[Optional[str], bool]:
        """(piece, finished) under the lock; raises the engine's error once pieces are drained."""
        if self._read < len(self._pieces):
            self._read += 1
            return self._pieces[self._read - 1], False
        if self._error is not None:
            raise self._error
        return None, self._result is not None

    def __iter__(self) -> Iterator[str]:
        while True:
            with self._cond:
                piece, finished = self._next()
                while piece is None and not finished:
                    self._cond.wait()
                    piece, finished = self._next()
            if finished or piece is None:  # a None piece comes only with finished
                return
            yield piece

    async def __aiter__(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        with self._cond:
            self._async_waiters.append(waiter)
        try:
            while True:
                with self._cond:
                    piece, finished = self._next()
                    if piece is None and not finished:
                        event.clear()  # under the lock: a piece pushed after this sets it again
                if finished:
                    return
                if piece is None:
                    await event.wait()
                    continue
                yield piece
        finally:
            with self._cond:
                self._async_waiters.remove(waiter)

    def result(self, timeout: Optional[float] = None) -> GenerationResult:
        """Wait for the end; raises the engine's error (or TimeoutError after ``timeout`` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout=timeout):
                raise TimeoutError(f"request not finished after {timeout} s")
            if self._error is not None:
                raise self._error
            assert self._result is not None
            return self._result

    async def aresult(self) -> GenerationResult:
        async for _ in self:
            pass
        return self.result(timeout=0)
