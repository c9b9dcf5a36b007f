"""Areas of interest: read any vector file, bring it onto a raster's grid."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from geoseg.errors import InputError
from geoseg.grid import GeoBox, Window
from geoseg.io.gdal import quiet_rasterio_georeference

__all__ = ["AOI", "aoi_lonlat", "check_aoi", "read_aoi"]


@dataclass(frozen=True)
class AOI:
    """AOI polygons in the raster's CRS, as WKB (picklable, cheap to ship to tasks)."""

    path: str
    wkb: tuple[bytes, ...]
    window: Window

    def __dask_tokenize__(self) -> tuple:
        return ("geoseg.AOI", self.path, self.wkb, self.window)

    def mask(self, geobox: GeoBox, window: Window):
        """Bool array, True for pixels of ``window`` whose centre lies inside the AOI."""
        import shapely
        from rasterio.features import geometry_mask

        geoms = shapely.from_wkb(list(self.wkb))
        quiet_rasterio_georeference()  # GDAL's scratch dataset inside rasterize has no georeference
        return geometry_mask(geoms, out_shape=window.shape, transform=geobox.crop(window).transform, invert=True)


def _read_polygons(path: str):
    """The AOI file's polygons (a GeoDataFrame with a CRS), checked; :class:`InputError` otherwise."""
    import geopandas as gpd
    import numpy as np

    if not os.path.exists(path) and not path.startswith("/vsi"):
        raise InputError(f"{path}: AOI file not found; check the aoi= path")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises its own DataSourceError family
        reason = " ".join(str(exc).split())[:200]
        raise InputError(
            f"{path}: not a vector file pyogrio can read ({reason}); give a GeoPackage, GeoJSON or Shapefile"
        ) from None
    try:
        if not isinstance(gdf, gpd.GeoDataFrame):
            raise AttributeError("no geometry")
        gdf.geometry  # noqa: B018  (raises when the table has no active geometry)
    except AttributeError:
        raise InputError(f"{path}: the AOI has no geometry column; give a file with Polygon or MultiPolygon features") from None
    gdf = gdf[~gdf.geometry.is_empty & gdf.geometry.notna()]
    gdf = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if gdf.empty:
        raise InputError(f"{path}: the AOI has no polygons; give a file with Polygon or MultiPolygon features")
    if gdf.crs is None:
        raise InputError(f"{path}: the AOI file has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:4326)")
    bounds = gdf.total_bounds
    if not np.isfinite(bounds).all():
        raise InputError(f"{path}: the AOI has coordinates that are not finite numbers; fix its geometry")
    if gdf.crs.is_geographic:
        minx, miny, maxx, maxy = (float(v) for v in bounds)
        if miny < -90 or maxy > 90 or minx < -540 or maxx > 540:
            worst = miny if abs(miny) > abs(maxy) else maxy
            raise InputError(
                f"{path}: the AOI has latitudes up to {worst:g} in a lon/lat CRS ({gdf.crs.to_string()}), past +-90; "
                "its coordinates are in another CRS (or x and y are swapped): set the file's real CRS"
            )
    return gdf


def check_aoi(path: str | os.PathLike) -> None:
    """Check an AOI file on its own (readable, polygons, a CRS, coordinates that exist), before any work.

    Raises
    ------
    InputError
        What :func:`read_aoi` would refuse about the file itself (not its overlap with a raster).
    """
    _read_polygons(os.fspath(path))


def aoi_lonlat(path: str | os.PathLike) -> dict:
    """The AOI's polygons as one GeoJSON geometry in EPSG:4326 (longitude, latitude): a STAC search's ``intersects``.

    Raises
    ------
    InputError
        What :func:`check_aoi` refuses.
    """
    import shapely

    path = os.fspath(path)
    geoms = _reprojected(_read_polygons(path), "EPSG:4326", "longitude/latitude (EPSG:4326)", path)
    return shapely.geometry.mapping(shapely.union_all(geoms))


def _reprojected(gdf: Any, crs: Any, where: str, path: str) -> Any:
    """The AOI's polygons repaired and reprojected to ``crs`` (``where``: how messages name it), as an array.

    Edges are densified before reprojecting so long straight edges follow the curvature they
    have in ``crs`` (a lon/lat box edge is not straight in UTM); rings are repaired before that
    (densifying a self-intersecting ring, a bow-tie, before ``make_valid`` loses one of its
    lobes) and again after (reprojection can fold rings).
    """
    import geopandas as gpd
    import numpy as np
    import shapely

    src = shapely.make_valid(gdf.geometry.values)
    minx, miny, maxx, maxy = gdf.total_bounds
    step = max(maxx - minx, maxy - miny) / 256
    if step > 0:
        src = shapely.segmentize(src, step)
    try:
        moved = gpd.GeoSeries(src, crs=gdf.crs).to_crs(crs).values
    except Exception as exc:  # pyproj errors for CRSs it cannot relate
        reason = " ".join(str(exc).split())[:200]
        raise InputError(f"{path}: the AOI cannot be reprojected to {where} ({reason})") from None
    if not np.isfinite(shapely.get_coordinates(moved)).all():
        raise InputError(
            f"{path}: the AOI reaches places {where} cannot show (coordinates become infinite); clip the AOI to the raster's area"
        )
    return shapely.make_valid(moved)


def read_aoi(path: str | os.PathLike, geobox: GeoBox) -> AOI:
    """Read an AOI from any vector file (any CRS) and find its window on ``geobox``.

    Parameters
    ----------
    path : str or os.PathLike
        GeoPackage, GeoJSON, Shapefile, FlatGeobuf, ... (anything pyogrio reads).
    geobox : GeoBox
        The raster grid; the AOI is reprojected to its CRS (``always_xy``).

    Returns
    -------
    AOI
        Polygons in the raster CRS and the pixel window covering them, clipped to the
        raster.

    Raises
    ------
    InputError
        Unreadable file, no polygons, no CRS on either side, or no overlap with the raster.
    """
    path = os.fspath(path)
    gdf = _read_polygons(path)
    if geobox.crs is None:
        raise InputError(f"{path}: the raster has no CRS, so a geographic AOI cannot be placed on it")
    import shapely

    geoms = _reprojected(gdf, geobox.crs, f"the raster's CRS {geobox.crs}", path)
    union = shapely.union_all(geoms)
    if union.is_empty:
        raise InputError(f"{path}: the AOI polygons are empty after reprojection")
    inv = ~geobox.transform
    minx, miny, maxx, maxy = union.bounds
    corners = [inv @ (x, y) for x in (minx, maxx) for y in (miny, maxy)]
    c0 = max(0, math.floor(min(c for c, _ in corners)))
    c1 = min(geobox.width, math.ceil(max(c for c, _ in corners)))
    r0 = max(0, math.floor(min(r for _, r in corners)))
    r1 = min(geobox.height, math.ceil(max(r for _, r in corners)))
    if c1 <= c0 or r1 <= r0:
        raise InputError(
            f"{path}: the AOI does not overlap the raster (bounds {geobox.bounds} in {geobox.crs}); check the AOI and its CRS"
        )
    return AOI(path, tuple(shapely.to_wkb(g) for g in geoms), Window(r0, c0, r1 - r0, c1 - c0))
