"""A workflow's band mappings: each step's own (a change step inherits its model's), checked before any work.

A ``change:`` step without ``bands`` takes the mapping its model is given under ``models:``
(the same scenes, so the same bands). Every mapping is parsed and matched against the first
scene's band descriptions before a unit runs, and a bad one fails with the YAML key that
holds it (``models[1].bands``, ``change[0].bands``), not after every scene was segmented.
"""

from __future__ import annotations

from typing import Any

from geoseg.errors import GeosegError, InputError
from geoseg.io.raster import open_source
from geoseg.models.bands import match_bands, parse_band_option
from geoseg.workflows.spec import Change, Workflow

__all__ = ["check_bands", "inherit_bands", "yaml_words"]


def inherit_bands(wf: Workflow) -> list[tuple[Change, str]]:
    """Each change step with its band mapping (its own, else its model's under ``models:``) and the key that gives it.

    Returns
    -------
    list of (Change, str)
        The step (``bands`` filled in when inherited) and the YAML key of its mapping.
    """
    given = {run.model: (run.bands, f"models[{i}].bands") for i, run in enumerate(wf.runs()) if run.bands}
    out = []
    for i, ch in enumerate(wf.change):
        key = f"change[{i}].bands"
        if ch.bands is None and ch.model in given:
            bands, origin = given[ch.model]
            ch, key = ch.model_copy(update={"bands": bands}), f"{key} (from {origin})"
        out.append((ch, key))
    return out


def yaml_words(message: str) -> str:
    """A band error worded for the workflow file: the API's ``bands=`` and ``band_map=`` are the step's ``bands`` key.

    ``band_map={'nir': 4, 'red': 3}`` reads ``bands nir=4,red=3``, ``bands='3,2'`` reads ``bands '3,2'``.
    """
    while "band_map={" in message:
        head, _, rest = message.partition("band_map={")
        pairs, _, tail = rest.partition("}")
        keys = (pair.partition(":") for pair in pairs.split(","))
        mapping = ",".join(f"{k.strip().strip(chr(39) + chr(34))}={v.strip()}" for k, _, v in keys)
        message = f"{head}bands {mapping}{tail}"
    for api in ("band_map=", "bands="):
        parts = message.split(api)
        message = parts[0] + "".join(("bands " if p[:1] not in ("", " ", ",", ";", ")") else "bands") + p for p in parts[1:])
    return message


def check_bands(wf: Workflow, runs: list[tuple[Any, Any, Any]], changes: list[tuple[Change, Any]], scene: str) -> None:
    """Match every step's bands against the first scene, as the engine will; errors name the YAML key.

    Parameters
    ----------
    wf : Workflow
        The workflow (its file names the error).
    runs : list of (ModelRun, ModelSpec, parsed bands)
        The segment steps, in ``models:`` order.
    changes : list of (Change, ModelSpec)
        The change steps from :func:`inherit_bands`, in ``change:`` order.
    scene : str
        The first scene's raster.

    Raises
    ------
    InputError
        A mapping that does not parse, names bands the model or the scene does not have, or
        selects a different number of bands than the model takes.
    """
    steps = [(f"models[{i}].bands", spec, run.bands) for i, (run, spec, _) in enumerate(runs)]
    keys = [key for _, key in inherit_bands(wf)]
    steps += [(key, spec, ch.bands) for key, (ch, spec) in zip(keys, changes, strict=True)]
    src = open_source(scene, require_crs=False)
    for key, spec, bands in steps:
        try:
            _match(spec.card, bands, src)
        except GeosegError as exc:
            raise InputError(f"{wf.path}: {key}: {yaml_words(str(exc))}") from None


def _match(card: Any, bands: str | None, src: Any) -> None:
    """Select the bands ``card`` takes from ``src`` with the mapping ``bands``, as the engine does."""
    idx, mapping = parse_band_option(bands)
    if not card.bands:
        if mapping:
            raise InputError("band_map= needs a model card that names its bands; give band numbers (bands=3,2,1)")
    elif idx is None:
        idx = match_bands(card.bands, src.band_descriptions, mapping, origin=src.path)
    elif len(idx) != len(card.bands):
        raise InputError(f"bands= gives {len(idx)} band(s) but the model {card.name!r} takes {', '.join(card.bands)}")
    over = [b for b in idx or () if b > src.count]
    if over:
        raise InputError(f"bands= band {over[0]} but {src.path} has {src.count} band(s)")
