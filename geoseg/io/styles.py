"""How a class mask and its input imagery look in GIS software: colours, QGIS styles, class names.

* :func:`mask_colormap` is the mask's colour table (background-like classes and nodata
  transparent where the format keeps alpha; a GeoTIFF colour table does not, GDAL reads it
  back opaque, so QGIS takes transparency from ``mask.qml`` and the project);
* :func:`mask_qml` is the mask's QGIS style (paletted, class names as legend, background
  transparent) and :func:`paletted_pipe` the same renderer for a project's layer;
* :func:`mask_aux_xml` names the classes for GDAL: category names and a raster attribute table
  (value, class, red, green, blue, alpha) in GDAL's ``.aux.xml`` (a GeoTIFF cannot hold either
  inside the file; GDAL and QGIS read them from beside it);
* :func:`write_mask_sidecars` / :func:`publish_mask_sidecars` write those two files beside a
  staged mask and move them into the output folder with it;
* :func:`true_colour` and :func:`imagery_pipe`: the input imagery drawn in true colour with a
  2-98 % cumulative cut stretch.

Plain XML only (no QGIS needed); the XML follows what QGIS 3.22 writes and reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from xml.etree import ElementTree as ET

from geoseg.classes import NODATA, is_background
from geoseg.errors import InputError
from geoseg.io.outdir import fsync_replace, write_text_atomic
from geoseg.io.raster import open_source, read_overview
from geoseg.io.remote import is_redacted, remote_env

__all__ = [
    "QGIS_VERSION",
    "QML_DOCTYPE",
    "TrueColour",
    "check_rgb",
    "imagery_pipe",
    "legend_label",
    "mask_aux_xml",
    "mask_colormap",
    "mask_qml",
    "mask_sidecars",
    "paletted_pipe",
    "publish_mask_sidecars",
    "true_colour",
    "write_mask_sidecars",
    "xml_child",
    "xml_text",
]

QGIS_VERSION = "3.22.0-Białowieża"  # the oldest QGIS whose format geoseg's styles follow
QML_DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
#: share of the pixels cut at each end of the imagery's stretch (QGIS's "cumulative count cut")
CUT = (0.02, 0.98)
_GREY = (128, 128, 128)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class MaskClassLike(Protocol):
    """A class of a mask: ``ClassInfo`` (model cards) and ``MaskClass`` (mask files) both fit."""

    id: int
    name: str
    color: tuple[int, int, int] | None


def legend_label(name: str) -> str:
    """A class name as a legend shows it: ``storage_tank`` -> ``Storage tank``."""
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:] if text else name


def xml_text(text: str) -> str:
    """``text`` with every character XML 1.0 cannot hold (NUL, other control characters, lone
    surrogates) replaced by U+FFFD, so names from cards and file names always give valid XML.
    """
    return _NOT_XML.sub("\ufffd", text)


def xml_child(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    """A sub-element of ``parent`` with ``text`` and attributes, every string made XML-safe."""
    el = ET.SubElement(parent, tag, {k: xml_text(str(v)) for k, v in attrib.items()})
    if text is not None:
        el.text = xml_text(text)
    return el


def check_rgb(color: Sequence[int]) -> tuple[int, int, int]:
    """``color`` as an (r, g, b) tuple of ints; :class:`~geoseg.errors.InputError` when it is not one."""
    if len(color) != 3 or any(not 0 <= int(c) <= 255 for c in color):
        raise InputError(f"colour {color!r} is not an (r, g, b) triple of 0..255 values; give three integers from 0 to 255")
    r, g, b = (int(c) for c in color)
    return r, g, b


def _rgb(color: Sequence[int] | None) -> tuple[int, int, int]:
    return _GREY if color is None else check_rgb(color)


def mask_colormap(classes: Sequence[MaskClassLike]) -> dict[int, tuple[int, int, int, int]] | None:
    """The mask's colour table: class colours, alpha 0 for background classes and nodata (255).

    Parameters
    ----------
    classes : sequence
        The mask's classes (``id``, ``name``, ``color``).

    Returns
    -------
    dict or None
        ``{value: (r, g, b, a)}``; None without classes.
    """
    if not classes:
        return None
    table = {c.id: (*_rgb(c.color), 0 if is_background(c.name) else 255) for c in classes}
    table[NODATA] = (0, 0, 0, 0)
    return table


def paletted_pipe(parent: ET.Element, classes: Sequence[MaskClassLike], *, opacity: float = 1.0) -> ET.Element:
    """A QGIS raster ``pipe`` drawing band 1 with one colour per class under ``parent``.

    Background classes stay in the legend (by name) but are fully transparent; values
    without a class (nodata included) are not drawn. Nearest-neighbour resampling keeps
    class ids from being blended.
    """
    pipe = xml_child(parent, "pipe")
    renderer = xml_child(
        pipe, "rasterrenderer", type="paletted", band="1", opacity=repr(float(opacity)), alphaBand="-1", nodataColor=""
    )
    xml_child(renderer, "rasterTransparency")
    palette = xml_child(renderer, "colorPalette")
    for c in sorted(classes, key=lambda c: c.id):
        r, g, b = _rgb(c.color)
        alpha = "0" if is_background(c.name) else "255"
        xml_child(
            palette,
            "paletteEntry",
            value=str(int(c.id)),
            color=f"#{r:02x}{g:02x}{b:02x}",
            alpha=alpha,
            label=legend_label(c.name),
        )
    xml_child(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    xml_child(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0", colorizeStrength="100")
    xml_child(pipe, "rasterresampler", maxOversampling="2")
    return pipe


def _qml_root() -> ET.Element:
    return ET.Element(
        "qgis",
        {"version": QGIS_VERSION, "styleCategories": "AllStyleCategories", "hasScaleBasedVisibilityFlag": "0",
         "minScale": "1e+08", "maxScale": "0"},
    )  # fmt: skip


def mask_qml(classes: Sequence[MaskClassLike], *, opacity: float = 1.0) -> str:
    """The QGIS style (``.qml``) of a class mask: class names and colours, background transparent.

    QGIS loads ``<mask stem>.qml`` beside a raster as its default style, so the mask
    opened alone shows the class names instead of a 256-entry legend.

    Parameters
    ----------
    classes : sequence
        The mask's classes (``id``, ``name``, ``color``).
    opacity : float
        Layer opacity, 0 to 1.

    Returns
    -------
    str
        The QML document.
    """
    root = _qml_root()
    paletted_pipe(root, classes, opacity=opacity)
    xml_child(root, "blendMode", "0")
    ET.indent(root)
    return QML_DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"


_RAT_FIELDS = (  # name, GDAL field type (0 integer, 2 string), usage (5 min-max, 2 name, 6-9 red..alpha)
    ("value", 0, 5), ("class", 2, 2), ("red", 0, 6), ("green", 0, 7), ("blue", 0, 8), ("alpha", 0, 9),
)  # fmt: skip


def mask_aux_xml(classes: Sequence[MaskClassLike]) -> str:
    """GDAL's ``.aux.xml`` for a mask: band 1's category names and raster attribute table.

    Category names are indexed by value (values without a class get an empty name); the
    thematic attribute table has one row per class: value, class name, red, green, blue,
    alpha (0 for background classes).

    Parameters
    ----------
    classes : sequence
        The mask's classes (``id``, ``name``, ``color``).

    Returns
    -------
    str
        The PAM document GDAL reads beside ``mask.tif`` (as ``mask.tif.aux.xml``).
    """
    ordered = sorted(classes, key=lambda c: c.id)
    root = ET.Element("PAMDataset")
    band = xml_child(root, "PAMRasterBand", band="1")
    names = {c.id: c.name for c in ordered}
    cats = xml_child(band, "CategoryNames")
    for value in range(max(names, default=-1) + 1):
        xml_child(cats, "Category", names.get(value, ""))
    rat = xml_child(band, "GDALRasterAttributeTable", tableType="thematic")
    for i, (name, kind, usage) in enumerate(_RAT_FIELDS):
        field = xml_child(rat, "FieldDefn", index=str(i))
        xml_child(field, "Name", name)
        xml_child(field, "Type", str(kind))
        xml_child(field, "Usage", str(usage))
    for row_no, c in enumerate(ordered):
        row = xml_child(rat, "Row", index=str(row_no))
        alpha = 0 if is_background(c.name) else 255
        for value in (c.id, c.name, *_rgb(c.color), alpha):
            xml_child(row, "F", str(value))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def mask_sidecars(mask_path: str) -> tuple[str, str]:
    """The QGIS style and GDAL ``.aux.xml`` that belong beside ``mask_path`` (``mask.qml``, ``mask.tif.aux.xml``)."""
    return os.path.splitext(mask_path)[0] + ".qml", mask_path + ".aux.xml"


def write_mask_sidecars(mask_path: str, classes: Sequence[MaskClassLike]) -> dict[str, str]:
    """Write ``mask.qml`` and ``mask.tif.aux.xml`` beside a (staged) mask; nothing without classes.

    Parameters
    ----------
    mask_path : str
        The mask COG.
    classes : sequence
        Its classes (``id``, ``name``, ``color``).

    Returns
    -------
    dict
        Output key -> file name, for run.json's ``outputs`` (``mask_style``, ``mask_classes``).
    """
    if not classes:
        return {}
    qml, aux = mask_sidecars(mask_path)
    write_text_atomic(qml, mask_qml(classes))
    write_text_atomic(aux, mask_aux_xml(classes))
    return {"mask_style": os.path.basename(qml), "mask_classes": os.path.basename(aux)}


def publish_mask_sidecars(staged_mask: str, out_dir: str) -> None:
    """Move the sidecars of a staged mask into ``out_dir``; remove stale ones the new mask has not."""
    for staged in mask_sidecars(staged_mask):
        final = os.path.join(out_dir, os.path.basename(staged))
        if os.path.exists(staged):
            fsync_replace(staged, final)
        elif os.path.isfile(final):
            os.remove(final)


@dataclass(frozen=True)
class TrueColour:
    """How to draw imagery: 1-based bands (red, green, blue; or one grey band) and their stretch."""

    path: str
    bands: tuple[int, ...]
    ranges: tuple[tuple[float, float], ...]
    crs: str | None


def _display_bands(descriptions: Sequence[str | None], interps: Sequence[str], count: int) -> tuple[int, ...]:
    """Red, green, blue from band names (else colour interpretation), else the first three (else band 1)."""
    for labels in ([(d or "").strip().lower() for d in descriptions], [i.lower() for i in interps]):
        if all(c in labels for c in ("red", "green", "blue")):
            return tuple(labels.index(c) + 1 for c in ("red", "green", "blue"))
    return (1, 2, 3) if count >= 3 else (1,)


def true_colour(path: str) -> TrueColour | None:
    """The bands and 2-98 % cumulative cut stretch to draw a raster in true colour; None if unreadable.

    Parameters
    ----------
    path : str
        The imagery (the run's input raster).

    Returns
    -------
    TrueColour or None
        Bands from band names ``red``/``green``/``blue`` (or the colour interpretation),
        else the first three (one grey band for one- or two-band rasters); the stretch is
        taken on a decimated read of the valid pixels, in the units QGIS draws (the bands'
        GDAL scale and offset applied, as for reflectance stored x 10000).
    """
    import numpy as np
    import rasterio

    if is_redacted(path):  # a signed URL as recorded: its token is not kept, so the image cannot be drawn
        return None
    try:
        with remote_env(path), rasterio.open(path) as ds:
            interps = [ci.name for ci in ds.colorinterp]
            bands = _display_bands(ds.descriptions, interps, ds.count)
            crs = ds.crs.to_string() if ds.crs else None
            scales = [(ds.scales[b - 1], ds.offsets[b - 1]) for b in bands]  # QGIS draws value x scale + offset
        data, _ = read_overview(open_source(path, bands=bands, require_crs=False), max_side=1024)
    except (OSError, ValueError, rasterio.errors.RasterioError, InputError):
        return None
    ranges = []
    for band, (scale, offset) in zip(data, scales, strict=True):
        values = np.ma.compressed(band).astype(np.float64) * scale + offset
        values = values[np.isfinite(values)]
        lo, hi = (float(v) for v in np.quantile(values, CUT)) if values.size else (0.0, 255.0)
        ranges.append((lo, hi if hi > lo else lo + max(abs(scale), 1e-12)))
    return TrueColour(path, bands, tuple(ranges), crs)


def _stretch(parent: ET.Element, tag: str, lo: float, hi: float) -> None:
    el = xml_child(parent, tag)
    xml_child(el, "minValue", repr(lo))
    xml_child(el, "maxValue", repr(hi))
    xml_child(el, "algorithm", "StretchToMinimumMaximum")


def imagery_pipe(parent: ET.Element, image: TrueColour) -> ET.Element:
    """A QGIS raster ``pipe`` drawing ``image`` in true colour (or grey), stretched to its 2-98 % range."""
    pipe = xml_child(parent, "pipe")
    common = {"opacity": "1", "alphaBand": "-1", "nodataColor": ""}
    if len(image.bands) == 3:
        r, g, b = (str(x) for x in image.bands)
        renderer = xml_child(pipe, "rasterrenderer", type="multibandcolor", redBand=r, greenBand=g, blueBand=b, **common)
    else:
        renderer = xml_child(pipe, "rasterrenderer", type="singlebandgray", grayBand=str(image.bands[0]),
                             gradient="BlackToWhite", **common)  # fmt: skip
    xml_child(renderer, "rasterTransparency")
    origin = xml_child(renderer, "minMaxOrigin")
    origin_values = {
        "limits": "CumulativeCut",
        "extent": "WholeRaster",
        "statAccuracy": "Estimated",
        "cumulativeCutLower": repr(CUT[0]),
        "cumulativeCutUpper": repr(CUT[1]),
        "stdDevFactor": "2",
    }
    for key, value in origin_values.items():
        xml_child(origin, key, value)
    tags = ("redContrastEnhancement", "greenContrastEnhancement", "blueContrastEnhancement")
    for tag, (lo, hi) in zip(tags if len(image.bands) == 3 else ("contrastEnhancement",), image.ranges, strict=True):
        _stretch(renderer, tag, lo, hi)
    xml_child(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    xml_child(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0", colorizeStrength="100")
    xml_child(pipe, "rasterresampler")
    return pipe
