"""Run a workflow: what is new, once. Masks, polygons, change maps, a summary and a quicklook.

Units of work and where they write (``OUT`` is ``outputs.folder`` or ``--out``)::

    OUT/<model>/...                       one scene: mask.tif, run.json, geoseg.gpkg, vectors/, project.qgz
    OUT/<scene>/<model>/...               several scenes
    OUT/change/<model>/<date1>_<date2>/   change.tif, run.json, polygons (one per date pair)
    OUT/quicklook.png (OUT/<scene>/quicklook.png), OUT/summary.json, OUT/ledger.sqlite

Every unit is recorded in the ledger with a hash of what it depends on; a unit that is
done with the same hash and whose outputs exist is skipped, so re-running a finished
workflow does nothing and changing a parameter redoes only what it affects. A run killed
mid-way leaves its unit "running" in the ledger (shown as interrupted next time) and the
engine's finished chunk parts in a staging folder: the next run redoes that unit and
reuses those chunks. One ``geoseg run`` at a time per output folder.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

from geoseg.errors import DiskFullError, GeosegError, InputError, OutputError
from geoseg.io.outdir import hold_lock_file, write_json_atomic
from geoseg.workflows.spec import Workflow, load_workflow

__all__ = ["format_summary", "run_workflow"]

RUN_LOCK = ".geoseg-run.lock"


def _slug(text: str) -> str:
    """A folder name from a model name or path: never ``.``/``..``, hidden or over 80 characters."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(text))[0]).lstrip(".") or "model"
    return slug[:80]


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


def _fingerprint(path: str | None, stamp: str = "") -> str | None:
    """Size and mtime of ``path`` and of every file it is read from (a VRT's sources), plus ``stamp``."""
    from geoseg.io.raster import file_fingerprint

    if path is None:
        return None
    return file_fingerprint(path) + (f"|{stamp}" if stamp else "")


def _run_lock(folder: str):
    """One ``geoseg run`` per output folder (a second one is refused at once); the lock file is never a link."""
    return hold_lock_file(
        folder,
        RUN_LOCK,
        "run lock",
        f"pid {os.getpid()}",
        lambda holder: (
            f"{folder}: another geoseg run is working on this output folder ({holder or 'another process'}); "
            "wait for it to finish"
        ),
    )


def run_workflow(path: str | os.PathLike, out: str | None = None, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the workflow file at ``path``: every unit that is new or changed.

    Parameters
    ----------
    path : str or os.PathLike
        Workflow YAML (see :mod:`geoseg.workflows.spec`).
    out : str, optional
        Output folder; overrides the workflow's ``outputs.folder``.
    echo : callable, optional
        Receives one line per unit.

    Returns
    -------
    dict
        The summary (also written to ``OUT/summary.json``): per scene and model, objects
        and hectares per class; per change pair, hectares per transition; units done,
        skipped and failed.

    Raises
    ------
    GeosegError
        Before any work: a bad workflow, model, band mapping or missing input. After: when
        any unit failed (the others still ran; the ledger has each error).
    """
    from geoseg.models.bands import parse_band_option
    from geoseg.models.spec import resolve_model
    from geoseg.workflows.ledger import Ledger
    from geoseg.workflows.sources import scenes

    say = echo or (lambda _line: None)
    wf: Workflow = load_workflow(path, out=out)
    folder = os.path.abspath(out) if out else wf.outputs.folder
    base = os.path.dirname(wf.path)

    def model_arg(name: str) -> str:
        local = os.path.join(base, os.path.expanduser(name))
        return local if os.path.isfile(local) else name  # a model file relative to the workflow, else a bundled name

    # everything that can be checked is checked before any work: models, bands, inputs
    runs = []
    for run in wf.runs():
        try:
            spec = resolve_model(model_arg(run.model))
            bands = parse_band_option(run.bands)
        except GeosegError as exc:
            raise InputError(f"{wf.path}: models: {run.model}: {exc}") from None
        runs.append((run, spec, bands))
    changes = []
    for ch in wf.change:
        try:
            spec = resolve_model(model_arg(ch.model))
            parse_band_option(ch.bands)
        except GeosegError as exc:
            raise InputError(f"{wf.path}: change: {ch.model}: {exc}") from None
        changes.append((ch, spec))
    im = wf.imagery_spec()
    import glob as globlib

    missing = [p for p in im.files or [] if not os.path.exists(p)]
    if im.glob and not globlib.glob(im.glob) and wf.sample and os.path.dirname(im.glob) == globlib.escape(wf.sample):
        missing = [os.path.join(wf.sample, os.path.basename(im.glob))]
    if missing and wf.sample and all(os.path.dirname(p) == wf.sample for p in missing):
        from geoseg.sample import make_sample

        say(f"generating the sample scene into {wf.sample}")
        make_sample(wf.sample)
    try:
        found = scenes(im, folder)
    except (InputError, OutputError) as exc:
        raise type(exc)(f"{wf.path}: {exc}") from None
    if wf.aoi and not os.path.exists(wf.aoi):
        raise InputError(f"{wf.path}: aoi {wf.aoi} does not exist; fix the path in 'aoi'")
    if wf.aoi:  # a bad AOI (no CRS, no polygons, latitudes past 90) fails here, before any unit runs
        from geoseg.io.aoi import check_aoi

        try:
            check_aoi(wf.aoi)
        except InputError as exc:
            raise InputError(f"{wf.path}: aoi: {exc}") from None
    if changes and len(found) < 2:
        raise InputError(f"{wf.path}: change detection needs at least two scenes; the imagery gives {len(found)}")
    model_dirs = _unique([_slug(r.model) for r, _, _ in runs])
    change_dirs = _unique([_slug(ch.model) for ch, _ in changes])
    # the layout depends on the kind of imagery, not on how many scenes a glob finds today
    single = im.files is not None and len(found) == 1
    dates = [s.date for s in found]
    by_date = all(dates) and len(set(dates)) == len(dates)
    # every folder a unit writes stays inside the output folder (names come from models, files and STAC ids)
    from geoseg.workflows.spec import check_inside

    fix = "rename the scene, model or STAC item"
    for scene in found:
        img_dir = folder if single else os.path.join(folder, scene.name)
        for mdir_name in model_dirs:
            check_inside(folder, os.path.join(img_dir, mdir_name), f"the output folder of {scene.name}", fix)
    for ch_dir in change_dirs:
        check_inside(folder, os.path.join(folder, "change", ch_dir), "a change output folder", fix)

    with _run_lock(folder):
        ledger = Ledger(folder)
        try:
            ledger.start_run()
        except BaseException:
            ledger.close()
            raise
        counts = {"done": 0, "skipped": 0, "failed": 0}
        failures: list[str] = []
        t0 = time.perf_counter()
        summary: dict[str, Any] = {"workflow": wf.name, "file": wf.path, "out": folder, "images": [], "changes": []}
        interrupted = True
        try:
            from geoseg.engine import scheduler

            with scheduler(wf.scheduler, workers=wf.workers) as sched:
                masks: dict[tuple[str, str], str] = {}
                for scene in found:
                    img_dir = folder if single else os.path.join(folder, scene.name)
                    entry: dict[str, Any] = {"image": scene.path, "date": scene.date, "folder": img_dir, "models": {}}
                    overlays = []
                    done_before = counts["done"]
                    for (run, spec, bands), mdir_name in zip(runs, model_dirs, strict=True):
                        mdir = os.path.join(img_dir, mdir_name)
                        params = {
                            "scene": _fingerprint(scene.path, scene.stamp),
                            "model": spec.sha256,
                            "card": _card_hash(spec),
                            "bands": run.bands,
                            "tile": run.tile,
                            "halo": run.halo,
                            "aoi": _fingerprint(wf.aoi),
                            "radiometry": _radiometry(wf),
                            "min_area_m2": run.min_area_m2,
                            "simplify_m": run.simplify_m,
                            "regularize": run.regularize,
                            "formats": sorted(wf.outputs.formats),
                            "crs": wf.outputs.crs,
                            "chunk": wf.chunk,
                        }
                        res = _unit(
                            ledger, folder, mdir, "segment", scene.name, run.model, params, counts, failures, say,
                            lambda mdir=mdir, spec=spec, bands=bands, run=run, scene=scene: _segment(
                                scene.path, spec, bands, run, wf, mdir, sched
                            ),
                        )  # fmt: skip
                        if res is not None:
                            entry["models"][run.model] = res
                            masks[(scene.name, spec.sha256)] = os.path.join(mdir, "mask.tif")
                            from geoseg.workflows.quicklook import Overlay

                            overlays.append(Overlay(os.path.join(mdir, "mask.tif"), mdir_name))
                    png = check_inside(folder, os.path.join(img_dir, "quicklook.png"), "the quicklook", fix)
                    if wf.outputs.quicklook and overlays:
                        if counts["done"] > done_before or not os.path.exists(png):  # nothing new: keep it as it is
                            from geoseg.workflows.quicklook import quicklook

                            title = f"{wf.name}: {scene.name} {scene.date or ''}".strip()
                            quicklook(scene.path, overlays, png, title=title)
                        entry["quicklook"] = png
                    summary["images"].append(entry)
                for (ch, spec), ch_dir in zip(changes, change_dirs, strict=True):
                    pairs = list(itertools.pairwise(found)) if ch.pairs == "consecutive" else [(found[0], s) for s in found[1:]]
                    for a, b in pairs:
                        pair = f"{a.date}_{b.date}" if by_date else f"{a.name}_{b.name}"
                        cdir = os.path.join(folder, "change", ch_dir, pair)
                        given = (masks.get((a.name, spec.sha256)), masks.get((b.name, spec.sha256)))
                        check_inside(folder, cdir, "a change output folder", fix)
                        params = {
                            "before": _fingerprint(a.path, a.stamp),
                            "after": _fingerprint(b.path, b.stamp),
                            "masks": [_fingerprint(m) for m in given],
                            "model": spec.sha256,
                            "card": _card_hash(spec),
                            "bands": ch.bands,
                            "aoi": _fingerprint(wf.aoi),
                            "min_area_m2": ch.min_area_m2,
                            "clouds": ch.clouds,
                            "resampling": ch.resampling,
                            "formats": sorted(wf.outputs.formats),
                            "crs": wf.outputs.crs,
                        }
                        res = _unit(
                            ledger, folder, cdir, "change", f"{a.name}->{b.name}", ch.model, params, counts, failures, say,
                            lambda cdir=cdir, a=a, b=b, ch=ch, spec=spec, given=given: _change(a, b, ch, spec, given, wf, cdir),
                        )  # fmt: skip
                        if res is not None:
                            summary["changes"].append({"before": a.date, "after": b.date, "model": ch.model, **res})
            interrupted = False
        finally:
            status = "interrupted" if interrupted else ("failed" if failures else "done")
            try:
                ledger.finish_run(status, counts["done"], counts["skipped"], counts["failed"])
            except GeosegError:
                if interrupted:
                    pass  # the error already on its way says what went wrong; the next run marks this one interrupted
                else:
                    raise
            finally:
                ledger.close()
        summary["units"] = counts
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(os.path.join(folder, "summary.json"), summary, indent=2)
    if failures:
        raise OutputError(f"{wf.path}: {len(failures)} unit(s) failed (see `geoseg runs`); first: {failures[0]}")
    return summary


def _unit(ledger, root, folder, kind, scene, model, params, counts, failures, say, work) -> dict[str, Any] | None:
    """Run one unit through the ledger: skip it when done, else do it and record the outcome."""
    from geoseg.workflows.ledger import params_hash

    unit_id = os.path.relpath(folder, root)
    digest = params_hash(params)
    summary_file = os.path.join(folder, ".geoseg-unit.json")
    if ledger.is_done(unit_id, digest, root) and os.path.isfile(summary_file):
        try:
            with open(summary_file) as f:
                kept = json.load(f)
        except (OSError, ValueError):
            kept = None  # unreadable: the unit is redone
        if isinstance(kept, dict):
            counts["skipped"] += 1
            say(f"{unit_id}: done earlier, skipped")
            return kept
    ledger.begin(unit_id, kind, scene, model, params, digest)
    t = time.perf_counter()
    try:
        result, outputs = work()
    except GeosegError as exc:
        counts["failed"] += 1
        if isinstance(exc, DiskFullError):  # nothing else can be written either: stop the run
            try:
                ledger.failed(unit_id, str(exc), time.perf_counter() - t)
            except GeosegError:
                pass
            raise
        ledger.failed(unit_id, str(exc), time.perf_counter() - t)
        failures.append(f"{unit_id}: {exc}")
        say(f"{unit_id}: failed: {exc}")
        return None
    except Exception as exc:  # a bug or an environment failure: recorded (when the ledger can be written), then raised
        counts["failed"] += 1
        try:
            ledger.failed(unit_id, f"{type(exc).__name__}: {exc}", time.perf_counter() - t)
        except GeosegError:
            pass
        raise
    result["seconds"] = round(time.perf_counter() - t, 1)
    write_json_atomic(summary_file, result)
    ledger.done(
        unit_id,
        [os.path.relpath(os.path.join(folder, o), root) for o in outputs] + [os.path.relpath(summary_file, root)],
        time.perf_counter() - t,
    )
    counts["done"] += 1
    found = ", ".join(f"{k} {v.get('objects', v.get('hectares'))}" for k, v in result.get("classes", {}).items())
    say(f"{unit_id}: {found or 'done'} ({result['seconds']:.1f} s)")
    return result


def _card_hash(spec) -> str:
    from geoseg.models.card import card_to_dict
    from geoseg.workflows.ledger import params_hash

    return params_hash(card_to_dict(spec.card))


def _radiometry(wf: Workflow) -> str | None:
    """The imagery's radiometry setting (models that take reflectance), if the workflow gives one."""
    return getattr(wf.imagery, "radiometry", None)


def _segment(image: str, spec, bands, run, wf: Workflow, mdir: str, sched) -> tuple[dict[str, Any], list[str]]:
    from geoseg.engine import predict, write
    from geoseg.vector import vectorize

    band_idx, band_map = bands
    result = predict(
        image,
        spec,
        bands=band_idx,
        band_map=band_map,
        aoi=wf.aoi,
        tile=run.tile,
        halo=run.halo,
        chunk=wf.chunk,
        num_threads=sched.num_threads,
        resources=sched.resources,
        device="cuda" if sched.gpus else "auto",
        radiometry=_radiometry(wf),
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
    outputs = [*list(report["outputs"].values()), "run.json", "vectors.json"]
    for v in vrep["outputs"].values():
        outputs += v if isinstance(v, list) else [v]
    return {
        "folder": mdir,
        "classes": classes,
        "warnings": report["warnings"],
        "resumed_chunks": report.get("resumed_chunks", 0),
    }, outputs


def _change(a, b, ch, spec, given, wf: Workflow, cdir: str) -> tuple[dict[str, Any], list[str]]:
    from geoseg.change import change

    report = change(
        a.path,
        b.path,
        spec,
        cdir,
        aoi=wf.aoi,
        bands_before=ch.bands,
        bands_after=ch.bands,
        mask_model="clouds" if ch.clouds else None,
        min_area=ch.min_area_m2,
        formats=tuple(wf.outputs.formats),
        resampling=ch.resampling,
        date_before=a.date,
        date_after=b.date,
        overwrite=True,
        chunk=wf.chunk,
        masks=given if all(given) else None,
        crs=wf.outputs.crs,
        radiometry=_radiometry(wf),
    )
    c = report["change"]
    classes = {k: {"hectares": v, "polygons": report["vectors"].get(k, 0)} for k, v in c["hectares"].items()}
    with open(os.path.join(cdir, "vectors.json")) as f:
        vouts = json.load(f)["outputs"]
    outputs = ["change.tif", "run.json", "vectors.json"]
    for v in vouts.values():
        outputs += v if isinstance(v, list) else [v]
    return {"folder": cdir, "classes": classes, "valid_hectares": c["valid_hectares"]}, outputs


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    lines = []
    for entry in summary["images"]:
        lines.append(f"{entry['image']} ({entry.get('date') or 'no date'}) -> {entry['folder']}")
        lines.append(f"  {'model':<12} {'class':<16} {'objects':>8} {'area (ha)':>10} {'time (s)':>9}")
        for model, m in entry["models"].items():
            for name, c in m["classes"].items() or [("-", {"objects": 0, "area_ha": 0.0})]:
                area = "-" if c["area_ha"] is None else f"{c['area_ha']:.2f}"
                lines.append(f"  {model:<12} {name:<16} {c['objects']:>8} {area:>10} {m['seconds']:>9.1f}")
        if entry.get("quicklook"):
            lines.append(f"  quicklook: {entry['quicklook']}")
    for c in summary.get("changes", []):
        lines.append(f"change {c['before']} -> {c['after']} ({c['model']}) -> {c['folder']}")
        for name, v in c["classes"].items():
            lines.append(f"  {name:<24} {v['hectares']:>10.2f} ha {v['polygons']:>7} polygons")
    u = summary.get("units", {})
    lines.append(
        f"units: {u.get('done', 0)} done, {u.get('skipped', 0)} skipped, {u.get('failed', 0)} failed; "
        f"summary: {os.path.join(summary['out'], 'summary.json')}; total {summary['seconds']:.1f} s"
    )
    return "\n".join(lines)
