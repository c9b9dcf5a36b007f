"""Georeferencing, reprojection and measurements of polygons.

Areas and lengths are always taken in a metric CRS: the raster's own when it is projected in
metres with under 0.5 % scale error over the data, else each polygon's own UTM zone (polar
equal-area beyond them), so
EPSG:4326, Web Mercator or plate carree inputs, even continent-wide, still get true metres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import shapely

__all__ = [
    "LOCAL_UTM",
    "metric_crs",
    "oriented_box",
    "pixel_to_world",
    "regularize",
    "reproject",
    "to_metric",
]


def pixel_to_world(geoms: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """Apply an affine ``(a, b, c, d, e, f)`` to geometries in pixel coordinates (x = column, y = row)."""
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    m = np.array([[a, d], [b, e]])
    off = np.array([c, f])
    return shapely.transform(geoms, lambda xy: xy @ m + off)


@lru_cache(maxsize=32)
def _transformer(src: str, dst: str):
    from pyproj import Transformer

    return Transformer.from_crs(src, dst, always_xy=True)


#: ``metric_crs`` result meaning "the UTM (or UPS) zone of each polygon"
LOCAL_UTM = "local-utm"
#: largest scale error (linear and areal) accepted for measuring in the data's own CRS
MAX_SCALE_ERROR = 0.005


def _scale_ok(crs, bounds: tuple[float, float, float, float]) -> bool:
    """Whether ``crs`` is projected in metres with scale errors below 0.5 % over ``bounds``."""
    from pyproj import Proj

    if not crs.is_projected:
        return False
    unit = crs.axis_info[0].unit_name if crs.axis_info else ""
    if unit not in ("metre", "meter"):
        return False
    xs = np.linspace(bounds[0], bounds[2], 5)
    ys = np.linspace(bounds[1], bounds[3], 5)
    gx, gy = np.meshgrid(xs, ys)
    lon, lat = _transformer(crs.to_wkt(), "EPSG:4326").transform(gx.ravel(), gy.ravel())
    try:
        f = Proj(crs).get_factors(lon, lat)
    except Exception:  # pyproj raises plain errors for points outside the projection's domain
        return False
    scales = np.concatenate([np.asarray(f.areal_scale), np.asarray(f.meridional_scale), np.asarray(f.parallel_scale)])
    return bool(np.all(np.isfinite(scales)) and np.max(np.abs(scales - 1.0)) < MAX_SCALE_ERROR)


def metric_crs(crs: str, bounds: tuple[float, float, float, float]) -> str:
    """Where areas and lengths of data at ``bounds`` (in ``crs``) are measured in true metres.

    Parameters
    ----------
    crs : str
        The data's CRS.
    bounds : tuple of float
        ``(xmin, ymin, xmax, ymax)`` of the data in ``crs``.

    Returns
    -------
    str
        ``crs`` itself when it is projected in metres and its scale error stays below 0.5 %
        over the data (checked with :meth:`pyproj.Proj.get_factors` on a 5x5 grid); else
        :data:`LOCAL_UTM`: each polygon is measured in the WGS 84 UTM zone of its centroid
        (beyond 84 N / 80 S a polar Lambert azimuthal equal-area), where the scale error is
        below 0.1 % (0.2 % in area).
    """
    from pyproj import CRS

    return crs if _scale_ok(CRS.from_user_input(crs), bounds) else LOCAL_UTM


#: polar caps (beyond UTM): Lambert azimuthal equal-area on the pole (UPS has a 0.994 scale there)
_POLAR = {
    1: "+proj=laea +lat_0=90 +lon_0=0 +datum=WGS84 +units=m +no_defs",
    -1: "+proj=laea +lat_0=-90 +lon_0=0 +datum=WGS84 +units=m +no_defs",
}


def _zone_crs(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    zone = (np.floor((np.asarray(lon) + 180.0) / 6.0).astype(int) % 60) + 1
    code = np.where(np.asarray(lat) >= 0, 32600, 32700) + zone
    out = np.array([f"EPSG:{c}" for c in code], dtype=object)
    out[np.asarray(lat) > 84.0] = _POLAR[1]
    out[np.asarray(lat) < -80.0] = _POLAR[-1]
    return out


def to_metric(geoms: np.ndarray, crs: str, mcrs: str) -> tuple[np.ndarray, np.ndarray]:
    """Geometries in metres, and the CRS each one was put in (for the way back).

    Parameters
    ----------
    geoms : numpy.ndarray
        Geometries in ``crs``.
    crs : str
        Their CRS.
    mcrs : str
        From :func:`metric_crs`: a CRS, or :data:`LOCAL_UTM`.

    Returns
    -------
    metric : numpy.ndarray
        The geometries in metres.
    crss : numpy.ndarray
        The CRS of each.
    """
    n = len(geoms)
    if mcrs != LOCAL_UTM:
        return reproject(geoms, crs, mcrs), np.full(n, mcrs, dtype=object)
    out = np.empty(n, dtype=object)
    crss = np.empty(n, dtype=object)
    if n == 0:
        return out, crss
    centres = reproject(shapely.centroid(geoms), crs, "EPSG:4326")
    zones = _zone_crs(shapely.get_x(centres), shapely.get_y(centres))
    for zone in set(zones):
        sel = zones == zone
        out[sel] = reproject(geoms[sel], crs, zone)
        crss[sel] = zone
    return out, crss


def reproject(geoms: np.ndarray, src: str, dst: str, *, densify: float | None = None) -> np.ndarray:
    """Reproject geometries with pyproj (``always_xy``), densifying long edges first.

    Parameters
    ----------
    geoms : numpy.ndarray
        Shapely geometries in ``src``.
    src, dst : str
        CRSs (anything pyproj accepts).
    densify : float, optional
        Longest edge, in ``src`` units, before projecting: straight edges in one CRS are
        curves in another, so long ones get intermediate vertices.

    Returns
    -------
    numpy.ndarray
        Valid geometries in ``dst`` with counter-clockwise exteriors.
    """
    from pyproj import CRS

    if CRS.from_user_input(src) == CRS.from_user_input(dst):
        return geoms
    if densify:
        geoms = shapely.segmentize(geoms, densify)
    tr = _transformer(src, dst)

    def fn(xy: np.ndarray) -> np.ndarray:
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    out = shapely.transform(geoms, fn)
    bad = ~shapely.is_valid(out)
    if bad.any():
        out[bad] = shapely.make_valid(out[bad], method="structure", keep_collapsed=False)
    return shapely.orient_polygons(out)


def oriented_box(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum-area oriented rectangle of each geometry (metric CRS).

    Returns
    -------
    length, width, heading : numpy.ndarray
        Long side and short side in CRS units, and the long axis' bearing in degrees
        clockwise from grid north, in ``[0, 180)``.
    """
    n = len(geoms)
    length = np.full(n, np.nan)
    width = np.full(n, np.nan)
    heading = np.full(n, np.nan)
    if n == 0:
        return length, width, heading
    rects = shapely.oriented_envelope(geoms)
    for k, r in enumerate(rects):
        if shapely.get_type_id(r) != 3:  # degenerate (a line or point)
            continue
        xy = np.asarray(r.exterior.coords)[:4]
        e1, e2 = xy[1] - xy[0], xy[2] - xy[1]
        l1, l2 = math.hypot(*e1), math.hypot(*e2)
        axis = e1 if l1 >= l2 else e2
        length[k], width[k] = max(l1, l2), min(l1, l2)
        heading[k] = math.degrees(math.atan2(axis[0], axis[1])) % 180.0
    return length, width, heading


def _dominant_angle(poly) -> float:
    xy = np.asarray(poly.exterior.coords)
    d = np.diff(xy, axis=0)
    lengths = np.hypot(d[:, 0], d[:, 1])
    ang = np.arctan2(d[:, 1], d[:, 0]) % (math.pi / 2)
    # circular mean with period pi/2, weighted by edge length
    z = np.sum(lengths * np.exp(4j * ang))
    return float(np.angle(z) / 4) % (math.pi / 2)


def regularize(geom, tolerance: float):
    """A building footprint with right angles along its dominant direction.

    The outline is rotated onto its dominant axis (length-weighted circular mean of the
    simplified outline's edge directions modulo 90 degrees), simplified, every edge snapped to horizontal or vertical,
    consecutive vertices rebuilt as the corners of the snapped edges, and rotated back.
    Holes are dropped. Where this would not give a valid polygon close to the original
    (area within 30 %), the oriented minimum rectangle is used if it fits that well, else the
    input is returned unchanged.

    Parameters
    ----------
    geom : shapely.Polygon or shapely.MultiPolygon
        Footprint in a metric CRS (the largest part is used).
    tolerance : float
        Simplification tolerance in CRS units (about one or two pixels).

    Returns
    -------
    shapely.Polygon
    """
    from shapely import affinity

    if geom.geom_type == "MultiPolygon":
        geom = max(geom.geoms, key=lambda p: p.area)
    if geom.is_empty or geom.area == 0:
        return geom
    # pixel outlines are staircases of axis-parallel steps: take directions from a simplified outline
    theta = _dominant_angle(geom.simplify(tolerance, preserve_topology=True))
    origin = geom.centroid
    rot = affinity.rotate(shapely.Polygon(geom.exterior), -theta, origin=origin, use_radians=True)
    simple = rot.simplify(tolerance, preserve_topology=True)
    xy = np.asarray(simple.exterior.coords)[:-1]
    candidate = None
    if len(xy) >= 4:
        d = np.diff(np.vstack([xy, xy[:1]]), axis=0)
        horizontal = np.abs(d[:, 0]) >= np.abs(d[:, 1])
        # each edge becomes a line y = const (horizontal) or x = const (vertical), through its midpoint
        mid = (xy + np.roll(xy, -1, axis=0)) / 2
        # merge runs of edges with the same orientation into one line (length-weighted position)
        lines: list[tuple[bool, float, float]] = []
        for k in range(len(xy)):
            pos = mid[k, 1] if horizontal[k] else mid[k, 0]
            ln = float(np.hypot(*d[k]))
            if lines and lines[-1][0] == horizontal[k]:
                h, p, w = lines[-1]
                lines[-1] = (h, (p * w + pos * ln) / (w + ln) if w + ln else p, w + ln)
            else:
                lines.append((bool(horizontal[k]), float(pos), ln))
        if len(lines) > 1 and lines[0][0] == lines[-1][0]:
            h, p, w = lines.pop()
            h0, p0, w0 = lines[0]
            lines[0] = (h0, (p0 * w0 + p * w) / (w0 + w) if w0 + w else p0, w0 + w)
        if len(lines) >= 4 and len(lines) % 2 == 0:
            corners = []
            for k in range(len(lines)):
                a, b = lines[k - 1], lines[k]
                x = b[1] if not b[0] else a[1]
                y = b[1] if b[0] else a[1]
                corners.append((x, y))
            poly = shapely.Polygon(corners)
            if poly.is_valid and abs(poly.area - rot.area) <= 0.3 * rot.area:
                candidate = poly
    if candidate is None:
        box = shapely.oriented_envelope(geom)
        if box.geom_type == "Polygon" and box.area <= 1.3 * geom.area:
            return shapely.orient_polygons(box)
        return geom
    out = affinity.rotate(candidate, theta, origin=origin, use_radians=True)
    return shapely.orient_polygons(out)
