"""Process-wide GDAL/rasterio settings shared by every io module (the lowest io room).

Holds what both :mod:`geoseg.io.raster` and :mod:`geoseg.io.frames` need, so neither
imports the other's internals.
"""

from __future__ import annotations

import warnings

__all__ = ["quiet_rasterio_georeference"]


def quiet_rasterio_georeference() -> None:
    """Never show rasterio's own NotGeoreferencedWarning in this process (geoseg warns once, itself).

    A process-wide filter, installed once, rather than ``warnings.catch_warnings`` around each
    open: ``catch_warnings`` saves and restores the filters of the whole process, so in a Dask
    worker's threads one task's restore can land while another task is inside ``rasterio.open``
    and let the warning through.
    """
    from rasterio.errors import NotGeoreferencedWarning as RioNotGeoreferenced

    if not any(f[0] == "ignore" and f[2] is RioNotGeoreferenced for f in warnings.filters):
        warnings.filterwarnings("ignore", category=RioNotGeoreferenced)
