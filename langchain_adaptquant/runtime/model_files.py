"""A model folder's parts besides the weights: the skeleton, tokenizer, generation settings, provenance.

Also where an in-memory model becomes a folder: the loader serves from memory-mapped safetensors
only, so a ``PreTrainedModel`` object is written once to the local cache and loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from langchain_adaptquant.backends.base import compute_dtype
from langchain_adaptquant.errors import UnsupportedArchitectureError

logger = logging.getLogger(__name__)


def build_skeleton(config: Any, device: str) -> nn.Module:
    """The model's modules on the meta device (no memory): the loader fills them tensor by tensor."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(device))
    except (ValueError, KeyError, ImportError) as error:
        raise UnsupportedArchitectureError(
            f"architecture {getattr(config, 'model_type', '?')!r} has no causal-LM class in transformers: {error}"
        ) from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # so sizing counts a tied head once, as it is stored
    return model.eval()


def read_generation_config(model: Any, folder: Path) -> None:
    """Use the folder's generation_config.json (end-of-turn ids, a base model's stop strings), as
    ``from_pretrained`` does; a skeleton built from the config alone only knows the config's eos id."""
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as error:
        logger.warning("ignoring %s/generation_config.json: %s", folder, error)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it ships none (a bare test model)."""
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def source_format(folder: Path) -> str:
    """"safetensors" for a plain folder; a pulled model's record says which GGUF it was converted from."""
    from langchain_adaptquant.pretrained.store import read_source

    source = read_source(folder)
    return source.format if source is not None else "safetensors"


def object_fingerprint(model: nn.Module) -> str:
    """A short digest of a model object's config and tensors' shapes and first values: its cache folder name."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string().encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().reshape(-1)[:64].float().cpu().numpy().tobytes()
        digest.update(flat)
    return digest.hexdigest()[:16]


def write_model_object(model: Any, tokenizer: Any, cache_dir: Path) -> Path:
    """Write an in-memory model once to ``cache_dir/objects``; later calls with the same model reuse it."""
    if not hasattr(model, "save_pretrained"):
        raise UnsupportedArchitectureError(
            f"model object of type {type(model).__name__} cannot be saved; pass a transformers PreTrainedModel"
        )
    folder = cache_dir / "objects" / object_fingerprint(model)
    marker = folder / ".complete"
    if not marker.exists():
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(folder), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder))
        marker.write_text(json.dumps({"written_at": time.time()}))
    return folder.resolve()
