"""Class values shared by every layer: the mask's nodata value.

Pure (no geoseg imports, no third-party imports), the lowest layer beside :mod:`geoseg.grid`.
"""

from __future__ import annotations

__all__ = ["NODATA"]

#: Value of a class mask (uint8) where nothing was predicted: outside the AOI or the raster's
#: valid pixels, or unusable on either date of a change map. Class ids are 0..254.
NODATA = 255
