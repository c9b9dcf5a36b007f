"""QGIS projects (``.qgz``) of segmentation outputs, written without QGIS: plain XML in a zip.

* :func:`write_project` writes the project of one output folder: the input imagery in true
  colour at the bottom, the class mask over it (half transparent, background classes not
  drawn) and the class layers (outlines) on top, with paths relative to the project so the
  folder can be moved;
* :func:`write_run_project` writes ONE project for a whole workflow run: a legend group per
  model and date (and change map), each with its imagery, mask and layers.

The XML follows what QGIS 3.22 writes itself and is read by QGIS 3.22 and later; the raster
renderers (mask palette, imagery stretch) come from :mod:`geoseg.io.styles`, the polygon
styles from :mod:`geoseg.vector.qgis`. A little over 400 lines: one chore (the project document), half docstrings.
"""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

from geoseg.classes import default_palette
from geoseg.errors import InputError, OutputError
from geoseg.io.mask import MaskClass, MaskSource, open_mask
from geoseg.io.styles import (
    QGIS_VERSION,
    QML_DOCTYPE,
    TrueColour,
    check_rgb,
    imagery_pipe,
    legend_label,
    paletted_pipe,
    true_colour,
    xml_child,
    xml_text,
)
from geoseg.vector.geometry import reproject

__all__ = [
    "IMAGERY_NAME",
    "MASK_NAME",
    "MASK_OPACITY",
    "ProjectGroup",
    "mask_classes",
    "project_source",
    "write_project",
    "write_run_project",
]

#: opacity of the class mask in a project: the imagery shows through, the polygons' outlines read over it
MASK_OPACITY = 0.5
IMAGERY_NAME = "Input imagery"
MASK_NAME = "Class mask"


@dataclass(frozen=True)
class ProjectGroup:
    """One group of a project's legend: imagery at the bottom, the class mask over it, polygons on top.

    Parameters
    ----------
    name : str or None
        The legend group (``None``: the layers sit at the top level).
    mask : str or None
        The class mask's data source (relative to the project, or absolute).
    classes : sequence of MaskClass
        The mask's classes (names and colours for its legend).
    vectors : sequence of tuple of str
        (GeoPackage source, layer name in it, name to show), top first.
    qml : dict of str to str
        QML style by GeoPackage layer name (or by name to show).
    imagery : TrueColour, optional
        The input imagery (its ``path`` is the data source) and how to draw it.
    crs : str or None
        CRS of the vector layers.
    raster_crs : str or None
        CRS of the mask.
    visible : bool
        Whether the group is switched on when the project opens.
    """

    name: str | None
    mask: str | None
    classes: Sequence[MaskClass] = ()
    vectors: Sequence[tuple[str, str, str]] = ()
    qml: dict[str, str] = field(default_factory=dict)
    imagery: TrueColour | None = None
    crs: str | None = None
    raster_crs: str | None = None
    visible: bool = True


def _srs(parent: ET.Element, crs: str | None) -> None:
    """A ``spatialrefsys`` element for ``crs`` (empty, that is unknown, for ``None``)."""
    srs = xml_child(parent, "spatialrefsys")
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
        xml_child(srs, key, value)
    xml_child(srs, "geographicflag", "true" if geographic else "false")


def _source(path: str) -> str:
    """A data source path as QGIS writes it relative to the project (``./x`` or ``../x``); absolute ones as given."""
    path = path.replace(os.sep, "/")
    if os.path.isabs(path) or path.startswith(("./", "../", "/vsi")):
        return path
    return "./" + path


def project_source(path: str, project_dir: str) -> str:
    """``path`` relative to ``project_dir`` when it lies inside it (the folder moves as one), else absolute."""
    full = os.path.abspath(path)
    folder = os.path.abspath(project_dir)
    if path.startswith("/vsi") or os.path.commonpath([full, folder]) != folder:
        return path if path.startswith("/vsi") else full
    return os.path.relpath(full, folder)


def _layer_id(name: str, source: str) -> str:
    return f"{re.sub(r'[^0-9A-Za-z_]', '_', name)}_{uuid.uuid5(uuid.NAMESPACE_URL, source).hex}"


def _maplayer(layers: ET.Element, kind: str, layer_id: str, source: str, name: str, provider: str, crs: str | None) -> ET.Element:
    ml = xml_child(layers, "maplayer", type=kind, hasScaleBasedVisibilityFlag="0", minScale="100000000", maxScale="0")
    xml_child(ml, "id", layer_id)
    xml_child(ml, "datasource", source)
    xml_child(ml, "layername", name)
    _srs(xml_child(ml, "srs"), crs)
    xml_child(ml, "provider", provider, **({"encoding": "UTF-8"} if provider == "ogr" else {}))
    return ml


Entry = tuple[str, str, str, str]  # layer id, name, provider, source


def _vector_layers(layers: ET.Element, group: ProjectGroup) -> list[Entry]:
    """The group's polygon layers, each with its QML style embedded."""
    entries = []
    for gpkg, layer, display in group.vectors:
        source = f"{_source(gpkg)}|layername={layer}"
        lid = _layer_id(display, f"{group.name}|{source}")
        ml = _maplayer(layers, "vector", lid, source, display, "ogr", group.crs)
        ml.set("geometry", "Polygon")
        style_xml = group.qml.get(layer, group.qml.get(display))
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
    return entries


def _raster_layers(layers: ET.Element, group: ProjectGroup) -> list[Entry]:
    """The class mask (paletted, half transparent) over the imagery (true colour), top first."""
    entries = []
    if group.mask is not None:
        source = _source(group.mask)
        lid = _layer_id(MASK_NAME, f"{group.name}|{source}")
        ml = _maplayer(layers, "raster", lid, source, MASK_NAME, "gdal", group.raster_crs or group.crs)
        xml_child(xml_child(ml, "noData"), "noDataList", useSrcNoData="1", bandNo="1")
        paletted_pipe(ml, group.classes, opacity=MASK_OPACITY)
        entries.append((lid, MASK_NAME, "gdal", source))
    if group.imagery is not None:
        source = _source(group.imagery.path)
        lid = _layer_id(IMAGERY_NAME, f"{group.name}|{source}")
        ml = _maplayer(layers, "raster", lid, source, IMAGERY_NAME, "gdal", group.imagery.crs)
        imagery_pipe(ml, group.imagery)
        entries.append((lid, IMAGERY_NAME, "gdal", source))
    return entries


def _tree_node(parent: ET.Element, entry: Entry) -> None:
    lid, name, provider, source = entry
    node = xml_child(parent, "layer-tree-layer", id=lid, name=name, providerKey=provider, source=source)
    node.set("checked", "Qt::Checked")
    node.set("expanded", "1" if provider == "ogr" or name == MASK_NAME else "0")
    xml_child(xml_child(node, "customproperties"), "Option")


def _layer_tree(root: ET.Element, groups: Sequence[ProjectGroup]) -> list[Entry]:
    """Every group's layers and the legend tree (tree order = drawing order: first on top)."""
    tree = xml_child(root, "layer-tree-group")
    xml_child(xml_child(tree, "customproperties"), "Option")
    layers = xml_child(root, "projectlayers")
    everything: list[Entry] = []
    for group in groups:
        entries = _vector_layers(layers, group) + _raster_layers(layers, group)
        parent = tree
        if group.name is not None:
            checked = "Qt::Checked" if group.visible else "Qt::Unchecked"
            parent = xml_child(tree, "layer-tree-group", name=group.name, checked=checked, expanded="1" if group.visible else "0")
            xml_child(xml_child(parent, "customproperties"), "Option")
        for entry in entries:
            _tree_node(parent, entry)
        everything += entries
    xml_child(tree, "custom-order", enabled="0")
    order = xml_child(root, "layerorder")
    for lid, *_ in everything:
        xml_child(order, "layer", id=lid)
    return everything


def _view(root: ET.Element, crs: str | None, extent: tuple[float, float, float, float] | None) -> None:
    """Where the map opens: the canvas element (read by the desktop) and the default view (server, headless)."""
    view = xml_child(root, "ProjectViewSettings", UseProjectScales="0", rotation="0")
    if extent is None:
        return
    xmin, ymin, xmax, ymax = (repr(float(v)) for v in extent)
    canvas = xml_child(root, "mapcanvas", name="theMapCanvas", annotationsVisible="1")
    box = xml_child(canvas, "extent")
    for key, value in zip(("xmin", "ymin", "xmax", "ymax"), (xmin, ymin, xmax, ymax), strict=True):
        xml_child(box, key, value)
    xml_child(canvas, "rotation", "0")
    _srs(xml_child(canvas, "destinationsrs"), crs)
    default = xml_child(view, "DefaultViewExtent", xmin=xmin, ymin=ymin, xmax=xmax, ymax=ymax)
    _srs(default, crs)


def _write_qgz(path: str, title: str, crs: str | None, extent, groups: Sequence[ProjectGroup]) -> str:
    """The project document of ``groups``, zipped into ``path`` atomically."""
    root = ET.Element("qgis", projectname=xml_text(title), version=QGIS_VERSION)
    xml_child(root, "homePath", path="")
    xml_child(root, "title", title)
    _srs(xml_child(root, "projectCrs"), crs)
    _layer_tree(root, groups)
    props = xml_child(root, "properties")
    xml_child(xml_child(props, "Paths"), "Absolute", "false", type="bool")
    xml_child(xml_child(props, "SpatialRefSys"), "ProjectionsEnabled", "1" if crs is not None else "0", type="int")
    xml_child(xml_child(root, "projectMetadata"), "title", title)
    _view(root, crs, extent)
    ET.indent(root)
    document = QML_DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"

    stem = os.path.splitext(os.path.basename(path))[0]
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{stem}.qgs", document.encode("utf-8"))
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"cannot write the QGIS project {path}: {exc}; check the folder exists and is writable") from exc
    return path


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
    imagery: TrueColour | None = None,
) -> str:
    """Write a QGIS project (``.qgz``) that shows one folder's segmentation outputs, styled.

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
        (path of the mask relative to the project, ignored legacy layer name, {class id:
        ((r, g, b), class name)}), drawn as "Class mask" at half opacity with a paletted
        renderer: background classes and values without a class (nodata) transparent.
    vectors : list of tuple of str
        (GeoPackage path relative to the project, layer name in it, name to show), listed on
        top of the raster in this order.
    qml : dict of str to str
        QML style by layer name in the GeoPackage (or by name to show); its renderer and
        other settings are embedded in the project layer.
    raster_crs : str, optional
        CRS of the mask when it differs from ``crs`` (vectors written with ``--crs``); QGIS
        reprojects it on the fly.
    imagery : TrueColour, optional
        The input imagery (``path`` relative to the project or absolute), drawn as
        "Input imagery" under the mask.

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
    mask, classes = (
        (raster[0], [MaskClass(k, name, check_rgb(rgb)) for k, (rgb, name) in raster[2].items()]) if raster else (None, [])
    )
    group = ProjectGroup(None, mask, classes, vectors, qml, imagery, crs, raster_crs)
    return _write_qgz(path, title, crs, extent, [group])


def mask_classes(src: MaskSource) -> list[MaskClass]:
    """A mask's classes, each with a colour (geoseg's default palette where the mask names none)."""
    palette = default_palette(256)
    return [c if c.color else MaskClass(c.id, c.name, tuple(palette[c.id % len(palette)])) for c in src.classes]


def _gpkg_layers(path: str) -> list[tuple[str, str | None, str | None, tuple[float, ...] | None]]:
    """(layer, CRS, default QML style or None, extent or None) of every polygon layer in a GeoPackage, by name.

    The extent is the layer's ``gpkg_contents`` box (an empty layer has none).
    """
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT g.table_name, s.organization, s.organization_coordsys_id, s.definition, "
            "c.min_x, c.min_y, c.max_x, c.max_y FROM gpkg_geometry_columns g "
            "LEFT JOIN gpkg_spatial_ref_sys s ON g.srs_id = s.srs_id "
            "LEFT JOIN gpkg_contents c ON c.table_name = g.table_name ORDER BY g.table_name"
        ).fetchall()
        try:
            styles = dict(
                con.execute("SELECT f_table_name, styleQML FROM layer_styles WHERE useAsDefault ORDER BY id").fetchall()
            )
        except sqlite3.OperationalError:  # no layer_styles table
            styles = {}
    except sqlite3.Error as exc:
        raise InputError(f"{path}: cannot read its layers ({exc}); give a GeoPackage geoseg vectorize wrote") from exc
    finally:
        con.close()
    out = []
    for name, org, code, definition, *box in rows:
        crs = (
            f"{org}:{code}" if org and code and int(code) > 0 else (definition if definition not in (None, "undefined") else None)
        )
        extent = tuple(box) if box[0] is not None and box[3] is not None else None
        out.append((name, crs, styles.get(name), extent))
    return out


def _run_group(name: str, mask: str | None, vectors: Sequence[str], imagery: str | None, folder: str, first: bool):
    """One workflow unit as a project group, its CRS and its bounds in that CRS: the mask's grid, or for a unit
    without a mask (a detector's boxes) the extent of its layers (None when they are empty).
    """
    import dataclasses

    src = open_mask(mask) if mask is not None else None
    layers, qml = [], {}
    crs = src.geobox.crs if src is not None else None
    bounds = src.geobox.bounds if src is not None else None
    for gpkg in vectors:
        rel = project_source(gpkg, folder)
        for layer, layer_crs, style, extent in _gpkg_layers(gpkg):
            layers.append((rel, layer, legend_label(layer)))
            crs = layer_crs or crs
            if style is not None:
                qml[layer] = style
            if src is None:  # the layers' extent, in their CRS
                bounds = _union(bounds, extent)
    bounds_crs = src.geobox.crs if src is not None else crs
    image = true_colour(imagery) if imagery else None
    if image is not None:
        image = dataclasses.replace(image, path=project_source(imagery, folder))
    mask_rel, classes = (project_source(mask, folder), mask_classes(src)) if src is not None else (None, [])
    group = ProjectGroup(name, mask_rel, classes, layers, qml, image, crs, src.geobox.crs if src is not None else None, first)
    return group, bounds_crs, bounds


def _union(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """The union of two ``(xmin, ymin, xmax, ymax)`` boxes, either of which may be None."""
    if a is None or b is None:
        return a if b is None else b
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def write_run_project(
    path: str, units: Sequence[tuple[str, str, Sequence[str], str | None]], *, title: str = "geoseg run"
) -> str:
    """Write ONE QGIS project for a whole workflow run: a legend group per model and date (and change map).

    Parameters
    ----------
    path : str
        The ``.qgz`` to write (replaced atomically); paths inside its folder are stored relative to it.
    units : sequence of tuple
        (group name, mask path or None (a detector's unit: layers only), GeoPackage paths, input imagery path or
        None) per unit, in
        legend order; the first group is switched on, the others off (each holds its own
        imagery, so switched on together they would hide one another).
    title : str
        The project title.

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    InputError
        If a mask or GeoPackage cannot be read.
    OutputError
        If the project cannot be written.
    """
    import numpy as np
    import shapely

    folder = os.path.dirname(os.path.abspath(path))
    groups, extent, crs = [], None, None
    for k, (name, mask, vectors, imagery) in enumerate(units):
        group, unit_crs, bounds = _run_group(name, mask, vectors, imagery, folder, k == 0)
        groups.append(group)
        crs = crs if k else unit_crs
        if bounds is not None and unit_crs and crs and unit_crs != crs:
            bounds = shapely.bounds(
                reproject(np.array([shapely.box(*bounds)]), unit_crs, crs, densify=(bounds[2] - bounds[0]) / 16)[0]
            )
        extent = _union(extent, bounds)
    return _write_qgz(path, title, crs, tuple(float(v) for v in extent) if extent is not None else None, groups)
