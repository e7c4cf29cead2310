"""LlamaCppEngine: one worker thread per model runs one ``llama_decode`` over every sequence in flight.

The contract is the torch engine's (``submit(GenerationRequest) -> RequestHandle``, ``kv_usage``,
``stats``, ``close``), so the chat model, the server and the callbacks do not know which runtime
answers. Each request gets a llama.cpp sequence id; every step feeds one token per decoding
sequence and then prompt chunks of the sequences being admitted (up to ``batch_tokens``), so a
long prompt delays the others by one chunk at most. Tokens are picked in Python from the logits
rows: one numpy argmax for plain greedy rows, the torch runtime's own sampler for the rest (a
grammar, a repetition penalty, temperature), so both runtimes pick the same way.

A switch (:meth:`switch_to`) happens between two steps on the worker thread: the old level's
context and weights are freed first (the two are never mapped together), the new level's file is
loaded, and every sequence in flight is fed again from its prompt and the tokens it already has
(a re-prefill: the KV cache of one level is not what another level computes). Nothing is lost:
the next token of each answer comes from the new level.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.runtime.contract import BetweenSteps, EngineBusyError, EngineClosedError, EngineStats, KVUsage
from langchain_adaptquant.runtime.llamacpp.weights import LlamaCppConfig, LlamaWeights
from langchain_adaptquant.runtime.requests import GenerationRequest, RequestHandle
from langchain_adaptquant.runtime.sequence import SequenceState

logger = logging.getLogger(__name__)


class _Slot(SequenceState):
    """One request on llama.cpp: the shared state plus its sequence id and how much of it is in the KV cache."""

    def __init__(self, handle: RequestHandle, tokenizer: Any, eos: set[int]) -> None:
        super().__init__(handle, tokenizer, eos)
        request = self.request
        self.eos = eos
        self.sampler: Any = None  # the torch runtime's RowSampler, built on first need
        sampling = request.sampling
        # greedy with nothing but a minimum length: a numpy argmax with the end tokens masked early on
        self.plain = (sampling.greedy and request.logits_processor is None
                      and sampling.repetition_penalty in (None, 1.0))
        self.eos_list = np.array(sorted(eos), dtype=np.int64)
        self.reserved_tokens = len(self.ids) + request.remaining_tokens
        self.seq_id = -1
        self.fed = 0  # ids already in this level's KV cache

    def pick(self, row: np.ndarray) -> int:
        if self.plain:
            if len(self.generated) < self.request.sampling.min_new_tokens and self.eos_list.size:
                row = row.copy()
                row[self.eos_list] = -np.inf
            return int(row.argmax())
        if self.sampler is None:
            import torch  # noqa: PLC0415 - only answers that sample or follow a grammar need it

            from langchain_adaptquant.runtime.sampling import RowSampler

            self.sampler = RowSampler(self.request, sorted(self.eos), torch.device("cpu"))
        import torch  # noqa: PLC0415

        scores = torch.from_numpy(np.array(row, dtype=np.float32, copy=True)).unsqueeze(0)
        return self.sampler.pick(scores, self.ids, len(self.generated))


@dataclass
class _PendingSwitch:
    path: Path
    level: QuantizationLevel
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    seconds: float = 0.0
    refed_tokens: int = 0


class LlamaCppEngine(BetweenSteps):
    """Owns generation for one llama.cpp model: ``submit(request) -> RequestHandle``."""

    def __init__(self, weights: LlamaWeights, tokenizer: Any, eos: set[int], config: LlamaCppConfig,
                 on_boundary: Optional[Callable[["LlamaCppEngine"], None]] = None, name: str = "model") -> None:
        self.weights = weights
        self.tokenizer, self.eos, self.config = tokenizer, eos, config
        self.on_boundary, self.name = on_boundary, name
        self._cond = threading.Condition()
        self._waiting: deque[_Slot] = deque()
        self._active: list[_Slot] = []
        self._free_ids = list(range(config.max_batch - 1, -1, -1))
        self._switch: Optional[_PendingSwitch] = None
        self._closed = False
        self._last_boundary = 0.0
        self.steps = self.tokens = self.max_batch_seen = 0
        self.last_switch: Optional[_PendingSwitch] = None
        self._thread = threading.Thread(target=self._run, name=f"adaptquant-llamacpp-{name}", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------------------------
    @property
    def level(self) -> QuantizationLevel:
        return self.weights.level

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; EngineBusyError when ``max_waiting`` wait already, a clear error when it
        can never fit the KV cache."""
        need = len(request.input_ids) + request.remaining_tokens
        if need > self.weights.n_ctx:
            raise InvalidValueError(
                "prompt and max_new_tokens", f"{len(request.input_ids)} + {request.remaining_tokens} tokens",
                f"at most the engine's KV cache of {self.weights.n_ctx} tokens (LlamaCppConfig.n_ctx)")
        handle = RequestHandle(request, wake=self._wake)
        slot = _Slot(handle, self.tokenizer, self.eos)
        with self._cond:
            if self._closed:
                raise EngineClosedError(f"the engine of {self.name!r} is closed")
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineBusyError(f"{len(self._waiting)} request(s) already wait for {self.name!r} "
                                      f"(max_waiting={self.config.max_waiting}); retry later")
            self._waiting.append(slot)
            self._cond.notify_all()
        return handle

    def switch_to(self, path: Path, level: QuantizationLevel, timeout: float = 600.0) -> _PendingSwitch:
        """Serve from ``path`` (the level's GGUF) from the next step on; waits until it is done.

        Raises the load's error after going back to the old level (the answers in flight go on).
        """
        pending = _PendingSwitch(Path(path), level)
        if threading.current_thread() is self._thread:  # the between-steps hook: already between two steps
            self._apply_switch(pending)
        else:
            with self._cond:
                if self._closed:
                    raise EngineClosedError(f"the engine of {self.name!r} is closed")
                self._switch = pending
                self._cond.notify_all()
        if not pending.done.wait(timeout):
            raise TimeoutError(f"switch of {self.name!r} to {level.value} not done after {timeout} s")
        if pending.error is not None:
            raise pending.error
        return pending

    def kv_usage(self) -> KVUsage:
        """The KV cache llama.cpp allocated up front (resident) and what the requests in flight reserve."""
        with self._cond:
            reserved = sum(s.reserved_tokens for s in self._active) + sum(s.reserved_tokens for s in self._waiting)
        per_token = self.weights.kv_bytes_per_token
        return KVUsage(self.weights.kv_bytes, max(self.weights.kv_bytes, reserved * per_token))

    def stats(self) -> EngineStats:
        return EngineStats(active=len(self._active), waiting=len(self._waiting), steps=self.steps, tokens=self.tokens,
                           max_batch_seen=self.max_batch_seen, kv=self.kv_usage(), row_batching=True)

    @property
    def in_flight(self) -> int:
        return len(self._active) + len(self._waiting)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker and free the weights; requests still queued or running fail with EngineClosedError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- worker -----------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while self._cycle():
                pass
        except BaseException as error:  # noqa: BLE001 - never leave a caller waiting forever
            logger.exception("llama.cpp engine of %s stopped", self.name)
            self._fail_all(error)
            raise
        finally:
            pending = self._switch
            if pending is not None and not pending.done.is_set():
                pending.error = EngineClosedError(f"the engine of {self.name!r} was closed")
                pending.done.set()
        self._fail_all(EngineClosedError(f"the engine of {self.name!r} was closed"))
        self.weights.free()

    def _cycle(self) -> bool:
        with self._cond:
            if self._closed:
                return False
            if not self._active and not self._waiting and self._switch is None:
                self._cond.wait(timeout=1.0)
                return True
            pending, self._switch = self._switch, None
        if pending is not None:
            self._apply_switch(pending)
        self._sweep(time.monotonic())
        self._boundary()
        self._admit()
        if self._active:
            self._step()
        return True

    def _apply_switch(self, pending: _PendingSwitch) -> None:
        started = time.perf_counter()
        old_path, old_level = self.weights.path, self.weights.level
        self.weights.free()  # first: the two levels are never mapped at once
        try:
            self.weights = LlamaWeights(pending.path, pending.level, self.config)
        except BaseException as error:  # noqa: BLE001 - go back to the level that worked
            pending.error = error
            self.weights = LlamaWeights(old_path, old_level, self.config)
        for slot in self._active:  # their KV cache went with the old context: feed them again
            pending.refed_tokens += len(slot.ids) - (1 if slot.generated else 0)
            slot.fed = 0
        pending.seconds = time.perf_counter() - started
        self.last_switch = pending
        pending.done.set()

    def _sweep(self, now: float) -> None:
        with self._cond:
            waiting = list(self._waiting)
        for slot in waiting:
            slot.check_limits(now)
            if slot.finish is not None:
                with self._cond:
                    self._waiting.remove(slot)
                self._complete(slot)
        for slot in self._active:
            slot.check_limits(now)
        self._drop_finished()

    def _admit(self) -> None:
        with self._cond:
            used = sum(s.reserved_tokens for s in self._active)
            while self._waiting and self._free_ids:
                slot = self._waiting[0]
                if used + slot.reserved_tokens > self.weights.n_ctx:
                    break  # waits until answers in flight leave room in the KV cache
                self._waiting.popleft()
                slot.seq_id = self._free_ids.pop()
                used += slot.reserved_tokens
                self._active.append(slot)
        self.max_batch_seen = max(self.max_batch_seen, len(self._active))

    def _step(self) -> None:
        """One llama_decode: the next token of every decoding sequence, then prompt chunks."""
        budget = self.config.batch_tokens
        rows: list[tuple[int, int, int, bool]] = []
        takes: list[tuple[_Slot, int, bool]] = []
        # the decoding sequences first (one token each), then the ones still being fed
        for slot in sorted(self._active, key=lambda s: len(s.ids) - s.fed):
            pending = len(slot.ids) - slot.fed
            take = min(pending, budget)
            if take <= 0:
                continue
            # the last id is fed without logits only if more of the prompt follows; a sequence
            # whose ids are all fed wants the next token
            wants = slot.fed + take == len(slot.ids)
            for offset in range(take):
                position = slot.fed + offset
                rows.append((slot.ids[position], position, slot.seq_id, wants and offset == take - 1))
            takes.append((slot, take, wants))
            budget -= take
            if budget <= 0:
                break
        if not rows:
            return
        level = self.weights.level.value
        try:
            logits = self.weights.decode(rows)
        except Exception as error:  # noqa: BLE001 - the batch's KV is unusable now: fail its requests
            for slot, _, _ in takes:
                slot.finish = "error"
                self._release(slot)
                slot.handle._fail(error)
            self._active = [s for s in self._active if s.finish is None]
            return
        self.steps += 1
        row = 0
        for slot, take, wants in takes:
            slot.fed += take
            slot.ran_at(level)
            if not wants:
                continue
            assert logits is not None
            try:
                token = slot.pick(logits[row])
            except Exception as error:  # noqa: BLE001 - that request's own processor failed: only it ends
                slot.finish = "error"
                self._release(slot)
                slot.handle._fail(error)
                row += 1
                continue
            row += 1
            slot.accept(token)
            self.tokens += 1
        self._drop_finished()

    def _release(self, slot: _Slot) -> None:
        if slot.seq_id >= 0:
            self.weights.clear_sequence(slot.seq_id)
            with self._cond:
                self._free_ids.append(slot.seq_id)
            slot.seq_id = -1

    def _complete(self, slot: _Slot) -> None:
        self._release(slot)
        if slot.handle.done:
            return
        tail = slot.watch.emit(final=True)
        slot.handle._finish(slot.result(), tail)

    def _drop_finished(self) -> None:
        finished = [s for s in self._active if s.finish is not None]
        if not finished:
            return
        for slot in finished:
            self._complete(slot)
        with self._cond:
            self._active = [s for s in self._active if s.finish is None]

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            slots = list(self._active) + list(self._waiting)
            self._active, self._waiting = [], deque()
        for slot in slots:
            if not slot.handle.done:
                slot.handle._fail(error)
