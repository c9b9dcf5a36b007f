"""Thin pytest wrapper around the engine benchmark (deselected by default; run with ``pytest -m benchmark -s``)."""

from __future__ import annotations

import json

import pytest

from . import bench_engine


@pytest.mark.benchmark
def test_bench_engine_small(tmp_path):
    out = tmp_path / "bench"
    results = bench_engine.main(
        ["--size", "1024", "--big", "1000", "--big-runs", "e2e,ceiling", "--wait-idle", "5", "--out-dir", str(out)]
    )
    main, big = results["tables"]
    geodeep = ("geodeep",) if bench_engine.geodeep_available() else ()  # measured when installed, ONNX only
    assert [(r["run"], r["backend"]) for r in main["rows"]] == [
        (run, backend)
        for backend in ("onnx", "openvino", "openvino-fast", "torchscript", "torchscript-fast")
        for run in ("e2e", "ceiling", *(geodeep if backend == "onnx" else ()))
    ]
    assert main["tiles_match"] is True and big["tiles_match"] is True
    for table in (main, big):
        for r in table["rows"]:
            assert r["seconds"] > 0 and r["mp_per_s"] > 0
            assert 0 < r["peak_mib"] < 3 * 1024
            assert r["cpu_s"] > 0.1 * r["seconds"]  # the timed part's CPU seconds, the whole process tree
    assert [r["output_shape"] for r in main["rows"] if r["run"] == "e2e"] == [[1024, 1024]] * 5
    assert 15 < results["gflop_per_tile"] < 22
    saved = json.loads((out / "bench_results.json").read_text())
    assert len(saved["tables"]) == 2 and "GeoDeep" in saved["markdown"]


def test_ratios_pair_the_runs_of_one_round():
    # a machine 20 % slower in round 2: the per-round ratios are both 1.25, a ratio of medians would not be
    ceiling, e2e = [4.0, 4.8, 4.1], [5.0, 6.0, 5.125]
    assert bench_engine._paired(ceiling, e2e) == pytest.approx(0.8)
    assert bench_engine._paired([2.0, 3.0], [1.0, 1.0]) == pytest.approx(2.5)  # an even count: the middle two's mean
    with pytest.raises(ValueError):
        bench_engine._paired([1.0], [1.0, 2.0])  # rounds that do not pair up
