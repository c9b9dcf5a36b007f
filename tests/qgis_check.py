"""Open a geoseg output folder in headless QGIS and print what QGIS sees, as JSON.

Run with the Python that has PyQGIS (Debian: ``apt-get install python3-qgis qgis-providers``)::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_check.py OUTPUT_DIR

It reports each layer of ``OUTPUT_DIR/geoseg.gpkg`` opened on its own (so the default style
from ``layer_styles`` applies), every layer of ``OUTPUT_DIR/project.qgz``, and
``OUTPUT_DIR/mask.tif``. Used by tests/test_qgis.py; handy by hand as well.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt loads: no display here

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import QgsMapCanvas


def rgba(color) -> list[int]:
    return list(color.getRgb())


def vector_info(layer: QgsVectorLayer) -> dict:
    info: dict = {"valid": layer.isValid(), "crs": layer.crs().authid(), "type": "vector"}
    if not layer.isValid():
        return info
    info["features"] = layer.featureCount()
    renderer = layer.renderer()
    info["renderer"] = renderer.type() if renderer else None
    symbol = renderer.symbol() if renderer is not None and renderer.type() == "singleSymbol" else None
    if symbol is not None and symbol.symbolLayerCount():
        sl = symbol.symbolLayer(0)
        info["symbol_class"] = sl.layerType()
        info["symbol_color"] = rgba(sl.color())
        info["stroke_color"] = rgba(sl.strokeColor()) if hasattr(sl, "strokeColor") else None
        info["stroke_width"] = sl.strokeWidth() if hasattr(sl, "strokeWidth") else None
    info["class_property"] = layer.customProperty("geoseg/class")
    return info


def raster_info(layer: QgsRasterLayer, classes: bool = True) -> dict:
    info: dict = {"valid": layer.isValid(), "crs": layer.crs().authid(), "type": "raster"}
    if not layer.isValid():
        return info
    info["bands"] = layer.bandCount()
    renderer = layer.renderer()
    info["renderer"] = renderer.type() if renderer else None
    if renderer is not None and renderer.type() == "paletted":
        info["class_count"] = len(renderer.classes())
        if classes:
            info["classes"] = [[c.value, rgba(c.color), c.label] for c in renderer.classes()]
    return info


def main(folder: str) -> dict:
    out: dict = {"qgis_version": Qgis.QGIS_VERSION}
    gpkg = os.path.join(folder, "geoseg.gpkg")
    if os.path.isfile(gpkg):
        con = sqlite3.connect(gpkg)
        names = [r[0] for r in con.execute("SELECT table_name FROM gpkg_geometry_columns ORDER BY table_name")]
        con.close()
        layers = {}
        for name in names:
            layer = QgsVectorLayer(f"{gpkg}|layername={name}", name, "ogr")
            info = vector_info(layer)
            if layer.isValid():
                info["styles_in_db"] = layer.listStylesInDatabase()[0]
            qml = os.path.join(folder, "styles", f"{name}.qml")
            if os.path.isfile(qml):  # the sidecar, loaded into the layer opened without its default style
                bare = QgsVectorLayer(f"{gpkg}|layername={name}", name, "ogr", QgsVectorLayer.LayerOptions(False))
                message, ok = bare.loadNamedStyle(qml)
                info["qml_file"] = {"loaded": ok, "message": message, **vector_info(bare)}
            layers[name] = info
        out["gpkg_layers"] = layers
    project_path = os.path.join(folder, "project.qgz")
    if os.path.isfile(project_path):
        canvas = QgsMapCanvas()  # named like the desktop's main canvas, so it takes the project's view
        canvas.setObjectName("theMapCanvas")
        canvas.resize(800, 600)
        project = QgsProject.instance()
        ok = project.read(project_path)
        proj: dict = {
            "read": ok,
            "title": project.title(),
            "crs": project.crs().authid(),
            "absolute_paths": project.readBoolEntry("Paths", "Absolute", True)[0],
        }
        view = project.viewSettings().defaultViewExtent()
        proj["default_extent"] = None if view.isNull() else [view.xMinimum(), view.yMinimum(), view.xMaximum(), view.yMaximum()]
        shown = canvas.extent()
        proj["canvas_extent"] = [shown.xMinimum(), shown.yMinimum(), shown.xMaximum(), shown.yMaximum()]
        items = []
        for node in project.layerTreeRoot().findLayers():  # tree order: top of the legend first
            layer = node.layer()
            if layer is None:
                items.append({"name": node.name(), "valid": False, "missing": True})
                continue
            info = vector_info(layer) if isinstance(layer, QgsVectorLayer) else raster_info(layer)
            info.update(name=layer.name(), visible=node.isVisible(), source=layer.source())
            items.append(info)
        proj["layers"] = items
        out["project"] = proj
    mask_path = os.path.join(folder, "mask.tif")
    if os.path.isfile(mask_path):
        out["mask"] = raster_info(QgsRasterLayer(mask_path, "mask", "gdal"), classes=False)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python3 tests/qgis_check.py OUTPUT_DIR")
    app = QgsApplication([], True)  # GUI flavour (offscreen) for the map canvas
    app.initQgis()
    try:
        result = main(sys.argv[1])
    except Exception as exc:  # report, then leave without exitQgis (which can crash)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)
