"""Nothing stale, nothing silent, nothing outside the output folder, bounded costs, one-line errors.

Issue 14's data-side cases: every file a scene is read from is fingerprinted; duplicate STAC
ids and NaN/Inf model outputs are never silently merged or turned into a class; a torn staged
part is redone; paths a workflow writes stay inside its folder and lock files are never links;
YAML and raster headers cannot make a small file cost gigabytes; ledger, disk and name
failures are one line. CLI cases assert the exit status, a single ``geoseg: error:`` line
without a traceback, and that nothing was written outside the output folder.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin

from tests.conftest import PROGRESS_LINE, conv_net, read, write_raster

TILE = ["--tile", "32", "--halo", "4"]


# ------------------------------------------------------------------ helpers


def cli(*args: str, env: dict | None = None, preexec_fn=None, timeout: float = 240) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "geoseg", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        preexec_fn=preexec_fn,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``geoseg: error:`` line of a failed command (exit 1, no traceback, short)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if ln.strip() and not PROGRESS_LINE.match(ln)]  # work done before
    lines = [ln for ln in said if not ln.startswith("geoseg: warning:")]
    assert len(lines) == 1 and lines[0].startswith("geoseg: error: "), proc.stderr
    assert len(lines[0]) < 700, lines[0]
    return lines[0]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else []


def limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG (a full disk, for one process)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def workflow(folder: Path, image: Path, model: Path, extra: str = "", out: str = "out") -> Path:
    f = folder / "w.yaml"
    f.write_text(
        f"name: t\nimagery: [{image}]\nmodels: [{{model: {model}, tile: 32, halo: 4}}]\n"
        f"outputs: {{folder: {out}, formats: [geojson], quicklook: false}}\nscheduler: synchronous\n{extra}"
    )
    return f


def georeferenced_vrt(path: Path, sources: list[Path], width: int, height: int) -> Path:
    """A one-band VRT mosaic of ``sources`` side by side (each ``height`` x ``width // len(sources)``)."""
    from rasterio.crs import CRS

    step = width // len(sources)
    wkt = CRS.from_epsg(32633).to_wkt()
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">', f"<SRS>{wkt}</SRS>"]
    lines.append("<GeoTransform>500000.0, 2.0, 0.0, 4100000.0, 0.0, -2.0</GeoTransform>")
    for b in (1, 2, 3):
        lines.append(f'<VRTRasterBand dataType="UInt16" band="{b}">')
        for k, s in enumerate(sources):
            rel = os.path.relpath(s, path.parent) if k % 2 else str(s)
            lines.append(
                f'<SimpleSource><SourceFilename relativeToVRT="{k % 2}">{rel}</SourceFilename><SourceBand>{b}</SourceBand>'
                f'<SrcRect xOff="0" yOff="0" xSize="{step}" ySize="{height}"/>'
                f'<DstRect xOff="{k * step}" yOff="0" xSize="{step}" ySize="{height}"/></SimpleSource>'
            )
        lines.append("</VRTRasterBand>")
    lines.append("</VRTDataset>")
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------ nothing stale


def test_fingerprints_cover_every_file_a_vrt_reads(tmp_path: Path) -> None:
    from geoseg.io.files import dataset_files, file_fingerprint
    from geoseg.io.raster import open_source

    a = write_raster(tmp_path / "a.tif", 32, 16, seed=1, blocksize=None)  # uncompressed: a rewrite keeps the size
    b = write_raster(tmp_path / "b.tif", 32, 16, seed=2, blocksize=None)
    mosaic = georeferenced_vrt(tmp_path / "m.vrt", [a, b], 32, 32)
    nested = tmp_path / "n.vrt"  # a VRT of the VRT, by a relative path
    nested.write_text(
        '<VRTDataset rasterXSize="32" rasterYSize="32"><VRTRasterBand dataType="UInt16" band="1"><SimpleSource>'
        '<SourceFilename relativeToVRT="1">m.vrt</SourceFilename><SourceBand>1</SourceBand></SimpleSource>'
        "</VRTRasterBand></VRTDataset>"
    )
    assert set(dataset_files(str(nested))) == {str(nested), str(mosaic), str(a), str(b)}
    before = (file_fingerprint(str(mosaic)), file_fingerprint(str(nested)), open_source(mosaic).fingerprint)
    st = b.stat()
    write_raster(b, 32, 16, seed=3, blocksize=None)  # the source tile is rewritten in place: same size, new pixels
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert b.stat().st_size == st.st_size
    after = (file_fingerprint(str(mosaic)), file_fingerprint(str(nested)), open_source(mosaic).fingerprint)
    assert all(x != y for x, y in zip(before, after, strict=True)), (before, after)  # the VRTs themselves did not change


def test_a_rewritten_vrt_source_redoes_the_unit(tmp_path: Path, torchscript_model: Path) -> None:
    from geoseg.workflows.run import run_workflow

    a = write_raster(tmp_path / "a.tif", 48, 24, seed=4)
    b = write_raster(tmp_path / "b.tif", 48, 24, seed=5)
    vrt = georeferenced_vrt(tmp_path / "scene.vrt", [a, b], 48, 48)
    f = workflow(tmp_path, vrt, torchscript_model)
    assert run_workflow(f)["units"] == {"done": 1, "skipped": 0, "failed": 0}
    assert run_workflow(f)["units"] == {"done": 0, "skipped": 1, "failed": 0}
    mask_before = read(tmp_path / "out" / "convnet" / "mask.tif")
    st = b.stat()
    write_raster(b, 48, 24, seed=6)  # a source tile rewritten in place; the VRT is untouched
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert run_workflow(f)["units"] == {"done": 1, "skipped": 0, "failed": 0}
    assert not np.array_equal(read(tmp_path / "out" / "convnet" / "mask.tif")[:, 24:], mask_before[:, 24:])


def _stac_item(path: Path, item_id: str, asset: Path, when: str = "2024-05-01T00:00:00Z", **asset_extra) -> None:
    with rasterio.open(asset) as ds:
        bbox = list(ds.bounds)
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item_id,
        "geometry": None,
        "bbox": bbox,
        "properties": {"datetime": when},
        "links": [],
        "assets": {"b1": {"href": str(asset), "eo:bands": [{"name": "b1", "common_name": "red"}], **asset_extra}},
        "stac_extensions": [],
    }
    path.write_text(json.dumps(item))


def _stac_catalog(folder: Path, items: list[str]) -> Path:
    cat = {
        "type": "Catalog",
        "stac_version": "1.0.0",
        "id": "c",
        "description": "test",
        "links": [{"rel": "item", "href": f"./{name}", "type": "application/json"} for name in items],
    }
    path = folder / "catalog.json"
    path.write_text(json.dumps(cat))
    return path


def test_stac_items_with_one_id_are_two_scenes_and_dot_dot_stays_inside(tmp_path: Path) -> None:
    from geoseg.workflows.sources import scenes
    from geoseg.workflows.spec import Imagery

    stac = tmp_path / "stac"
    stac.mkdir()
    a = write_raster(tmp_path / "a.tif", 16, 16, bands=1, seed=1)
    b = write_raster(tmp_path / "b.tif", 16, 16, bands=1, seed=2)
    c = write_raster(tmp_path / "c.tif", 16, 16, bands=1, seed=3)
    _stac_item(stac / "one.json", "same", a, "2024-05-01T00:00:00Z")
    _stac_item(stac / "two.json", "same", b, "2024-06-01T00:00:00Z")
    _stac_item(stac / "up.json", "..", c, "2024-07-01T00:00:00Z")
    cat = _stac_catalog(stac, ["one.json", "two.json", "up.json"])
    out = tmp_path / "work" / "out"
    found = scenes(Imagery(stac=str(cat)), str(out))
    assert len(found) == 3 and len({s.path for s in found}) == 3 and len({s.name for s in found}) == 3
    hrefs = {s.date: Path(s.path).read_text() for s in found}
    assert str(a) in hrefs["2024-05-01"] and str(b) in hrefs["2024-06-01"]  # each scene is its own item
    for s in found:
        assert s.name not in (".", "..") and not s.name.startswith(".")
        real = os.path.realpath(os.path.join(out, s.name))
        assert os.path.commonpath([real, str(out)]) == str(out)
        assert os.path.dirname(s.path) == str(out / ".geoseg-stac")
    assert tree(tmp_path / "work") == sorted(
        ["out", "out/.geoseg-stac", *(f"out/.geoseg-stac/{Path(s.path).name}" for s in found)]
    )


def test_stac_asset_rewrite_or_new_checksum_changes_the_scene_fingerprint(tmp_path: Path) -> None:
    from geoseg.workflows.sources import scenes
    from geoseg.workflows.spec import Imagery
    from geoseg.workflows.units import scene_fingerprint

    stac = tmp_path / "stac"
    stac.mkdir()
    a = write_raster(tmp_path / "a.tif", 16, 16, bands=1, seed=1)
    _stac_item(stac / "one.json", "item", a, **{"file:checksum": "1220aa"})
    cat = _stac_catalog(stac, ["one.json"])

    def fingerprint() -> str:
        (s,) = scenes(Imagery(stac=str(cat)), str(tmp_path / "out"))
        return scene_fingerprint(s)  # the key the ledger keeps

    first = fingerprint()
    assert fingerprint() == first
    st = a.stat()
    write_raster(a, 16, 16, bands=1, seed=2)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = fingerprint()
    assert second != first  # the local asset behind the VRT changed
    _stac_item(stac / "one.json", "item", a, **{"file:checksum": "1220bb"})
    assert fingerprint() != second  # the catalog says the asset changed


# ------------------------------------------------------------------ nothing silent: NaN/Inf and overflow


class _NaNWhereBright(torch.nn.Module):
    """conv_net's classes, but NaN (or +inf) logits wherever band 1 is above ``level``."""

    def __init__(self, level: float, value: float) -> None:
        super().__init__()
        self.net = conv_net()
        self.level = level
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.where(x[:, :1] > self.level, torch.full_like(y, self.value), y)


def _bright_raster(path: Path, n_bright: int, size: int = 48, dtype: str = "uint16", bright: float = 5000.0) -> Path:
    data = np.full((3, size, size), 100, dtype=dtype)
    data[:, : size // 2] = 300
    flat = data[0].reshape(-1)
    flat[np.linspace(0, flat.size - 1, n_bright).astype(int)] = bright
    with rasterio.open(
        path, "w", driver="GTiff", width=size, height=size, count=3, dtype=dtype, crs="EPSG:32633",
        transform=from_origin(500000, 4100000, 2, 2),
    ) as ds:  # fmt: skip
        ds.write(data)
    return path


@pytest.mark.parametrize("blend", ["crop", "cosine"])
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_few_nan_outputs_are_nodata_counted_and_reported(tmp_path: Path, blend: str, probabilities: bool, value: float) -> None:
    import dask

    import geoseg

    src = _bright_raster(tmp_path / "src.tif", n_bright=5)
    model = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(_NaNWhereBright(1000.0, value)), str(model))
    with dask.config.set(scheduler="synchronous"):
        result = geoseg.predict(str(src), str(model), tile=32, halo=4, blend=blend, probabilities=probabilities)
        report = geoseg.write(result, tmp_path / "out")
    mask = read(tmp_path / "out" / "mask.tif")
    bright = read(src) > 1000
    lost = report["nonfinite"]["model_output_pixels"]
    assert lost >= 5 and (mask == 255).sum() == lost  # never silently a class
    assert (mask[bright] == 255).all()
    assert any("NaN or Inf" in w for w in report["warnings"]), report["warnings"]
    if probabilities:
        with rasterio.open(tmp_path / "out" / "probabilities.tif") as ds:
            assert (ds.read_masks(1)[bright] == 0).all()


@pytest.mark.parametrize("scheduler", ["local", "synchronous"])
def test_a_model_that_returns_nan_is_one_line_not_blamed_on_nodata(tmp_path: Path, scheduler: str) -> None:
    src = _bright_raster(tmp_path / "src.tif", n_bright=48 * 48 // 3)
    model = tmp_path / "nan.pt"
    torch.jit.save(torch.jit.script(_NaNWhereBright(1000.0, float("nan"))), str(model))
    out = tmp_path / "out"
    args = ["predict", str(src), "-m", str(model), "-o", str(out), "--scheduler", scheduler, *TILE]
    line = error_line(cli(*args, "--probabilities"))
    assert "the model returned NaN or Inf for" in line and str(model) in line and "nodata" not in line, line
    assert tree(out) == []
    if scheduler == "synchronous":
        line = error_line(cli(*args))
        assert "the model returned NaN or Inf for" in line, line


def test_scaling_that_overflows_float32_is_refused(tmp_path: Path, torchscript_model: Path) -> None:
    src = write_raster(tmp_path / "src.tif", 40, 40)
    model = tmp_path / "m.pt"
    shutil.copy(torchscript_model, model)
    card = {"name": "m", "classes": [{"id": k, "name": f"c{k}"} for k in range(4)]}
    for scaling, needle in (
        ({"method": "divide", "value": 1e-300}, "overflows float32"),
        ({"method": "meanstd", "mean": [0], "std": [1e-45]}, "overflows float32"),
        ({"method": "minmax", "low": [0], "high": [1e39]}, "within float32's range"),
    ):
        model.with_suffix(".card.json").write_text(json.dumps({**card, "scaling": scaling}))
        out = tmp_path / "out"
        line = error_line(cli("predict", str(src), "-m", str(model), "-o", str(out), "--scheduler", "synchronous", *TILE))
        assert needle in line and "m.card.json" in line, line
        assert tree(out) == []


def test_float64_values_past_float32_are_counted_not_fed_as_inf(tmp_path: Path) -> None:
    import dask

    import geoseg
    from geoseg.errors import InputError

    net = conv_net()
    model = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(net), str(model))
    src = _bright_raster(tmp_path / "few.tif", n_bright=3, dtype="float64", bright=1e300)
    with dask.config.set(scheduler="synchronous"):
        report = geoseg.write(geoseg.predict(str(src), str(model), tile=32, halo=4), tmp_path / "few")
    mask = read(tmp_path / "few" / "mask.tif")
    assert report["nonfinite"]["input_overflow_pixels"] == 3 and report["nonfinite"]["model_output_pixels"] == 0
    assert (mask[read(src) > 1e30] == 255).all() and (mask == 255).sum() == 3
    assert any("do not fit float32" in w for w in report["warnings"])
    # a card scaling that makes ordinary values overflow is caught the same way
    model.with_suffix(".card.json").write_text(
        json.dumps({"name": "m", "classes": [{"id": k, "name": f"c{k}"} for k in range(4)],
                    "scaling": {"method": "divide", "value": 1e-37}})
    )  # fmt: skip
    with dask.config.set(scheduler="synchronous"), pytest.raises(InputError, match="do not fit float32 once scaled"):
        geoseg.write(geoseg.predict(str(src), str(model), tile=32, halo=4), tmp_path / "many")
    assert tree(tmp_path / "many") == []


# ------------------------------------------------------------------ staged parts, resume, run.json, geoseg runs


def _on(where: str):
    import dask

    import geoseg

    return geoseg.scheduler("local", workers=1) if where == "local" else dask.config.set(scheduler="synchronous")


def _kill_before_assembly(monkeypatch: pytest.MonkeyPatch, src: Path, model: Path, out: Path, where: str) -> Path:
    """Run predict+write until every chunk part is staged, then stop as a killed run would (parts kept)."""
    import importlib

    import geoseg

    write_mod = importlib.import_module("geoseg.engine.write")  # the module (geoseg.engine.write is the function)

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, _on(where):
        m.setattr(write_mod, "assemble_cog", killed)
        with pytest.raises(KeyboardInterrupt):
            geoseg.write(geoseg.predict(str(src), str(model), tile=32, halo=4, chunk=24), out)
    (staging,) = [p for p in out.iterdir() if p.name.startswith(".geoseg-staging-")]
    owner = json.loads((staging / "owner.json").read_text())
    (staging / "owner.json").write_text(json.dumps({**owner, "pid": dead_pid()}))  # its process is gone
    return staging


@pytest.mark.parametrize(
    ("name", "where"), [("out", "synchronous"), ("o[1]", "synchronous"), ("*", "synchronous"), ("o[1]", "local")]
)
def test_torn_staged_parts_are_redone_and_run_json_counts_every_tile(
    tmp_path: Path, torchscript_model: Path, monkeypatch: pytest.MonkeyPatch, name: str, where: str
) -> None:
    import dask

    import geoseg

    src = write_raster(tmp_path / "src.tif", 96, 96, seed=7)
    with dask.config.set(scheduler="synchronous"):
        clean = geoseg.write(geoseg.predict(str(src), str(torchscript_model), tile=32, halo=4, chunk=24), tmp_path / "clean")
    parent = tmp_path / "runs"
    parent.mkdir()
    sibling = parent / "o1"  # a sibling the patterns 'o[1]' and '*' would match: its staging must survive
    sibling_staging = sibling / ".geoseg-staging-0000000000000000-deadbeef"
    sibling_staging.mkdir(parents=True)
    (sibling_staging / "owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": dead_pid()}))
    out = parent / name
    staging = _kill_before_assembly(monkeypatch, src, torchscript_model, out, where)
    parts = sorted((staging / "mask").glob("*.tif"))
    assert len(parts) == clean["tiles"]["chunks"] == 16
    raw = parts[0].read_bytes()
    parts[0].write_bytes(raw[: len(raw) // 2])  # truncated (power loss)
    parts[1].write_bytes(b"")  # emptied
    parts[2].write_bytes(os.urandom(len(raw)))  # garbage
    with _on(where):  # the resumed run checks the parts in tasks: on the default local cluster too
        report = geoseg.write(geoseg.predict(str(src), str(torchscript_model), tile=32, halo=4, chunk=24), out, overwrite=True)
    assert report["resumed_chunks"] == 13
    assert report["tiles"] == clean["tiles"]  # every tile of the job, not only the redone chunks
    np.testing.assert_array_equal(read(out / "mask.tif"), read(tmp_path / "clean" / "mask.tif"))
    assert not [p for p in os.listdir(out) if p.startswith(".geoseg-staging")]
    assert sibling_staging.is_dir()  # the sweep never matched a sibling folder


def test_a_dead_run_is_not_shown_running(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "import os, signal\nfrom geoseg.workflows.ledger import Ledger\n"
        f"ledger = Ledger({str(out)!r})\nledger.start_run()\n"
        "ledger.begin('scene/m', 'segment', 'scene', 'm', {}, 'h')\nos.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == -signal.SIGKILL
    f = workflow(tmp_path, tmp_path / "a.tif", tmp_path / "m.pt")
    proc = cli("runs", str(f), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "interrupted" in proc.stdout and "running" not in proc.stdout, proc.stdout
    proc = cli("runs", str(f), "--out", str(out), "--json")
    data = json.loads(proc.stdout)
    assert data["runs"][0]["status"] == "interrupted" and data["units"][0]["status"] == "interrupted"


# ------------------------------------------------------------------ writes stay inside the output folder


def test_sample_outside_the_project_is_refused(tmp_path: Path, torchscript_model: Path) -> None:
    project = tmp_path / "p"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (project / "workflows").mkdir(parents=True)
    f = project / "workflows" / "w.yaml"
    f.write_text(
        "name: t\nsample: ../../victim\nimagery: [../../victim/scene.tif]\n"
        f"models: [{torchscript_model}]\noutputs: {{folder: ../out}}\nscheduler: synchronous\n"
    )
    line = error_line(cli("run", str(f)))
    assert f"{f}:2: sample '../../victim' is outside the project folder" in line, line
    assert tree(victim) == ["keep.txt"] and (victim / "keep.txt").read_text() == "mine"
    assert tree(project) == ["workflows", "workflows/w.yaml"]


@pytest.mark.parametrize("lock", [".geoseg-run.lock", "ledger.sqlite"])
def test_a_lock_or_ledger_planted_as_a_link_is_refused(tmp_path: Path, torchscript_model: Path, lock: str) -> None:
    src = write_raster(tmp_path / "src.tif", 40, 40)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / lock).symlink_to(victim)
    f = workflow(tmp_path, src, torchscript_model)
    line = error_line(cli("run", str(f), "--out", str(out)))
    assert str(out / lock) in line and ("symbolic link" in line or "a link" in line), line
    assert victim.read_text() == "precious"
    assert set(tree(out)) <= {lock, ".geoseg-run.lock"} and (out / lock).is_symlink()


def test_lock_files_are_never_followed(tmp_path: Path) -> None:
    from geoseg.errors import OutputError
    from geoseg.io.outdir import open_lock_file

    target = tmp_path / "t"
    target.write_text("x")
    (tmp_path / "link.lock").symlink_to(target)
    with pytest.raises(OutputError, match="is a symbolic link"):
        open_lock_file(str(tmp_path / "link.lock"))
    os.mkfifo(tmp_path / "fifo.lock")
    with pytest.raises(OutputError, match="not a regular file"):
        open_lock_file(str(tmp_path / "fifo.lock"))  # never blocks on a FIFO
    assert target.read_text() == "x"
    fd = open_lock_file(str(tmp_path / "ok.lock"))
    os.close(fd)


def test_an_output_folder_that_is_a_link_is_refused(tmp_path: Path, torchscript_model: Path) -> None:
    src = write_raster(tmp_path / "src.tif", 40, 40)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").symlink_to(elsewhere)
    args = ["predict", str(src), "-m", str(torchscript_model), "-o", str(tmp_path / "out"), "--scheduler", "synchronous"]
    line = error_line(cli(*args, *TILE))
    assert "is a symbolic link" in line and str(elsewhere) in line, line
    assert tree(elsewhere) == []


def test_sweep_and_adopt_escape_glob_characters(tmp_path: Path) -> None:
    from geoseg.io.outdir import adopt_staging, sweep_staging

    host = os.uname().nodename
    for name in ("o1", "ox", "*", "o[1]"):
        stage = tmp_path / name / ".geoseg-staging-tok-1234"
        stage.mkdir(parents=True)
        (stage / "owner.json").write_text(json.dumps({"host": host, "pid": dead_pid()}))
    assert adopt_staging(str(tmp_path / "o[1]"), ".geoseg-staging-", "tok") == str(tmp_path / "o[1]" / ".geoseg-staging-tok-1234")
    sweep_staging(str(tmp_path / "*"), ".geoseg-staging-")
    assert not (tmp_path / "*" / ".geoseg-staging-tok-1234").exists()
    assert all((tmp_path / n / ".geoseg-staging-tok-1234").exists() for n in ("o1", "ox", "o[1]"))


# ------------------------------------------------------------------ bounded costs


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["  l0: &l0 [x" + ", x" * (width - 1) + "]"]
    lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines)


def test_alias_bombs_and_recursive_aliases_fail_fast() -> None:
    from geoseg._yaml import load_yaml
    from geoseg.errors import InputError

    t = time.perf_counter()
    with pytest.raises(InputError, match=r"expand to more than .* values \(an alias bomb\)"):
        load_yaml("metrics:\n" + _bomb(), "c.yaml", InputError, "fix")
    with pytest.raises(InputError, match="an alias refers to a value that contains it"):
        load_yaml("a: &c [*c, *c]\n", "c.yaml", InputError, "fix")
    with pytest.raises(InputError, match=r"more than the .* a YAML file may have"):
        load_yaml("a: " + "x" * (1 << 21), "c.yaml", InputError, "fix")
    assert time.perf_counter() - t < 5
    assert load_yaml("a: &x {k: 1}\nb: {<<: *x, j: 2}\n", "c.yaml", InputError, "fix") == {"a": {"k": 1}, "b": {"k": 1, "j": 2}}


@pytest.mark.parametrize("case", ["bomb", "dev_zero", "fifo", "huge"])
def test_card_files_cannot_cost_unbounded_time_or_memory(tmp_path: Path, torchscript_model: Path, case: str) -> None:
    src = write_raster(tmp_path / "src.tif", 40, 40)
    model = tmp_path / "m.pt"
    shutil.copy(torchscript_model, model)
    card = model.with_suffix(".card.yaml")
    if case == "bomb":  # 600 bytes that json.dumps would expand to 387 million values
        card.write_text("name: m\nclasses: [{id: 0, name: a}, {id: 1, name: b}]\nmetrics:\n" + _bomb())
        needle = "alias bomb"
    elif case == "dev_zero":
        card.symlink_to("/dev/zero")
        needle = "not a regular file"
    elif case == "fifo":
        os.mkfifo(card)
        needle = "not a regular file"
    else:
        card.write_text("name: m\n# " + "x" * (2 << 20) + "\n")
        needle = "more than the 1048576 a card may have"
    out = tmp_path / "out"
    t = time.perf_counter()
    line = error_line(cli("predict", str(src), "-m", str(model), "-o", str(out), "--scheduler", "synchronous", *TILE))
    assert needle in line and str(card) in line, line
    assert time.perf_counter() - t < 120
    assert tree(out) == []


def test_rasters_declaring_far_more_pixels_than_they_hold_are_refused(tmp_path: Path, torchscript_model: Path) -> None:
    from geoseg.io.raster import open_source

    big = tmp_path / "big.tif"
    profile = {"driver": "GTiff", "width": 200_000, "height": 200_000, "count": 3, "dtype": "uint16", "crs": "EPSG:32633",
               "transform": from_origin(500000, 4100000, 1, 1), "tiled": True, "blockxsize": 512, "blockysize": 512,
               "sparse_ok": True, "compress": "deflate"}  # fmt: skip
    with rasterio.open(big, "w", **profile) as ds:
        ds.write(np.ones((3, 512, 512), np.uint16), window=rasterio.windows.Window(0, 0, 512, 512))
    assert big.stat().st_size < 3_000_000
    small = write_raster(tmp_path / "small.tif", 40, 40)
    huge = tmp_path / "huge.vrt"  # 10^6 x 10^6 over a 40 px file
    huge.write_text(
        '<VRTDataset rasterXSize="1000000" rasterYSize="1000000"><SRS>EPSG:32633</SRS>'
        "<GeoTransform>500000, 1, 0, 4100000, 0, -1</GeoTransform>"
        f'<VRTRasterBand dataType="UInt16" band="1"><SimpleSource><SourceFilename relativeToVRT="0">{small}</SourceFilename>'
        "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>"
    )
    out = tmp_path / "out"
    for src, needle in ((big, "a sparse or damaged raster"), (huge, "more than geoseg's limit of 1e+11")):
        t = time.perf_counter()
        line = error_line(cli("predict", str(src), "-m", str(torchscript_model), "-o", str(out), "--scheduler", "synchronous"))
        assert needle in line and str(src) in line, line
        assert time.perf_counter() - t < 60
        assert tree(out) == []
    forged_mask = tmp_path / "mask.tif"  # a class mask's header can lie the same way
    with rasterio.open(forged_mask, "w", **{**profile, "count": 1, "dtype": "uint8", "nodata": 255}) as ds:
        ds.write(np.ones((1, 512, 512), np.uint8), window=rasterio.windows.Window(0, 0, 512, 512))
    line = error_line(cli("vectorize", str(forged_mask), "-o", str(out), "--scheduler", "synchronous"))
    assert "a sparse or damaged raster" in line and str(forged_mask) in line, line
    assert tree(out) == []
    # the limits are configurable
    line = error_line(cli("predict", str(small), "-m", str(torchscript_model), "-o", str(out), "--scheduler", "synchronous",
                          *TILE, env={"GEOSEG_MAX_PIXELS": "1000"}))  # fmt: skip
    assert "40 x 40 pixels" in line and "GEOSEG_MAX_PIXELS" in line, line
    os.environ["GEOSEG_MAX_SPARSE_RATIO"] = "0"
    try:
        assert open_source(big).geobox.width == 200_000  # accepted when meant to be mostly empty
    finally:
        del os.environ["GEOSEG_MAX_SPARSE_RATIO"]


# ------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize("case", ["foreign", "old_schema", "newer", "garbage"])
def test_a_ledger_of_another_program_or_schema_is_one_line_and_untouched(
    tmp_path: Path, torchscript_model: Path, case: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    path = out / "ledger.sqlite"
    if case == "garbage":
        path.write_bytes(b"not a database at all" * 100)
    else:
        con = sqlite3.connect(path)
        if case == "foreign":
            con.execute("CREATE TABLE invoices (n INTEGER)")
        elif case == "old_schema":
            con.execute("CREATE TABLE units (id TEXT PRIMARY KEY, status TEXT)")
            con.execute("CREATE TABLE runs (run INTEGER PRIMARY KEY)")
        else:
            con.execute("PRAGMA user_version = 99")
        con.commit()
        con.close()
    before = path.read_bytes()
    src = write_raster(tmp_path / "src.tif", 40, 40)
    line = error_line(cli("run", str(workflow(tmp_path, src, torchscript_model)), "--out", str(out)))
    needle = {"foreign": "not a geoseg run ledger", "old_schema": "another schema", "newer": "newer geoseg",
              "garbage": "not a usable run ledger"}[case]  # fmt: skip
    assert needle in line and str(path) in line and "move it away" in line, line
    assert path.read_bytes() == before
    assert not (out / "convnet").exists()


def test_a_locked_ledger_fails_in_seconds_with_one_line(tmp_path: Path, torchscript_model: Path) -> None:
    from geoseg.workflows.ledger import Ledger

    out = tmp_path / "out"
    Ledger(str(out)).close()
    holder = sqlite3.connect(out / "ledger.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program writing
    try:
        src = write_raster(tmp_path / "src.tif", 40, 40)
        t = time.perf_counter()
        line = error_line(cli("run", str(workflow(tmp_path, src, torchscript_model)), "--out", str(out)))
        assert "the run ledger is locked by another program" in line, line
        assert time.perf_counter() - t < 25  # not 30 s of waiting, then a traceback
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_read_only_ledger_is_readable_and_refuses_a_run_in_one_line(tmp_path: Path) -> None:
    from geoseg.workflows.ledger import Ledger

    base = Path(f"/tmp/geoseg-ro-{os.getpid()}")  # world-traversable, for a run as another user
    shutil.rmtree(base, ignore_errors=True)
    out = base / "out"
    try:
        ledger = Ledger(str(out))
        ledger.start_run()
        ledger.finish_run("done", 1, 0, 0)
        ledger.close()
        code = (
            "from geoseg.workflows.ledger import Ledger\n"
            f"ledger = Ledger({str(out)!r})\nprint(ledger.readonly, [r['status'] for r in ledger.runs()])\n"
            "ledger.start_run()\n"
        )
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: no way to make the ledger read-only")
            base.chmod(0o755)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code]
        else:
            (out / "ledger.sqlite").chmod(0o444)
            out.chmod(0o555)
            cmd = [sys.executable, "-c", code]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
        assert proc.stdout.splitlines()[0] == "True ['done']", (proc.stdout, proc.stderr)
        assert proc.returncode == 1 and "OutputError" in proc.stderr and "the run ledger is read-only" in proc.stderr
    finally:
        if base.exists():
            out.chmod(0o755)
            shutil.rmtree(base, ignore_errors=True)


def test_a_full_disk_at_ledger_or_summary_time_is_one_line_and_leaves_no_temp_file(
    tmp_path: Path, torchscript_model: Path
) -> None:
    src = write_raster(tmp_path / "src.tif", 40, 40)
    out = tmp_path / "out"
    line = error_line(cli("run", str(workflow(tmp_path, src, torchscript_model)), "--out", str(out),
                          preexec_fn=limit_file_size(1000)))  # fmt: skip
    assert "the disk is full (File too large)" in line and "ledger.sqlite" in line, line
    assert not [p for p in tree(out) if p.endswith(".tmp")]
    code = f"from geoseg.io.outdir import write_text_atomic\nwrite_text_atomic({str(out / 'summary.json')!r}, 'x' * 100000)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit_file_size(1000))
    assert proc.returncode == 1 and "DiskFullError" in proc.stderr and "summary.json: the disk is full" in proc.stderr
    assert proc.stderr.count("Traceback") == 1  # not a second one from the cleanup
    assert not [p for p in os.listdir(out) if "summary" in p]


def test_cannot_write_feature_is_reported_as_a_full_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = tmp_path / "noisy.tif"
    with rasterio.open(
        mask, "w", driver="GTiff", width=200, height=200, count=1, dtype="uint8", crs="EPSG:32633",
        transform=from_origin(500000, 4100000, 2, 2), nodata=255,
    ) as ds:  # fmt: skip
        ds.write(rng.integers(0, 3, (200, 200)).astype("uint8"), 1)  # ~10000 polygons: 2 MB of GeoJSON per class
    out = tmp_path / "vo"
    args = ["vectorize", str(mask), "-o", str(out), "--scheduler", "synchronous", "--format", "geojson"]
    line = error_line(cli(*args, preexec_fn=limit_file_size(2_000_000)))
    assert f"{out}: the disk is full (File too large); free space or choose another --out" in line, line
    assert tree(out) == []


def test_long_cjk_and_nul_class_names_give_files_and_a_valid_project(tmp_path: Path) -> None:
    import dask

    import geoseg
    from geoseg.vector import vectorize

    src = write_raster(tmp_path / "src.tif", 48, 48, seed=8)
    model = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(conv_net()), str(model))
    names = ["background", "x" * 300, "森" * 100, "a\x00b"]
    model.with_suffix(".card.json").write_text(
        json.dumps({"name": "odd", "classes": [{"id": i, "name": n} for i, n in enumerate(names)]})
    )
    out = tmp_path / "out"
    with dask.config.set(scheduler="synchronous"):
        geoseg.write(geoseg.predict(str(src), str(model), tile=32, halo=4), out)
        report = vectorize(str(out / "mask.tif"), str(out))
    assert len(report["layers"]) == 3
    for p in (out / "styles").iterdir():
        assert len(p.name.encode()) < 200
    with zipfile.ZipFile(out / "project.qgz") as z:
        text = z.read(z.namelist()[0]).decode("utf-8")
    import xml.etree.ElementTree as ET

    root = ET.fromstring(text.split("\n", 1)[1])  # valid XML: the NUL is replaced, not written raw
    labels = [e.get("label") for e in root.iter("paletteEntry")]
    # legend labels start with a capital (issue 17); the class names themselves are kept in the RAT and category names
    assert "X" + "x" * 299 in labels and "森" * 100 in labels and "A\ufffdb" in labels
    aux = ET.fromstring((out / "mask.tif.aux.xml").read_text(encoding="utf-8"))
    assert [c.text for c in aux.iter("Category")] == ["background", "x" * 300, "森" * 100, "a\ufffdb"]


def test_workflow_crs_and_aoi_errors_come_before_any_segmentation(tmp_path: Path, torchscript_model: Path) -> None:
    from geoseg.errors import InputError
    from geoseg.workflows.spec import load_workflow

    src = write_raster(tmp_path / "src.tif", 40, 40)
    f = workflow(tmp_path, src, torchscript_model)
    f.write_text(f.read_text().replace("quicklook: false}", "quicklook: false, crs: 'EPSG:999999'}"))
    with pytest.raises(InputError, match=r"w.yaml:4: outputs.crs: .*'EPSG:999999' is not a CRS pyproj knows"):
        load_workflow(f)
    aoi = tmp_path / "aoi95.geojson"
    aoi.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[10, 94], [11, 94], [11, 95], [10, 95], [10, 94]]]}}]}))  # fmt: skip
    f = workflow(tmp_path, src, torchscript_model, extra=f"aoi: {aoi}\n")
    line = error_line(cli("run", str(f)))
    assert "latitudes up to 95" in line and str(aoi) in line, line
    assert not list((tmp_path / "out").rglob("mask.tif")) and not (tmp_path / "out" / "convnet").exists()
    out = tmp_path / "p"
    line = error_line(cli("predict", str(src), "-m", str(torchscript_model), "-o", str(out), "--aoi", str(aoi),
                          "--scheduler", "synchronous", *TILE))  # fmt: skip
    assert "latitudes up to 95" in line, line
    assert tree(out) == []


@pytest.mark.parametrize("option", [("--simplify", "nan"), ("--simplify", "inf"), ("--min-area", "nan")])
def test_non_finite_vectorize_options_are_refused(tmp_path: Path, option: tuple[str, str]) -> None:
    from geoseg.errors import InputError
    from geoseg.workflows.spec import load_workflow

    mask = tmp_path / "m.tif"
    with rasterio.open(
        mask, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8", crs="EPSG:32633",
        transform=from_origin(500000, 4100000, 2, 2),
    ) as ds:  # fmt: skip
        ds.write(np.ones((1, 8, 8), np.uint8))
    out = tmp_path / "o"
    line = error_line(cli("vectorize", str(mask), "-o", str(out), "--scheduler", "synchronous", *option))
    assert f"{option[0]} must be a finite number >= 0" in line or option[0] in line, line
    assert tree(out) == []
    f = tmp_path / "w.yaml"
    key = "simplify_m" if option[0] == "--simplify" else "min_area_m2"
    f.write_text(f"name: t\nimagery: [a.tif]\nmodels: [{{model: m.pt, {key}: .{option[1]}}}]\noutputs: {{folder: out}}\n")
    with pytest.raises(InputError, match=rf"w.yaml:3: models.0.{key}: Input should be a finite number"):
        load_workflow(f)


def test_a_stac_folder_planted_as_a_link_out_of_the_outputs_is_refused(tmp_path: Path) -> None:
    from geoseg.errors import OutputError
    from geoseg.workflows.sources import scenes
    from geoseg.workflows.spec import Imagery

    stac = tmp_path / "stac"
    stac.mkdir()
    _stac_item(stac / "one.json", "item", write_raster(tmp_path / "a.tif", 16, 16, bands=1))
    cat = _stac_catalog(stac, ["one.json"])
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.mkdir()
    (out / ".geoseg-stac").symlink_to(victim)
    with pytest.raises(OutputError, match=r"item\.vrt: the VRT of STAC item 'item' resolves to .*victim/item\.vrt, outside"):
        scenes(Imagery(stac=str(cat)), str(out))
    assert tree(victim) == []


def test_an_imagery_glob_in_a_project_folder_with_glob_characters(tmp_path: Path) -> None:
    from geoseg.workflows.sources import scenes
    from geoseg.workflows.spec import load_workflow

    project = tmp_path / "p[1]*"
    (project / "data").mkdir(parents=True)
    src = write_raster(project / "data" / "scene_2024-05-01.tif", 16, 16)
    (tmp_path / "p1x" / "data").mkdir(parents=True)  # what the pattern would match if the folder were not escaped
    write_raster(tmp_path / "p1x" / "data" / "other_2024-05-02.tif", 16, 16)
    f = project / "w.yaml"
    f.write_text("name: t\nimagery: {glob: data/*.tif}\nmodels: [m.pt]\noutputs: {folder: out}\n")
    wf = load_workflow(f)
    assert [s.path for s in scenes(wf.imagery_spec(), wf.outputs.folder)] == [str(src)]


def test_a_damaged_staging_folder_is_started_afresh(
    tmp_path: Path, torchscript_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dask

    import geoseg

    src = write_raster(tmp_path / "src.tif", 48, 48, seed=9)
    out = tmp_path / "out"
    staging = _kill_before_assembly(monkeypatch, src, torchscript_model, out, "synchronous")
    shutil.rmtree(staging / "mask")
    (staging / "mask").write_text("a file where the parts' folder belongs")
    with dask.config.set(scheduler="synchronous"):
        report = geoseg.write(geoseg.predict(str(src), str(torchscript_model), tile=32, halo=4, chunk=24), out)
    assert report["resumed_chunks"] == 0 and report["tiles"]["chunks"] == 4
    assert sorted(os.listdir(out)) == ["mask.qml", "mask.tif", "mask.tif.aux.xml", "run.json"]  # + class names (issue 17)
