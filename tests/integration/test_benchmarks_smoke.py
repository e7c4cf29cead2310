"""The level and adaptation benchmarks run end to end (``--quick``) on a tiny model and write what they promise.

Numbers are not checked, only shapes: timings on a shared CI machine mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from langchain_adaptquant.backends.registry import available_levels
from langchain_adaptquant.replay import SEED_TIMELINE

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
LEVELS = [level.value for level in available_levels("cpu")]
HELDOUT = (
    "Return a list of the words in the string, using sep as the delimiter string.\n\n"
    "The quick brown fox jumps over the lazy dog. Lists hold items; tuples are immutable.\n"
) * 4


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"adaptquant_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_with_heldout(tiny_chat_dir, tmp_path_factory) -> Path:
    """The tiny chat model plus a held-out sample and eval.json, so the quality path runs too."""
    folder = tmp_path_factory.mktemp("bench") / "tiny-chat"
    shutil.copytree(tiny_chat_dir, folder)
    (folder / "heldout_sample.txt").write_text(HELDOUT, encoding="utf-8")
    (folder / "eval.json").write_text(json.dumps({"window": 32}), encoding="utf-8")
    return folder


@pytest.mark.slow
def test_levels_quick_writes_a_row_per_level(tiny_with_heldout, tmp_path):
    result = _benchmark("levels").main(["--quick", "--models", str(tiny_with_heldout), "--out-dir", str(tmp_path)])

    saved = json.loads((tmp_path / "levels.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert {"cpu_model", "logical_cores", "torch", "torch_threads"} <= set(saved["machine"])
    assert saved["bandwidth"]["best_gb_s"] > 0
    assert [row["level"] for row in saved["rows"]] == LEVELS
    for row in saved["rows"]:
        for key in ("stored_mb", "estimated_mb", "estimate_error_percent", "rss_mb", "anon_mb", "file_backed_mb",
                    "load_s", "prefill_tok_s", "decode_tok_s", "decode_limit_tok_s", "decode_fraction_of_limit",
                    "backends", "perplexity", "top1_agreement"):
            assert key in row, key
        assert row["stored_mb"] > 0 and row["backends"]
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert 0.0 <= row["top1_agreement"] <= 1.0
    by_level = {row["level"]: row for row in saved["rows"]}
    assert by_level["fp16"]["top1_agreement"] == 1.0
    assert by_level["fp16"]["stored_mb"] > by_level[LEVELS[-1]]["stored_mb"]
    assert (tmp_path / "levels.png").stat().st_size > 0


@pytest.mark.slow
def test_adaptation_quick_replays_both_traces(tiny_with_heldout, tmp_path):
    _benchmark("adaptation").main(["--quick", "--model", str(tiny_with_heldout), "--out-dir", str(tmp_path)])

    saved = json.loads((tmp_path / "adaptation.json").read_text())
    assert set(saved["levels"]) == set(LEVELS)
    assert saved["budget_mb"] > 0
    lengths = sorted(len(trace["steps"]) for trace in saved["traces"].values())
    assert lengths == sorted([len(SEED_TIMELINE), 8])
    for trace in saved["traces"].values():
        for step in trace["steps"]:
            for key in ("used_percent", "requests", "level", "action", "switch_s", "rss_mb"):
                assert key in step, key
            assert step["level"] in LEVELS
            if step["served_level"] is not None:  # the chat request was answered at the chosen level
                assert step["served_level"] == step["level"]
        assert trace["steps"][0]["action"] == "initial load"
        comparison = trace["comparison"]
        assert {"adaptive", "static_fp16", "static_int4"} <= set(comparison)
        assert comparison["static_int4"]["perplexity_int4"] > 1
    assert (tmp_path / "adaptation.png").stat().st_size > 0
