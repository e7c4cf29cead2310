"""One level of a model in llama.cpp: the memory-mapped GGUF, its context (KV cache) and a batch.

Only the engine's worker thread decodes with it; it is made and freed whole, one level at a time,
so a switch never holds two levels' weights (the engine frees the old one before loading the new).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.runtime.llamacpp.bindings import lib
from langchain_adaptquant.runtime.llamacpp.gguf_files import GGUFError, read_table


@dataclass(frozen=True)
class LlamaCppConfig:
    """Bounds of one llama.cpp engine. Defaults suit small models on a few CPU cores."""

    n_ctx: int = 4096  # KV-cache tokens shared by every sequence in flight (a unified cache)
    max_batch: int = 16  # sequences decoding together (llama.cpp's n_seq_max)
    max_waiting: int = 1024  # queued beyond the batch; more is refused (EngineBusyError)
    batch_tokens: int = 512  # tokens per llama_decode: one per decoding sequence, then prompt chunks
    threads: Optional[int] = None  # llama.cpp's threads; None: every core
    boundary_every_s: float = 0.1  # how often the between-steps hook (the policy's check) may run

    def __post_init__(self) -> None:
        for name in ("n_ctx", "max_batch", "max_waiting", "batch_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidValueError(name, value, "an integer >= 1")
        if self.batch_tokens < self.max_batch:
            raise InvalidValueError("batch_tokens", self.batch_tokens, f"at least max_batch ({self.max_batch})")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InvalidValueError("threads", self.threads, "None or an integer >= 1")


class LlamaWeights:
    """A loaded level: model, context and a reusable batch. ``free()`` releases all three."""

    def __init__(self, path: Path, level: QuantizationLevel, config: LlamaCppConfig) -> None:
        llama = lib()
        self.path, self.level, self.config = Path(path), level, config
        self.table = read_table(self.path)  # GGUFError for a file that is not a complete GGUF
        started = time.perf_counter()
        params = llama.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise GGUFError(f"llama.cpp could not load {self.path} (see the log above for its reason)")
        cparams = llama.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = cparams.n_ubatch = config.batch_tokens
        cparams.n_seq_max = config.max_batch
        cparams.kv_unified = True  # one pool of n_ctx tokens: a long answer may use what short ones leave
        threads = config.threads or os.cpu_count() or 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self._ctx = llama.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama.llama_model_free(self._model)
            self._model = None
            raise GGUFError(f"llama.cpp could not make a context of {config.n_ctx} tokens for {self.path}")
        self._memory = llama.llama_get_memory(self._ctx)
        self.n_vocab = int(llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self._model)))
        self.n_ctx = int(llama.llama_n_ctx(self._ctx))
        layers = int(llama.llama_model_n_layer(self._model))
        heads, kv_heads = int(llama.llama_model_n_head(self._model)), int(llama.llama_model_n_head_kv(self._model))
        head_dim = int(llama.llama_model_n_embd(self._model)) // max(1, heads)
        self.kv_bytes_per_token = layers * 2 * kv_heads * head_dim * 2  # K and V, F16 (type_k/type_v default)
        self.context_length = int(llama.llama_model_n_ctx_train(self._model))
        self._batch = llama.llama_batch_init(config.batch_tokens, 0, 1)
        self.load_seconds = time.perf_counter() - started

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the level's weights (the file's tensor table): what the policy counts as the model."""
        return self.table.tensor_bytes

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache this context allocated (all of it, up front)."""
        return self.n_ctx * self.kv_bytes_per_token

    def clear_sequence(self, seq_id: int) -> None:
        lib().llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def decode(self, tokens: Sequence[tuple[int, int, int, bool]]) -> Optional[np.ndarray]:
        """One ``llama_decode`` over ``(token, position, seq_id, wants_logits)`` rows.

        Returns the logits of the rows that asked for them, in order, as ``[rows, vocab]`` float32
        (a view valid until the next decode), or None when no row asked.
        """
        llama = lib()
        batch = self._batch
        outputs = 0
        for i, (token, position, seq_id, wants) in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = 1 if wants else 0
            outputs += 1 if wants else 0
        batch.n_tokens = len(tokens)
        code = llama.llama_decode(self._ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} for {len(tokens)} tokens "
                               "(1: no room left in the KV cache; < 0: an error)")
        if not outputs:
            return None
        pointer = llama.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(outputs, self.n_vocab))

    def free(self) -> None:
        """Release the batch, the context (KV cache) and the model's mapping; idempotent."""
        llama = lib()
        if getattr(self, "_batch", None) is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            llama.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # a last resort; the engine frees explicitly
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
