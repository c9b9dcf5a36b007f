"""Pure pixel and georeference maths: windows, grids, tile plans, halos, blend weights.

Nothing here reads a file, imports torch or talks to Dask; every function is a plain
computation on integers and arrays, so it is cheap to test exhaustively. A little over 400
lines, half of them docstrings: the one place windows, grids and chunkings are computed.

Conventions
-----------
* Pixel sizes and offsets are integers counted in pixels (``*_px`` where a name alone
  would be ambiguous); geographic quantities live on :class:`GeoBox` and are in CRS units.
* Windows are half-open: a window covers rows ``row_off .. row_off + height - 1``.
* A :class:`TilePlan` works in the pixel space of the whole raster. Tile input windows may
  reach outside the raster; :func:`reflect_index` says which raster pixel stands in for an
  outside one (mirror at the edge pixel, numpy's ``"reflect"`` mode, never wrapping).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from affine import Affine

from geoseg.errors import InputError

__all__ = [
    "GeoBox",
    "Tile",
    "TilePlan",
    "Window",
    "blend_window_1d",
    "chunk_windows",
    "reflect_index",
    "reflect_window",
    "regular_chunks",
]


@dataclass(frozen=True, order=True)
class Window:
    """A rectangle of pixels: offsets and sizes in pixels, half-open."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def row_stop(self) -> int:
        """First row after the window."""
        return self.row_off + self.height

    @property
    def col_stop(self) -> int:
        """First column after the window."""
        return self.col_off + self.width

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return (self.height, self.width)

    @property
    def empty(self) -> bool:
        """True when the window covers no pixel."""
        return self.height <= 0 or self.width <= 0

    def slices(self, origin: Window | None = None) -> tuple[slice, slice]:
        """Row and column slices of this window, relative to ``origin``'s top-left corner.

        Parameters
        ----------
        origin : Window, optional
            The window an array covers; the slices then index that array.

        Returns
        -------
        tuple of slice
        """
        r0 = self.row_off - (origin.row_off if origin else 0)
        c0 = self.col_off - (origin.col_off if origin else 0)
        return slice(r0, r0 + self.height), slice(c0, c0 + self.width)

    def intersection(self, other: Window) -> Window:
        """The overlap of two windows (possibly empty, with zero sizes)."""
        r0 = max(self.row_off, other.row_off)
        c0 = max(self.col_off, other.col_off)
        r1 = min(self.row_stop, other.row_stop)
        c1 = min(self.col_stop, other.col_stop)
        return Window(r0, c0, max(0, r1 - r0), max(0, c1 - c0))

    def expand(self, px: int) -> Window:
        """The window grown by ``px`` pixels on every side."""
        return Window(self.row_off - px, self.col_off - px, self.height + 2 * px, self.width + 2 * px)

    def contains(self, other: Window) -> bool:
        """True when ``other`` lies entirely inside this window."""
        return (
            other.row_off >= self.row_off
            and other.col_off >= self.col_off
            and other.row_stop <= self.row_stop
            and other.col_stop <= self.col_stop
        )


@dataclass(frozen=True)
class GeoBox:
    """A raster grid: size in pixels, affine geotransform and CRS.

    ``crs`` is kept as a WKT or ``EPSG:n`` string (or ``None`` for plain images) so that the
    value is immutable, hashable and cheap to ship to Dask workers.
    """

    width: int
    height: int
    transform: Affine = field(default_factory=Affine.identity)
    crs: str | None = None

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise InputError(
                f"a grid needs at least one pixel, got {self.width}x{self.height}; check that the raster is not empty"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` in pixels."""
        return (self.height, self.width)

    @property
    def window(self) -> Window:
        """The whole grid as a window."""
        return Window(0, 0, self.height, self.width)

    @property
    def resolution(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units (positive numbers)."""
        t = self.transform
        return (math.hypot(t.a, t.d), math.hypot(t.b, t.e))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` in CRS units (for north-up grids)."""
        corners = ((0, 0), (self.width, 0), (0, self.height), (self.width, self.height))
        xs, ys = zip(*(self.transform @ (c, r) for c, r in corners), strict=True)
        return (min(xs), min(ys), max(xs), max(ys))

    def crop(self, window: Window) -> GeoBox:
        """The grid of a window of this grid (same resolution and CRS, shifted origin).

        Parameters
        ----------
        window : Window
            Must lie inside this grid.

        Returns
        -------
        GeoBox
        """
        if not self.window.contains(window) or window.empty:
            raise InputError(f"window {window} is not inside the {self.width}x{self.height} grid")
        return GeoBox(window.width, window.height, self.transform @ Affine.translation(window.col_off, window.row_off), self.crs)

    def __dask_tokenize__(self) -> tuple:
        return ("geoseg.GeoBox", self.width, self.height, tuple(self.transform), self.crs)


def reflect_index(index: np.ndarray | int, n: int) -> np.ndarray:
    """Map pixel indices that may lie outside ``[0, n)`` onto the raster by mirroring.

    The mirror is at the edge pixel (numpy's and torch's ``"reflect"``): for ``n = 4`` the
    indices ``-2 -1 0 1 2 3 4 5`` map to ``2 1 0 1 2 3 2 1``. It repeats with period
    ``2 (n - 1)`` so any offset is valid; a one-pixel axis maps everything to 0.

    Parameters
    ----------
    index : array_like of int
        Pixel indices, any sign and size.
    n : int
        Length of the axis in pixels.

    Returns
    -------
    numpy.ndarray
        Indices in ``[0, n)``.

    Examples
    --------
    >>> reflect_index(np.arange(-2, 6), 4).tolist()
    [2, 1, 0, 1, 2, 3, 2, 1]
    """
    idx = np.asarray(index, dtype=np.int64)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def reflect_window(window: Window, height: int, width: int) -> tuple[Window, np.ndarray, np.ndarray]:
    """What a read of ``window`` (which may reach past the raster) takes from a ``height`` x ``width`` raster.

    Returns
    -------
    span : Window
        The smallest window inside the raster holding every pixel needed.
    rows, cols : numpy.ndarray
        For each row and column of ``window``, the row and column of ``span`` that stands in
        for it (:func:`reflect_index`, relative to ``span``): ``data[:, rows[:, None], cols]``
        of the span's pixels is the window, mirrored past the edges.
    """
    rows = reflect_index(np.arange(window.row_off, window.row_stop), height)
    cols = reflect_index(np.arange(window.col_off, window.col_stop), width)
    r0, c0 = int(rows.min()), int(cols.min())
    span = Window(r0, c0, int(rows.max()) + 1 - r0, int(cols.max()) + 1 - c0)
    return span, rows - r0, cols - c0


def blend_window_1d(size: int, halo: int) -> np.ndarray:
    """Cosine-ramped weights along one tile axis for ``blend="cosine"``.

    The first and last ``2 * halo`` pixels ramp with ``sin**2`` and ``cos**2``; the middle is
    one. Two neighbouring tiles of a plan overlap by exactly ``2 * halo`` pixels, where their
    ramps sum to one; every weight is strictly positive, so dividing by the accumulated
    weight is always defined (raster edges included).

    Parameters
    ----------
    size : int
        Tile input size in pixels.
    halo : int
        Halo in pixels.

    Returns
    -------
    numpy.ndarray
        float32 weights of length ``size``.
    """
    w = np.ones(size, dtype=np.float64)
    ramp = min(2 * halo, size // 2)
    if ramp > 0:
        theta = np.pi * (np.arange(ramp) + 0.5) / (2 * ramp)
        up = np.sin(theta) ** 2
        w[:ramp] = up
        w[size - ramp :] = np.minimum(w[size - ramp :], up[::-1])
    return w.astype(np.float32)


@dataclass(frozen=True)
class Tile:
    """One model input: the ``core`` pixels it decides and the ``input`` window it sees.

    ``input`` is ``core`` grown by the halo (and, at a ragged edge, rounded up to the
    model's size multiple); it may extend past the raster, where pixels are mirrored.
    """

    core: Window
    input: Window


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class TilePlan:
    """How a region of a raster is cut into Dask chunks and model tiles.

    Tiles sit on a regular grid anchored at the region's top-left pixel with a step of
    ``core = tile - 2 * halo`` pixels; each tile decides its core and sees ``halo`` pixels of
    context on every side. Chunks (one Dask task each) are whole multiples of the core, so
    every tile belongs to exactly one chunk and a chunk's tiles need one read.

    Parameters
    ----------
    raster_height, raster_width : int
        Size of the whole raster in pixels (edges beyond it are mirrored).
    region : Window
        Part of the raster to segment (the whole raster, or an AOI's window).
    tile : int
        Model input size in pixels.
    halo : int
        Context pixels at each tile edge; ``tile > 2 * halo`` is required.
    chunk : int
        Requested pixels per chunk side; rounded to a whole number of cores (at least one).
    size_multiple : int
        Edge tiles that need less than ``tile`` pixels are shrunk to a multiple of this.
    fixed_size : bool
        When True (models with a fixed input shape) every tile is ``tile`` pixels.
    """

    raster_height: int
    raster_width: int
    region: Window
    tile: int = 512
    halo: int = 32
    chunk: int = 2048
    size_multiple: int = 32
    fixed_size: bool = False

    def __post_init__(self) -> None:
        if self.tile < 1 or self.halo < 0:
            raise InputError(f"tile must be >= 1 and halo >= 0 pixels, got tile={self.tile}, halo={self.halo}")
        if self.tile <= 2 * self.halo:
            raise InputError(
                f"tile ({self.tile} px) must be larger than twice the halo ({self.halo} px); raise tile= or lower halo="
            )
        if self.size_multiple < 1:
            raise InputError(f"size_multiple must be >= 1, got {self.size_multiple}")
        whole = Window(0, 0, self.raster_height, self.raster_width)
        if self.region.empty or not whole.contains(self.region):
            raise InputError(
                f"region {self.region} is not a non-empty part of the {self.raster_width}x{self.raster_height} raster"
            )

    @property
    def core(self) -> int:
        """Pixels each tile decides along one axis: ``tile - 2 * halo``."""
        return self.tile - 2 * self.halo

    @property
    def chunk_px(self) -> int:
        """Chunk side in pixels: ``chunk`` rounded to a whole number of cores, and at least
        the halo (so a tile's halo reaches no further than the neighbouring chunk).
        """
        return max(1, round(self.chunk / self.core), -(-self.halo // self.core)) * self.core

    @cached_property
    def _chunk_edges(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        def edges(off: int, length: int) -> tuple[int, ...]:
            return (*range(off, off + length, self.chunk_px), off + length)

        return edges(self.region.row_off, self.region.height), edges(self.region.col_off, self.region.width)

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Chunk sizes along rows and columns, in Dask's ``chunks`` format."""
        rows, cols = self._chunk_edges
        return tuple(np.diff(rows).tolist()), tuple(np.diff(cols).tolist())

    @property
    def shape(self) -> tuple[int, int]:
        """Number of chunks ``(rows, cols)``."""
        rows, cols = self._chunk_edges
        return (len(rows) - 1, len(cols) - 1)

    def chunk_window(self, i: int, j: int) -> Window:
        """Window of chunk ``(i, j)`` in raster pixel coordinates."""
        rows, cols = self._chunk_edges
        return Window(rows[i], cols[j], rows[i + 1] - rows[i], cols[j + 1] - cols[j])

    def iter_chunks(self) -> Iterator[tuple[int, int]]:
        """All chunk indices, row by row."""
        ny, nx = self.shape
        for i in range(ny):
            for j in range(nx):
                yield i, j

    def _axis_tiles(self, start: int, length: int) -> list[tuple[int, int, int, int]]:
        """``(core_start, core_len, input_start, input_len)`` along one axis of a chunk."""
        out = []
        for s in range(start, start + length, self.core):
            core_len = min(self.core, start + length - s)
            if self.fixed_size or core_len == self.core:
                size = self.tile
            else:
                size = min(self.tile, _ceil_to(core_len + 2 * self.halo, self.size_multiple))
            out.append((s, core_len, s - self.halo, size))
        return out

    def tiles(self, i: int, j: int) -> list[Tile]:
        """The tiles of chunk ``(i, j)``, row by row."""
        w = self.chunk_window(i, j)
        rows = self._axis_tiles(w.row_off, w.height)
        cols = self._axis_tiles(w.col_off, w.width)
        return [
            Tile(Window(rs, cs, rl, cl), Window(ris, cis, rsz, csz)) for rs, rl, ris, rsz in rows for cs, cl, cis, csz in cols
        ]

    def input_window(self, i: int, j: int) -> Window:
        """Bounding window of all tile inputs of chunk ``(i, j)`` (may pass the raster edge)."""
        ts = self.tiles(i, j)
        r0 = min(t.input.row_off for t in ts)
        c0 = min(t.input.col_off for t in ts)
        r1 = max(t.input.row_stop for t in ts)
        c1 = max(t.input.col_stop for t in ts)
        return Window(r0, c0, r1 - r0, c1 - c0)

    def accumulator_window(self, i: int, j: int) -> Window:
        """Pixels chunk ``(i, j)``'s tiles contribute to under cosine blending: the chunk
        grown by the halo, clipped to the region.
        """
        return self.chunk_window(i, j).expand(self.halo).intersection(self.region)

    def neighbours(self, i: int, j: int) -> list[tuple[int, int]]:
        """Chunk ``(i, j)`` and the chunks around it (the 3x3 block, clipped to the plan)."""
        ny, nx = self.shape
        return [(a, b) for a in range(max(0, i - 1), min(ny, i + 2)) for b in range(max(0, j - 1), min(nx, j + 2))]

    def n_tiles(self) -> int:
        """Number of model tiles in the whole plan."""
        ny, nx = self.shape
        rows = sum(len(self._axis_tiles(self.chunk_window(i, 0).row_off, self.chunk_window(i, 0).height)) for i in range(ny))
        cols = sum(len(self._axis_tiles(self.chunk_window(0, j).col_off, self.chunk_window(0, j).width)) for j in range(nx))
        return rows * cols


def regular_chunks(height: int, width: int, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A 2-D chunking (Dask's ``chunks``) of ``step``-pixel blocks, the last row and column ragged.

    Parameters
    ----------
    height, width : int
        Raster size.
    step : int
        Block size.

    Returns
    -------
    tuple of (tuple of int, tuple of int)
        Block heights, then block widths.
    """

    def axis(n: int) -> tuple[int, ...]:
        return (step,) * (n // step) + ((n % step,) if n % step else ())

    return axis(height), axis(width)


def chunk_windows(chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> list[list[Window]]:
    """The window of every block of a 2-D chunking (Dask's ``chunks``), row by row.

    Parameters
    ----------
    chunks : tuple of (tuple of int, tuple of int)
        Block heights, then block widths.

    Returns
    -------
    list of list of Window
        ``windows[i][j]`` is block ``(i, j)``.
    """
    rows = np.concatenate([[0], np.cumsum(chunks[0])])
    cols = np.concatenate([[0], np.cumsum(chunks[1])])
    return [
        [Window(int(rows[i]), int(cols[j]), int(chunks[0][i]), int(chunks[1][j])) for j in range(len(chunks[1]))]
        for i in range(len(chunks[0]))
    ]
