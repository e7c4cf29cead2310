"""How many bytes a model needs at each level, known before a single weight is loaded.

The policy must compare levels before switching, so sizes come from the architecture alone: either a
transformers config (exact parameter split) or a parameter count in billions (the documented
``model_size_params`` of ``/calculate``, with an assumed share of unquantized parameters).

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

With mixed precision (:mod:`langchain_adaptquant.control.layer_plan`) some layers are stored one level up;
a size that knows its Linear shapes (from a model or config) sums them layer by layer at their
planned levels. A bare parameter count has no layer names, so there the rule's share of weights
is taken from Llama-2-7B's layout (32 blocks of 4096x4096 attention and 4096x11008 MLP).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from langchain_adaptquant.control.layer_plan import UNIFORM, MixedPrecision, count_blocks, one_level_up
from langchain_adaptquant.control.levels import QuantizationLevel
from langchain_adaptquant.errors import InvalidValueError
from langchain_adaptquant.units import GIB

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
    # torchao int4 (CPU tinygemm) with group 32 and a bf16 scale + zero per group; bitsandbytes
    # nf4 (CUDA) uses block 64 with an fp32 absmax (4 B per 64): a few % smaller.
    QuantizationLevel.INT4: LevelLayout(bits=4, group_size=32, group_bytes=4.0),
    # int2pack (CPU): group 32 with a bf16 scale + zero; quanto int2 (fallback, CUDA/MPS): group 64, same 4 B.
    QuantizationLevel.INT2: LevelLayout(bits=2, group_size=32, group_bytes=4.0),
}


def _linear_bytes(params: int, rows: int, layout: LevelLayout) -> float:
    total = params * layout.bits / 8 + rows * layout.row_bytes
    if layout.group_size:
        total += math.ceil(params / layout.group_size) * layout.group_bytes
    return total


def _llama_7b_linears() -> tuple[tuple[str, int, int], ...]:
    """(name, in, out) of Llama-2-7B's quantizable Linears: the layout bare parameter counts assume."""
    hidden, mlp = 4096, 11008
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (hidden, mlp), "mlp.up_proj": (hidden, mlp), "mlp.down_proj": (mlp, hidden)}
    return tuple((f"model.layers.{b}.{k}", i, o) for b in range(32) for k, (i, o) in shapes.items())


@dataclass(frozen=True)
class ModelSize:
    """Parameter split of a model: what a backend quantizes and what stays 16-bit."""

    quantizable_params: int
    quantizable_rows: int
    unquantized_params: int
    source: str
    #: (name, in_features, out_features) of every quantizable Linear, when known.
    linears: tuple[tuple[str, int, int], ...] = ()
    #: Which layers are stored one level up (see layer_plan); uniform by default.
    mixed: MixedPrecision = UNIFORM
    #: Bytes per level a runtime read off its files (llama.cpp: each level's GGUF tensor table, or the
    #: source's table with the quantizer's rules); they replace the formula for those levels.
    known_bytes: tuple[tuple[QuantizationLevel, int], ...] = ()

    @property
    def total_params(self) -> int:
        return self.quantizable_params + self.unquantized_params

    @property
    def params_billions(self) -> float:
        return self.total_params / 1e9

    def estimated_bytes(self, level: QuantizationLevel | str, layout: Optional[LevelLayout] = None) -> int:
        """Bytes the model occupies at ``level``; see the module docstring for the formula."""
        level = QuantizationLevel.parse(level)
        if layout is None:
            for known, nbytes in self.known_bytes:
                if known is level:
                    return nbytes
        total: float = self.unquantized_params * 2
        if layout is not None or not self.mixed.active or level not in self.mixed.at_levels:
            layout = layout or DEFAULT_LAYOUTS[level]
            return int(math.ceil(total + _linear_bytes(self.quantizable_params, self.quantizable_rows, layout)))
        if self.linears:
            blocks = count_blocks(name for name, _, _ in self.linears)
            for name, in_features, out_features in self.linears:
                at = DEFAULT_LAYOUTS[self.mixed.level_for(name, level, blocks)]
                total += _linear_bytes(in_features * out_features, out_features, at)
            return int(math.ceil(total))
        share = _kept_share(self.mixed)
        q, rows = self.quantizable_params, self.quantizable_rows
        up = DEFAULT_LAYOUTS[one_level_up(level)]
        total += _linear_bytes(int(q * share), int(rows * share), up)
        total += _linear_bytes(q - int(q * share), rows - int(rows * share), DEFAULT_LAYOUTS[level])
        return int(math.ceil(total))

    def with_mixed(self, mixed: MixedPrecision) -> "ModelSize":
        """The same model under another mixed-precision rule."""
        from dataclasses import replace

        return replace(self, mixed=mixed)

    def estimated_gb(self, level: QuantizationLevel | str, layout: Optional[LevelLayout] = None) -> float:
        """Estimated size in GiB (2**30 bytes), the unit every memory figure of this package uses."""
        return self.estimated_bytes(level, layout) / GIB

    def bytes_per_level(self) -> dict[QuantizationLevel, int]:
        return {level: self.estimated_bytes(level) for level in QuantizationLevel}


def _kept_share(mixed: MixedPrecision) -> float:
    """Share of quantizable weights ``mixed`` keeps one level up, on Llama-2-7B's layout."""
    linears = _llama_7b_linears()
    blocks = count_blocks(name for name, _, _ in linears)
    kept = sum(i * o for name, i, o in linears if mixed.keeps(name, blocks))
    return kept / sum(i * o for _, i, o in linears)


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
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            weight = module.weight
            if id(weight) in quantizable_ids:
                continue
            quantizable_ids.add(id(weight))
            quantizable += weight.numel()
            rows += module.out_features
            linears.append((name, module.in_features, module.out_features))
    # parameters() yields a tied tensor once; buffers (rotary tables) are recomputed, not stored weights
    total = sum(parameter.numel() for parameter in model.parameters())
    return ModelSize(
        quantizable_params=quantizable,
        quantizable_rows=rows,
        unquantized_params=total - quantizable,
        source=source,
        linears=tuple(linears),
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
