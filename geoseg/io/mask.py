"""Class masks as inputs: what a mask file says about its classes, and windowed reads of it.

A class mask is a single-band uint8 raster (255 = nodata). Its classes come, in order of
preference, from the ``GEOSEG_CLASSES`` metadata geoseg writes into every ``mask.tif``, a
``run.json`` beside it, or its colour table; otherwise they are ``class_<value>``.
A ``probabilities.tif`` (one band per class, named by class) may accompany it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from geoseg.classes import NODATA
from geoseg.errors import InputError, RasterReadError, warn_not_georeferenced
from geoseg.grid import GeoBox, Window
from geoseg.io.files import check_declared_size, dataset_files
from geoseg.io.gdal import quiet_rasterio_georeference
from geoseg.io.outdir import atomic_path, fsync_replace

__all__ = [
    "CLASSES_TAG",
    "OBJECTS_TAG",
    "PNG_MAX_PIXELS",
    "MaskClass",
    "MaskSource",
    "mask_reader",
    "open_mask",
    "read_mask_window",
    "read_prob_window",
    "write_mask_png",
]

CLASSES_TAG = "GEOSEG_CLASSES"
#: the model's object rules (``min_area_m2``, ``max_length_m``: JSON), applied by vectorize and evaluate
OBJECTS_TAG = "GEOSEG_OBJECTS"
#: Plain images up to this many pixels also get their mask as a PNG (larger ones: the tiled TIFF only).
PNG_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class MaskClass:
    """A class value in a mask, with its name, RGB colour (None when unknown) and the card's kind (or None)."""

    id: int
    name: str
    color: tuple[int, int, int] | None
    kind: str | None = None


@dataclass(frozen=True)
class MaskSource:
    """A class mask (and optional probabilities) described by path.

    Parameters
    ----------
    path : str
        The mask raster.
    geobox : GeoBox
        Its grid (``crs`` None for pixel-space images).
    classes : tuple of MaskClass
        Known classes (may be empty: values are then discovered while reading).
    prob_path : str or None
        Probabilities raster on the same grid.
    prob_bands : tuple of (int, int)
        ``(class value, 0-based band index)`` pairs.
    prob_scale : float
        Factor to bring probability values to [0, 1] (1/255 for uint8).
    block : int
        The mask's internal block size (chunks are aligned to it).
    fingerprint : str
        Size and modification time of the mask.
    class_source : str
        Where ``classes`` came from: ``tag``, ``run.json``, ``colormap`` or ``none``.
    object_rules : tuple of (str, float)
        The model's rules from :data:`OBJECTS_TAG`: object rules (``min_area_m2``,
        ``max_length_m``) and the area classes' minimum mapping unit (``mmu_px``).
    """

    path: str
    geobox: GeoBox
    classes: tuple[MaskClass, ...]
    prob_path: str | None = None
    prob_bands: tuple[tuple[int, int], ...] = ()
    prob_scale: float = 1.0
    block: int = 512
    fingerprint: str = ""
    class_source: str = "none"
    object_rules: tuple[tuple[str, float], ...] = ()

    @property
    def named(self) -> bool:
        """Whether the file lists its classes (geoseg metadata or run.json), not just colours."""
        return self.class_source in ("tag", "run.json")


def _parse_classes(items: list) -> tuple[MaskClass, ...]:
    return tuple(
        MaskClass(int(c["id"]), str(c["name"]), tuple(c["color"]) if c.get("color") else None, c.get("kind") or None)
        for c in items
    )


def _classes_from(ds, path: str) -> tuple[tuple[MaskClass, ...], str]:
    tag = ds.tags().get(CLASSES_TAG)
    if tag:
        try:
            return _parse_classes(json.loads(tag)), "tag"
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: its {CLASSES_TAG} metadata is not a JSON class list ({exc}); rewrite the mask") from exc
    run = os.path.join(os.path.dirname(path), "run.json")
    if os.path.exists(run):
        try:
            with open(run) as f:
                found = _parse_classes(json.load(f).get("model", {}).get("classes") or [])
            if found:
                return found, "run.json"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # a foreign or damaged run.json: fall through to the colour table
    try:
        cmap = ds.colormap(1)
    except ValueError:
        return (), "none"
    # a colour table has 256 entries whatever the classes: colours only, no class list
    return tuple(MaskClass(k, f"class_{k}", tuple(rgba[:3])) for k, rgba in sorted(cmap.items()) if k != NODATA), "colormap"


def open_mask(path: str, probabilities: str | None = None) -> MaskSource:
    """Describe a class mask (and its probabilities) for vectorisation.

    Parameters
    ----------
    path : str
        Single-band uint8 mask.
    probabilities : str, optional
        Probabilities raster on the same grid; bands are matched to classes by band
        description (class name), else by position when the band count equals the class count.

    Returns
    -------
    MaskSource
    """
    import rasterio
    import rasterio.errors

    if not os.path.exists(path) and not path.startswith("/vsi"):
        raise RasterReadError(f"{path}: no such file; give the mask.tif that geoseg predict wrote")
    try:
        quiet_rasterio_georeference()
        ds = rasterio.open(path)
        with ds:
            if ds.count != 1 or ds.dtypes[0] != "uint8":
                raise InputError(
                    f"{path}: a class mask must be one uint8 band (this has {ds.count} band(s) of {ds.dtypes[0]}); "
                    "give the mask.tif that geoseg predict wrote"
                )
            crs = ds.crs.to_wkt() if ds.crs is not None else None
            if ds.crs is not None and ds.crs.to_epsg() is not None:
                crs = f"EPSG:{ds.crs.to_epsg()}"
            check_declared_size(path, ds, dataset_files(path))  # a forged 10^6 x 10^6 header: refused before planning
            geobox = GeoBox(ds.width, ds.height, ds.transform, crs)
            block = ds.block_shapes[0][0] if ds.block_shapes else 512
            classes, class_source = _classes_from(ds, path)
            object_rules = _rules_from(ds.tags().get(OBJECTS_TAG))
            st = os.stat(path) if os.path.exists(path) else None
            if crs is None:
                warn_not_georeferenced(path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(f"{path}: not a readable raster ({exc}); check the file") from exc
    prob_bands: tuple[tuple[int, int], ...] = ()
    scale = 1.0
    if probabilities:
        try:
            with rasterio.open(probabilities) as ps:
                if (ps.width, ps.height) != (geobox.width, geobox.height) or not ps.transform.almost_equals(geobox.transform):
                    raise InputError(f"{probabilities}: not on the grid of {path}; give the probabilities written with this mask")
                desc = [d or "" for d in ps.descriptions]
                by_name = {d: i for i, d in enumerate(desc) if d}
                pairs = [(c.id, by_name[c.name]) for c in classes if c.name in by_name]
                if not pairs and len(classes) == ps.count:
                    pairs = [(c.id, i) for i, c in enumerate(sorted(classes, key=lambda c: c.id))]
                prob_bands = tuple(pairs)
                scale = 1.0 / 255.0 if ps.dtypes[0] == "uint8" else 1.0
        except rasterio.errors.RasterioIOError as exc:
            raise RasterReadError(f"{probabilities}: not a readable raster ({exc}); check the file") from exc
    return MaskSource(
        path=os.path.abspath(path) if os.path.exists(path) else path,
        geobox=geobox,
        classes=classes,
        prob_path=os.path.abspath(probabilities) if probabilities else None,
        prob_bands=prob_bands,
        prob_scale=scale,
        block=int(block),
        fingerprint=f"{st.st_size}-{st.st_mtime_ns}" if st else "",
        class_source=class_source,
        object_rules=object_rules,
    )


def _rules_from(tag: str | None) -> tuple[tuple[str, float], ...]:
    """The object rules of a mask's :data:`OBJECTS_TAG` (unknown keys and bad values ignored)."""
    if not tag:
        return ()
    try:
        d = json.loads(tag)
    except ValueError:
        return ()
    out = []
    for key in ("min_area_m2", "max_length_m", "mmu_px"):
        v = d.get(key) if isinstance(d, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v >= 0:
            out.append((key, float(v)))
    return tuple(out)


@contextlib.contextmanager
def mask_reader(source: MaskSource) -> Iterator[Callable[[Window], np.ndarray]]:
    """Keep the mask open for many window reads (inside one task): yields ``read(window) -> array``.

    Pixels masked in the file become 255, as in :func:`read_mask_window`.
    """
    import rasterio
    import rasterio.errors
    from rasterio.windows import Window as RioWindow

    quiet_rasterio_georeference()
    try:
        ds = rasterio.open(source.path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(f"{source.path}: cannot open the mask ({exc}); check the file is complete") from exc

    def read(window: Window) -> np.ndarray:
        w = RioWindow(window.col_off, window.row_off, window.width, window.height)
        try:
            data = ds.read(1, window=w)
            if ds.nodata is None or int(ds.nodata) != NODATA:
                valid = ds.read_masks(1, window=w)
                data[valid == 0] = NODATA
        except rasterio.errors.RasterioIOError as exc:
            raise RasterReadError(f"{source.path}: reading window {window} failed ({exc})") from exc
        return data

    with ds:
        yield read


def read_mask_window(source: MaskSource, window: Window) -> np.ndarray:
    """Read a window of the mask (inside a task); pixels masked in the file become 255."""
    with mask_reader(source) as read:
        return read(window)


def read_prob_window(source: MaskSource, window: Window) -> np.ndarray | None:
    """Probabilities in [0, 1] for a window, ``(bands, h, w)`` float32, NaN where masked."""
    if not source.prob_path:
        return None
    import rasterio
    from rasterio.windows import Window as RioWindow

    w = RioWindow(window.col_off, window.row_off, window.width, window.height)
    try:
        with rasterio.open(source.prob_path) as ds:
            data = ds.read(window=w, masked=True)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterReadError(f"{source.prob_path}: reading window {window} failed ({exc})") from exc
    out = data.astype(np.float32).filled(np.nan) * np.float32(source.prob_scale)
    return out


def write_mask_png(mask_tif: str, png: str, colors: dict[int, tuple[int, int, int]] | None = None) -> None:
    """Write a class mask as an indexed PNG of the same size: pixel values are the class ids.

    The palette carries the class colours (nodata 255 is transparent), so the PNG shows the
    classes in any viewer and reads back as class ids (``PIL.Image.open(png)`` in mode ``P``,
    or any reader that returns palette indices).

    Parameters
    ----------
    mask_tif : str
        The class mask (single band, uint8).
    png : str
        PNG to write (written to a temporary name, then renamed).
    colors : dict, optional
        RGB per class id; default grey levels.
    """
    import rasterio
    from PIL import Image

    quiet_rasterio_georeference()
    with rasterio.open(mask_tif) as ds:
        if ds.width * ds.height > PNG_MAX_PIXELS:
            raise InputError(f"{mask_tif}: {ds.width}x{ds.height} is too large for a PNG mask; use the tiled TIFF")
        data = ds.read(1)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:, :] = np.arange(256, dtype=np.uint8)[:, None]
    for k, rgb in (colors or {}).items():
        if 0 <= int(k) < NODATA:
            palette[int(k)] = rgb[:3]
    palette[NODATA] = (0, 0, 0)
    img = Image.frombytes("P", (data.shape[1], data.shape[0]), np.ascontiguousarray(data).tobytes())
    img.putpalette(palette.ravel().tolist())

    tmp = atomic_path(png)
    try:
        img.save(tmp, format="PNG", transparency=NODATA, optimize=False)
        fsync_replace(tmp, png)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
