"""geoseg: segment rasters of any size with PyTorch/ONNX models on Dask, seamlessly.

The public API is small and imported lazily, so ``import geoseg`` stays fast::

    import geoseg
    mask = geoseg.predict("scene.tif", model="unet.pt", aoi="aoi.gpkg")  # lazy DataArray
    geoseg.write(mask, "out/")  # mask.tif (COG) + run.json
    done = geoseg.segment("scene.tif", "buildings", "out/", vectorize={})  # both, and the polygon layers
    days = geoseg.stac_scenes(api_url, "out/", collections=["sentinel-2-l2a"], aoi="aoi.gpkg")  # a VRT per day

Layers, each importing only the ones before it (DESIGN.md says what each owns;
tests/test_layers.py enforces the order): classes, records, grid -> io -> models -> engine ->
vector -> pipeline -> evaluate -> train -> effects -> sequences -> change -> workflows ->
commands and cli.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from geoseg._version import __version__
from geoseg.errors import GeosegError, NotGeoreferencedWarning

if TYPE_CHECKING:  # pragma: no cover
    from geoseg.engine import predict, scheduler, write
    from geoseg.pipeline import segment
    from geoseg.workflows.stac import stac_scenes

__all__ = ["GeosegError", "NotGeoreferencedWarning", "__version__", "predict", "scheduler", "segment", "stac_scenes", "write"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {"predict": "geoseg.engine", "write": "geoseg.engine", "scheduler": "geoseg.engine", "segment": "geoseg.pipeline",
         "stac_scenes": "geoseg.workflows.stac"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
