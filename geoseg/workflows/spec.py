"""The workflow file: a YAML description of a run, validated before any work starts.

Under 500 lines: the whole schema (pydantic models, one per YAML section, the STAC API search keys with them) with the
line-numbered error reporting that goes with it, kept in one file so the format reads in one place.

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
from geoseg.io.remote import is_http_url, is_remote

__all__ = ["Change", "Imagery", "ModelRun", "Outputs", "Workflow", "check_cron", "check_inside", "load_workflow"]

FORMATS = ("geojson", "gpkg", "fgb", "parquet")


CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


def check_cron(cron: str) -> str:
    """Validate a ``schedule:`` cron expression: five fields (or an alias) that fire at some time.

    Parameters
    ----------
    cron : str
        E.g. ``"0 6 * * 1"`` (Mondays at 06:00) or ``"@daily"``.

    Returns
    -------
    str
        ``cron`` unchanged.

    Raises
    ------
    ValueError
        Not five fields (a sixth would be read as seconds), not a cron expression, or one
        that never fires (``0 0 30 2 *``). The message names no file: callers add it.
    """
    from datetime import datetime, timezone

    from croniter import croniter

    text = cron.strip()
    shown = text if len(text) <= 60 else text[:57] + "..."
    fields = text.split()
    if len(fields) == 1 and fields[0].lower() in CRON_ALIASES:
        return cron
    if len(fields) != 5:
        raise ValueError(
            f"{shown!r} is not a cron expression of five fields (it has {len(fields)}); give minute hour day month "
            "weekday, e.g. '0 6 * * 1', or @daily/@hourly/@weekly/@monthly"
        )
    try:
        valid = croniter.is_valid(text)
    except Exception:  # croniter raises more than CroniterError on odd fields (e.g. huge numbers)
        valid = False
    if not valid:
        raise ValueError(f"{shown!r} is not a cron expression (minute hour day month weekday, e.g. '0 6 * * 1')")
    try:
        croniter(text, datetime.now(timezone.utc)).get_next(datetime)
    except Exception:  # CroniterBadDateError: no such date in the years croniter searches
        raise ValueError(f"{shown!r} never fires (no such date); fix the day or month, e.g. '0 6 28 2 *'") from None
    return cron


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRun(_Strict):
    """A model and how to run and vectorise it."""

    model: str
    bands: str | None = None
    tile: int | None = Field(None, ge=8)
    halo: int | None = Field(None, ge=0)
    min_area_m2: float | None = Field(None, ge=0, allow_inf_nan=False)  # default: the model's object rules
    simplify_m: float = Field(0.0, ge=0, allow_inf_nan=False)
    regularize: bool = False
    # a detector's lowest score kept and its suppression IoU; a binary segmentor's class-1 probability cut
    # (default: the model's card); only the keys given enter the unit's hash, so older ledgers stay valid
    conf: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    iou: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    threshold: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    # arithmetic: fast = bf16 on CPUs with AVX-512 BF16/AMX (ONNX through OpenVINO), fp16 on GPUs; hashed when given
    precision: Literal["fp32", "fast", "bf16", "fp16"] | None = None


class Imagery(_Strict):
    """Where the scenes come from: files, a glob, a static STAC catalog/collection, or a STAC API search."""

    files: list[str] | None = None
    glob: str | None = None
    stac: str | None = None
    # STAC: band name -> asset key, or a list of asset keys (default: eo:bands common names)
    assets: dict[str, str] | list[str] | None = None
    # a STAC API search (stac: https://...): the workflow's AOI is its intersects geometry
    collections: list[str] | None = None
    datetime: str | None = None
    query: dict[str, dict[Literal["eq", "neq", "lt", "lte", "gt", "gte", "in"], Any]] | None = None
    filter: dict[str, Any] | None = None  # CQL2-JSON
    max_items: int | None = Field(None, ge=1)
    date_from: Literal["metadata", "filename"] = "metadata"
    # how the scenes store reflectance (models that take reflectance): a preset or scale=S,offset=O
    radiometry: str | None = None

    @field_validator("radiometry")
    @classmethod
    def _radiometry(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from geoseg.io.radiometry import parse_radiometry

        try:
            parse_radiometry(v)
        except InputError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("datetime", mode="before")
    @classmethod
    def _iso(cls, v: Any) -> Any:
        """A bare YAML date (``datetime: 2024-05-01``) is that day."""
        import datetime as dt

        return v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v

    def search_keys(self) -> list[str]:
        """The STAC API search keys given (``collections``, ``datetime``, ``query``, ``filter``, ``max_items``)."""
        return [k for k in ("collections", "datetime", "query", "filter", "max_items") if getattr(self, k) is not None]

    @model_validator(mode="after")
    def _one(self) -> Imagery:
        if sum(bool(v) for v in (self.files, self.glob, self.stac)) != 1:
            raise ValueError("give exactly one of files, glob or stac")
        search = self.search_keys()
        if search and not (self.stac and is_http_url(self.stac)):
            raise ValueError(f"{search[0]} searches a STAC API: give stac: https://... (the API's address)")
        return self


class Change(_Strict):
    """Change detection between dates with one model."""

    model: str
    pairs: Literal["consecutive", "baseline"] = "consecutive"
    bands: str | None = None
    min_area_m2: float = Field(0.0, ge=0, allow_inf_nan=False)
    clouds: bool = False
    resampling: Literal["nearest", "bilinear", "cubic", "average"] = "bilinear"


class Outputs(_Strict):
    """Where results go and in which formats."""

    folder: str
    formats: list[Literal["geojson", "gpkg", "fgb", "parquet"]] = ["geojson", "gpkg"]
    crs: str | None = None
    quicklook: bool = True

    @field_validator("crs")
    @classmethod
    def _known_crs(cls, v: str | None) -> str | None:
        """A CRS pyproj knows, checked here rather than after every segmentation ran."""
        if v is None:
            return v
        from pyproj import CRS

        try:
            CRS.from_user_input(v)
        except Exception as exc:  # pyproj raises CRSError, and others on odd input
            reason = " ".join(str(exc).split())[:120]
            raise ValueError(f"{v[:60]!r} is not a CRS pyproj knows ({reason}); use e.g. EPSG:32632") from None
        return v


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
    scheduler: str = "auto"
    workers: int | None = Field(None, ge=1)
    chunk: int | None = Field(None, ge=16)
    schedule: str | None = None
    path: str = ""

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        """Five fields (or an alias) that fire at some time: ``geoseg run`` refuses what ``schedule`` would."""
        if v is None:
            return v
        try:
            return check_cron(v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        """``auto``/``local``/``threads``/``synchronous`` or a well-formed scheduler address, checked before any work."""
        if v in ("auto", "local", "threads", "synchronous"):
            return v
        if "://" not in v:
            raise ValueError(f"{v!r}: use auto, local, threads, synchronous or a scheduler address such as tcp://HOST:8786")
        from geoseg.engine.security import check_address

        try:
            check_address(v)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
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


def check_inside(root: str, path: str, what: str, fix: str = "") -> str:
    """``path`` (resolved: ``..`` and symbolic links) when it lies inside the folder ``root``, else an error.

    Every path a workflow writes goes through this: outputs of units, STAC-derived file names,
    the sample folder.

    Parameters
    ----------
    root : str
        The folder ``path`` must stay in.
    path : str
        The path about to be written (it need not exist yet).
    what : str
        What the path is, for the message.
    fix : str
        How to fix it, for the message.

    Returns
    -------
    str
        ``path`` unchanged.

    Raises
    ------
    OutputError
        ``path`` resolves outside ``root``.
    """
    from geoseg.errors import OutputError

    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real, real_root]) != real_root:
        raise OutputError(
            f"{_flat(path)}: {what} resolves to {_flat(real)}, outside {_flat(real_root)}; "
            f"{fix or 'geoseg writes only inside its output folder'}"
        )
    return path


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
    data, root = _read_document(path)
    wf = _validate(path, data, root)
    if not wf.runs() and not wf.change:
        raise InputError(f"{path}: nothing to do; give models (segmentation) or change (change detection)")
    paths = _Paths(path, root)
    project = _project_folder(path)
    return wf.model_copy(
        update={
            "sample": _sample_folder(wf, paths, project),
            "aoi": paths.resolve(wf.aoi, ("aoi",)),
            "imagery": _imagery(wf, paths),
            "outputs": wf.outputs.model_copy(update={"folder": _output_folder(wf, paths, project, out)}),
        }
    )


def _read_document(path: str) -> tuple[dict, Any]:
    """The file's mapping of keys and its YAML node tree (for line numbers); one-line errors for anything else."""
    from geoseg._yaml import read_text_file

    if not os.path.exists(path):
        raise InputError(f"{path}: workflow file not found; give a YAML file such as workflows/sample_aoi.yaml")
    text = read_text_file(path, path, InputError, "workflow file")
    data, root = _parse(path, text)
    if not isinstance(data, dict):
        raise InputError(f"{path}: a workflow is a mapping of keys (name, imagery, models, outputs, ...)")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        line = _line_of(root, (str(odd[0]),))
        raise InputError(f"{path}{f':{line}' if line else ''}: {_flat(repr(odd[0]))}: unknown key (keys are names)")
    if "path" in data:
        raise InputError(f"{path}: 'path' is not a workflow key")
    return data, root


def _validate(path: str, data: dict, root: Any) -> Workflow:
    """The schema's verdict, its first refusal as one line naming the file, the line and the key."""
    try:
        return Workflow.model_validate({**data, "path": os.path.abspath(path)})
    except ValidationError as exc:
        # in a union, the branch that got furthest (on a tie, not "a list was expected": a mapping was given)
        err = max(exc.errors(), key=lambda e: (len(e["loc"]), e["type"] != "list_type"))
        skip = ("str", "ModelRun", "list[str]", "Imagery", "function-after[_some(), union[list[str],Imagery]]")
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and (x in skip or x.startswith(("function-", "union[")))))
        key = _flat(".".join(str(x) for x in loc)) or "(top level)"
        line = _line_of(root, loc)
        msg = "unknown key" if err["type"] == "extra_forbidden" else _flat(err["msg"])
        raise InputError(f"{path}{f':{line}' if line else ''}: {key}: {msg}") from None


class _Paths:
    """Paths of the file made absolute against its folder; ``at(loc)`` is ``file:line`` of a key, for messages."""

    def __init__(self, path: str, root: Any) -> None:
        self.path, self.root = path, root
        self.base = os.path.dirname(os.path.abspath(path))

    def at(self, loc: tuple) -> str:
        line = _line_of(self.root, loc)
        return f"{self.path}{f':{line}' if line else ''}"

    def resolve(self, p: str | None, loc: tuple, pattern: bool = False) -> str | None:
        if p is None or is_remote(p):  # a URL or a network /vsi path is not relative to the file's folder
            return p
        if "\x00" in p:
            raise InputError(f"{self.at(loc)}: {'.'.join(map(str, loc))}: a path cannot contain a NUL character; fix the path")
        if pattern:  # a glob: the folder it is relative to is literal, even with [ ] * ? in its name
            import glob as globlib

            return os.path.normpath(os.path.join(globlib.escape(self.base), os.path.expanduser(p)))
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(p)))


def _imagery(wf: Workflow, paths: _Paths) -> Imagery:
    """The imagery with its files, glob and STAC catalogue absolute."""
    im = wf.imagery_spec()
    listed = isinstance(wf.imagery, list)
    files = [paths.resolve(p, ("imagery", i) if listed else ("imagery", "files", i)) for i, p in enumerate(im.files or [])]
    return im.model_copy(
        update={
            "files": files or None,
            "glob": paths.resolve(im.glob, ("imagery", "glob"), pattern=True),
            "stac": paths.resolve(im.stac, ("imagery", "stac")),
        }
    )


def _output_folder(wf: Workflow, paths: _Paths, project: str, out: str | os.PathLike | None) -> str:
    """``out`` when given (the user's own choice), else ``outputs.folder``, which must stay inside the project."""
    folder = paths.resolve(wf.outputs.folder, ("outputs", "folder"))
    if out is not None:
        return os.path.abspath(os.fspath(out))
    real = os.path.realpath(folder)
    if os.path.commonpath([real, project]) != project:
        raise InputError(
            f"{paths.at(('outputs', 'folder'))}: outputs.folder {_flat(repr(wf.outputs.folder))} is outside the project "
            f"folder {project} (it resolves to {real}); give a folder inside {project}, or pass out="
        )
    return folder


def _sample_folder(wf: Workflow, paths: _Paths, project: str) -> str | None:
    """Where geoseg may write the sample scene: never outside the project."""
    sample = paths.resolve(wf.sample, ("sample",))
    if sample is not None:
        real_sample = os.path.realpath(sample)
        if os.path.commonpath([real_sample, project]) != project:
            raise InputError(
                f"{paths.at(('sample',))}: sample {_flat(repr(wf.sample))} is outside the project folder {project} "
                f"(it resolves to {_flat(real_sample)}); give a folder inside {project}"
            )
    return sample
