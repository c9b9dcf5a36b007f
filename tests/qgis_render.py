"""Render a QGIS project to PNG headless, as QGIS draws it, and print what was drawn as JSON.

Run with the Python that has PyQGIS (Debian: ``apt-get install python3-qgis qgis-providers``)::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tests/qgis_render.py PROJECT.qgz OUT.png WIDTH HEIGHT

The map shows the project's switched-on layers in legend order over the project's default
view extent, on a magenta background (so a hole in every layer is easy to see). Used by
tests/test_readable_outputs.py; handy by hand as well.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt loads: no display here

from qgis.core import QgsApplication, QgsMapRendererParallelJob, QgsMapSettings, QgsProject
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor


def render(project_path: str, png: str, width: int, height: int) -> dict:
    project = QgsProject.instance()
    if not project.read(project_path):
        return {"error": f"QGIS could not read {project_path}: {project.error()}"}
    layers = project.layerTreeRoot().checkedLayers()  # legend order: top first, as QgsMapSettings wants
    settings = QgsMapSettings()
    settings.setLayers(layers)
    settings.setDestinationCrs(project.crs())
    settings.setExtent(project.viewSettings().defaultViewExtent())
    settings.setOutputSize(QSize(width, height))
    settings.setOutputDpi(96)
    settings.setBackgroundColor(QColor(255, 0, 255))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()
    saved = image.save(png, "PNG")
    shown = settings.visibleExtent()
    return {
        "saved": saved,
        "layers": [layer.name() for layer in layers],
        "invalid": [layer.name() for layer in layers if not layer.isValid()],
        "errors": [f"{e.layerID}: {e.message}" for e in job.errors()],
        "visible_extent": [shown.xMinimum(), shown.yMinimum(), shown.xMaximum(), shown.yMaximum()],
        "size": [image.width(), image.height()],
    }


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: python3 tests/qgis_render.py PROJECT.qgz OUT.png WIDTH HEIGHT")
    app = QgsApplication([], False)
    app.initQgis()
    try:
        result = render(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    except Exception as exc:  # report, then leave without exitQgis (which can crash)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)
