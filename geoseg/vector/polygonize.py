"""Class masks to polygons, one block at a time, and the exact merge of pieces cut at block seams.

Everything here works in *pixel coordinates of the whole raster* (x = column, y = row, pixel
corners on integers), so every vertex is an exact small integer, unions across seams are exact,
and the georeference is applied once at the end. Polygons are GDAL's (``rasterio.features.shapes``):
the merged result equals polygonising the whole raster at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

from geoseg.classes import NODATA
from geoseg.io.gdal import quiet_rasterio_georeference

__all__ = ["Pieces", "merge_seams", "polygonize_block"]


@dataclass
class Pieces:
    """Polygons with their pixel statistics, as parallel columns.

    Attributes
    ----------
    geometry : numpy.ndarray
        Shapely (Multi)Polygons in raster pixel coordinates.
    class_id : numpy.ndarray
        Class value of each polygon.
    count : numpy.ndarray
        Pixels in each polygon (its exact area in pixels).
    prob_sum : numpy.ndarray
        Sum of the polygon's class probability over its pixels (NaN without probabilities).
    first : numpy.ndarray
        Linear index ``row * width + col`` of the polygon's first pixel in raster order:
        unique, and independent of the chunking, so it serves as a stable feature id.
    seam : numpy.ndarray
        True where the polygon touches a chunk edge inside the raster (it may continue there).
    chunk : numpy.ndarray
        Index of the chunk the piece came from (-1 once merged).
    """

    geometry: np.ndarray
    class_id: np.ndarray
    count: np.ndarray
    prob_sum: np.ndarray
    first: np.ndarray
    seam: np.ndarray
    chunk: np.ndarray

    def __len__(self) -> int:
        return len(self.geometry)

    def take(self, idx: np.ndarray) -> Pieces:
        """The pieces at ``idx`` (an index or boolean array)."""
        return Pieces(**{k: getattr(self, k)[idx] for k in self.__dataclass_fields__})

    @staticmethod
    def concat(parts: list[Pieces]) -> Pieces:
        """All pieces of ``parts``, in order."""
        if not parts:
            return Pieces.empty()
        return Pieces(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in Pieces.__dataclass_fields__})

    @staticmethod
    def empty() -> Pieces:
        """No pieces."""
        return Pieces(
            geometry=np.empty(0, dtype=object),
            class_id=np.empty(0, np.uint8),
            count=np.empty(0, np.int64),
            prob_sum=np.empty(0, np.float64),
            first=np.empty(0, np.int64),
            seam=np.empty(0, bool),
            chunk=np.empty(0, np.int32),
        )

    def to_wire(self) -> dict[str, np.ndarray]:
        """A picklable form (geometry as WKB) for sending between processes."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "geometry"}
        out["geometry"] = shapely.to_wkb(self.geometry)
        return out

    @staticmethod
    def from_wire(d: dict[str, np.ndarray]) -> Pieces:
        """Inverse of :meth:`to_wire`."""
        return Pieces(**{**d, "geometry": shapely.from_wkb(d["geometry"])})


def _structure(connectivity: int) -> np.ndarray:
    if connectivity == 4:
        return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    if connectivity == 8:
        return np.ones((3, 3), bool)
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def _shapes_to_geometries(shapes) -> tuple[np.ndarray, np.ndarray]:
    """GeoJSON-like polygons from ``rasterio.features.shapes`` as one vectorised shapely build."""
    coords: list = []
    ring_len: list[int] = []
    ring_poly: list[int] = []
    values: list[float] = []
    for i, (geom, value) in enumerate(shapes):
        values.append(value)
        for ring in geom["coordinates"]:
            coords.extend(ring)
            ring_len.append(len(ring))
            ring_poly.append(i)
    if not values:
        return np.empty(0, dtype=object), np.empty(0, np.int64)
    rings = shapely.linearrings(np.asarray(coords, dtype=np.float64), indices=np.repeat(np.arange(len(ring_len)), ring_len))
    polys = shapely.polygons(rings, indices=np.asarray(ring_poly))
    return polys, np.asarray(values).astype(np.int64)


def make_valid(geoms: np.ndarray) -> np.ndarray:
    """Repair invalid polygons, keeping only polygonal parts.

    GDAL's polygons can self-touch (always with 8-connectivity; with 4-connectivity where a
    hole meets the outline at a corner); the ``structure`` method rebuilds them as valid
    (Multi)Polygons covering exactly the same pixels.
    """
    bad = ~shapely.is_valid(geoms)
    if bad.any():
        geoms = geoms.copy()
        geoms[bad] = shapely.make_valid(geoms[bad], method="structure", keep_collapsed=False)
    return geoms


def polygonize_block(
    block: np.ndarray,
    row_off: int,
    col_off: int,
    raster_shape: tuple[int, int],
    *,
    classes: set[int] | None = None,
    connectivity: int = 4,
    prob: np.ndarray | None = None,
    prob_band: dict[int, int] | None = None,
    simplify: float = 0.0,
    chunk: int = 0,
) -> Pieces:
    """Polygonise one block of a class mask.

    Parameters
    ----------
    block : numpy.ndarray
        ``(height, width)`` uint8 class values; 255 is nodata.
    row_off, col_off : int
        Position of the block in the raster.
    raster_shape : tuple of int
        ``(height, width)`` of the whole raster (for seams and stable ids).
    classes : set of int, optional
        Class values to return (default: every value but nodata).
    connectivity : int
        4 (GDAL's default: pixels joined through edges) or 8 (also through corners).
    prob : numpy.ndarray, optional
        ``(bands, height, width)`` probabilities in [0, 1]; NaN where unknown.
    prob_band : dict, optional
        Class value -> band index in ``prob``.
    simplify : float
        Tolerance in pixels. Simplification runs on the block's whole coverage (every class)
        with its outline (block edges and nodata edges) fixed, so neighbouring polygons keep sharing
        their edges exactly and the pieces still join exactly across seams.
    chunk : int
        Chunk index stored with the pieces.

    Returns
    -------
    Pieces
    """
    h, w = block.shape
    wanted, todo = _classes_to_trace(block, classes, simplify)
    if not wanted:
        return Pieces.empty()
    labels, label_class = _label_regions(block, todo, connectivity)
    geoms, values = _trace_regions(labels, row_off, col_off, connectivity, simplify)
    count, first_local, prob_sum = _region_stats(labels, block, len(label_class), prob, prob_band)

    cls = label_class[values]
    keep = np.isin(cls, wanted)
    geoms, values, cls = geoms[keep], values[keep], cls[keep]
    fl = first_local[values]
    first = (fl // w + row_off) * raster_shape[1] + (fl % w + col_off)
    return Pieces(
        geometry=geoms,
        class_id=cls,
        count=count[values].astype(np.int64),
        prob_sum=prob_sum[values],
        first=first.astype(np.int64),
        seam=_touches_seam(geoms, row_off, col_off, (h, w), raster_shape),
        chunk=np.full(len(geoms), chunk, np.int32),
    )


def _classes_to_trace(block: np.ndarray, classes: set[int] | None, simplify: float) -> tuple[list[int], list[int]]:
    """The block's classes to return, and those to trace (every class when simplifying)."""
    present = [int(v) for v in np.unique(block)]
    wanted = [v for v in present if v != NODATA and (classes is None or v in classes)]
    # simplification needs every class of the block as one coverage; nodata stays outside it, so
    # edges against nodata are coverage boundary and stay fixed (classes never grow into nodata)
    todo = [v for v in present if v != NODATA] if simplify > 0 else wanted
    return wanted, todo


def _label_regions(block: np.ndarray, todo: list[int], connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Connected regions of the ``todo`` classes as one label image (0: not traced), and each label's class."""
    from scipy import ndimage

    structure = _structure(connectivity)
    labels = np.zeros(block.shape, np.int32)
    label_class = [NODATA]  # label 0: not polygonised
    for v in todo:
        lab, n = ndimage.label(block == v, structure=structure)
        sel = lab > 0
        labels[sel] = lab[sel] + (len(label_class) - 1)
        label_class += [v] * n
    return labels, np.asarray(label_class, np.uint8)


def _trace_regions(
    labels: np.ndarray, row_off: int, col_off: int, connectivity: int, simplify: float
) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's polygons of the labelled regions in raster pixel coordinates (valid, simplified), and their labels."""
    from rasterio import features
    from rasterio.transform import Affine

    transform = Affine(1.0, 0.0, float(col_off), 0.0, 1.0, float(row_off))
    quiet_rasterio_georeference()  # rasterio's in-memory copy of the array has no georeference
    geoms, values = _shapes_to_geometries(
        features.shapes(labels, mask=labels > 0, connectivity=connectivity, transform=transform)
    )
    geoms = make_valid(geoms)
    if simplify > 0 and len(geoms):
        geoms = shapely.coverage_simplify(geoms, simplify, simplify_boundary=False)
    return geoms, values


def _region_stats(
    labels: np.ndarray, block: np.ndarray, n_labels: int, prob: np.ndarray | None, prob_band: dict[int, int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label: pixel count, first pixel (linear index in the block) and probability sum (NaN when unknown)."""
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n_labels)
    first_local = np.full(n_labels, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first_local, flat, np.arange(flat.size, dtype=np.int64))
    if prob is not None and prob_band:
        prob_sum = _prob_sums(flat, block, count, prob, prob_band)
    else:
        prob_sum = np.full(n_labels, np.nan)
    return count, first_local, prob_sum


def _prob_sums(flat: np.ndarray, block: np.ndarray, count: np.ndarray, prob: np.ndarray, prob_band: dict[int, int]) -> np.ndarray:
    """Sum of each pixel's own-class probability per label; NaN for a label with any unknown probability."""
    band_of = np.full(256, -1, np.int64)
    for v, b in prob_band.items():
        band_of[v] = b
    bands = band_of[block]
    own = np.take_along_axis(prob, np.clip(bands, 0, None)[None], axis=0)[0].astype(np.float64)
    own[bands < 0] = np.nan
    n_labels = len(count)
    prob_sum = np.bincount(flat, weights=np.nan_to_num(own, nan=0.0).ravel(), minlength=n_labels)
    prob_known = np.bincount(flat, weights=np.isfinite(own).astype(np.float64).ravel(), minlength=n_labels)
    prob_sum[prob_known < count] = np.nan  # a polygon with unknown probabilities has no score
    return prob_sum


def _touches_seam(
    geoms: np.ndarray, row_off: int, col_off: int, block_shape: tuple[int, int], raster_shape: tuple[int, int]
) -> np.ndarray:
    """True where a polygon touches a block edge that lies inside the raster (it may continue there)."""
    h, w = block_shape
    height, width = raster_shape
    xmin, ymin, xmax, ymax = shapely.bounds(geoms).T
    return (
        ((xmin == col_off) & (col_off > 0))
        | ((xmax == col_off + w) & (col_off + w < width))
        | ((ymin == row_off) & (row_off > 0))
        | ((ymax == row_off + h) & (row_off + h < height))
    )


def merge_seams(pieces: Pieces, connectivity: int = 4) -> Pieces:
    """Join pieces of one object that chunk seams cut apart.

    Candidate pairs come from an STRtree query; two pieces of the same class from different
    chunks belong together when they share an edge (4-connectivity) or any point
    (8-connectivity). Connected components of that graph (union-find via
    :func:`scipy.sparse.csgraph.connected_components`) are unioned, and their statistics
    summed, so the result equals polygonising the whole raster.

    Parameters
    ----------
    pieces : Pieces
        Seam-touching pieces from all chunks.
    connectivity : int
        4 or 8, as used to polygonise.

    Returns
    -------
    Pieces
        One row per object, ``seam`` False and ``chunk`` -1.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _structure(connectivity)
    n = len(pieces)
    if n == 0:
        return pieces
    g = pieces.geometry
    tree = shapely.STRtree(g)
    i, j = tree.query(g, predicate="intersects")
    keep = (i < j) & (pieces.class_id[i] == pieces.class_id[j]) & (pieces.chunk[i] != pieces.chunk[j])
    i, j = i[keep], j[keep]
    if connectivity == 4 and len(i):
        shared = shapely.length(shapely.intersection(g[i], g[j])) > 0
        i, j = i[shared], j[shared]
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)

    order = np.argsort(comp, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(comp[order]) != 0])
    groups = np.split(order, starts[1:])
    geometry = np.empty(len(groups), dtype=object)
    for k, idx in enumerate(groups):
        geometry[k] = g[idx[0]] if len(idx) == 1 else shapely.union_all(g[idx])
    first_of = np.array([idx[0] for idx in groups])
    comp_sorted = comp[order]
    return Pieces(
        geometry=geometry,
        class_id=pieces.class_id[first_of],
        count=np.add.reduceat(pieces.count[order], starts),
        prob_sum=np.add.reduceat(pieces.prob_sum[order], starts),  # NaN if any piece lacks probabilities
        first=np.minimum.reduceat(pieces.first[order], starts),
        seam=np.zeros(len(groups), bool),
        chunk=np.full(len(groups), -1, np.int32) if len(comp_sorted) else np.empty(0, np.int32),
    )
