"""How many bytes a KV cache holds, from a model config alone (no model, no torch).

Every attention layer keeps a key and a value vector per KV head per token:
``layers x kv_heads x head_dim x 2 x dtype bytes`` per token. Layers with a sliding window stop
growing at the window. The engine's memory accounting and the policy's projected memory use these
numbers; :func:`kv_layout` reads them from configs that spell the fields differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from langchain_adaptquant.errors import InvalidValueError


@dataclass(frozen=True)
class KVLayout:
    """The shape of one sequence's KV cache, per token."""

    layers: int  # attention layers that keep a cache
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    sliding_layers: int = 0  # of ``layers``, those limited to ``sliding_window`` tokens
    sliding_window: Optional[int] = None

    @property
    def bytes_per_token_per_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes  # key and value

    @property
    def bytes_per_token(self) -> int:
        """Bytes one more token costs while the sequence is shorter than any sliding window."""
        return self.layers * self.bytes_per_token_per_layer

    def bytes_for(self, tokens: int) -> int:
        """Bytes the cache of one sequence of ``tokens`` tokens holds (sliding layers capped at the window)."""
        if tokens <= 0:
            return 0
        full = self.layers - self.sliding_layers
        capped = min(tokens, self.sliding_window) if self.sliding_window else tokens
        return (full * tokens + self.sliding_layers * capped) * self.bytes_per_token_per_layer


def _first(config: Any, *names: str) -> Optional[Any]:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def kv_layout(config: Any, dtype_bytes: int = 2) -> KVLayout:
    """KV layout of a transformers config (the text part of a multimodal one).

    ``head_dim`` falls back to ``hidden_size / num_attention_heads``, ``num_key_value_heads`` to
    the attention heads (multi-head attention), or 1 for multi-query configs; ``layer_types``
    entries ``"sliding_attention"`` count as sliding layers of ``sliding_window`` tokens.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    if not isinstance(layers, int) or not isinstance(heads, int) or layers < 1 or heads < 1:
        raise InvalidValueError(
            "model config", type(config).__name__,
            "a config with num_hidden_layers and num_attention_heads (positive integers) to size its KV cache",
        )
    kv_heads: Any = _first(config, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if getattr(config, "multi_query", False) else heads
    head_dim: Any = _first(config, "head_dim")
    if head_dim is None:
        hidden = _first(config, "hidden_size", "n_embd", "d_model")
        if not isinstance(hidden, int):
            raise InvalidValueError("model config", type(config).__name__, "a config with head_dim or hidden_size")
        head_dim = hidden // heads
    layer_types = getattr(config, "layer_types", None) or ()
    window: Any = _first(config, "sliding_window")
    sliding = sum(1 for kind in layer_types[:layers] if kind == "sliding_attention") if window else 0
    if window and not layer_types and getattr(config, "use_sliding_window", False):
        sliding = layers  # older configs: one window for every layer
    return KVLayout(
        layers=layers, kv_heads=int(kv_heads), head_dim=int(head_dim), dtype_bytes=dtype_bytes,
        sliding_layers=sliding, sliding_window=int(window) if sliding else None,
    )
