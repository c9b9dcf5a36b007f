"""A workflow's units of work under the ledger: skip what is done, run the rest, record every outcome.

A unit (one scene × model, or one date pair × change model) is identified by its folder and
by a hash of what its outputs depend on: the inputs' fingerprints, the model and card hashes
and the exact options it runs with (see :func:`unit_params`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from geoseg.errors import DiskFullError, GeosegError
from geoseg.io.files import file_fingerprint
from geoseg.io.outdir import hold_lock_file, removed_if_failed, write_json_atomic
from geoseg.io.remote import redact
from geoseg.models.card import card_to_dict
from geoseg.records import hectares_text
from geoseg.workflows.ledger import params_hash
from geoseg.workflows.spec import Workflow

__all__ = [
    "RUN_LOCK",
    "Tally",
    "card_hash",
    "change_options",
    "fingerprint",
    "finish",
    "found_text",
    "run_lock",
    "run_unit",
    "scene_fingerprint",
    "segment_options",
    "unit_params",
    "workflow_radiometry",
]

RUN_LOCK = ".geoseg-run.lock"


@dataclass
class Tally:
    """Units done, skipped and failed in this run, and the failures' lines."""

    counts: dict[str, int] = field(default_factory=lambda: {"done": 0, "skipped": 0, "failed": 0})
    failures: list[str] = field(default_factory=list)


def fingerprint(path: str | None, stamp: str = "", content: bool = False) -> str | None:
    """Size and mtime of ``path`` and of every file it is read from (a VRT's sources), plus ``stamp``;
    with ``content``, a VRT by its text (see :func:`geoseg.io.files.file_fingerprint`).
    """
    if path is None:
        return None
    return file_fingerprint(path, content=content) + (f"|{stamp}" if stamp else "")


def scene_fingerprint(scene: Any) -> str:
    """What a scene's units depend on: its files (:func:`fingerprint`) and stamp; a STAC scene's VRT by its
    text with the tokens redacted, not its mtime (signed hrefs are signed again, and the VRT rewritten, each run).
    """
    return fingerprint(scene.path, scene.stamp, content=bool(scene.items))


def run_lock(folder: str):
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


def card_hash(spec: Any) -> str:
    """A hash of the model card (its classes, scaling and rules decide the outputs as much as the weights)."""
    return params_hash(card_to_dict(spec.card))


def unit_params(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the AOI file by fingerprint (its content, not only its path, decides the outputs)."""
    out = {k: (unit_params(v) if isinstance(v, dict) else v) for k, v in options.items()}
    if "aoi" in out:
        out["aoi"] = fingerprint(out["aoi"])
    return out


def finish(ledger: Any, interrupted: bool, tally: Tally) -> None:
    """Record how the run ended and close the ledger."""
    counts = tally.counts
    status = "interrupted" if interrupted else ("failed" if tally.failures else "done")
    try:
        ledger.finish_run(status, counts["done"], counts["skipped"], counts["failed"])
    except GeosegError:
        if not interrupted:
            raise  # else the error already on its way says what went wrong; the next run marks this one interrupted
    finally:
        ledger.close()


def run_unit(
    ledger: Any,
    root: str,
    folder: str,
    kind: str,
    scene: str,
    model: str,
    params: dict[str, Any],
    tally: Tally,
    say: Callable[[str], None],
    work: Callable[[], tuple[dict[str, Any], list[str]]],
) -> dict[str, Any] | None:
    """Run one unit through the ledger: skip it when done, else do it and record the outcome."""
    counts, failures = tally.counts, tally.failures

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
        with removed_if_failed(folder):  # a failed unit leaves no empty folder
            result, outputs = work()
    except GeosegError as exc:
        counts["failed"] += 1
        message = redact(str(exc))  # a signed URL's token in GDAL's words never reaches the ledger or the log
        if isinstance(exc, DiskFullError):  # nothing else can be written either: stop the run
            try:
                ledger.failed(unit_id, message, time.perf_counter() - t)
            except GeosegError:
                pass
            raise
        ledger.failed(unit_id, message, time.perf_counter() - t)
        failures.append(f"{unit_id}: {message}")
        say(f"{unit_id}: failed: {message}")
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
    say(f"{unit_id}: {found_text(result) or 'done'} ({result['seconds']:.1f} s)")
    return result


def found_text(result: dict[str, Any]) -> str:
    """What a unit found, for its log line: objects per class, or hectares per transition (rounded for people)."""
    return ", ".join(
        f"{k} {v['objects']}" if "objects" in v else f"{k} {hectares_text(v['hectares'])} ha"
        for k, v in result.get("classes", {}).items()
    )


def workflow_radiometry(wf: Workflow) -> str | None:
    """The imagery's radiometry setting (models that take reflectance), if the workflow gives one."""
    return getattr(wf.imagery, "radiometry", None)


def segment_options(wf: Workflow, run: Any, bands: tuple[Any, Any]) -> dict[str, Any]:
    """What a segment unit is run with; the ledger hashes exactly this (files by fingerprint)."""
    band_idx, band_map = bands
    # conf, iou, threshold and precision only when given: a unit without them hashes as before they existed
    cuts = {k: getattr(run, k) for k in ("conf", "iou", "threshold", "precision") if getattr(run, k) is not None}
    return {
        "predict": {
            "bands": band_idx,
            "band_map": band_map,
            "aoi": wf.aoi,
            "tile": run.tile,
            "halo": run.halo,
            "chunk": wf.chunk,
            "radiometry": workflow_radiometry(wf),
            **cuts,
        },
        "vectorize": {
            "formats": wf.outputs.formats,
            "crs": wf.outputs.crs,
            "min_area": run.min_area_m2,
            "simplify": run.simplify_m,
            "regularize": run.regularize,
        },
    }


def change_options(wf: Workflow, ch: Any, a: Any, b: Any, given: tuple[str | None, str | None]) -> dict[str, Any]:
    """The keyword arguments of a change unit's :func:`geoseg.change.change` call."""
    return {
        "aoi": wf.aoi,
        "bands_before": ch.bands,
        "bands_after": ch.bands,
        "mask_model": "clouds" if ch.clouds else None,
        "min_area": ch.min_area_m2,
        "formats": tuple(wf.outputs.formats),
        "resampling": ch.resampling,
        "date_before": a.date,
        "date_after": b.date,
        "chunk": wf.chunk,
        "masks": given if all(given) else None,
        "crs": wf.outputs.crs,
        "radiometry": workflow_radiometry(wf),
    }
