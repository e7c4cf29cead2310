"""The embedded reference model: loads offline, is as good as its model card says, speaks our chat format."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from langchain_adaptquant.assets import reference_model_path  # noqa: E402

PATH = reference_model_path()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}


@pytest.fixture(scope="module")
def model():
    # fp32 compute on the bf16 weights: the way eval.json was computed (see its "method").
    return AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(PATH)


@pytest.fixture(scope="module")
def card_eval() -> dict:
    return json.loads((PATH / "eval.json").read_text(encoding="utf-8"))


@torch.no_grad()
def sample_perplexity(model, tokenizer, text: str, window: int) -> float:
    """Same recipe as scripts/train_reference_model.py: leading <|endoftext|>, windows of ``window`` tokens."""
    ids = [tokenizer.pad_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]])
        logits = model(input_ids=chunk).logits[0, :-1].float()
        total += F.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(total / count)


def test_heldout_perplexity_matches_model_card_and_beats_unigram(model, tokenizer, card_eval) -> None:
    text = (PATH / "heldout_sample.txt").read_text(encoding="utf-8")
    assert len(text) > 1000
    ppl = sample_perplexity(model, tokenizer, text, card_eval["window"])
    expected = card_eval["heldout_sample_perplexity"]
    assert abs(ppl - expected) / expected < 0.05, (ppl, expected)
    assert ppl * 3 < card_eval["unigram_perplexity"], (ppl, card_eval["unigram_perplexity"])


def test_shape_size_and_storage(model) -> None:
    dims = {d for m in model.modules() if isinstance(m, torch.nn.Linear) for d in (m.in_features, m.out_features)}
    assert dims and all(d % 64 == 0 for d in dims), sorted(dims)
    assert 5_000_000 <= sum(p.numel() for p in model.parameters()) <= 20_000_000
    assert not model.config.tie_word_embeddings
    assert sum(f.stat().st_size for f in PATH.rglob("*") if f.is_file()) <= 25 * 1024 * 1024
    with safe_open(str(PATH / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_split_is_recorded() -> None:
    split = json.loads((PATH / "split.json").read_text(encoding="utf-8"))
    assert len(split["heldout_ids"]) >= 0.05 * split["n_documents"]
    assert len(split["corpus_sha256"]) == 64


def test_special_tokens(tokenizer, model) -> None:
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == model.config.vocab_size
    for token in ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        assert tokenizer.tokenize(token) == [token]  # one token each, easy to emit
    assert tokenizer.decode(tokenizer.encode("<tool_call>{}</tool_call>"), skip_special_tokens=True) == (
        "<tool_call>{}</tool_call>"
    )


def test_chat_template_renders_tools_calls_results_and_generation_prompt(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[WEATHER_TOOL], add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in text
    assert "<|im_start|>user\nWeather in Paris?<|im_end|>\n" in text
    assert '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}' \
           "</tool_call><|im_end|>\n" in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")

    plain = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert plain == "<|im_start|>user\nhi<|im_end|>\n"


def test_generates_text(model, tokenizer) -> None:
    ids = tokenizer("The json module", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    new = out[0, ids.shape[1]:]
    assert len(new) > 0
    assert tokenizer.decode(new).strip()


def test_model_card_has_quantization_table() -> None:
    card = (PATH / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "| level | backend | stored MB | held-out perplexity | top-1 agreement with 16-bit |" in card
