"""The level and adaptation benchmarks run end to end (``--quick``) on a tiny model and write what they promise.

Numbers are not checked, only shapes: timings on a shared CI machine mean nothing.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
from pathlib import Path

import pytest

from langchain_adaptquant.backends.registry import available_levels
from langchain_adaptquant.control.replay import EXAMPLE_TIMELINE

LEVELS = [level.value for level in available_levels("cpu")]
HELDOUT = (
    "Return a list of the words in the string, using sep as the delimiter string.\n\n"
    "The quick brown fox jumps over the lazy dog. Lists hold items; tuples are immutable.\n"
) * 4


def _benchmark(name: str):
    return importlib.import_module(f"benchmarks.{name}")  # the repository root is on pytest's pythonpath


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
    assert lengths == sorted([len(EXAMPLE_TIMELINE), 8])
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


def test_switch_benchmark_revisits_levels_from_the_layer_cache(tiny_chat_dir, tmp_path, capsys):
    out = tmp_path / "switch.json"
    _benchmark("switch").main(["--models", str(tiny_chat_dir), "--passes", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["switch"] for row in rows[:5]] == ["fp16 -> int8", "int8 -> int4", "int4 -> int2", "int2 -> int4",
                                                  "int4 -> fp16"]
    assert [row["pass"] for row in rows] == [1] * 5 + [2] * 5
    for row in rows:
        target = row["switch"].split(" -> ")[1]
        revisit = row["pass"] == 2 or row["switch"] == "int2 -> int4"
        expected = row["layers"] if revisit and target != "fp16" else 0
        assert row["layers_from_cache"] == expected, row
        for key in ("switch_s", "requantize_s", "cold_reload_s", "peak_rss_ratio", "reload_peak_rss_ratio"):
            assert row[key] > 0 and math.isfinite(row[key]), (key, row)
    assert rows[-1]["layer_cache"]["hits"] == rows[0]["layers"] * 5  # int2 -> int4, then four in pass 2
    assert "layers_from_cache" in capsys.readouterr().out


def test_cuda_check_dry_run_on_cpu_exercises_loader_and_requests_in_flight(tmp_path):
    """The device check's CPU dry run, so the script a GPU session runs has not rotted meanwhile."""
    from optimum.quanto.library.extensions import extension

    quanto_loader = extension.load
    out = tmp_path / "cuda_check.json"
    # --quanto-jit: a fresh machine may have to build quanto's CPU kernels for INT2, as serving would
    args = ["--device", "cpu", "--quick", "--parts", "b,d", "--quanto-jit", "--out", str(out)]
    assert _benchmark("cuda_check").main(args) == 0
    assert extension.load is quanto_loader  # the script's build guard is undone for the rest of the process
    checks = json.loads(out.read_text())["checks"]
    loader_rows = checks["b_loader"]["result"]["rows"]
    assert checks["b_loader"]["status"] == "ok" and all(row["ok"] and row["all_on_device"] for row in loader_rows)
    assert [row["step"] for row in loader_rows][1:] == ["fp16 -> int8", "int8 -> int4", "int4 -> int2", "int2 -> int4",
                                                       "int4 -> fp16"]
    assert all(abs(row["stored_vs_estimate_pct"]) <= 10 for row in loader_rows)
    inflight = checks["d_inflight"]["result"]
    assert inflight["exceptions"] == 0 and inflight["all_non_empty"] and all(s["ok"] for s in inflight["switches"])
