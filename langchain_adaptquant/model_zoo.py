"""Random-weight models with the shapes of real checkpoints, built from a config and cached on disk.

Why: memory, sizing and quantization benchmarks need realistic *shapes* (a 150M Llama, Qwen2-0.5B with its
151k vocabulary, tied embeddings and q/k/v biases), and nothing may come from a hub. Weights are random but
seeded, so two builds with one seed are identical. Quality numbers need the trained reference model
(:func:`langchain_adaptquant.assets.reference_model_path`) instead.

Models go to ``<cache root>/models/<name>`` (``<name>-seed<k>`` for seeds other than 0). The cache root is
``cache_dir`` if given, else ``$ADAPTQUANT_CACHE_DIR``, else ``~/.cache/langchain_adaptquant`` (the same root
the loader uses). A folder is built once, atomically (temp folder + rename), and reused afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from langchain_adaptquant.assets import reference_model_path
from langchain_adaptquant.errors import InvalidValueError, choices

#: Written last into a built folder; its presence means the folder is complete.
MARKER_FILE = "model_zoo.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
# The reference model's tokenizer (used by llama-* and qwen2-tiny): vocab and ChatML token ids.
_REFERENCE_VOCAB = {"vocab_size": 8192, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}


def _reference_vocab() -> dict[str, Any]:
    """Vocab size and special ids of the shipped reference model, so its tokenizer fits our models."""
    config_file = reference_model_path() / "config.json"
    if not config_file.is_file():
        return dict(_REFERENCE_VOCAB)
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return {key: config.get(key, default) for key, default in _REFERENCE_VOCAB.items()}


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=64,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **_reference_vocab(),
    )


def _qwen2(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, **extra):
    from transformers import Qwen2Config

    vocab = extra or _reference_vocab()
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        **vocab,
    )


# Every Linear dimension below is a multiple of 64 (head dim 64), like the reference model.
_BUILDERS: dict[str, Callable[[], object]] = {
    # ~2.5M params: fast tests with the reference tokenizer.
    "llama-tiny": lambda: _llama(hidden=128, intermediate=384, layers=2, heads=2, kv_heads=1),
    # ~152M params: Llama-3-like GQA (16 heads, 4 kv heads), the size the design notes measured.
    "llama-150m": lambda: _llama(hidden=1024, intermediate=2816, layers=12, heads=16, kv_heads=4),
    # ~3.3M params: Qwen2 layout (q/k/v biases, tied embeddings) with the reference tokenizer.
    "qwen2-tiny": lambda: _qwen2(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2),
    # Qwen2-0.5B's published shape (~494M params, 151936-token vocab); no tokenizer ships with it.
    "qwen2-0.5b": lambda: _qwen2(
        hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2,
        vocab_size=151936, bos_token_id=151643, eos_token_id=151643, pad_token_id=None,
    ),
}
#: Models whose vocabulary is the reference tokenizer's, so its files are copied next to the weights.
_WITH_REFERENCE_TOKENIZER = {"llama-tiny", "llama-150m", "qwen2-tiny"}


def model_names() -> tuple[str, ...]:
    """Names :func:`build_random_model` and :func:`model_config` accept."""
    return tuple(_BUILDERS)


def model_config(name: str):
    """The ``transformers.PretrainedConfig`` of a zoo model, without building any weights."""
    if name not in _BUILDERS:
        raise InvalidValueError("model name", name, choices(_BUILDERS))
    return _BUILDERS[name]()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where built models live: ``cache_dir``, else ``$ADAPTQUANT_CACHE_DIR``, else ``~/.cache/langchain_adaptquant``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ADAPTQUANT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "langchain_adaptquant"


def model_dir(name: str, cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """The folder :func:`build_random_model` writes (and reuses) for ``name`` and ``seed``."""
    model_config(name)  # validate the name before building a path from it
    folder = name if seed == 0 else f"{name}-seed{seed}"
    return cache_root(cache_dir) / "models" / folder


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file() and (folder / "config.json").is_file()


def _write_model(name: str, seed: int, folder: Path) -> None:
    """Seeded random init in fp32 (the usual init distribution), saved as bf16 safetensors."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    del model
    if name in _WITH_REFERENCE_TOKENIZER:
        for file in _TOKENIZER_FILES:
            source = reference_model_path() / file
            if source.is_file():
                shutil.copy2(source, folder / file)
    marker = {"name": name, "seed": seed, "parameters": params, "weights": "random (seeded), not trained"}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def build_random_model(name: str, cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Folder of a random-weight zoo model, built on first use; ``from_pretrained`` loads it offline.

    Raises ``ValueError`` (:class:`~langchain_adaptquant.errors.InvalidValueError`) for unknown names.
    """
    target = model_dir(name, cache_dir, seed)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_model(name, seed, tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # left over from an interrupted copy by hand; ours are atomic
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # another process won the race only if its folder is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
