"""Run a workflow: every model on every image, masks, polygons, a summary and a quicklook.

Outputs (``OUT`` is the workflow's ``outputs.folder`` or ``--out``)::

    OUT/<model>/mask.tif, run.json, geoseg.gpkg, vectors/*.geojson, project.qgz, vectors.json
    OUT/quicklook.png          the scene with every class drawn over it, and a legend
    OUT/summary.json           objects and area per class, timings

With several images each gets its own folder ``OUT/<image name>/``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from geoseg.errors import GeosegError, InputError
from geoseg.workflows.spec import Workflow, load_workflow

__all__ = ["format_summary", "run_workflow"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(text))[0]) or "model"


def _unique(names: list[str]) -> list[str]:
    """Folder names made unique (``unet``, ``unet-2``) so no output replaces another."""
    out: list[str] = []
    for n in names:
        name, k = n, 2
        while name in out:
            name, k = f"{n}-{k}", k + 1
        out.append(name)
    return out


def _areas(vreport: dict[str, Any], out_dir: str) -> dict[str, float]:
    """Area in hectares per layer, summed from the written polygons' ``area_m2``."""
    import pyogrio

    outputs = vreport["outputs"]
    per_layer = [f for fmt in ("fgb", "parquet", "geojson") for f in outputs.get(fmt) or []]
    out: dict[str, float] = {}
    for layer in vreport["layers"]:
        if outputs.get("gpkg"):
            path, name = os.path.join(out_dir, outputs["gpkg"]), layer["name"]
        else:
            hits = [f for f in per_layer if os.path.splitext(os.path.basename(f))[0] == layer["name"]]
            if not hits:
                continue
            path, name = os.path.join(out_dir, hits[0]), None
        if layer["features"] == 0:
            out[layer["name"]] = 0.0
            continue
        df = pyogrio.read_dataframe(path, layer=name, columns=["area_m2"], read_geometry=False)
        out[layer["name"]] = round(float(df["area_m2"].sum()) / 10_000, 3)
    return out


def run_workflow(path: str | os.PathLike, out: str | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the workflow file at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        Workflow YAML (see :mod:`geoseg.workflows.spec`).
    out : str, optional
        Output folder; overrides the workflow's ``outputs.folder``.
    echo : callable, optional
        Receives one line per finished step.

    Returns
    -------
    dict
        The summary (also written to ``OUT/summary.json``).
    """
    from geoseg.engine import predict, scheduler, write
    from geoseg.models.card import parse_band_option
    from geoseg.models.spec import resolve_model
    from geoseg.vector import vectorize
    from geoseg.workflows.quicklook import Overlay, quicklook

    say = echo or (lambda _line: None)
    wf: Workflow = load_workflow(path)
    folder = os.path.abspath(out) if out else wf.outputs.folder
    # everything that can be checked is checked before any work: models, bands, output names
    base = os.path.dirname(wf.path)
    runs = []
    for run in wf.runs():
        model = run.model
        local = os.path.join(base, os.path.expanduser(model))
        if os.path.exists(local):
            model = local  # a model file, relative to the workflow
        try:
            resolve_model(model)
            bands = parse_band_option(run.bands)
        except GeosegError as exc:
            raise InputError(f"{wf.path}: models: {run.model}: {exc}") from None
        runs.append((run, model, bands))
    model_dirs = _unique([_slug(r.model) for r in wf.runs()])
    image_dirs = _unique([_slug(p) for p in wf.imagery])
    missing = [p for p in wf.imagery if not os.path.exists(p)]
    if missing and wf.sample and all(os.path.dirname(p) == wf.sample for p in missing):
        from geoseg.sample import make_sample

        say(f"generating the sample scene into {wf.sample}")
        make_sample(wf.sample)
        missing = [p for p in wf.imagery if not os.path.exists(p)]
    if missing:
        raise InputError(f"{wf.path}: imagery {missing[0]} does not exist; fix the path in 'imagery'")
    if wf.aoi and not os.path.exists(wf.aoi):
        raise InputError(f"{wf.path}: aoi {wf.aoi} does not exist; fix the path in 'aoi'")
    os.makedirs(folder, exist_ok=True)
    for stale in ("summary.json",):  # never leave a summary of an earlier run beside new outputs
        if os.path.exists(os.path.join(folder, stale)):
            os.remove(os.path.join(folder, stale))
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"workflow": wf.name, "file": wf.path, "out": folder, "images": []}
    with scheduler(wf.scheduler, workers=wf.workers) as sched:
        for image, image_dir in zip(wf.imagery, image_dirs, strict=True):
            img_dir = folder if len(wf.imagery) == 1 else os.path.join(folder, image_dir)
            entry: dict[str, Any] = {"image": image, "folder": img_dir, "models": {}}
            overlays = []
            for (run, model, (band_idx, band_map)), model_dir in zip(runs, model_dirs, strict=True):
                t1 = time.perf_counter()
                mdir = os.path.join(img_dir, model_dir)
                result = predict(
                    image,
                    model,
                    bands=band_idx,
                    band_map=band_map,
                    aoi=wf.aoi,
                    num_threads=sched.num_threads,
                    resources=sched.resources,
                    device="cuda" if sched.gpus else "auto",
                )
                report = write(result, mdir, overwrite=True)
                vrep = vectorize(
                    os.path.join(mdir, "mask.tif"),
                    mdir,
                    formats=wf.outputs.formats,
                    crs=wf.outputs.crs,
                    min_area=run.min_area_m2,
                    simplify=run.simplify_m,
                    regularize=run.regularize,
                    overwrite=True,
                )
                areas = _areas(vrep, mdir)
                classes = {ly["name"]: {"objects": ly["features"], "area_ha": areas.get(ly["name"])} for ly in vrep["layers"]}
                seconds = round(time.perf_counter() - t1, 1)
                entry["models"][run.model] = {
                    "folder": mdir,
                    "classes": classes,
                    "seconds": seconds,
                    "warnings": report["warnings"],
                }
                overlays.append(Overlay(os.path.join(mdir, "mask.tif"), model_dir))
                found = ", ".join(f"{k} {v['objects']}" for k, v in classes.items()) or "nothing found"
                say(f"{run.model}: {found} ({seconds:.1f} s)")
            if wf.outputs.quicklook:
                png = os.path.join(img_dir, "quicklook.png")
                quicklook(image, overlays, png, title=f"{wf.name}: {os.path.basename(image)}")
                entry["quicklook"] = png
            summary["images"].append(entry)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    from geoseg.io.cog import atomic_path, fsync_replace

    target = os.path.join(folder, "summary.json")
    tmp = atomic_path(target)
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    fsync_replace(tmp, target)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    lines = []
    for entry in summary["images"]:
        lines.append(f"{entry['image']} -> {entry['folder']}")
        lines.append(f"  {'model':<12} {'class':<16} {'objects':>8} {'area (ha)':>10} {'time (s)':>9}")
        for model, m in entry["models"].items():
            for name, c in m["classes"].items() or [("-", {"objects": 0, "area_ha": 0.0})]:
                area = "-" if c["area_ha"] is None else f"{c['area_ha']:.2f}"
                lines.append(f"  {model:<12} {name:<16} {c['objects']:>8} {area:>10} {m['seconds']:>9.1f}")
        if entry.get("quicklook"):
            lines.append(f"  quicklook: {entry['quicklook']}")
    lines.append(f"summary: {os.path.join(summary['out'], 'summary.json')}; total {summary['seconds']:.1f} s")
    return "\n".join(lines)
