"""The random-weight model zoo: shapes, caching, reuse and clear errors (tiny models only, fast)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from langchain_adaptquant import model_zoo  # noqa: E402
from langchain_adaptquant.assets import reference_model_path  # noqa: E402

HAS_REFERENCE_TOKENIZER = (reference_model_path() / "tokenizer.json").is_file()


def _linear_dims(model: torch.nn.Module) -> set[int]:
    return {d for m in model.modules() if isinstance(m, torch.nn.Linear) for d in (m.in_features, m.out_features)}


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_tiny_models_build_and_load(name: str, tmp_path) -> None:
    folder = model_zoo.build_random_model(name, cache_dir=tmp_path)
    assert folder == tmp_path / "models" / name
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < params < 10_000_000
    assert all(d % 64 == 0 for d in _linear_dims(model))
    assert model.config.vocab_size == model_zoo.model_config(name).vocab_size
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, model.config.vocab_size) and torch.isfinite(out).all()

    if HAS_REFERENCE_TOKENIZER:  # the copied tokenizer fits the model's vocabulary
        tok = AutoTokenizer.from_pretrained(folder)
        assert len(tok) == model.config.vocab_size


def test_build_is_cached_and_seeded(tmp_path) -> None:
    first = model_zoo.build_random_model("llama-tiny", cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert model_zoo.build_random_model("llama-tiny", cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt

    other = model_zoo.build_random_model("llama-tiny", cache_dir=tmp_path, seed=1)
    assert other.name == "llama-tiny-seed1"
    with safe_open(str(first / "model.safetensors"), "pt") as a, safe_open(str(other / "model.safetensors"), "pt") as b:
        key = "model.layers.0.mlp.up_proj.weight"
        assert not torch.equal(a.get_tensor(key), b.get_tensor(key))
    assert not list(tmp_path.joinpath("models").glob(".*"))  # no temp folders left behind


def test_cache_dir_from_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADAPTQUANT_CACHE_DIR", str(tmp_path))
    assert model_zoo.model_dir("qwen2-tiny") == tmp_path / "models" / "qwen2-tiny"


def test_big_configs_have_the_advertised_shapes() -> None:
    qwen = model_zoo.model_config("qwen2-0.5b")
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.num_hidden_layers) == (896, 4864, 24)
    assert (qwen.num_attention_heads, qwen.num_key_value_heads, qwen.vocab_size) == (14, 2, 151936)
    assert qwen.tie_word_embeddings is True
    llama = model_zoo.model_config("llama-150m")
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(llama).parameters())
    assert 130e6 < params < 170e6


def test_unknown_name_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'gpt2'.*llama-tiny.*qwen2-0\.5b"):
        model_zoo.build_random_model("gpt2", cache_dir=tmp_path)
    assert not tmp_path.joinpath("models").exists()  # nothing half-applied
