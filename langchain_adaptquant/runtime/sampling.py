"""Picking each sequence's next token from its row of logits.

Rows that decode greedily with nothing to adjust share one batched ``argmax`` and one host
transfer per step (the common case, and the cheap one). Every other row goes through its own
processors: repetition penalty, the request's own logits processor (e.g. a grammar), the
minimum-length rule, then temperature / top-k / top-p and a draw from the row's own generator.
The warpers and the penalty are transformers' own ``LogitsProcessor`` classes, so the
arithmetic is the one ``model.generate`` uses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from langchain_adaptquant.runtime.requests import GenerationRequest


class RowSampler:
    """The next-token rule of one sequence, built once when it is admitted."""

    def __init__(self, request: GenerationRequest, eos_ids: Sequence[int], device: torch.device) -> None:
        sampling = request.sampling
        self.plain = sampling.plain_greedy and request.logits_processor is None
        self.greedy = sampling.greedy
        self.user = request.logits_processor
        self.min_new_tokens = sampling.min_new_tokens
        self.eos = list(eos_ids)
        self.penalty = (RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
                        if sampling.repetition_penalty not in (None, 1.0) else None)
        warpers = LogitsProcessorList()
        if not self.greedy:
            if sampling.temperature is not None and sampling.temperature != 1.0:  # not greedy: set and > 0
                warpers.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k is not None:
                warpers.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p is not None and sampling.top_p < 1.0:
                warpers.append(TopPLogitsWarper(sampling.top_p))
        self.warpers = warpers
        self.generator: Optional[torch.Generator] = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if sampling.seed is not None:
                self.generator.manual_seed(sampling.seed)
            else:
                self.generator.seed()
        self.needs_ids = self.penalty is not None or self.user is not None

    def pick(self, scores: torch.Tensor, ids: Sequence[int], generated: int) -> int:
        """Next token from ``scores`` ([1, vocab]); ``ids`` is the prompt plus the tokens so far."""
        scores = scores.float()
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=scores.device) if self.needs_ids else None
        if self.penalty is not None:
            scores = self.penalty(input_ids, scores)
        if self.user is not None:
            scores = self.user(input_ids, scores)
            if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != 1:
                raise TypeError(f"logits_processor returned {type(scores).__name__} {getattr(scores, 'shape', '')}; "
                                "expected a FloatTensor of shape [1, vocab]")
        if generated < self.min_new_tokens and self.eos:
            scores = scores.clone()
            scores[:, self.eos] = float("-inf")
        if self.greedy:
            return int(scores.argmax(dim=-1))
        # the warpers (temperature, top-k, top-p) read only the scores, never the ids
        scores = self.warpers(input_ids, scores) if len(self.warpers) else scores  # type: ignore[arg-type]
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def next_tokens(logits: torch.Tensor, samplers: Sequence[RowSampler], ids: Sequence[Sequence[int]],
                generated: Sequence[int]) -> list[int | BaseException]:
    """One token per row (an int), or the exception that row's own processing raised.

    ``logits`` is ``[rows, vocab]``. Plain greedy rows cost one batched argmax and one transfer.
    """
    out: list[int | BaseException] = [0] * len(samplers)
    plain = [i for i, s in enumerate(samplers) if s.plain]
    if len(plain) == len(samplers):
        return list(logits.argmax(dim=-1).tolist())
    if plain:
        picked = logits[torch.tensor(plain, device=logits.device)].argmax(dim=-1).tolist()
        for i, token in zip(plain, picked):
            out[i] = token
    for i, sampler in enumerate(samplers):
        if sampler.plain:
            continue
        try:
            out[i] = sampler.pick(logits[i : i + 1], ids[i], generated[i])
        except Exception as error:  # noqa: BLE001 - that request's own code failed: only it ends
            out[i] = error
    return out
