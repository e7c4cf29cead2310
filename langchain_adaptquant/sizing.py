"""How many bytes a model needs at each level, known before a single weight is loaded.

The policy must compare levels before switching, so sizes come from the architecture alone: either a
transformers config (exact parameter split) or a parameter count in billions (the seed's
``model_size_params``, with an assumed share of unquantized parameters).

Estimated bytes at a level::

    bytes(level) = Q * bits / 8                  quantized Linear weights
                 + rows * row_bytes              per-output-channel scales (INT8)
                 + ceil(Q / group) * group_bytes per-group scales and zeros (INT4, INT2)
                 + U * 2                         everything left in 16-bit: embeddings, lm_head,
                                                 norms, biases (bf16 on CPU, fp16 elsewhere)

where ``Q`` is the number of weights in quantizable Linear layers (every Linear except the output
head), ``rows`` their summed ``out_features`` and ``U`` all other parameters, each counted once
(tied embeddings are one tensor). The per-level layout constants below are the defaults of the
backends we prefer on CPU and CUDA; a backend can pass its own :class:`LevelLayout`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.levels import QuantizationLevel

GIB = 1024**3

#: Share of parameters that stay 16-bit when only a parameter count is known. A Llama-2-7B has
#: 2 x 32000 x 4096 embedding/head weights of 6.74B (3.9%); smaller models have a larger share.
DEFAULT_UNQUANTIZED_FRACTION = 0.04

#: Largest parameter count accepted, in billions (a sanity bound, not a capability claim).
MAX_PARAMS_BILLIONS = 10_000.0


@dataclass(frozen=True)
class LevelLayout:
    """Storage layout of a quantized Linear: bits per weight plus its metadata."""

    bits: int
    group_size: Optional[int] = None  # weights sharing one scale (and zero); None = no groups
    group_bytes: float = 0.0  # bytes of metadata per group
    row_bytes: float = 0.0  # bytes of metadata per output channel


DEFAULT_LAYOUTS: dict[QuantizationLevel, LevelLayout] = {
    QuantizationLevel.FP16: LevelLayout(bits=16),
    # LLM.int8 / int8 weight-only: one fp32 scale per output row.
    QuantizationLevel.INT8: LevelLayout(bits=8, row_bytes=4.0),
    # nf4 with block 64 and an fp32 absmax per block; quanto int4 uses group 128 with bf16 scale+shift (same 4 B).
    QuantizationLevel.INT4: LevelLayout(bits=4, group_size=64, group_bytes=4.0),
    # quanto int2: group 64 with a bf16 scale and a bf16 shift.
    QuantizationLevel.INT2: LevelLayout(bits=2, group_size=64, group_bytes=4.0),
}


@dataclass(frozen=True)
class ModelSize:
    """Parameter split of a model: what a backend quantizes and what stays 16-bit."""

    quantizable_params: int
    quantizable_rows: int
    unquantized_params: int
    source: str

    @property
    def total_params(self) -> int:
        return self.quantizable_params + self.unquantized_params

    @property
    def params_billions(self) -> float:
        return self.total_params / 1e9

    def estimated_bytes(self, level: QuantizationLevel | str, layout: Optional[LevelLayout] = None) -> int:
        """Bytes the model occupies at ``level``; see the module docstring for the formula."""
        level = QuantizationLevel.parse(level)
        layout = layout or DEFAULT_LAYOUTS[level]
        q = self.quantizable_params
        total = q * layout.bits / 8
        total += self.quantizable_rows * layout.row_bytes
        if layout.group_size:
            total += math.ceil(q / layout.group_size) * layout.group_bytes
        total += self.unquantized_params * 2
        return int(math.ceil(total))

    def estimated_gb(self, level: QuantizationLevel | str, layout: Optional[LevelLayout] = None) -> float:
        """Estimated size in GiB (2**30 bytes), the unit every memory figure of this package uses."""
        return self.estimated_bytes(level, layout) / GIB

    def bytes_per_level(self) -> dict[QuantizationLevel, int]:
        return {level: self.estimated_bytes(level) for level in QuantizationLevel}


def validate_params_billions(value: Any) -> float:
    """A parameter count in billions must be a finite number in (0, MAX_PARAMS_BILLIONS]."""
    allowed = f"a finite number of billions of parameters in (0, {MAX_PARAMS_BILLIONS:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValueError("model_size_params", value, allowed)
    number = float(value)
    if not math.isfinite(number) or number <= 0 or number > MAX_PARAMS_BILLIONS:
        raise InvalidValueError("model_size_params", value, allowed)
    return number


def size_from_params(
    params_billions: float, unquantized_fraction: float = DEFAULT_UNQUANTIZED_FRACTION
) -> ModelSize:
    """Size from a bare parameter count. ``rows`` assumes Linear layers about 4096 wide (7B-class)."""
    billions = validate_params_billions(params_billions)
    if not 0.0 <= unquantized_fraction < 1.0:
        raise InvalidValueError("unquantized_fraction", unquantized_fraction, "a fraction in [0, 1)")
    total = int(round(billions * 1e9))
    unquantized = int(round(total * unquantized_fraction))
    quantizable = total - unquantized
    return ModelSize(
        quantizable_params=quantizable,
        quantizable_rows=max(1, quantizable // 4096),
        unquantized_params=unquantized,
        source=f"{billions:g}B parameters, {unquantized_fraction:.0%} assumed unquantized",
    )


def size_from_model(model: Any, source: str = "model") -> ModelSize:
    """Exact split of an instantiated (or meta-device) ``nn.Module``.

    Every ``nn.Linear`` except the output embeddings is quantizable; shared tensors count once.
    """
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantizable_ids: set[int] = set()
    quantizable = rows = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            weight = module.weight
            if id(weight) in quantizable_ids:
                continue
            quantizable_ids.add(id(weight))
            quantizable += weight.numel()
            rows += module.out_features
    # parameters() yields a tied tensor once; buffers (rotary tables) are recomputed, not stored weights
    total = sum(parameter.numel() for parameter in model.parameters())
    return ModelSize(
        quantizable_params=quantizable,
        quantizable_rows=rows,
        unquantized_params=total - quantizable,
        source=source,
    )


def size_from_config(config: Any) -> ModelSize:
    """Exact split from a transformers config, instantiating the model on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    name = getattr(config, "model_type", type(config).__name__)
    return size_from_model(model, source=f"{name} config")


def size_of(model_or_config_or_params: Any) -> ModelSize:
    """Dispatch: a ModelSize, a number of billions, a transformers config, a mapping or an nn.Module."""
    value = model_or_config_or_params
    if isinstance(value, ModelSize):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return size_from_params(value)
    if isinstance(value, Mapping):
        from transformers import AutoConfig

        config_dict = dict(value)
        model_type = config_dict.pop("model_type", None)
        if model_type is None:
            raise InvalidValueError("config", value, "a config mapping with a 'model_type' key")
        return size_from_config(AutoConfig.for_model(model_type, **config_dict))
    if hasattr(value, "to_dict") and hasattr(value, "model_type"):
        return size_from_config(value)
    if hasattr(value, "parameters"):
        return size_from_model(value)
    raise InvalidValueError(
        "model size", value, "billions of parameters, a transformers config or an nn.Module"
    )
