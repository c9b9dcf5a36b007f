"""The parameters of one vectorisation: what every chunk task needs besides its window."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely

from geoseg.io.mask import MaskSource
from geoseg.vector.geometry import pixel_to_world, to_metric

__all__ = ["VectorParams", "pixel_size_m"]


@dataclass(frozen=True)
class VectorParams:
    """Everything a chunk task needs besides its window (small, hashable, travels in the graph)."""

    classes: tuple[int, ...]
    names: tuple[tuple[int, str], ...]
    kinds: tuple[tuple[int, str], ...]
    connectivity: int = 4
    min_area: float = 0.0
    max_length: float = 0.0  # objects longer than this (m; oriented box) dropped; 0 = no limit
    min_pixels: int = 0  # area-class polygons of fewer pixels are speckle, dropped (the minimum mapping unit)
    simplify: float = 0.0
    regularize: bool = False
    run_id: str = ""
    metric_crs: str | None = None
    pixel_size_m: float = 1.0
    lonlat_crs: str = "EPSG:4326"
    extra: tuple[tuple[str, Any], ...] = field(default=())
    attributes: tuple[tuple[str, str], ...] = ()

    @property
    def simplify_px(self) -> float:
        """Simplification tolerance in pixels."""
        return self.simplify / self.pixel_size_m if self.simplify > 0 else 0.0


def pixel_size_m(src: MaskSource, mcrs: str | None) -> float:
    """Side of one pixel in metres, at the raster centre.

    Parameters
    ----------
    src : MaskSource
        The mask (grid and CRS).
    mcrs : str or None
        The metric CRS the mask is measured in; None for pixel space.

    Returns
    -------
    float
        The side in metres; 1.0 in pixel space (sizes are then in pixels).
    """
    gb = src.geobox
    if mcrs is None or gb.crs is None:
        return 1.0
    cx, cy = gb.width / 2, gb.height / 2
    square = pixel_to_world(np.array([shapely.box(cx, cy, cx + 1, cy + 1)]), gb.transform)
    area = shapely.area(to_metric(square, gb.crs, mcrs)[0])[0]
    return float(math.sqrt(area))
