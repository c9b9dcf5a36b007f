"""QGIS styles and projects, written without QGIS: plain XML, zip and SQLite.

* :func:`layer_qml` makes a QGIS 3 ``.qml`` style for a class's polygon layer;
* :func:`store_styles` puts such styles into a GeoPackage's ``layer_styles`` table as the
  layers' default styles, so QGIS applies them whenever a layer is opened;
* :func:`write_project` writes a ``.qgz`` project holding the class mask (paletted) and the
  class layers (styled), with paths relative to the project so the folder can be moved.

The XML follows what QGIS 3.22 writes itself and is read by QGIS 3.22 and later.
"""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
import warnings
import zipfile
from xml.etree import ElementTree as ET

from geoseg.errors import InputError, OutputError

__all__ = ["layer_qml", "store_styles", "write_project"]

_QGIS_VERSION = "3.22.0-Białowieża"  # the oldest QGIS whose format this module follows
_DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
_LAYER_STYLES_SQL = (
    'CREATE TABLE "layer_styles" ("id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "f_table_catalog" TEXT(256), '
    '"f_table_schema" TEXT(256), "f_table_name" TEXT(256), "f_geometry_column" TEXT(256), "styleName" TEXT(30), '
    '"styleQML" TEXT, "styleSLD" TEXT, "useAsDefault" BOOLEAN, "description" TEXT, "owner" TEXT(30), "ui" TEXT(30), '
    "\"update_time\" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
)
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ','now')"


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """``text`` with every character XML 1.0 cannot hold (NUL, other control characters, lone
    surrogates) replaced by U+FFFD, so names from cards and file names always give valid XML.
    """
    return _NOT_XML.sub("\ufffd", text)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: xml_text(str(v)) for k, v in attrib.items()})
    if text is not None:
        el.text = xml_text(text)
    return el


def _options(parent: ET.Element, values: dict[str, str]) -> None:
    """Write ``values`` both as an ``Option`` map (read by QGIS >= 3.16) and legacy ``prop`` pairs."""
    omap = _sub(parent, "Option", type="Map")
    for key, value in values.items():
        _sub(omap, "Option", name=key, type="QString", value=value)
    for key, value in values.items():
        _sub(parent, "prop", k=key, v=value)


def _check_rgb(color: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(color) != 3 or any(not 0 <= int(c) <= 255 for c in color):
        raise InputError(f"colour {color!r} is not an (r, g, b) triple of 0..255 values; give three integers from 0 to 255")
    r, g, b = (int(c) for c in color)
    return r, g, b


def layer_qml(color: tuple[int, int, int], *, fill_opacity: float = 0.5, label: str | None = None) -> str:
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
    r, g, b = _check_rgb(color)
    if not 0.0 <= fill_opacity <= 1.0:
        raise InputError(f"fill_opacity={fill_opacity!r} is outside 0..1; give a number from 0 (hollow) to 1 (opaque)")
    root = ET.Element(
        "qgis",
        {
            "version": _QGIS_VERSION,
            "styleCategories": "AllStyleCategories",
            "hasScaleBasedVisibilityFlag": "0",
            "minScale": "100000000",
            "maxScale": "0",
            "labelsEnabled": "0",
            "readOnly": "0",
        },
    )
    renderer = _sub(root, "renderer-v2", type="singleSymbol", symbollevels="0", forceraster="0", enableorderby="0")
    symbol = _sub(_sub(renderer, "symbols"), "symbol", name="0", type="fill", alpha="1", clip_to_extent="1", force_rhr="0")
    fill = _sub(symbol, "layer", None, **{"class": "SimpleFill", "pass": "0", "locked": "0", "enabled": "1"})
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
    _sub(renderer, "rotation")
    _sub(renderer, "sizescale")
    props = _sub(_sub(root, "customproperties"), "Option", type="Map")
    if label is not None:
        _sub(props, "Option", name="geoseg/class", type="QString", value=label)
    _sub(root, "blendMode", "0")
    _sub(root, "featureBlendMode", "0")
    _sub(root, "layerOpacity", "1")
    _sub(root, "legend", type="default-vector", showLabelLegend="0")
    _sub(root, "layerGeometryType", "2")  # polygon: QGIS refuses the style on point/line layers
    ET.indent(root)
    return _DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"


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


def _srs(parent: ET.Element, crs: str | None) -> None:
    """A ``spatialrefsys`` element for ``crs`` (empty, that is unknown, for ``None``)."""
    srs = _sub(parent, "spatialrefsys")
    values = {"wkt": "", "proj4": "", "srsid": "0", "srid": "0", "authid": "", "description": ""}
    geographic = False
    if crs is not None:
        import pyproj

        try:
            c = pyproj.CRS.from_user_input(crs)
        except pyproj.exceptions.CRSError as exc:
            raise InputError(f"cannot use CRS {crs!r} for the QGIS project: {exc}") from exc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "you will likely lose important projection information"
            proj4 = c.to_proj4() or ""
        auth = c.to_authority(min_confidence=90)
        values.update(wkt=c.to_wkt("WKT2_2019"), proj4=proj4, description=c.name)
        if auth is not None:
            values.update(authid=f"{auth[0]}:{auth[1]}", srid=auth[1] if auth[0] == "EPSG" else "0")
        geographic = c.is_geographic
    for key, value in values.items():
        _sub(srs, key, value)
    _sub(srs, "geographicflag", "true" if geographic else "false")


def _source(path: str) -> str:
    """A data source path as QGIS writes it relative to the project (``./x`` or ``../x``)."""
    path = path.replace(os.sep, "/")
    if os.path.isabs(path) or path.startswith(("./", "../")):
        return path
    return "./" + path


def _layer_id(name: str, source: str) -> str:
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', name)}_{uuid.uuid5(uuid.NAMESPACE_URL, source).hex}"


def _maplayer(layers: ET.Element, kind: str, layer_id: str, source: str, name: str, provider: str, crs: str | None) -> ET.Element:
    ml = _sub(layers, "maplayer", type=kind, hasScaleBasedVisibilityFlag="0", minScale="100000000", maxScale="0")
    _sub(ml, "id", layer_id)
    _sub(ml, "datasource", source)
    _sub(ml, "layername", name)
    _srs(_sub(ml, "srs"), crs)
    _sub(ml, "provider", provider, **({"encoding": "UTF-8"} if provider == "ogr" else {}))
    return ml


def write_project(
    path: str,
    *,
    title: str,
    crs: str | None,
    extent: tuple[float, float, float, float] | None,
    raster: tuple[str, str, dict[int, tuple[tuple[int, int, int], str]]] | None,
    vectors: list[tuple[str, str, str]],
    qml: dict[str, str],
    raster_crs: str | None = None,
) -> str:
    """Write a QGIS project (``.qgz``) that shows the segmentation outputs, styled.

    Parameters
    ----------
    path : str
        The ``.qgz`` file to write; it is replaced atomically.
    title : str
        The project title.
    crs : str or None
        The CRS of the project and its layers, anything :class:`pyproj.CRS` accepts, or
        ``None`` for outputs in pixel coordinates. QGIS takes a project layer's CRS from the
        project, not from the data, so this must be the CRS the mask and layers are in.
    extent : tuple of float or None
        (xmin, ymin, xmax, ymax) to open the map at, in ``crs``; ``None`` leaves it to QGIS.
    raster : tuple or None
        (path of the mask relative to the project, layer name, {class id: ((r, g, b), class
        name)}), drawn with a paletted renderer (other values, nodata included, transparent).
    vectors : list of tuple of str
        (GeoPackage path relative to the project, layer name in it, name to show), listed on
        top of the raster in this order.
    qml : dict of str to str
        QML style by layer name in the GeoPackage (or by name to show); its renderer and
        other settings are embedded in the project layer.
    raster_crs : str, optional
        CRS of the mask when it differs from ``crs`` (vectors written with ``--crs``); QGIS
        reprojects it on the fly.

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    InputError
        If ``crs`` or a QML document cannot be read.
    OutputError
        If the project cannot be written.
    """
    root = ET.Element("qgis", projectname=xml_text(title), version=_QGIS_VERSION)
    _sub(root, "homePath", path="")
    _sub(root, "title", title)
    _srs(_sub(root, "projectCrs"), crs)
    tree = _sub(root, "layer-tree-group")
    _sub(_sub(tree, "customproperties"), "Option")
    layers = _sub(root, "projectlayers")
    entries: list[tuple[str, str, str, str]] = []  # id, name, provider, source

    for gpkg, layer, display in vectors:
        source = f"{_source(gpkg)}|layername={layer}"
        lid = _layer_id(display, source)
        ml = _maplayer(layers, "vector", lid, source, display, "ogr", crs)
        ml.set("geometry", "Polygon")
        style_xml = qml.get(layer, qml.get(display))
        if style_xml is not None:
            try:
                style = ET.fromstring(style_xml)
            except ET.ParseError as exc:
                raise InputError(f"the QML style of layer {layer!r} is not valid XML: {exc}") from exc
            for key, value in style.attrib.items():
                if key not in ("version", "styleCategories"):
                    ml.set(key, value)
            ml.extend([el for el in style if el.tag != "layerGeometryType"])
        entries.append((lid, display, "ogr", source))

    if raster is not None:
        mask, name, classes = raster
        source = _source(mask)
        lid = _layer_id(name, source)
        ml = _maplayer(layers, "raster", lid, source, name, "gdal", raster_crs or crs)
        _sub(_sub(ml, "noData"), "noDataList", useSrcNoData="1", bandNo="1")
        pipe = _sub(ml, "pipe")
        renderer = _sub(pipe, "rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1", nodataColor="")
        palette = _sub(renderer, "colorPalette")
        for value, (color, label) in sorted(classes.items()):
            r, g, b = _check_rgb(color)
            _sub(palette, "paletteEntry", value=str(int(value)), color=f"#{r:02x}{g:02x}{b:02x}", alpha="255", label=label)
        _sub(pipe, "rasterresampler", maxOversampling="2")  # nearest neighbour: class ids must not be blended
        entries.append((lid, name, "gdal", source))

    for lid, name, provider, source in entries:  # tree order = drawing order: first on top
        node = _sub(tree, "layer-tree-layer", id=lid, name=name, providerKey=provider, source=source)
        node.set("checked", "Qt::Checked")
        node.set("expanded", "1")
        _sub(_sub(node, "customproperties"), "Option")
    _sub(tree, "custom-order", enabled="0")
    order = _sub(root, "layerorder")
    for lid, *_ in entries:
        _sub(order, "layer", id=lid)

    props = _sub(root, "properties")
    _sub(_sub(props, "Paths"), "Absolute", "false", type="bool")
    _sub(_sub(props, "SpatialRefSys"), "ProjectionsEnabled", "1" if crs is not None else "0", type="int")
    _sub(_sub(root, "projectMetadata"), "title", title)
    view = _sub(root, "ProjectViewSettings", UseProjectScales="0", rotation="0")
    if extent is not None:
        xmin, ymin, xmax, ymax = (repr(float(v)) for v in extent)
        # the desktop reads the canvas element; ProjectViewSettings is the fallback (and used by QGIS server/headless)
        canvas = _sub(root, "mapcanvas", name="theMapCanvas", annotationsVisible="1")
        box = _sub(canvas, "extent")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (xmin, ymin, xmax, ymax), strict=True):
            _sub(box, key, value)
        _sub(canvas, "rotation", "0")
        _srs(_sub(canvas, "destinationsrs"), crs)
        default = _sub(view, "DefaultViewExtent", xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax)
        _srs(default, crs)
    ET.indent(root)
    document = _DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"

    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(folder, exist_ok=True)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{stem}.qgs", document.encode("utf-8"))
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"cannot write the QGIS project {path}: {exc}; check the folder exists and is writable") from exc
    return path
