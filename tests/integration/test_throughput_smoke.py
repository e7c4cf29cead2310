"""benchmarks/throughput.py runs end to end on a tiny model and writes what it promises (shapes, not speeds)."""

from __future__ import annotations

import importlib
import json

import pytest


def _throughput():
    return importlib.import_module("benchmarks.throughput")  # the repository root is on pytest's pythonpath


@pytest.mark.slow
def test_throughput_writes_both_paths_per_client_count(tiny_chat_dir, tmp_path):
    out = tmp_path / "throughput.json"
    _throughput().main(["--model", str(tiny_chat_dir), "--clients", "1,3", "--tokens", "4", "--min-requests", "3",
                        "--overhead-tokens", "2", "--overhead-runs", "1", "--also-padded", "--out", str(out)])
    saved = json.loads(out.read_text())
    points = {(p["path"], p["clients"]): p for p in saved["points"]}
    assert set(points) == {(path, n) for path in ("per-request", "engine", "engine, padded attention") for n in (1, 3)}
    for point in points.values():
        assert point["tokens"] == point["requests"] * 4  # exactly --tokens per answer on every path
        assert point["p50_s"] <= point["p99_s"]
    # on this model the engine's answers equal the answers alone (row-exact attention, row-invariant kernels)
    assert all(points[("engine", n)]["differ_from_alone"] == 0 for n in (1, 3))
    assert [row["clients"] for row in saved["table"]] == [1, 3]
    assert set(saved["decode_overhead"]["decode_tok_s"]) == {"model.generate", "engine (ChatAdaptQuant.invoke)",
                                                             "bare model.forward loop"}
    switch = saved["switch_under_batch"]
    assert switch["switched"] and switch["answers"] == 3 and switch["answers_mixed_levels"] == 3
    assert {"peak_rss_mb", "bound_mb", "kv_reserved_mb", "within_bound"} <= set(switch)
