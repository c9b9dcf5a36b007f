"""What a workflow run tells its user: the summary as a table, one QGIS project and one STAC Collection over every unit."""

from __future__ import annotations

import os
from typing import Any

from geoseg.records import hectares_text
from geoseg.vector.project import write_run_project
from geoseg.vector.stac import COLLECTION_NAME, ITEM_NAME, write_collection

__all__ = ["format_summary", "run_collection", "run_project"]


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    lines = []
    for entry in summary["images"]:
        lines.append(f"{entry['image']} ({entry.get('date') or 'no date'}) -> {entry['folder']}")
        lines.append(f"  {'model':<12} {'class':<16} {'objects':>8} {'area (ha)':>10} {'time (s)':>9}")
        for model, m in entry["models"].items():
            for name, c in m["classes"].items() or [("-", {"objects": 0, "area_ha": 0.0})]:
                area = "-" if c["area_ha"] is None else hectares_text(c["area_ha"])
                lines.append(f"  {model:<12} {name:<16} {c['objects']:>8} {area:>10} {m['seconds']:>9.1f}")
        if entry.get("quicklook"):
            lines.append(f"  quicklook: {entry['quicklook']}")
    for c in summary.get("changes", []):
        lines.append(f"change {c['before']} -> {c['after']} ({c['model']}) -> {c['folder']}")
        for name, v in c["classes"].items():
            lines.append(f"  {name:<24} {hectares_text(v['hectares']):>10} ha {v['polygons']:>7} polygons")
    u = summary.get("units", {})
    lines.append(
        f"units: {u.get('done', 0)} done, {u.get('skipped', 0)} skipped, {u.get('failed', 0)} failed; "
        f"summary: {os.path.join(summary['out'], 'summary.json')}; total {summary['seconds']:.1f} s"
    )
    return "\n".join(lines)


def run_project(path: str, summary: dict[str, Any], title: str) -> str:
    """Every unit of a run in one QGIS project at ``path``: a group per scene and model, and per change map.

    Parameters
    ----------
    path : str
        The ``.qgz`` to write.
    summary : dict
        The run's summary (:func:`geoseg.workflows.run.run_workflow`).
    title : str
        The project title.

    Returns
    -------
    str
        ``path``.
    """
    units = []
    for entry in summary["images"]:
        for model, res in entry["models"].items():
            name = " ".join(x for x in (entry.get("date") or os.path.basename(entry["folder"]), model) if x)
            units.append(_project_unit(name, res["folder"], "mask.tif", entry["image"]))
    for c in summary["changes"]:
        units.append(
            _project_unit(f"change {c['model']} {c['before']} -> {c['after']}", c["folder"], "change.tif", c.get("after_image"))
        )
    return write_run_project(path, units, title=title)


def _project_unit(name: str, folder: str, mask: str, imagery: str) -> tuple[str, str | None, list[str], str]:
    """A unit's group: its mask (none for a detector's unit, which writes layers only: a done segmentation unit
    always has its mask, the ledger checks its outputs), its GeoPackage, its imagery.
    """
    gpkg, mask_path = os.path.join(folder, "geoseg.gpkg"), os.path.join(folder, mask)
    return name, mask_path if os.path.isfile(mask_path) else None, [gpkg] if os.path.exists(gpkg) else [], imagery


def run_collection(folder: str, summary: dict[str, Any], wf: Any) -> str:
    """A STAC Collection (``folder/collection.json``) over every unit's ``item.json``, each scene's quicklook added.

    Parameters
    ----------
    folder : str
        The run's output folder.
    summary : dict
        The run's summary (:func:`geoseg.workflows.run.run_workflow`): the units' folders.
    wf : Workflow
        The workflow (its name and description).

    Returns
    -------
    str
        The collection's path.
    """
    items: list[tuple[str, dict[str, str]]] = []
    for entry in summary["images"]:
        more = {"quicklook": entry["quicklook"]} if entry.get("quicklook") else {}
        items += [(os.path.join(res["folder"], ITEM_NAME), more) for res in entry["models"].values()]
    items += [(os.path.join(c["folder"], ITEM_NAME), {}) for c in summary["changes"]]
    own = {"summary": os.path.join(folder, "summary.json")}
    if summary.get("project"):
        own["project"] = summary["project"]
    description = wf.description or f"geoseg run of the workflow {wf.name}: every scene x model and change map"
    return write_collection(os.path.join(folder, COLLECTION_NAME), items, wf.name, description, own)
