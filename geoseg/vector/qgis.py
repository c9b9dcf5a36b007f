"""QGIS styles for the class layers, written without QGIS: plain XML and SQLite.

* :func:`layer_qml` makes a QGIS 3 ``.qml`` style for a class's polygon layer (outline, faint fill);
* :func:`store_styles` puts such styles into a GeoPackage's ``layer_styles`` table as the
  layers' default styles, so QGIS applies them whenever a layer is opened.

Projects (``.qgz``) are :mod:`geoseg.vector.project`'s. The XML follows what QGIS 3.22 writes
itself and is read by QGIS 3.22 and later.
"""

from __future__ import annotations

import os
import sqlite3
from xml.etree import ElementTree as ET

from geoseg.errors import InputError, OutputError
from geoseg.io.styles import QGIS_VERSION, QML_DOCTYPE, check_rgb, xml_child

__all__ = ["FILL_OPACITY", "layer_qml", "store_styles"]

_LAYER_STYLES_SQL = (
    'CREATE TABLE "layer_styles" ("id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "f_table_catalog" TEXT(256), '
    '"f_table_schema" TEXT(256), "f_table_name" TEXT(256), "f_geometry_column" TEXT(256), "styleName" TEXT(30), '
    '"styleQML" TEXT, "styleSLD" TEXT, "useAsDefault" BOOLEAN, "description" TEXT, "owner" TEXT(30), "ui" TEXT(30), '
    "\"update_time\" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
)
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ','now')"
#: fill opacity of the class polygons: outlines that read over the mask, a faint fill when opened alone
FILL_OPACITY = 0.1


def _options(parent: ET.Element, values: dict[str, str]) -> None:
    """Write ``values`` both as an ``Option`` map (read by QGIS >= 3.16) and legacy ``prop`` pairs."""
    omap = xml_child(parent, "Option", type="Map")
    for key, value in values.items():
        xml_child(omap, "Option", name=key, type="QString", value=value)
    for key, value in values.items():
        xml_child(parent, "prop", k=key, v=value)


def layer_qml(color: tuple[int, int, int], *, fill_opacity: float = FILL_OPACITY, label: str | None = None) -> str:
    """A QGIS 3 style (``.qml``) for a polygon layer drawn in one class colour.

    Parameters
    ----------
    color : tuple of int
        The class colour as (red, green, blue), each 0..255.
    fill_opacity : float, optional
        Opacity of the fill, 0 (hollow) to 1 (opaque); the outline is always opaque.
    label : str, optional
        The class name, kept in the style as the layer's custom property ``geoseg/class``.

    Returns
    -------
    str
        The QML document: a single-symbol renderer with a simple fill in ``color`` (alpha from
        ``fill_opacity``) and a solid 0.4 mm outline in the same colour.

    Raises
    ------
    InputError
        If ``color`` or ``fill_opacity`` is out of range.
    """
    r, g, b = check_rgb(color)
    if not 0.0 <= fill_opacity <= 1.0:
        raise InputError(f"fill_opacity={fill_opacity!r} is outside 0..1; give a number from 0 (hollow) to 1 (opaque)")
    root = ET.Element(
        "qgis",
        {
            "version": QGIS_VERSION,
            "styleCategories": "AllStyleCategories",
            "hasScaleBasedVisibilityFlag": "0",
            "minScale": "100000000",
            "maxScale": "0",
            "labelsEnabled": "0",
            "readOnly": "0",
        },
    )
    renderer = xml_child(root, "renderer-v2", type="singleSymbol", symbollevels="0", forceraster="0", enableorderby="0")
    symbol = xml_child(
        xml_child(renderer, "symbols"), "symbol", name="0", type="fill", alpha="1", clip_to_extent="1", force_rhr="0"
    )
    fill = xml_child(symbol, "layer", None, **{"class": "SimpleFill", "pass": "0", "locked": "0", "enabled": "1"})
    _options(
        fill,
        {
            "color": f"{r},{g},{b},{round(fill_opacity * 255)}",
            "style": "solid",
            "outline_color": f"{r},{g},{b},255",
            "outline_style": "solid",
            "outline_width": "0.4",
            "outline_width_unit": "MM",
            "joinstyle": "bevel",
            "offset": "0,0",
            "offset_unit": "MM",
        },
    )
    xml_child(renderer, "rotation")
    xml_child(renderer, "sizescale")
    props = xml_child(xml_child(root, "customproperties"), "Option", type="Map")
    if label is not None:
        xml_child(props, "Option", name="geoseg/class", type="QString", value=label)
    xml_child(root, "blendMode", "0")
    xml_child(root, "featureBlendMode", "0")
    xml_child(root, "layerOpacity", "1")
    xml_child(root, "legend", type="default-vector", showLabelLegend="0")
    xml_child(root, "layerGeometryType", "2")  # polygon: QGIS refuses the style on point/line layers
    ET.indent(root)
    return QML_DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"


def store_styles(gpkg_path: str, styles: dict[str, str]) -> None:
    """Store QML styles in a GeoPackage as its layers' default styles.

    The styles go into the ``layer_styles`` table that QGIS reads (created when missing and
    registered in ``gpkg_contents`` as an attributes table), with ``useAsDefault`` set, so
    QGIS draws each layer with its style as soon as it is opened. A layer's earlier styles
    are replaced.

    Parameters
    ----------
    gpkg_path : str
        The GeoPackage, already holding the layers.
    styles : dict of str to str
        QML document (see :func:`layer_qml`) by layer (table) name.

    Raises
    ------
    OutputError
        If the file is not a GeoPackage, a layer is not in it, or the table cannot be written.
    """
    if not os.path.isfile(gpkg_path):
        raise OutputError(f"cannot store styles: {gpkg_path} does not exist; write the GeoPackage first")
    try:
        con = sqlite3.connect(gpkg_path)
    except sqlite3.Error as exc:
        raise OutputError(f"cannot open {gpkg_path} to store layer styles: {exc}") from exc
    try:
        with con:
            rows = []
            for layer, qml in styles.items():
                found = con.execute(
                    "SELECT table_name, column_name FROM gpkg_geometry_columns WHERE lower(table_name) = lower(?)", (layer,)
                ).fetchone()
                if found is None:
                    raise OutputError(f"cannot store a style for layer {layer!r}: {gpkg_path} has no such geometry layer")
                rows.append((found[0], found[1], qml))
            con.execute(_LAYER_STYLES_SQL.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
            con.execute(
                "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description, last_change, srs_id) "
                f"VALUES ('layer_styles', 'attributes', 'layer_styles', '', {_NOW}, 0)"
            )
            for table, geom_column, qml in rows:
                con.execute("DELETE FROM layer_styles WHERE f_table_name = ?", (table,))
                con.execute(
                    "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName, "
                    "styleQML, styleSLD, useAsDefault, description, owner, ui, update_time) "
                    f"VALUES ('', '', ?, ?, ?, ?, '', 1, 'geoseg class style', '', NULL, {_NOW})",
                    (table, geom_column, table, qml),
                )
    except sqlite3.Error as exc:
        raise OutputError(f"cannot store layer styles in {gpkg_path} (is it a GeoPackage, and writable?): {exc}") from exc
    finally:
        con.close()
