"""What every engine keeps per request, whichever runtime decodes it (no torch here).

The ids so far, the text handed out (a :class:`TextWatch`), the levels its tokens came from, and
how it ends; both engines (torch's and llama.cpp's) subclass it with what only they need.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from langchain_adaptquant.runtime.requests import Progress, RequestHandle
from langchain_adaptquant.runtime.text import GenerationResult, TextWatch


class SequenceState:
    """Engine-side state of one request."""

    def __init__(self, handle: RequestHandle, tokenizer: Any, eos: set[int]) -> None:
        request = handle.request
        self.handle = handle
        self.request = request
        self.ids = list(request.input_ids)  # prompt and every answer token so far
        resume = request.resume
        self.generated = list(resume.ids) if resume else []
        # (level, tokens produced at it) in order; a forward that produced no token (a prefill chunk) opens a run too
        self.runs: list[list[Any]] = [list(run) for run in resume.runs] if resume else []
        self.prior_seconds = resume.seconds if resume else 0.0
        self.watch = TextWatch(tokenizer, request.stop, eos)
        if resume:
            self.watch.add(resume.ids)
            self.watch.emitted = resume.emitted_chars
        self.started = time.perf_counter()  # submitted: an answer's seconds include its wait in the queue
        handle._progress_of = self.progress  # read by a caller only once this request has failed
        self.finish: Optional[str] = None

    def ran_at(self, level: str) -> None:
        if not self.runs or self.runs[-1][0] != level:
            self.runs.append([level, 0])

    def level_runs(self) -> tuple[tuple[str, int], ...]:
        return tuple((level, count) for level, count in self.runs)

    def progress(self) -> Progress:
        elapsed = time.perf_counter() - self.started
        return Progress(tuple(self.generated), self.watch.emitted, self.level_runs(), self.prior_seconds + elapsed)

    def accept(self, token: int) -> None:
        """Add the token just produced; decide whether the answer is complete."""
        self.generated.append(token)
        self.ids.append(token)
        self.runs[-1][1] += 1
        self.watch.add([token])
        piece = self.watch.emit()
        if piece:
            self.handle._emit(piece)
        if self.watch.done:
            self.finish = "stop"
        elif len(self.generated) >= self.request.max_new_tokens:
            self.finish = "length"

    def check_limits(self, now: float) -> None:
        if self.finish is not None:
            return
        if self.handle.cancelled:
            self.finish = "cancelled"
        elif self.request.deadline is not None and now >= self.request.deadline:
            self.finish = "timeout"

    def result(self) -> GenerationResult:
        elapsed = time.perf_counter() - self.started
        return GenerationResult(
            text=self.watch.final_text(),
            input_tokens=len(self.request.prompt_ids),
            output_tokens=len(self.generated),  # an end-of-turn token the model generated counts too
            finish_reason=self.finish or "stop",
            seconds=self.prior_seconds + elapsed,
            levels_used=tuple(level for level, _ in self.runs),
            level_runs=self.level_runs(),
        )
