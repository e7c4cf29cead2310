"""Tiny Llama and Qwen2 models from a config, random seeded weights, saved as bf16 safetensors."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

TINY_CONFIGS = {
    # every Linear dimension a multiple of 128 so every 4-bit group kernel applies
    "llama": LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256,
    ),
    # Qwen2: q/k/v biases and tied embeddings, the other common layout
    "qwen2": Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
    ),
}


def build_tiny(arch: str, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]).to(torch.bfloat16).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder




CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_chat(folder: Path, seed: int = 0) -> Path:
    """A random-weight Llama with a small byte-level BPE tokenizer and a ChatML template.

    Its answers are noise, but every mechanism of a chat model (template, stop strings, streaming,
    usage, cancellation, switches) runs for real and fast.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    corpus = ["The quick brown fox jumps over the lazy dog. Lists hold items; tuples are immutable."] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


@functools.lru_cache(maxsize=1)
def override_chat_folder() -> str:
    """One tiny chat model folder per test process, for the standard suites' ``model_override_value``:
    a different folder than the suite's model, so the override shows in ``model_name``."""
    return str(build_tiny_chat(Path(tempfile.mkdtemp(prefix="adaptquant-override-"))))
