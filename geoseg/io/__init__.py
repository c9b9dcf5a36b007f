"""Input and output by path: raster windows read inside tasks, AOIs, COG parts and assembly.

Depends on :mod:`geoseg.grid` only; never imports torch or the engine.
"""

from geoseg.io.aoi import AOI, read_aoi
from geoseg.io.cog import Part, assemble_cog, write_part
from geoseg.io.raster import RasterSource, open_source, read_window
from geoseg.io.xarray_source import ArraySource, open_array

__all__ = [
    "AOI",
    "ArraySource",
    "Part",
    "RasterSource",
    "assemble_cog",
    "open_array",
    "open_source",
    "read_aoi",
    "read_window",
    "write_part",
]
