"""What an answer is made of, without torch: decoded text with stop strings, and the result.

:class:`TextWatch` turns generated ids into text that is safe to show: stop strings are matched on
decoded text, so one spanning several tokens works (the answer ends as soon as it appears and is
cut before it). Both runtimes' engines keep one per sequence; this module imports no torch, so the
llama.cpp runtime's path stays free of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence


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
