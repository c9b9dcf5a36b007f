"""The workflow file: a YAML description of a run, validated before any work starts.

Paths are relative to the workflow file's folder. Every error names the file, the line
and the key. ``outputs.folder`` must stay inside the project folder (the file's folder, or its
parent when the file sits in ``workflows/``); ``--out`` on the command line may go anywhere.
A workflow is trusted like a script (it names the files read and written and may name a
Dask scheduler to connect to)::

    name: sample_aoi
    sample: ../sample_aoi          # generate geoseg's sample scene here when it is missing
    aoi: ../sample_aoi/aoi.geojson
    imagery: [../sample_aoi/scene.tif]
    models: [forest, water, buildings, ships, tanks]
    outputs: {folder: ../sample_out, formats: [geojson, gpkg], quicklook: true}
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg._yaml import flat as _flat
from geoseg._yaml import load_yaml
from geoseg.errors import InputError

__all__ = ["Change", "Imagery", "ModelRun", "Outputs", "Workflow", "load_workflow"]

FORMATS = ("geojson", "gpkg", "fgb", "parquet")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRun(_Strict):
    """A model and how to run and vectorise it."""

    model: str
    bands: str | None = None
    tile: int | None = Field(None, ge=8)
    halo: int | None = Field(None, ge=0)
    min_area_m2: float = Field(0.0, ge=0)
    simplify_m: float = Field(0.0, ge=0)
    regularize: bool = False


class Imagery(_Strict):
    """Where the scenes come from: files, a glob, or a static STAC catalog/collection on disk."""

    files: list[str] | None = None
    glob: str | None = None
    stac: str | None = None
    assets: dict[str, str] | None = None  # STAC: band name -> asset key (default: eo:bands common names)
    date_from: Literal["metadata", "filename"] = "metadata"

    @model_validator(mode="after")
    def _one(self) -> Imagery:
        if sum(bool(v) for v in (self.files, self.glob, self.stac)) != 1:
            raise ValueError("give exactly one of files, glob or stac")
        return self


class Change(_Strict):
    """Change detection between dates with one model."""

    model: str
    pairs: Literal["consecutive", "baseline"] = "consecutive"
    bands: str | None = None
    min_area_m2: float = Field(0.0, ge=0)
    clouds: bool = False
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"


class Outputs(_Strict):
    """Where results go and in which formats."""

    folder: str
    formats: list[Literal["geojson", "gpkg", "fgb", "parquet"]] = ["geojson", "gpkg"]
    crs: str | None = None
    quicklook: bool = True


class Workflow(_Strict):
    """A validated workflow (paths already resolved against the file's folder)."""

    name: str = Field(min_length=1)
    description: str | None = None
    sample: str | None = None
    aoi: str | None = None
    imagery: list[str] | Imagery
    models: list[str | ModelRun] = Field(default_factory=list)
    change: list[Change] = Field(default_factory=list)
    outputs: Outputs
    scheduler: str = "local"
    workers: int | None = Field(None, ge=1)
    chunk: int | None = Field(None, ge=16)
    schedule: str | None = None
    path: str = ""

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from croniter import croniter

        try:
            valid = croniter.is_valid(v)
        except Exception:  # croniter raises more than CroniterError on odd fields (e.g. huge numbers)
            valid = False
        if not valid:
            raise ValueError(f"{v!r} is not a cron expression (minute hour day month weekday, e.g. '0 6 * * 1')")
        return v

    @field_validator("imagery")
    @classmethod
    def _some(cls, v: list[str] | Imagery) -> list[str] | Imagery:
        if isinstance(v, list) and not v:
            raise ValueError("List should have at least 1 item")
        return v

    @field_validator("change", mode="before")
    @classmethod
    def _listed(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("models")
    @classmethod
    def _as_runs(cls, v: list[str | ModelRun]) -> list[str | ModelRun]:
        names = [m if isinstance(m, str) else m.model for m in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model {dup[0]!r} is listed twice")
        return v

    def runs(self) -> list[ModelRun]:
        """Every model as a :class:`ModelRun`."""
        return [ModelRun(model=m) if isinstance(m, str) else m for m in self.models]

    def imagery_spec(self) -> Imagery:
        """The imagery as an :class:`Imagery` (a plain list means files)."""
        return Imagery(files=self.imagery) if isinstance(self.imagery, list) else self.imagery


def _project_folder(path: str) -> str:
    """The project folder of a workflow file: its folder, or that folder's parent when it is ``workflows``."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "workflows":
        folder = os.path.dirname(folder)
    return os.path.realpath(folder)


def _parse(path: str, text: str) -> tuple[Any, Any]:
    """The loaded data and the composed node tree of ``text``; :class:`InputError` when it is not YAML."""
    return load_yaml(text, path, InputError, "fix the syntax", compose=True)


def _line_of(root: Any, loc: tuple) -> int | None:
    """The 1-based YAML line of the key path ``loc`` (from a composed node tree)."""
    import yaml

    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, val in node.value:
                if k.value == str(key):
                    node, line = val, k.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def load_workflow(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Workflow:
    """Read and validate a workflow file.

    Parameters
    ----------
    path : str or os.PathLike
        The YAML file.
    out : str or os.PathLike, optional
        The command line's ``--out``: replaces ``outputs.folder`` (absolute against the
        current folder) and, being the user's own choice, may lie anywhere.

    Returns
    -------
    Workflow
        With every path made absolute against the file's folder.

    Raises
    ------
    InputError
        Missing or unreadable file, YAML errors, unknown keys, wrong types, an
        ``outputs.folder`` outside the project folder: one line naming the file, the line
        and the key.

    Notes
    -----
    ``outputs.folder`` must lie inside the project folder (the workflow file's folder, or
    its parent when that folder is named ``workflows``), compared after resolving ``..`` and
    symbolic links. The command line's ``--out`` (``out``) is not subject to this rule.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: workflow file not found; give a YAML file such as workflows/sample_aoi.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file ({exc.reason}); save the workflow as UTF-8 YAML") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the workflow file ({exc.strerror or exc}); check its permissions") from None
    data, root = _parse(path, text)
    if not isinstance(data, dict):
        raise InputError(f"{path}: a workflow is a mapping of keys (name, imagery, models, outputs, ...)")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        line = _line_of(root, (str(odd[0]),))
        raise InputError(f"{path}{f':{line}' if line else ''}: {_flat(repr(odd[0]))}: unknown key (keys are names)")
    if "path" in data:
        raise InputError(f"{path}: 'path' is not a workflow key")
    try:
        wf = Workflow.model_validate({**data, "path": os.path.abspath(path)})
    except ValidationError as exc:
        err = max(exc.errors(), key=lambda e: len(e["loc"]))  # in a union, the branch that got furthest
        skip = ("str", "ModelRun", "list[str]", "Imagery", "function-after[_some(), union[list[str],Imagery]]")
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and (x in skip or x.startswith(("function-", "union[")))))
        key = _flat(".".join(str(x) for x in loc)) or "(top level)"
        line = _line_of(root, loc)
        msg = "unknown key" if err["type"] == "extra_forbidden" else _flat(err["msg"])
        raise InputError(f"{path}{f':{line}' if line else ''}: {key}: {msg}") from None
    base = os.path.dirname(os.path.abspath(path))

    def at(loc: tuple) -> str:
        line = _line_of(root, loc)
        return f"{path}{f':{line}' if line else ''}"

    def resolve(p: str | None, loc: tuple) -> str | None:
        if p is None:
            return None
        if "\x00" in p:
            raise InputError(f"{at(loc)}: {'.'.join(map(str, loc))}: a path cannot contain a NUL character; fix the path")
        return os.path.normpath(os.path.join(base, os.path.expanduser(p)))

    im = wf.imagery_spec()
    listed = isinstance(wf.imagery, list)
    files = [resolve(p, ("imagery", i) if listed else ("imagery", "files", i)) for i, p in enumerate(im.files or [])]
    imagery = im.model_copy(
        update={
            "files": files or None,
            "glob": resolve(im.glob, ("imagery", "glob")),
            "stac": resolve(im.stac, ("imagery", "stac")),
        }
    )
    if not wf.runs() and not wf.change:
        raise InputError(f"{path}: nothing to do; give models (segmentation) or change (change detection)")
    folder = resolve(wf.outputs.folder, ("outputs", "folder"))
    project = _project_folder(path)
    real = os.path.realpath(folder)
    if out is not None:
        folder = os.path.abspath(os.fspath(out))
    elif os.path.commonpath([real, project]) != project:
        raise InputError(
            f"{at(('outputs', 'folder'))}: outputs.folder {_flat(repr(wf.outputs.folder))} is outside the project folder "
            f"{project} (it resolves to {real}); give a folder inside {project}, or pass --out on the command line"
        )
    return wf.model_copy(
        update={
            "sample": resolve(wf.sample, ("sample",)),
            "aoi": resolve(wf.aoi, ("aoi",)),
            "imagery": imagery,
            "outputs": wf.outputs.model_copy(update={"folder": folder}),
        }
    )
