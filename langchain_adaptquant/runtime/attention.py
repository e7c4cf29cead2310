"""Row-exact attention for batched decode steps.

A batched decode step over rows of different lengths normally attends over padded keys with a
mask. On CPU that is not bit-identical to attending over the row's own keys (measured with
torch 2.13's SDPA: a few padding lengths change the result in the last bit), so a sequence's
greedy answer could depend on who shares its batch. The engine therefore registers an attention
function with transformers' ``AttentionInterface`` that, when the step passes ``row_lengths``,
runs SDPA once per row on exactly that row's keys, the call a request alone would make; without
``row_lengths`` (prefill, any other caller of the model) it is plain SDPA. The projections, the
MLP and the output head, where the bytes and the time are, stay batched.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "adaptquant_rows"


def row_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Optional[torch.Tensor], row_lengths: Optional[Sequence[int]] = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA; with ``row_lengths`` (one query per row), SDPA per row over its first ``n`` keys."""
    if row_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[row : row + 1], key[row : row + 1, :, :n], value[row : row + 1, :, :n],
                               None, **kwargs)[0]
        for row, n in enumerate(row_lengths)
    ]
    return torch.cat(outputs, dim=0), None


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
