"""benchmarks/llamacpp_compare.py runs end to end (``--quick``): ours always, llama.cpp when it is installed.

Only shapes and exactness are checked (every call decoded exactly N tokens, the same prompt tokens
everywhere, each engine in its own process); timings on a shared machine mean nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def _compare_module():
    return importlib.import_module("benchmarks.llamacpp_compare")  # the repository root is on pytest's pythonpath


def _check_our_row(row: dict, level: str, new_tokens: int) -> None:
    assert row["status"] == "ok", row["status"]
    assert row["level"] == level
    for path in ("public", "loop"):
        summary = row[path]
        assert summary["tokens_exact"], (level, path)  # min_new_tokens held every answer to N
        assert summary["prompt_tok_s"] > 0 and summary["internal_prompt_tok_s"] > 0
        assert len(summary["per_prompt"]) == 1 and f"t{new_tokens}_s" in summary["per_prompt"][0]
    assert row["model_mb"] > 0
    assert row["rss_mb"] >= row["anon_mb"] > 0 and row["library_mb"] > 0  # its own process, torch included


@pytest.mark.slow
def test_quick_run_measures_our_levels_and_says_why_llama_cpp_is_absent(tiny_chat_dir, tmp_path):
    bench = _compare_module()
    args = ["--quick", "--model", str(tiny_chat_dir), "--gguf", str(tmp_path / "absent.gguf"),
            "--levels", "fp16,int4", "--out-dir", str(tmp_path)]
    bench.main(args)

    saved = json.loads((tmp_path / "llamacpp_compare.json").read_text())
    rows = {row["engine"]: row for row in saved["rows"]}
    assert list(rows) == ["llama.cpp", "ours fp16", "ours int4"]
    reason = rows["llama.cpp"]["status"]
    assert reason.startswith("skipped: ") and ("not installed" in reason or "absent.gguf: no such file" in reason)
    assert any(note.startswith("llama.cpp: skipped") for note in saved["notes"])
    assert saved["ollama"]["measured"] is False and "Ollama" in saved["ollama"]["reason"]
    prompt_tokens = saved["prompts"][0]["tokens"]
    for level in ("fp16", "int4"):
        row = rows[f"ours {level}"]
        _check_our_row(row, level, new_tokens=4)
        assert row["prompt_ratio"] is None and row["decode_ratio"] is None  # nothing to divide by
        samples = saved["samples"][f"ours {level}"]
        assert sorted((s["path"], s["new_tokens"]) for s in samples) == [("loop", 1), ("loop", 4), ("public", 1),
                                                                        ("public", 4)]
        assert {s["prompt_tokens"] for s in samples} == {prompt_tokens}  # invoke rendered what the script rendered
        assert all(s["output_tokens"] == s["new_tokens"] for s in samples)
    engines = {engine["label"]: engine for engine in saved["engines"]}
    assert engines["ours int4"]["info"]["level"] == "int4" and engines["ours int4"]["info"]["torch_threads"] == 2
    assert rows["ours int4"]["model_mb"] < rows["ours fp16"]["model_mb"]
    assert {"cpu_model", "logical_cores", "torch"} <= set(saved["machine"])


def test_bad_arguments_are_named():
    bench = _compare_module()
    with pytest.raises(SystemExit, match="int3"):
        bench.parse_levels("fp16,int3")
    with pytest.raises(SystemExit, match="no config.json"):
        bench.main(["--model", str(BENCHMARKS), "--quick"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (bench extra: "
                                               "pip install -e '.[bench]', compiles llama.cpp)")
def test_quick_run_against_llama_cpp_on_the_real_model(tmp_path):
    bench = _compare_module()
    if bench.default_model() is None or bench.default_gguf() is None:
        pytest.skip("the real model is not pulled (adaptquant models pull smollm2-135m)")
    bench.main(["--quick", "--levels", "fp16", "--out-dir", str(tmp_path)])

    saved = json.loads((tmp_path / "llamacpp_compare.json").read_text())
    rows = {row["engine"]: row for row in saved["rows"]}
    llama = rows["llama.cpp"]
    assert llama["status"] == "ok"
    engine = next(e for e in saved["engines"] if e["label"] == "llama.cpp")
    assert engine["info"]["tokenizer_matches_ours"]  # the GGUF and our copy tokenize the prompts alike
    for path in ("public", "loop"):
        assert llama[path]["tokens_exact"], path  # the -inf end-of-generation bias held llama.cpp to N too
    prompt_tokens = {s["prompt_tokens"] for samples in saved["samples"].values() for s in samples}
    assert prompt_tokens == {saved["prompts"][0]["tokens"]}  # both chat templates gave the same prompt
    ours = rows["ours fp16"]
    _check_our_row(ours, "fp16", new_tokens=4)
    assert ours["prompt_ratio"] > 0 and ours["rss_ratio"] > 0
    same, total = map(int, ours["tokens_same_as_llamacpp"].split("/"))
    assert total == 4 and 0 <= same <= 4
