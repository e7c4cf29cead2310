"""GenerationEngine: one worker thread per model decodes every request in flight as one batch.

Requests wait in a bounded queue; between steps the worker admits as many as the batch has room
for (a prefill of their prompts, several prompts per forward, long prompts in chunks), then runs
one decode step over every active sequence, hands each its token, and drops the finished ones.
Weight switches happen between steps (:class:`~langchain_adaptquant.runtime.gate.StepGate`), so
each token is produced at one known level; each answer reports the levels its forwards ran at.

Why not transformers' continuous batching (``generate_batch`` / ``init_continuous_batching``):
measured on this CPU with our quantized modules it was several times slower than even
sequential ``generate`` and its greedy answers differed from ``generate``'s, and it has no
per-request stop strings or per-request logits processors (see docs/DYNAMIC_QUANTIZATION.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.runtime.attention import BUCKET, MODES, row_groups, use_row_attention
from langchain_adaptquant.runtime.cache import BatchCache, packed_cache, supports_row_batching
from langchain_adaptquant.runtime.contract import BetweenSteps, EngineBusyError, EngineClosedError, EngineStats, KVUsage
from langchain_adaptquant.runtime.gate import StepGate
from langchain_adaptquant.runtime.kv import KVLayout, kv_layout
from langchain_adaptquant.runtime.requests import GenerationRequest, RequestHandle
from langchain_adaptquant.runtime.sampling import RowSampler, next_tokens
from langchain_adaptquant.runtime.sequence import SequenceState
from langchain_adaptquant.runtime.text import eos_ids

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Bounds of one engine. Defaults suit small models on a few CPU cores."""

    max_batch: int = 32  # sequences decoding together
    max_waiting: int = 1024  # queued beyond the batch; more is refused (EngineBusyError)
    prefill_tokens: int = 512  # prompt tokens per prefill forward (longer prompts go in chunks)
    threads: Optional[int] = None  # torch threads, set once by the worker; None keeps torch's choice
    boundary_every_s: float = 0.1  # how often the between-steps hook (the policy's check) may run
    #: Decode-step attention (runtime/attention.py): "bucket" (default) and "row" make an answer
    #: independent of its batch company ("row" also equals model.generate, one call per row);
    #: "padded" is one masked call over the padded batch (answers can differ in near-ties).
    attention: str = "bucket"

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_waiting", "prefill_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValueError(name, value, "an integer >= 1")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InvalidValueError("threads", self.threads, "None or an integer >= 1")
        if self.attention not in MODES:
            raise InvalidValueError("attention", self.attention, " or ".join(repr(m) for m in MODES))


class _Sequence(SequenceState):
    """Engine-side state of one request: the shared state plus its sampler and KV reservation."""

    def __init__(self, handle: RequestHandle, tokenizer: Any, eos: set[int], layout: KVLayout,
                 device: torch.device) -> None:
        super().__init__(handle, tokenizer, eos)
        self.sampler = RowSampler(self.request, sorted(eos), device)
        self.reserved = layout.bytes_for(len(self.ids) + self.request.remaining_tokens)


class GenerationEngine(BetweenSteps):
    """Owns generation for one model: ``submit(request) -> RequestHandle``.

    ``level_of`` names the level the weights are at (read inside each step, under the gate);
    ``on_boundary`` runs between steps, at most every ``boundary_every_s`` (the loader passes the
    policy's check there, so memory pressure is acted on even while no new request arrives).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        gate: Optional[StepGate] = None,
        level_of: Callable[[], str] = lambda: "unknown",
        config: EngineConfig = EngineConfig(),
        on_boundary: Optional[Callable[["GenerationEngine"], None]] = None,
        name: str = "model",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.gate = gate or StepGate()
        self.level_of = level_of
        self.config = config
        self.on_boundary = on_boundary
        self.name = name
        self.device = torch.device(getattr(model, "device", "cpu"))
        dtype = getattr(model, "dtype", torch.bfloat16)
        self.layout = kv_layout(model.config, dtype_bytes=torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 2)
        self.eos = eos_ids(model, tokenizer)
        # rows batch when the cache is plain full attention; attention is then computed per row
        # (bit-identical to a request alone) with SDPA, or over padded rows with a mask otherwise
        self.row_batching = supports_row_batching(model.config)
        # our attention function (runtime/attention.py): packed prefills, row-exact decode steps
        self.packing = self.row_batching and use_row_attention(model)
        self.exact_rows = self.packing and config.attention != "padded"
        impl = getattr(model.config, "_attn_implementation", None)
        self.max_batch = config.max_batch if self.row_batching else 1
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._batch = self._new_cache()
        # the sequence being prefilled (long prompts take several rounds): it, its cache, ids, positions, columns done
        self._prefill: Optional[tuple[_Sequence, BatchCache, torch.Tensor, torch.Tensor, int]] = None
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self._last_boundary = 0.0
        self._reserved = 0
        self._resident = 0
        self.steps = 0
        self.tokens = 0
        self.max_batch_seen = 0
        if not self.row_batching:
            logger.info("%s: cache layout %s / attention %s: one sequence per step", name,
                        [type(cached).__name__ for cached in BatchCache(1, self.device, False, model.config).cache.layers][:2], impl)

    # -- public -----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; raises EngineBusyError when ``max_waiting`` requests already wait."""
        handle = RequestHandle(request, wake=self._wake)
        sequence = _Sequence(handle, self.tokenizer, self.eos, self.layout, self.device)
        with self._cond:
            if self._closed:
                raise EngineClosedError(f"the engine of {self.name!r} is closed")
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineBusyError(
                    f"{len(self._waiting)} request(s) already wait for {self.name!r} (max_waiting="
                    f"{self.config.max_waiting}); retry later")
            self._waiting.append(sequence)
            self._reserved += sequence.reserved
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"adaptquant-engine-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return handle

    def kv_usage(self) -> KVUsage:
        """Bytes the KV cache holds now, and will hold at most for what is in flight and queued."""
        return KVUsage(self._resident, max(self._reserved, self._resident))

    def stats(self) -> EngineStats:
        return EngineStats(active=len(self._active), waiting=len(self._waiting), steps=self.steps, tokens=self.tokens,
                           max_batch_seen=self.max_batch_seen, kv=self.kv_usage(), row_batching=self.row_batching)

    @property
    def in_flight(self) -> int:
        return len(self._active) + len(self._waiting) + (1 if self._prefill else 0)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still queued or running fail with EngineClosedError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- worker -----------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _new_cache(self) -> BatchCache:
        round_keys = BUCKET if self.exact_rows and self.config.attention == "bucket" else 1
        return BatchCache(self.layout.layers if self.row_batching else 0, self.device, self.row_batching,
                          self.model.config, round_keys=round_keys)

    def _run(self) -> None:
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)  # once, in the one thread that runs torch work
        try:
            with torch.no_grad():  # not inference_mode: quanto's packed tensors fail under it
                while self._cycle():
                    pass
        except BaseException as error:  # noqa: BLE001 - never leave a caller waiting forever
            logger.exception("engine of %s stopped", self.name)
            self._fail_all(error)
            raise
        self._fail_all(EngineClosedError(f"the engine of {self.name!r} was closed"))

    def _cycle(self) -> bool:
        """One round: sweep, boundary hook, one prefill forward and/or one decode step. False: stop."""
        with self._cond:
            if self._closed:
                return False
            if not self._active and not self._waiting and self._prefill is None:
                self._cond.wait(timeout=1.0)
                return True
        now = time.monotonic()
        self._sweep(now)
        self._boundary()
        if self._prefill is not None or (self._waiting and len(self._active) < self.max_batch):
            self._admit()
        if self._active:
            self._decode_step()
        return True

    def _sweep(self, now: float) -> None:
        """End cancelled and timed-out requests, queued or running."""
        with self._cond:
            waiting = list(self._waiting)
        for sequence in waiting:
            sequence.check_limits(now)
            if sequence.finish is not None:
                with self._cond:
                    self._waiting.remove(sequence)
                self._complete(sequence)
        for sequence in self._active:
            sequence.check_limits(now)
        if any(s.finish for s in self._active):
            self._drop_finished()

    def _release(self, sequence: _Sequence) -> None:
        with self._cond:  # submit() adds to the same counter from callers' threads
            self._reserved -= sequence.reserved
            sequence.reserved = 0

    def _complete(self, sequence: _Sequence) -> None:
        if sequence.handle.done:
            return  # failed already (its own logits processor raised)
        self._release(sequence)
        tail = sequence.watch.emit(final=True)
        sequence.handle._finish(sequence.result(), tail)

    def _drop_finished(self) -> None:
        done = [i for i, s in enumerate(self._active) if s.finish is not None]
        if not done:
            return
        for i in done:
            self._complete(self._active[i])
        self._batch.remove(done, self._active)
        self._resident = self._batch.nbytes

    def _fail(self, sequences: Sequence[_Sequence], error: BaseException) -> None:
        for sequence in sequences:
            self._release(sequence)
            sequence.handle._fail(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        prefilling = [self._prefill[0]] if self._prefill else []
        self._fail(list(self._active) + prefilling + waiting, error)
        self._active, self._prefill = [], None
        self._batch.clear()
        self._resident = 0

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: Optional[torch.Tensor], cache: Any,
                 sequences: Sequence[_Sequence], keep: Any = 1, **extra: Any) -> torch.Tensor:
        """One forward under the gate; returns the logits of the kept positions ``[rows, vocab]``."""
        if mask is not None and self.exact_rows:  # each row's keys, its new one included
            extra["row_groups"] = row_groups([n + 1 for n in cache.lengths], self.config.attention, self.device)
            mask = None  # the groups carry their own masks
        with self.gate.step():
            level = self.level_of()
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             cache=cache.cache if isinstance(cache, BatchCache) else cache, use_cache=True,
                             logits_to_keep=keep, **extra)
        self.steps += 1
        for sequence in sequences:
            sequence.ran_at(level)
        return out.logits[0] if isinstance(keep, torch.Tensor) else out.logits[:, -1, :]

    def _take_group(self, budget: int) -> list[_Sequence]:
        """Waiting prompts for one packed prefill: whole prompts, up to ``budget`` tokens (at least one)."""
        group: list[_Sequence] = []
        tokens = 0
        with self._cond:
            while self._waiting and len(self._active) + len(group) < self.max_batch:
                n = len(self._waiting[0].ids)
                if n > self.config.prefill_tokens or (group and tokens + n > budget):
                    break  # a long prompt goes alone, in chunks
                group.append(self._waiting.popleft())
                tokens += n
        return group

    def _prefill_packed(self, group: list[_Sequence]) -> None:
        """Several fresh prompts side by side in one forward; attention stays per prompt (row_attention)."""
        prompts, start = [], 0
        for sequence in group:
            prompts.append((start, len(sequence.ids)))
            start += len(sequence.ids)
        ids = torch.tensor([[t for s in group for t in s.ids]], dtype=torch.long, device=self.device)
        positions = torch.tensor([[i for s in group for i in range(len(s.ids))]], dtype=torch.long, device=self.device)
        keep = torch.tensor([first + n - 1 for first, n in prompts], device=self.device)
        cache = packed_cache(self.layout.layers)
        try:
            logits = self._forward(ids, positions, None, cache, group, keep=keep, prompts=prompts)
        except Exception as error:  # noqa: BLE001 - these requests fail; the others go on
            self._fail(group, error)
            return
        self._take_tokens(group, logits)
        for sequence, (first, n) in zip(group, prompts):
            if sequence.finish is None and not sequence.handle.done:
                self._batch.add_packed(cache, first, n)
                self._active.append(sequence)
            else:
                self._complete(sequence)
        self.max_batch_seen = max(self.max_batch_seen, len(self._active))
        self._resident = self._batch.nbytes

    def _admit(self) -> None:
        """Prefill waiting sequences into the batch, up to ``prefill_tokens`` prompt tokens this round.

        Prompts up to ``prefill_tokens`` long are packed side by side into one forward (attention
        per prompt, so each prompt's keys are what it would get alone); a longer prompt goes alone,
        in chunks of ``prefill_tokens`` at fixed offsets, so a long prompt delays the others' next
        token by one chunk at most.
        """
        budget = self.config.prefill_tokens
        while budget > 0 and not self.gate.switch_pending:
            if self._prefill is None and self.packing:
                group = self._take_group(budget)
                if group:
                    budget -= sum(len(s.ids) for s in group)
                    self._prefill_packed(group)
                    continue
            if self._prefill is None:
                with self._cond:
                    if not self._waiting or len(self._active) >= self.max_batch:
                        return
                    sequence = self._waiting.popleft()
                cache = self._new_cache()
                ids, positions = cache.start(sequence.ids)
                self._prefill = (sequence, cache, ids, positions, 0)
            sequence, cache, ids, positions, offset = self._prefill
            end = min(offset + self.config.prefill_tokens, ids.shape[1])
            try:
                logits = self._forward(ids[:, offset:end], positions[:, offset:end], None, cache, [sequence])
            except Exception as error:  # noqa: BLE001 - this request fails; the others go on
                self._prefill = None
                cache.clear()
                self._fail([sequence], error)
                continue
            cache.prefilled(end - offset)
            budget -= end - offset
            if end < ids.shape[1]:
                self._prefill = (sequence, cache, ids, positions, end)
                self._resident = self._batch.nbytes + cache.nbytes
                continue
            self._prefill = None
            self._take_tokens([sequence], logits)
            if sequence.finish is None and not sequence.handle.done:
                self._batch.add(cache)
                self._active.append(sequence)
                self.max_batch_seen = max(self.max_batch_seen, len(self._active))
            else:
                cache.clear()
                self._complete(sequence)
            self._resident = self._batch.nbytes

    def _decode_step(self) -> None:
        active = self._active
        batch = self._batch
        ids = torch.tensor([[s.generated[-1]] for s in active], dtype=torch.long, device=self.device)
        mask, positions = batch.begin_step()
        try:
            logits = self._forward(ids, positions, mask, batch, active)
        except Exception as error:  # noqa: BLE001 - the batch's cache is unusable now: fail its requests
            batch.abort_step()
            self._fail(active, error)
            self._active = []
            batch.clear()
            self._resident = 0
            return
        batch.end_step()
        self._take_tokens(active, logits)
        self._drop_finished()
        self._resident = self._batch.nbytes

    def _take_tokens(self, sequences: Sequence[_Sequence], logits: torch.Tensor) -> None:
        tokens = next_tokens(logits, [s.sampler for s in sequences], [s.ids for s in sequences],
                             [len(s.generated) for s in sequences])
        for sequence, token in zip(sequences, tokens):
            if isinstance(token, BaseException):
                sequence.finish = "error"
                self._fail([sequence], token)
                continue
            sequence.accept(int(token))
        self.tokens += len(sequences)
