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
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from geoseg.errors import GeosegError, InputError, OutputError
from geoseg.io.outdir import write_json_atomic
from geoseg.io.remote import is_remote, redact
from geoseg.workflows.bands import check_bands, inherit_bands, yaml_words
from geoseg.workflows.progress import Units
from geoseg.workflows.spec import Workflow, check_inside, load_workflow
from geoseg.workflows.summary import run_collection, run_project
from geoseg.workflows.units import (
    Tally,
    card_hash,
    change_options,
    fingerprint,
    finish,
    run_lock,
    run_unit,
    scene_fingerprint,
    segment_options,
    unit_params,
)

__all__ = ["run_workflow"]

#: how to fix a unit folder that would leave the output folder
FIX = "rename the scene, model or STAC item"


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


@dataclass(frozen=True)
class _Plan:
    """A checked workflow: what runs where, known before any work starts."""

    wf: Workflow
    folder: str
    runs: list[tuple[Any, Any, Any]]  # (ModelRun, ModelSpec, parsed bands) per model
    changes: list[tuple[Any, Any]]  # (ChangeRun, ModelSpec) per change step
    scenes: list[Any]
    model_dirs: list[str]
    change_dirs: list[str]
    single: bool  # one image: its units write straight into the output folder
    by_date: bool  # change pairs are named by date
    fingerprints: dict[str, str] = field(default_factory=dict, compare=False)  # scene name -> its fingerprint

    def image_dir(self, scene: Any) -> str:
        return self.folder if self.single else os.path.join(self.folder, scene.name)

    def scene_key(self, scene: Any) -> str:
        """:func:`scene_fingerprint`, taken once per scene and run (a remote scene's costs an HTTP request)."""
        if scene.name not in self.fingerprints:
            self.fingerprints[scene.name] = scene_fingerprint(scene)
        return self.fingerprints[scene.name]


def run_workflow(
    path: str | os.PathLike, out: str | None = None, echo: Callable[[str], None] | None = None, progress: bool = False
) -> dict[str, Any]:
    """Run the workflow file at ``path``: every unit that is new or changed.

    Parameters
    ----------
    path : str or os.PathLike
        Workflow YAML (see :mod:`geoseg.workflows.spec`).
    out : str, optional
        Output folder; overrides the workflow's ``outputs.folder``.
    echo : callable, optional
        Receives one line per unit.
    progress : bool
        Units done of the total and the running unit's tiles on stderr (a bar on a terminal, else plain lines).

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
    say = echo or (lambda _line: None)
    plan = _prepare(path, out, say)  # everything that can be checked is checked before any work
    with run_lock(plan.folder):
        n_units = len(plan.scenes) * len(plan.runs) + len(plan.changes) * max(len(plan.scenes) - 1, 0)  # pairs: n - 1
        summary, tally = _execute(plan, say, Units(n_units, progress))
    if tally.failures:
        raise OutputError(f"{plan.wf.path}: {len(tally.failures)} unit(s) failed (see `geoseg runs`); first: {tally.failures[0]}")
    return summary


def _prepare(path: str | os.PathLike, out: str | None, say: Callable[[str], None]) -> _Plan:
    """Load the workflow and check models, bands, inputs, AOI and output folders."""
    wf: Workflow = load_workflow(path, out=out)
    folder = os.path.abspath(out) if out else wf.outputs.folder
    runs, changes = _resolve_models(wf)
    found = _find_scenes(wf, folder, say)
    _check_aoi(wf)
    if changes and len(found) < 2:
        raise InputError(f"{wf.path}: change detection needs at least two scenes; the imagery gives {len(found)}")
    dates = [s.date for s in found]
    plan = _Plan(
        wf=wf,
        folder=folder,
        runs=runs,
        changes=changes,
        scenes=found,
        model_dirs=_unique([_slug(r.model) for r, _, _ in runs]),
        change_dirs=_unique([_slug(ch.model) for ch, _ in changes]),
        # the layout depends on the kind of imagery, not on how many scenes a glob finds today
        single=wf.imagery_spec().files is not None and len(found) == 1,
        by_date=all(dates) and len(set(dates)) == len(dates),
    )
    _check_folders(plan)
    if found:
        check_bands(wf, runs, changes, found[0].path)
    return plan


def _resolve_models(wf: Workflow) -> tuple[list[tuple[Any, Any, Any]], list[tuple[Any, Any]]]:
    """Every model and band mapping of the segment and change steps, resolved (errors name the step or YAML key)."""
    from geoseg.models.bands import parse_band_option
    from geoseg.models.spec import resolve_model

    base = os.path.dirname(wf.path)

    def model_arg(name: str) -> str:
        local = os.path.join(base, os.path.expanduser(name))
        return local if os.path.isfile(local) else name  # a model file relative to the workflow, else a bundled name

    def resolved(step: str, name: str) -> Any:
        try:
            return resolve_model(model_arg(name))
        except GeosegError as exc:
            raise InputError(f"{wf.path}: {step}: {name}: {exc}") from None

    runs, changes = [], []
    for i, run in enumerate(wf.runs()):
        spec = resolved("models", run.model)
        _check_cuts(wf, i, run, spec)
        try:
            runs.append((run, spec, parse_band_option(run.bands)))
        except GeosegError as exc:
            raise InputError(f"{wf.path}: models[{i}].bands: {yaml_words(str(exc))}") from None
    for ch, _key in inherit_bands(wf):
        spec = resolved("change", ch.model)
        if spec.card.detector is not None:
            raise InputError(
                f"{wf.path}: change: {ch.model}: a detector gives boxes, not a mask to compare; give a segmentation model"
            )
        changes.append((ch, spec))
    return runs, changes


def _check_cuts(wf: Workflow, i: int, run: Any, spec: Any) -> None:
    """``conf``/``iou`` are a detector's keys, ``threshold`` a segmentor's: the other kind's is refused here."""
    detector = spec.card.detector is not None
    wrong = [k for k in (("threshold",) if detector else ("conf", "iou")) if getattr(run, k) is not None]
    if wrong:
        fix = "give conf instead (the lowest score kept)" if detector else "conf and iou are a detector's; drop them"
        kind = "a detector" if detector else "a segmentation model"
        raise InputError(f"{wf.path}: models[{i}].{wrong[0]}: {run.model} is {kind}; {fix}")


def _find_scenes(wf: Workflow, folder: str, say: Callable[[str], None]) -> list[Any]:
    """The dated scenes of the imagery (the sample scene generated first when the workflow uses it)."""
    import glob as globlib

    from geoseg.workflows.sources import scenes

    im = wf.imagery_spec()
    missing = [p for p in im.files or [] if not is_remote(p) and not os.path.exists(p)]
    if im.glob and not globlib.glob(im.glob) and wf.sample and os.path.dirname(im.glob) == globlib.escape(wf.sample):
        missing = [os.path.join(wf.sample, os.path.basename(im.glob))]
    if missing and wf.sample and all(os.path.dirname(p) == wf.sample for p in missing):
        from geoseg.sample import make_sample

        say(f"generating the sample scene into {wf.sample}")
        make_sample(wf.sample)
    try:
        return scenes(im, folder, wf.aoi)
    except (InputError, OutputError) as exc:
        raise type(exc)(f"{wf.path}: {exc}") from None


def _check_aoi(wf: Workflow) -> None:
    """A missing or bad AOI (no CRS, no polygons, latitudes past 90) fails here, before any unit runs."""
    if not wf.aoi:
        return
    if not os.path.exists(wf.aoi):
        raise InputError(f"{wf.path}: aoi {wf.aoi} does not exist; fix the path in 'aoi'")
    from geoseg.io.aoi import check_aoi

    try:
        check_aoi(wf.aoi)
    except InputError as exc:
        raise InputError(f"{wf.path}: aoi: {exc}") from None


def _check_folders(plan: _Plan) -> None:
    """Every folder a unit writes stays inside the output folder (names come from models, files and STAC ids)."""
    for scene in plan.scenes:
        for mdir_name in plan.model_dirs:
            check_inside(plan.folder, os.path.join(plan.image_dir(scene), mdir_name), f"the output folder of {scene.name}", FIX)
    for ch_dir in plan.change_dirs:
        check_inside(plan.folder, os.path.join(plan.folder, "change", ch_dir), "a change output folder", FIX)


def _execute(plan: _Plan, say: Callable[[str], None], units: Units) -> tuple[dict[str, Any], Tally]:
    """Every unit under the ledger, on one scheduler; the summary written last."""
    from geoseg.engine import scheduler
    from geoseg.workflows.ledger import Ledger

    wf = plan.wf
    ledger = Ledger(plan.folder)
    try:
        ledger.start_run()
    except BaseException:
        ledger.close()
        raise
    tally, t0 = Tally(), time.perf_counter()
    summary: dict[str, Any] = {"workflow": wf.name, "file": wf.path, "out": plan.folder, "images": [], "changes": []}
    interrupted = True
    try:
        with scheduler(wf.scheduler, workers=wf.workers, chunks=_chunks(plan)) as sched:
            masks: dict[tuple[str, str], str] = {}
            for scene in plan.scenes:
                summary["images"].append(_scene(plan, scene, ledger, tally, sched, masks, say, units))
            for (ch, spec), ch_dir in zip(plan.changes, plan.change_dirs, strict=True):
                summary["changes"] += _change_pairs(plan, ch, spec, ch_dir, ledger, tally, masks, say, units)
        interrupted = False
    finally:
        finish(ledger, interrupted, tally)
    summary["units"] = tally.counts
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    project = os.path.join(plan.folder, "project.qgz")
    if "gpkg" in wf.outputs.formats and (summary["images"] or summary["changes"]):
        if tally.counts["done"] or not os.path.exists(project):  # nothing new: keep it as it is
            run_project(project, summary, f"geoseg run: {wf.name}")
        summary["project"] = project
    run_collection(plan.folder, summary, wf)  # collection.json over every unit's item.json
    write_json_atomic(os.path.join(plan.folder, "summary.json"), summary, indent=2)
    return summary, tally


def _chunks(plan: _Plan) -> int | None:
    """The run's size for ``scheduler: auto``: chunks summed over the scenes (each model's pass is one such job)."""
    if plan.wf.scheduler != "auto":
        return None
    from geoseg.engine.preflight import raster_chunks

    return sum(raster_chunks(scene.path, plan.wf.aoi, plan.wf.chunk) for scene in plan.scenes)


def _scene(
    plan: _Plan, scene: Any, ledger: Any, tally: Tally, sched: Any, masks: dict, say: Callable, units: Units
) -> dict[str, Any]:
    """Every model on one scene (a unit each), then the scene's quicklook."""
    from geoseg.workflows.quicklook import Overlay

    wf, img_dir = plan.wf, plan.image_dir(scene)
    entry: dict[str, Any] = {"image": redact(scene.path), "date": scene.date, "folder": img_dir, "models": {}}
    overlays = []
    done_before = tally.counts["done"]
    for (run, spec, bands), mdir_name in zip(plan.runs, plan.model_dirs, strict=True):
        mdir = os.path.join(img_dir, mdir_name)
        options = segment_options(wf, run, bands)
        params = {
            "scene": plan.scene_key(scene),
            "model": spec.sha256,
            "card": card_hash(spec),
            **unit_params(options),
        }
        res = run_unit(
            ledger, plan.folder, mdir, "segment", scene.name, run.model, params, tally, say,
            units.unit(os.path.relpath(mdir, plan.folder), partial(_segment, scene, spec, options, mdir, sched)),
        )  # fmt: skip
        if res is not None:
            entry["models"][run.model] = res
            if spec.card.detector is None:  # a detector writes layers, no mask: nothing to overlay or compare
                masks[(scene.name, spec.sha256)] = os.path.join(mdir, "mask.tif")
                overlays.append(Overlay(os.path.join(mdir, "mask.tif"), mdir_name))
    png = check_inside(plan.folder, os.path.join(img_dir, "quicklook.png"), "the quicklook", FIX)
    if wf.outputs.quicklook and overlays:
        if tally.counts["done"] > done_before or not os.path.exists(png):  # nothing new: keep it as it is
            from geoseg.workflows.quicklook import quicklook

            quicklook(scene.path, overlays, png, title=f"{wf.name}: {scene.name} {scene.date or ''}".strip())
        entry["quicklook"] = png
    return entry


def _change_pairs(
    plan: _Plan, ch: Any, spec: Any, ch_dir: str, ledger: Any, tally: Tally, masks: dict, say: Callable, units: Units
) -> list[dict[str, Any]]:
    """One change unit per date pair (consecutive, or each against the first)."""
    found, out = plan.scenes, []
    pairs = list(itertools.pairwise(found)) if ch.pairs == "consecutive" else [(found[0], s) for s in found[1:]]
    for a, b in pairs:
        pair = f"{a.date}_{b.date}" if plan.by_date else f"{a.name}_{b.name}"
        cdir = check_inside(plan.folder, os.path.join(plan.folder, "change", ch_dir, pair), "a change output folder", FIX)
        given = (masks.get((a.name, spec.sha256)), masks.get((b.name, spec.sha256)))
        kwargs = change_options(plan.wf, ch, a, b, given)
        params = {
            "before": plan.scene_key(a),
            "after": plan.scene_key(b),
            "model": spec.sha256,
            "card": card_hash(spec),
            **unit_params(kwargs),
            "masks": [fingerprint(m) for m in given],
        }
        res = run_unit(
            ledger, plan.folder, cdir, "change", f"{a.name}->{b.name}", ch.model, params, tally, say,
            units.unit(os.path.relpath(cdir, plan.folder), partial(_change, a, b, spec, kwargs, cdir)),
        )  # fmt: skip
        if res is not None:
            out.append({"before": a.date, "after": b.date, "model": ch.model, "after_image": redact(b.path), **res})
    return out


def _segment(scene: Any, spec: Any, options: dict[str, Any], mdir: str, sched: Any, progress: Any) -> tuple[dict, list[str]]:
    from geoseg.pipeline import segment

    done = segment(
        scene.path,
        spec,
        mdir,
        vectorize=options["vectorize"],
        overwrite=True,
        progress=progress,
        date=scene.date,
        derived_from=scene.item_hrefs,
        **options["predict"],
        **sched.predict_options(),
    )
    summary = {
        "folder": mdir,
        "classes": done.classes(),
        "warnings": done.run["warnings"],
        "resumed_chunks": done.run.get("resumed_chunks", 0),
    }
    return summary, done.files()


def _change(a: Any, b: Any, spec: Any, kwargs: dict[str, Any], cdir: str, progress: Any) -> tuple[dict[str, Any], list[str]]:
    from geoseg.change import change

    report = change(a.path, b.path, spec, cdir, overwrite=True, progress=progress, **kwargs)
    c = report["change"]
    classes = {k: {"hectares": v, "polygons": report["vectors"].get(k, 0)} for k, v in c["hectares"].items()}
    return {"folder": cdir, "classes": classes, "valid_hectares": c["valid_hectares"]}, report.files()
