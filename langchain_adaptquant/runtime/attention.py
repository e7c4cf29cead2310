"""Batch-invariant attention for batched decode steps.

A batched decode step over rows of different lengths normally attends over keys padded to the
longest row, with a mask. On CPU that is not bit-identical to attending over fewer keys (torch
2.13's SDPA: the kernel blocks the key axis by the call's length, so padding changes the
summation order), and a sequence's greedy answer could then depend on who shares its batch.

The engine registers an attention function with transformers' ``AttentionInterface`` that, when
a decode step passes ``row_groups``, makes each row's computation depend on that row alone:

* ``"bucket"`` (default): each row attends over its keys padded to the next multiple of
  ``BUCKET`` tokens, masked. Rows in the same bucket share one SDPA call, so a step makes one call
  per distinct bucket (usually one to three), not one per row. A request alone is padded the same
  way, so its answer is the same alone and in any batch.
* ``"row"``: one SDPA call per row over exactly its keys, the call ``model.generate`` makes: the
  answers equal ``generate``'s too, at the price of one call per row per layer.

Prompts are prefilled packed: several fresh prompts side by side in one row, so projections and
MLP run over all their tokens at once, while ``prompts`` makes attention causal per prompt over
exactly its own tokens (one call each), as if it were alone. Without ``row_groups`` or
``prompts`` (any other caller of the model) it is plain SDPA. Projections, MLP and the output
head, where the bytes and the time are, stay batched either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "adaptquant_rows"
#: Key-length granularity of the "bucket" mode (the cache allocates columns in the same blocks).
BUCKET = 64
MODES = ("bucket", "row", "padded")


@dataclass(frozen=True)
class RowGroup:
    """Rows that attend over the same number of key columns in one call."""

    columns: int
    rows: Optional[torch.Tensor]  # None: every row of the step
    mask: Optional[torch.Tensor]  # [rows of the step, 1, 1, columns] bool, None: no padding (row mode)


def row_groups(lengths: Sequence[int], mode: str, device: torch.device) -> list[RowGroup]:
    """How one decode step's attention is split; ``lengths`` are the rows' key counts (new token included)."""
    if mode == "row":
        return [RowGroup(n, torch.tensor([row], device=device), None) for row, n in enumerate(lengths)]
    buckets = [-(-n // BUCKET) * BUCKET for n in lengths]
    wanted = torch.tensor(lengths, device=device)
    groups = []
    for columns in sorted(set(buckets)):
        mask = (torch.arange(columns, device=device)[None, :] < wanted[:, None])[:, None, None, :]
        members = [row for row, bucket in enumerate(buckets) if bucket == columns]
        rows = None if len(members) == len(lengths) else torch.tensor(members, device=device)
        groups.append(RowGroup(columns, rows, mask))
    return groups


def row_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], row_groups: Optional[Sequence[RowGroup]] = None,
                  prompts: Optional[Sequence[tuple[int, int]]] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA. With ``row_groups`` (a decode step, one query per row): per group, each row over its own
    columns. With ``prompts`` (a packed prefill, fresh prompts side by side in one row, as
    ``(start, length)``): causal SDPA per prompt over exactly its tokens, the call a prompt alone gets."""
    if prompts is not None:
        parts = [sdpa_attention_forward(module, query[:, :, start : start + n], key[:, :, start : start + n],
                                        value[:, :, start : start + n], None, **kwargs)[0]
                 for start, n in prompts]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None
    if row_groups is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out: Optional[torch.Tensor] = None
    for group in row_groups:
        if group.mask is None:  # one row, exactly its keys
            rows = group.rows
            part = sdpa_attention_forward(module, query[rows], key[rows, :, : group.columns],
                                          value[rows, :, : group.columns], None, **kwargs)[0]
        else:  # every row over the group's columns (rows outside the group are computed and dropped)
            part = sdpa_attention_forward(module, query, key[:, :, : group.columns], value[:, :, : group.columns],
                                          group.mask, **kwargs)[0]
            if group.rows is None:
                return part, None
            part = part[group.rows]
        if out is None:
            out = part.new_empty((query.shape[0],) + tuple(part.shape[1:]))
        out[group.rows] = part
    if out is None:
        raise ValueError("row_attention got an empty row_groups: a decode step has at least one row")
    return out, None


AttentionInterface.register(NAME, row_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_row_attention(model: Any) -> bool:
    """Switch an SDPA model to :func:`row_attention` (same results for every other caller). False if not SDPA."""
    config = model.config
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
