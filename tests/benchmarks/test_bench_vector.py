"""Thin pytest wrappers around the vectorisation benchmark (deselected by default).

Run with ``pytest -m benchmark -s tests/benchmarks/test_bench_vector.py`` (a 2048² mask, well
under a minute) or ``pytest -m big -s tests/benchmarks/test_bench_vector.py`` (20000², many
minutes and a few GiB of disk).
"""

from __future__ import annotations

import json

import pytest

from . import bench_vector


def _check(results: dict, out, size: int) -> None:
    rows = {r["run"]: r for r in results["rows"]}
    assert list(rows) == list(bench_vector.RUNS)
    assert not any(r.get("timed_out") for r in rows.values())
    mp = size * size / 1e6
    for r in rows.values():
        assert r["seconds"] > 0 and r["polygons"] > 0
        assert r["polygons_per_s"] == pytest.approx(r["polygons"] / r["seconds"])
        assert r["mp_per_s"] == pytest.approx(mp / r["seconds"])
        assert 0 < r["largest_process_mib"] <= r["peak_mib"]
    # correctness: every geoseg run finds exactly the whole-raster polygons, class by class
    assert results["counts_reference"] == "rasterio_whole"
    assert results["counts_match"] is True
    assert set(rows["rasterio_whole"]["counts"]) == {"1", "2"}  # buildings and water; background skipped
    for run in ("geoseg_1w", "geoseg_2w", "writers"):
        assert rows[run]["counts"] == rows["rasterio_whole"]["counts"]
        assert rows[run]["seam_objects"] < rows[run]["seam_pieces"]  # pieces were joined across seams
    assert rows["geoseg_1w"]["workers"] == 1 and rows["geoseg_2w"]["workers"] == 2
    writers = {w["format"]: w for w in results["writers"]}
    assert list(writers) == ["geojson", "gpkg", "fgb"]
    for w in writers.values():
        assert w["features"] == rows["rasterio_whole"]["polygons"]
        assert w["seconds"] > 0 and w["features_per_s"] > 0 and w["output_mib"] > 0
    text = results["markdown"]
    for run in bench_vector.MAIN_RUNS:
        assert f"| {run} |" in text
    assert "| geojson |" in text and "MATCH `rasterio_whole`" in text and "DO NOT MATCH" not in text
    saved = json.loads((out / "bench_vector.json").read_text())
    assert saved["counts_match"] is True and saved["size"] == size


@pytest.mark.benchmark
def test_bench_vector_small(tmp_path):
    out = tmp_path / "bench"
    results = bench_vector.main(
        ["--size", "2048", "--chunk", "512", "--wait-idle", "5", "--timeout", "600", "--out-dir", str(out)]
    )
    _check(results, out, 2048)
    rows = {r["run"]: r for r in results["rows"]}
    assert rows["geoseg_1w"]["chunks"] == 16  # 2048² in 512 px chunks
    assert rows["rasterio_whole"]["counts"]["1"] > 10_000  # about one building per 19x19 px cell
    for r in rows.values():
        assert r["peak_mib"] < 3 * 1024


@pytest.mark.big
def test_bench_vector_big(tmp_path):
    out = tmp_path / "bench"
    results = bench_vector.main(["--size", "20000", "--wait-idle", "30", "--timeout", "3600", "--out-dir", str(out)])
    _check(results, out, 20000)
    rows = {r["run"]: r for r in results["rows"]}
    assert rows["geoseg_1w"]["chunks"] == 100  # 20000² in 2048 px chunks
    assert 800_000 < rows["rasterio_whole"]["counts"]["1"] < 1_200_000  # about a million buildings
    # bounded memory: no geoseg process holds the whole raster (400 MB of uint8) as the baseline does
    raster_mib = 20000 * 20000 / 2**20
    for run in ("geoseg_1w", "geoseg_2w"):
        assert rows[run]["largest_process_mib"] < rows["rasterio_whole"]["largest_process_mib"]
        assert rows[run]["largest_process_mib"] < 2 * raster_mib
