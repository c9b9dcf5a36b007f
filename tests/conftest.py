"""Shared fixtures: generated georeferenced rasters, small nets with a known receptive field,
whole-image reference inference, and the real data folder (skipped when absent)."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

# Ctrl-C must be live for the tests that send it: a shell that starts pytest in the background
# (`cmd &` without job control) hands it SIGINT ignored, and every child would inherit that
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

#: geoseg's plain progress lines on stderr when it is not a terminal (tiles, chunks, chunk windows; a workflow
#: unit's start and end): the work done before an error, not noise beside its one line
PROGRESS_LINE = re.compile(
    r"^(?!geoseg: )(\[\d+/\d+\] .*: (started|finished in .*)|\S.*: \d+/\d+ (tiles|chunks|chunk windows)( .*)?)$"
)

# the real test data sits beside the repository (../shared/data); GEOSEG_TEST_DATA points elsewhere
SHARED_DATA = Path(os.environ.get("GEOSEG_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def pytest_report_header(config: pytest.Config) -> list[str]:
    import dask
    import torch

    import geoseg

    return [
        f"geoseg {geoseg.__version__}, torch {torch.__version__}, rasterio {rasterio.__version__} "
        f"(GDAL {rasterio.__gdal_version__}), dask {dask.__version__}, numpy {np.__version__}",
        f"shared data: {SHARED_DATA if SHARED_DATA.is_dir() else 'absent (real-data tests skip)'}",
    ]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real rasters of ../shared/data (see its SOURCES.md); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (put shared/data beside the repository or set GEOSEG_TEST_DATA)")
    return SHARED_DATA


def write_raster(
    path: Path,
    height: int,
    width: int,
    bands: int = 3,
    dtype: str = "uint16",
    *,
    crs: str | None = "EPSG:32633",
    res: float = 2.0,
    nodata: float | None = None,
    nodata_box: tuple[int, int, int, int] | None = None,
    seed: int = 0,
    blocksize: int | None = 256,
    driver: str = "GTiff",
) -> Path:
    """Write a textured test raster; ``nodata_box`` (r0, r1, c0, c1) is set to ``nodata``."""
    rng = np.random.default_rng(seed)
    hi = 255 if dtype == "uint8" else 3000
    base = rng.integers(0, hi, (bands, height, width))
    # add structure so classes form regions, not salt and pepper
    yy, xx = np.mgrid[0:height, 0:width]
    base = (base * 0.3 + hi * 0.35 * (1 + np.sin(xx / 7.0 + bands) * np.cos(yy / 11.0))).clip(1, hi)
    data = base.astype(dtype)
    if nodata_box is not None:
        r0, r1, c0, c1 = nodata_box
        data[:, r0:r1, c0:c1] = nodata
    profile = {
        "driver": driver,
        "width": width,
        "height": height,
        "count": bands,
        "dtype": dtype,
        "nodata": nodata,
    }
    if crs:
        profile.update(crs=crs, transform=from_origin(500000.0, 4100000.0, res, res))
    if driver == "GTiff" and blocksize and height >= 16 and width >= 16:
        profile.update(tiled=True, blockxsize=blocksize, blockysize=blocksize, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_raster(height, width, bands=3, dtype="uint16", **kw)`` -> path."""
    counter = iter(range(10_000))

    def _make(height: int, width: int, bands: int = 3, dtype: str = "uint16", **kw) -> Path:
        return write_raster(tmp_path / f"src{next(counter)}.tif", height, width, bands, dtype, **kw)

    return _make


def conv_net(bands: int = 3, classes: int = 4, depth: int = 3, seed: int = 0):
    """A fully-convolutional net of ``depth`` 3x3 convs (receptive-field radius ``depth``)."""
    import torch

    torch.manual_seed(seed)
    layers: list = []
    ch = bands
    for k in range(depth):
        out = classes if k == depth - 1 else 8
        layers.append(torch.nn.Conv2d(ch, out, 3, padding=1))
        if k < depth - 1:
            layers.append(torch.nn.ReLU())
        ch = out
    net = torch.nn.Sequential(*layers).eval()
    # scale the first layer so raw uint16 values give logits of a sensible size
    with torch.no_grad():
        net[0].weight.mul_(1e-3)
    return net


@pytest.fixture(scope="session")
def torchscript_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript file of :func:`conv_net` (3 bands, 4 classes, receptive radius 3)."""
    import torch

    path = tmp_path_factory.mktemp("models") / "convnet.pt"
    torch.jit.save(torch.jit.script(conv_net()), str(path))
    return path


def whole_image_reference(net, data: np.ndarray, halo: int, probabilities: bool = False) -> np.ndarray:
    """Run ``net`` once on the whole raster, mirrored by ``halo`` at the edges (as geoseg pads).

    Returns the argmax class map (or softmax probabilities) of the unpadded raster.
    """
    import torch

    from geoseg.grid import reflect_index

    _, h, w = data.shape
    rows = reflect_index(np.arange(-halo, h + halo), h)
    cols = reflect_index(np.arange(-halo, w + halo), w)
    x = data.astype(np.float32)[:, rows[:, None], cols[None, :]]
    with torch.inference_mode():
        y = net(torch.from_numpy(np.ascontiguousarray(x))[None])[0]
    y = y[:, halo : halo + h, halo : halo + w]
    if probabilities:
        return torch.softmax(y, 0).numpy()
    return y.argmax(0).numpy().astype(np.uint8)


def read(path: os.PathLike | str, band: int | None = 1) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(band) if band else ds.read()


@pytest.fixture(autouse=True)
def _fresh_not_georeferenced_warning():
    """geoseg says "not georeferenced" once per process; give every test a fresh process's view."""
    import geoseg.errors

    geoseg.errors._warned_not_georeferenced = False
    yield


@pytest.fixture(autouse=True)
def _cli_logging_undone():
    """A test that runs the CLI in-process (click's CliRunner) sets up the CLI's logging on the ``geoseg`` and
    ``distributed`` loggers (handlers, levels, the Dask log file's variable): undo it, so later tests see
    the library's own logging, as a fresh process would."""
    import logging

    names = ("geoseg", "distributed")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    env = os.environ.get("GEOSEG_DASK_LOG")
    yield
    for n, (level, handlers) in saved.items():
        logger = logging.getLogger(n)
        logger.setLevel(level)
        logger.handlers[:] = handlers
    if env is None:
        os.environ.pop("GEOSEG_DASK_LOG", None)
    else:
        os.environ["GEOSEG_DASK_LOG"] = env
