"""A batched KV cache whose rows (sequences) join and leave between steps.

Every row's tokens start at column 0; shorter rows are padded on the right and the 2D attention
mask hides the padding. A decode step writes each row's new key and value at that row's own
length (``position_ids`` are those lengths), so a row's real keys sit at exactly the columns a
request alone would use. Keys past a row's end are masked out, and masked columns add exact zeros
to attention, so a sequence's answer does not depend on who shares the batch (where the linear
kernels are row-invariant too; see ``docs/DYNAMIC_QUANTIZATION.md``).

Buffers keep spare rows and columns: joining copies one row into a free slot, leaving moves the
last row into the hole, and a step writes one column. Nothing re-concatenates the whole cache per
token (transformers' ``DynamicLayer`` does).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

#: Columns are allocated in blocks of this many tokens; growth adds a quarter of the length.
BLOCK = 64


def _capacity(tokens: int, block: int = BLOCK) -> int:
    wanted = tokens + max(block, tokens // 4)
    return -(-wanted // block) * block


class GrowingLayer(DynamicLayer):
    """One layer's keys and values in ``[row slots, heads, columns, head_dim]`` buffers.

    ``rows`` slots and ``length`` columns are in use. Before a decode step the owner sets
    ``write_at`` (one column per row); a prefill (one row, several tokens) appends at ``length``.
    """

    def __init__(self, round_keys: int = 1) -> None:
        super().__init__()
        self.rows = 0
        self.length = 0
        self.round_keys = round_keys  # decode steps see keys up to the next multiple of this (padding, masked)
        self.key_buffer: Optional[torch.Tensor] = None
        self.value_buffer: Optional[torch.Tensor] = None
        # (row index, column index) tensors, or (None, column) for a single row
        self.write_at: Optional[tuple[Optional[torch.Tensor], Any]] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers, which exist once ``reserve`` or ``resize`` made them."""
        if self.key_buffer is None or self.value_buffer is None:
            raise RuntimeError("this cache layer holds no buffers yet: reserve() comes first")
        return self.key_buffer, self.value_buffer

    def reserve(self, rows: int, columns: int, like: torch.Tensor) -> None:
        """Room for ``rows`` x ``columns``; grows (copying what is in use) only when short."""
        buffer = self.key_buffer
        if buffer is not None and rows <= buffer.shape[0] and columns <= buffer.shape[2]:
            return
        have_rows = buffer.shape[0] if buffer is not None else 0
        have_cols = buffer.shape[2] if buffer is not None else 0
        new_rows = max(rows, have_rows) if rows <= have_rows else max(rows, 2 * have_rows)
        new_cols = have_cols if columns <= have_cols else _capacity(columns)
        self.resize(new_rows, new_cols, like)

    def resize(self, rows: int, columns: int, like: torch.Tensor) -> None:
        heads, dim = like.shape[1], like.shape[-1]
        keys = like.new_zeros((rows, heads, columns, dim))
        values = keys.clone()
        if self.key_buffer is not None and self.rows and self.length:
            old_keys, old_values = self.buffers()
            keys[: self.rows, :, : self.length] = old_keys[: self.rows, :, : self.length]
            values[: self.rows, :, : self.length] = old_values[: self.rows, :, : self.length]
        self.key_buffer, self.value_buffer = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.write_at is not None:  # decode: one new column per row, each at its own length
            rows, columns = self.write_at
            key_buffer, value_buffer = self.buffers()
            if isinstance(columns, int):  # one row: a plain slice is cheaper than an indexed write
                key_buffer[:1, :, columns : columns + 1] = key_states
                value_buffer[:1, :, columns : columns + 1] = value_states
            else:
                key_buffer[rows, :, columns] = key_states[:, :, 0]
                value_buffer[rows, :, columns] = value_states[:, :, 0]
            self.length += 1
            shown = min(-(-self.length // self.round_keys) * self.round_keys, key_buffer.shape[2])
            keys, values = key_buffer[: self.rows, :, :shown], value_buffer[: self.rows, :, :shown]
            self.keys, self.values = keys, values
            return keys, values
        # prefill of one sequence: append its tokens
        self.rows = max(self.rows, key_states.shape[0])
        end = self.length + key_states.shape[-2]
        self.reserve(self.rows, end, key_states)
        key_buffer, value_buffer = self.buffers()
        key_buffer[: self.rows, :, self.length : end] = key_states
        value_buffer[: self.rows, :, self.length : end] = value_states
        self.length = end
        keys, values = key_buffer[: self.rows, :, :end], value_buffer[: self.rows, :, :end]
        self.keys, self.values = keys, values
        return keys, values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = self.keys = self.values = None
        self.rows = self.length = 0
        self.write_at = None
        self.is_initialized = False

    @property
    def nbytes(self) -> int:
        if self.key_buffer is None:
            return 0
        return 2 * self.key_buffer.numel() * self.key_buffer.element_size()


class PackedLayer(DynamicLayer):
    """Keys and values of one packed prefill: several fresh prompts side by side in one row."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.is_initialized = True
        self.keys, self.values = key_states, value_states
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0  # every prompt in it starts fresh; its tokens go to batch rows afterwards


def _held(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed layer's keys and values, which exist once the prefill ran."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if keys is None or values is None:
        raise RuntimeError("this packed cache layer holds no keys yet: run the prefill first")
    return keys, values


def packed_cache(num_layers: int) -> Cache:
    return Cache(layers=[PackedLayer() for _ in range(num_layers)])


def supports_row_batching(config: Any) -> bool:
    """Whether every layer of this model caches plain full attention (what ``BatchCache`` holds).

    Sliding-window, linear-attention and other hybrid caches keep per-layer state this cache does
    not model; the engine then runs such a model one sequence at a time with its own cache class.
    """
    layers = DynamicCache(config=config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class BatchCache:
    """The KV cache, padding mask and lengths of the rows decoding together."""

    def __init__(self, num_layers: int, device: torch.device, batched: bool = True, config: Any = None,
                 round_keys: int = 1) -> None:
        self.batched = batched
        self.device = device
        self._num_layers, self._config, self._round_keys = num_layers, config, round_keys
        self.cache: Cache = self._fresh_cache()
        self.lengths: list[int] = []  # per row: tokens in the cache = the position id of its next token
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=device)

    def _fresh_cache(self) -> Cache:
        if self.batched:
            return Cache(layers=[GrowingLayer(self._round_keys) for _ in range(self._num_layers)])
        return DynamicCache(config=self._config)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """Columns in use: the longest row."""
        return max(self.lengths, default=0)

    @property
    def layers(self) -> Sequence[GrowingLayer]:
        return self.cache.layers  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        if not self.batched:
            held = (getattr(cached, "keys", None) for cached in self.cache.layers)
            return sum(2 * keys.numel() * keys.element_size() for keys in held if keys is not None and keys.numel())
        return sum(layer.nbytes for layer in self.layers) + self.mask.numel()

    # -- one sequence, prefilled on its own -----------------------------------------------------
    def start(self, prompt: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One fresh row for ``prompt``: its ids and position ids, to prefill (in chunks if long)."""
        self.lengths = [0]
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        return ids, torch.arange(len(prompt), device=self.device).unsqueeze(0)

    def prefilled(self, columns: int) -> None:
        """A prefill forward appended ``columns`` tokens to the one row."""
        self.lengths[0] += columns

    # -- the decode batch -----------------------------------------------------------------------
    def add(self, single: "BatchCache") -> None:
        """Take ``single``'s one prefilled row into the next free slot."""
        if not self.batched or not self.rows:
            if self.rows:
                raise RuntimeError("this model's cache holds one sequence; rows cannot be added")
            self.cache, self.lengths = single.cache, list(single.lengths)
            if self.batched:
                self._reserve_mask(1, self.length + 1)
                self.mask[0, : self.length] = True
            single.cache, single.lengths = single._fresh_cache(), []
            return
        length = single.lengths[0]
        self._add_row([(keys[0, :, :length], values[0, :, :length])
                       for keys, values in (layer.buffers() for layer in single.layers)])
        single.clear()

    def add_packed(self, packed: Cache, start: int, length: int) -> None:
        """Take one prompt of a packed prefill (tokens ``start`` to ``start + length``) as a new row."""
        self._add_row([(keys[0, :, start : start + length], values[0, :, start : start + length])
                       for keys, values in (_held(layer) for layer in packed.layers)])

    def _add_row(self, per_layer: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A new row holding these keys and values (``[heads, tokens, head_dim]`` per layer)."""
        if not self.batched:
            raise RuntimeError("this model's cache holds one sequence; rows cannot be added")
        row, length = self.rows, per_layer[0][0].shape[1]
        columns = max(self.length, length) + 1
        for mine, (keys, values) in zip(self.layers, per_layer):
            if not mine.is_initialized:
                mine.lazy_initialization(keys, values)
            mine.reserve(row + 1, columns, keys.unsqueeze(0) if mine.key_buffer is None else mine.key_buffer)
            key_buffer, value_buffer = mine.buffers()
            key_buffer[row, :, :length] = keys
            value_buffer[row, :, :length] = values
            key_buffer[row, :, length:] = 0  # a former row's keys: masked, but keep them finite and zero
            value_buffer[row, :, length:] = 0
            mine.rows, mine.length = row + 1, max(mine.length, length)
        self._reserve_mask(row + 1, columns)
        self.mask[row] = False
        self.mask[row, :length] = True
        self.lengths.append(length)

    def _reserve_mask(self, rows: int, columns: int) -> None:
        if rows <= self.mask.shape[0] and columns <= self.mask.shape[1]:
            return
        grown = torch.zeros((max(rows, 2 * self.mask.shape[0]), max(_capacity(columns), self.mask.shape[1])),
                            dtype=torch.bool, device=self.device)
        grown[: self.mask.shape[0], : self.mask.shape[1]] = self.mask
        self.mask = grown

    def begin_step(self) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Attention mask and position ids for one decode step; tells each layer where to write."""
        positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device).unsqueeze(1)
        if not self.batched:
            return None, positions
        end = self.length + 1
        rows: Optional[torch.Tensor]
        columns: Any
        write_at: tuple[Optional[torch.Tensor], Any]
        if self.rows == 1:
            rows, columns, write_at = None, self.lengths[0], (None, self.lengths[0])
        else:
            rows, columns = torch.arange(self.rows, device=self.device), positions[:, 0]
            write_at = (rows, columns)
        grow = end > self.layers[0].buffers()[0].shape[2]  # every layer has the same shape
        for layer in self.layers:
            if grow:
                layer.reserve(self.rows, end, layer.buffers()[0])
            layer.write_at = write_at
        self._reserve_mask(self.rows, end)
        if rows is None:
            self.mask[0, columns] = True
        else:
            self.mask[rows, columns] = True
        return self.mask[: self.rows, :end], positions

    def end_step(self) -> None:
        """Every row got one more token."""
        self.lengths = [n + 1 for n in self.lengths]
        if self.batched:
            for layer in self.layers:
                layer.write_at = None
                layer.length = self.length

    def abort_step(self) -> None:
        for layer in self.cache.layers:
            if isinstance(layer, GrowingLayer):
                layer.write_at = None

    def remove(self, rows: Sequence[int], items: list[Any]) -> None:
        """Drop ``rows``; the last row moves into each hole, and ``items`` (one per row) moves alike."""
        for row in sorted(set(rows), reverse=True):
            last = self.rows - 1
            if row != last and self.batched:
                for layer in self.layers:
                    key_buffer, value_buffer = layer.buffers()
                    key_buffer[row, :, : self.lengths[last]] = key_buffer[last, :, : self.lengths[last]]
                    value_buffer[row, :, : self.lengths[last]] = value_buffer[last, :, : self.lengths[last]]
                self.mask[row] = self.mask[last]
            self.lengths[row] = self.lengths[last]
            items[row] = items[last]
            self.lengths.pop()
            items.pop()
            for cached in self.cache.layers:
                if isinstance(cached, GrowingLayer):
                    cached.rows = self.rows
        if not self.rows:
            self.clear()
            return
        if self.batched:
            self._shrink()

    def _shrink(self) -> None:
        """Give memory back when far fewer rows or columns are in use than allocated."""
        length, rows = self.length, self.rows
        for layer in self.layers:
            layer.length = length
            buffer = layer.buffers()[0]
            if buffer.shape[0] > 2 * rows or buffer.shape[2] > 2 * _capacity(length + 1):
                layer.resize(rows, _capacity(length + 1), buffer)
        if self.mask.shape[0] > 2 * rows or self.mask.shape[1] > 2 * _capacity(length + 1):
            mask = torch.zeros((rows, _capacity(length + 1)), dtype=torch.bool, device=self.device)
            mask[:, :length] = self.mask[:rows, :length]
            self.mask = mask

    def clear(self) -> None:
        for layer in self.cache.layers:
            layer.reset()
        self.lengths = []
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
