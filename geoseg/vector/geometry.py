"""Georeferencing, reprojection and measurements of polygons.

Areas and lengths are always taken in a metric CRS: the raster's own when it is a projected
CRS in metres other than a Mercator variant, else the UTM zone of the data (from pyproj's
database), so EPSG:4326 and Web Mercator inputs still get true metres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import shapely

__all__ = [
    "metric_crs",
    "object_kind",
    "oriented_box",
    "pixel_to_world",
    "regularize",
    "reproject",
]

#: shape attributes per kind of class
KINDS = ("area", "building", "ship", "tank", "object")


def object_kind(name: str) -> str:
    """Kind of a class from its name: which shape attributes its polygons get.

    ``tank`` (fitted circle), ``ship`` (oriented rectangle), ``building`` (optional
    regularised footprint), ``object`` (other countable things: oriented rectangle), or
    ``area`` (land cover and change: hectares).
    """
    n = name.lower()
    if "tank" in n:
        return "tank"
    if any(k in n for k in ("ship", "boat", "vessel")):
        return "ship"
    if "building" in n or "roof" in n:
        return "building"
    if any(k in n for k in ("car", "vehicle", "plane", "aircraft", "object", "tree_crown")):
        return "object"
    return "area"


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


def _is_metric(crs) -> bool:
    if not crs.is_projected:
        return False
    unit = crs.axis_info[0].unit_name if crs.axis_info else ""
    if unit not in ("metre", "meter"):
        return False
    method = (crs.coordinate_operation.method_name if crs.coordinate_operation else "").lower()
    return "mercator" not in method or "transverse" in method


def metric_crs(crs: str, bounds: tuple[float, float, float, float]) -> str:
    """A CRS in which areas and lengths of data at ``bounds`` (in ``crs``) are true metres.

    Parameters
    ----------
    crs : str
        The data's CRS.
    bounds : tuple of float
        ``(xmin, ymin, xmax, ymax)`` of the data in ``crs``.

    Returns
    -------
    str
        ``crs`` itself when it is a projected CRS in metres (not Mercator), else the WGS 84
        UTM zone at the centre of ``bounds`` (``EPSG:326xx``/``EPSG:327xx``).
    """
    from pyproj import CRS
    from pyproj.aoi import AreaOfInterest
    from pyproj.database import query_utm_crs_info

    c = CRS.from_user_input(crs)
    if _is_metric(c):
        return crs
    lon, lat = _transformer(crs, "EPSG:4326").transform((bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2)
    infos = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat))
    if not infos:
        return "EPSG:6933"  # equal-area fallback (near the poles)
    return f"{infos[0].auth_name}:{infos[0].code}"


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
