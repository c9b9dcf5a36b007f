"""geoseg: segment rasters of any size with PyTorch/ONNX models on Dask, seamlessly.

The public API is small and imported lazily, so ``import geoseg`` stays fast::

    import geoseg
    mask = geoseg.predict("scene.tif", model="unet.pt", aoi="aoi.gpkg")  # lazy DataArray
    geoseg.write(mask, "out/")  # mask.tif (COG) + run.json

Layers (each imports only the ones before it): :mod:`geoseg.grid` -> :mod:`geoseg.io` ->
:mod:`geoseg.models` -> :mod:`geoseg.engine` -> ... -> :mod:`geoseg.commands` and
:mod:`geoseg.cli` (the full order is in DESIGN.md and tests/test_layers.py).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from geoseg._version import __version__
from geoseg.errors import GeosegError, NotGeoreferencedWarning

if TYPE_CHECKING:  # pragma: no cover
    from geoseg.engine import predict, scheduler, write

__all__ = ["GeosegError", "NotGeoreferencedWarning", "__version__", "predict", "scheduler", "write"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {"predict": "geoseg.engine", "write": "geoseg.engine", "scheduler": "geoseg.engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
