"""GGUF file -> a bf16 safetensors folder our loader can memory-map and requantize layer by layer.

transformers reads GGUF itself (``from_pretrained(..., gguf_file=...)`` with the ``gguf`` package):
it maps the tensor names, undoes llama.cpp's rotary permutation and rebuilds the tokenizer and chat
template from the file's metadata. We ask it to dequantize every block to bf16, then save plainly.
The result is the GGUF's quantized weights made dense, not the upstream 16-bit checkpoint: our
"16-bit" level for such a model is, say, a Q4_1 file dequantized, and the lower levels are measured
against that copy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from langchain_adaptquant.errors import PullError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufSummary:
    """What a GGUF header says about the model inside."""

    architecture: str
    name: str
    tensor_count: int
    tensor_types: tuple[str, ...]  # distinct ggml types, e.g. ("F32", "Q4_1", "Q8_0")
    has_chat_template: bool


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_gguf` wrote."""

    folder: Path
    parameters: int
    architecture: str
    seconds: float


def read_gguf_summary(path: Path) -> GgufSummary:
    """Parse a GGUF's header and tensor table; a clear :class:`PullError` when it is not one, or truncated."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise PullError(f"cannot read GGUF file {str(path)!r}: {error}") from None
    if magic != GGUF_MAGIC:
        raise PullError(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PullError("reading GGUF files needs the 'gguf' package: pip install 'langchain-adaptquant[gguf]'") from None
    try:
        reader = GGUFReader(str(path))
        fields = reader.fields

        def text(key: str, default: str = "") -> str:
            field = fields.get(key)
            return str(field.contents()) if field is not None else default

        types = tuple(sorted({tensor.tensor_type.name for tensor in reader.tensors}))
        summary = GgufSummary(
            architecture=text("general.architecture", "?"),
            name=text("general.name", path.stem),
            tensor_count=len(reader.tensors),
            tensor_types=types,
            has_chat_template="tokenizer.chat_template" in fields,
        )
    except Exception as error:  # noqa: BLE001 - a truncated file fails in numpy's memmap or struct unpacking
        raise PullError(f"{str(path)!r} is not a readable GGUF file (truncated or corrupt?): "
                        f"{type(error).__name__}: {error}") from None
    if summary.tensor_count == 0:
        raise PullError(f"{str(path)!r} holds no tensors")
    return summary


def convert_gguf(gguf_path: Path, out_dir: Path, chat_template: Optional[str] = None,
                 stop_strings: Sequence[str] = ()) -> Conversion:
    """Write ``out_dir`` (config, bf16 model.safetensors, tokenizer) from the GGUF at ``gguf_path``.

    ``chat_template`` is used when the file carries none (base models); ``stop_strings`` go into the
    generation config, where :class:`~langchain_adaptquant.chat_model.ChatAdaptQuant` reads them.
    ``out_dir`` must be empty or absent; the caller makes the result visible atomically.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    summary = read_gguf_summary(gguf_path)
    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as error:  # noqa: BLE001 - unsupported architecture, unknown block type, bad metadata
        raise PullError(
            f"transformers could not read {name} ({summary.architecture}, tensor types {', '.join(summary.tensor_types)}): "
            f"{type(error).__name__}: {error}"
        ) from None
    # The model is now dense bf16; it only still *says* it is GGUF-quantized, which save_pretrained refuses.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = summary.name
    if chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    if stop_strings:
        model.generation_config.stop_strings = list(stop_strings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return Conversion(out_dir, parameters, summary.architecture, time.perf_counter() - started)
