r"""Models by name: a catalogue of public ONNX models, pulled once into a cache, then resolved offline.

``geoseg models pull NAME|URL [--sha256 HEX]`` downloads a model (:mod:`geoseg.models.download`)
into the cache folder, checks its SHA-256 (the catalogue's, the one given, or, when neither is
known, the first download's, recorded and said: trust on first use), checks it is an ONNX
model (never a pickle: ``.pt``/``.pth``/``.ckpt`` are refused; those load only as a path,
through the safe state-dict route of :mod:`geoseg.models.loading`; no external data files; the
ONNX checker passes; its card readable, a detector's in a layout geoseg decodes), and renames
it into place with a record ``NAME.json`` beside it. A model without a checksum known before
the download (trust on first use) comes over ``https://`` only, redirects included; a pinned
checksum (``--sha256`` or the catalogue's) makes the transport irrelevant. Afterwards ``--model NAME`` (predict, run, workflows)
resolves to the cached file with no network: :func:`cached_model`, which
:func:`geoseg.models.spec.resolve_model` asks; the file is checked against its record there.

The cache is ``$GEOSEG_CACHE/models`` (default: the user's cache folder, ``~/.cache/geoseg``
on Linux, ``~/Library/Caches/geoseg`` on macOS, ``%LOCALAPPDATA%\\geoseg\\Cache`` on Windows).
The catalogue is ``zoo.yaml`` beside this module; ``GEOSEG_ZOO`` names another file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from geoseg.errors import ModelError
from geoseg.io.outdir import fsync_replace, write_json_atomic
from geoseg.io.remote import cache_root, is_url, redact
from geoseg.models.bundled import BUNDLED
from geoseg.models.card_sources import DET_TYPES, find_card
from geoseg.models.download import fetch, insecure_text, sha256_file

__all__ = ["TASKS", "ZooEntry", "cache_dir", "cached_model", "load_catalogue", "pull"]

ZOO_ENV = "GEOSEG_ZOO"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")
#: Formats that are pickles (loading one can run code): never downloaded by name.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".pt2", ".tar", ".joblib", ".h5", ".keras")
_KEYS = {"url", "sha256", "format", "task", "det_type", "description", "classes", "bands", "resolution_cm", "tile",
         "licence", "source"}  # fmt: skip
TASKS = ("segmentation", "detection")


@dataclass(frozen=True)
class ZooEntry:
    """One catalogue model: where it is, its checksum when known, and what its source says about it."""

    name: str
    url: str
    sha256: str | None = None
    task: str = "segmentation"
    det_type: str | None = None  # a detector's Deepness/GeoDeep output layout, when the source says it
    description: str = ""
    classes: tuple[str, ...] = ()
    bands: tuple[str, ...] = ()
    resolution_cm: float | None = None
    tile: int | None = None
    licence: str = ""
    source: str = ""

    def refusal(self) -> str | None:
        """Why geoseg cannot run this model (a task or detector layout it does not have), or None."""
        if self.task not in TASKS:
            return f"{self.name} is a {self.task} model; geoseg runs {' and '.join(TASKS)} models (see its source)"
        if self.det_type is not None and self.det_type not in DET_TYPES:
            return (
                f"{self.name} is a {self.det_type} detector; geoseg decodes the YOLO layouts ({', '.join(DET_TYPES)}), "
                "not this one (see its source)"
            )
        return None


@dataclass(frozen=True)
class Pulled:
    """What :func:`pull` did: the cached file, its checksum, and whether it downloaded and trusted on first use."""

    name: str
    path: str
    sha256: str
    size: int
    downloaded: bool
    first_use: bool


def cache_dir() -> str:
    """The folder pulled models live in: ``$GEOSEG_CACHE/models``, else the user's cache folder's ``geoseg/models``."""
    return os.path.join(cache_root(), "models")


def catalogue_path() -> str:
    """The catalogue file: ``GEOSEG_ZOO`` when set, else the ``zoo.yaml`` shipped beside this module."""
    return os.environ.get(ZOO_ENV, "").strip() or os.path.join(os.path.dirname(__file__), "zoo.yaml")


def load_catalogue(path: str | None = None) -> dict[str, ZooEntry]:
    """The catalogue's entries by name (checked: names, URLs, checksums, no pickle formats).

    Raises
    ------
    ModelError
        The file is missing or not a valid catalogue (one line naming the entry and the fix).
    """
    from geoseg._yaml import load_yaml

    path = path or catalogue_path()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model catalogue ({exc.strerror}); check {ZOO_ENV}") from None
    data = load_yaml(text, path, ModelError, "fix the catalogue file") or {}
    if not isinstance(data, dict):
        raise ModelError(f"{path}: a model catalogue is a mapping of names to entries (url, sha256, ...)")
    return {str(name): _entry(path, str(name), raw) for name, raw in data.items()}


def _entry(path: str, name: str, raw: object) -> ZooEntry:
    where = f"{path}: {name}"
    if not _NAME.match(name):
        raise ModelError(f"{where}: a model name is letters, digits, '.', '_' and '-' (up to 64); rename it")
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        raise ModelError(f"{where}: an entry needs url: (an https:// URL of an .onnx file)")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ModelError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_KEYS))}")
    sha = raw.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _HEX.match(sha.lower())):
        raise ModelError(f"{where}: sha256 must be 64 hex digits (in quotes), or null when no checksum is known")
    _check_format(f"{where}: {redact(raw['url'])}", raw["url"], raw.get("format"))
    as_tuple = lambda v: tuple(str(x) for x in v) if isinstance(v, list) else ()  # noqa: E731
    return ZooEntry(
        name=name,
        url=raw["url"],
        sha256=sha.lower() if sha else None,
        task=str(raw.get("task", "segmentation")),
        det_type=str(raw["det_type"]) if raw.get("det_type") is not None else None,
        description=str(raw.get("description", "")),
        classes=as_tuple(raw.get("classes")),
        bands=as_tuple(raw.get("bands")),
        resolution_cm=raw.get("resolution_cm"),
        tile=raw.get("tile"),
        licence=str(raw.get("licence", "")),
        source=str(raw.get("source", "")),
    )


def _check_format(where: str, url: str, fmt: object = None) -> None:
    """Refuse anything but ONNX: a pickle format by name or extension (loading it could run code)."""
    tail = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower()
    if fmt not in (None, "onnx") or tail.endswith(PICKLE_SUFFIXES):
        kind = f"format {fmt}" if fmt not in (None, "onnx") else f"a {os.path.splitext(tail)[1]} file"
        raise ModelError(
            f"{where}: {kind}: geoseg pulls ONNX models only (a pickled checkpoint can run code when loaded); export "
            "it to ONNX, or pass a state-dict file you trust as a path with a card naming its architecture"
        )


def _record_path(name: str) -> str:
    return os.path.join(cache_dir(), f"{name}.json")


def _read_record(name: str) -> dict | None:
    try:
        with open(_record_path(name), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and _HEX.match(str(record.get("sha256", ""))) else None


def cached_model(model: str) -> tuple[str, str] | None:
    """The cached file and recorded SHA-256 of a pulled model ``NAME`` (or the URL it was pulled from), offline.

    Parameters
    ----------
    model : str
        What the user passed as ``--model``.

    Returns
    -------
    (path, sha256) or None
        None when ``model`` is neither a pulled nor a catalogued name, nor a URL (a file path, then).

    Raises
    ------
    ModelError
        A catalogued name or a URL that has not been pulled: the message says ``geoseg models pull``.
    """
    if is_url(model):
        for name in _pulled_names():
            record = _read_record(name)
            if record and record.get("source_url") == _url_key(model):
                return os.path.join(cache_dir(), f"{name}.onnx"), record["sha256"]
        raise ModelError(f"{redact(model)}: a model URL is pulled once first: geoseg models pull URL (then --model NAME)")
    if not _NAME.match(model) or model.lower().endswith((".onnx", *PICKLE_SUFFIXES)):
        return None
    record = _read_record(model)
    path = os.path.join(cache_dir(), f"{model}.onnx")
    if record is not None and os.path.isfile(path):
        return path, record["sha256"]
    if model in _catalogue_names():
        raise ModelError(f"model {model!r} is in the catalogue but not pulled yet; run: geoseg models pull {model}")
    return None


def _catalogue_names() -> set[str]:
    try:
        return set(load_catalogue())
    except ModelError:
        return set()


def _pulled_names() -> list[str]:
    try:
        return sorted(n[:-5] for n in os.listdir(cache_dir()) if n.endswith(".json"))
    except OSError:
        return []


def _url_key(url: str) -> str:
    """How a URL is remembered in a record: its secrets left out."""
    return redact(url)


def _target(what: str, name: str | None, catalogue: dict[str, ZooEntry]) -> ZooEntry:
    """The catalogue entry ``what`` names, or an entry made for a URL (named by ``name`` or the URL's file stem)."""
    if not is_url(what):
        if what not in catalogue:
            known = ", ".join(sorted(catalogue)) or "none"
            raise ModelError(f"model {what!r} is not in the catalogue ({catalogue_path()}); known: {known}; or give a URL")
        entry = catalogue[what]
        return entry if name is None else replace(entry, name=name)
    if not what.lower().startswith(("http://", "https://")):
        raise ModelError(f"{redact(what)}: models are pulled over https://; download it yourself and pass it as a path")
    _check_format(redact(what), what)
    stem = what.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    stem = name or (stem[:-5] if stem.lower().endswith(".onnx") else stem)
    if not _NAME.match(stem):
        raise ModelError(f"{redact(what)}: no usable name in the URL; give one with --name")
    if stem in BUNDLED or stem in catalogue:
        raise ModelError(f"{redact(what)}: {stem!r} is already a bundled or catalogued model's name; choose one with --name")
    return ZooEntry(name=stem, url=what)


def pull(what: str, sha256: str | None = None, *, name: str | None = None, force: bool = False) -> Pulled:
    """Download a catalogued model (or a URL) once into the cache, checked; a no-op when it is already there.

    Parameters
    ----------
    what : str
        A catalogue name or an ``https://`` URL of an ``.onnx`` file.
    sha256 : str, optional
        The expected checksum (overrides the catalogue's; required to check a model whose
        checksum nobody published, else the first download's is recorded).
    name : str, optional
        The name to pull it under (default: the catalogue name, or the URL's file stem).
    force : bool
        Download again even when a checked copy is cached.

    Returns
    -------
    Pulled

    Raises
    ------
    ModelError
        Unknown name, a pickle format, a detector whose output layout geoseg does not decode, plain
        ``http://`` without a checksum known beforehand, a download that fails, a checksum mismatch
        (nothing is left in the cache), or a file that is not an ONNX model geoseg can read.
    """
    if name is not None and not _NAME.match(name):
        raise ModelError(f"--name {name!r}: a model name is letters, digits, '.', '_' and '-' (up to 64)")
    entry = _target(what, name, load_catalogue())
    refused = entry.refusal()
    if refused:
        raise ModelError(refused)
    expected = _expected_sha(entry, sha256)
    if expected is None and not entry.url.lower().startswith("https://"):
        raise ModelError(insecure_text(entry.url))
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"{entry.name}.onnx")
    record = _read_record(entry.name)
    if not force and record is not None and os.path.isfile(final):
        return _already(entry, final, record, expected)
    return _download(entry, final, expected)


def _expected_sha(entry: ZooEntry, given: str | None) -> str | None:
    if given is None:
        return entry.sha256
    given = given.strip().lower()
    if not _HEX.match(given):
        raise ModelError(f"--sha256 {given!r}: give the 64 hex digits of the file's SHA-256")
    return given


def _already(entry: ZooEntry, final: str, record: dict, expected: str | None) -> Pulled:
    """The cached copy, checked against its record (and ``expected``): a no-op pull."""
    got = sha256_file(final)
    if got != record["sha256"]:
        raise ModelError(
            f"{final}: the cached file changed since it was pulled (sha256 {got}, recorded {record['sha256']}); "
            f"pull it again: geoseg models pull {entry.name} --force"
        )
    if expected is not None and got != expected:
        raise ModelError(
            f"{entry.name}: the cached copy has sha256 {got}, not the expected {expected}; "
            f"pull it again to replace it: geoseg models pull {entry.name} --force --sha256 {expected}"
        )
    return Pulled(entry.name, final, got, os.path.getsize(final), downloaded=False, first_use=False)


def _download(entry: ZooEntry, final: str, expected: str | None) -> Pulled:
    """Fetch, check (checksum, ONNX), rename into place, then write the record; nothing left behind on failure."""
    got = fetch(entry.url, os.path.dirname(final), entry.name, pinned=expected is not None)
    try:
        if expected is not None and got.sha256 != expected:
            raise ModelError(
                f"{entry.name}: sha256 mismatch: expected {expected}, got {got.sha256}; the download was discarded "
                "(check the checksum, or the source changed the file)"
            )
        _check_onnx(entry, got.path)
        fsync_replace(got.path, final)
    except BaseException:
        if os.path.exists(got.path):
            os.unlink(got.path)
        raise
    record = {
        "name": entry.name,
        "sha256": got.sha256,
        "size": got.size,
        "source_url": _url_key(entry.url),
        "checksum": "checked" if expected else "recorded at first download (trust on first use)",
        "pulled": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "licence": entry.licence,
        "source": entry.source,
    }
    write_json_atomic(_record_path(entry.name), record)
    return Pulled(entry.name, final, got.sha256, got.size, downloaded=True, first_use=expected is None)


def _check_onnx(entry: ZooEntry, path: str) -> None:
    """The download is an ONNX model (a protobuf graph: parsing it runs nothing), not a pickle or a web page; all of it
    in the one file (external data would be read from paths the file names); valid for the ONNX checker; with a card
    geoseg reads (a detector's in a layout it decodes).
    """
    with open(path, "rb") as f:
        head = f.read(4)
    where = f"{entry.name}: {redact(entry.url)}"
    if head[:2] == b"PK" or head[:1] == b"\x80" or head.lstrip()[:1] == b"<":
        raise ModelError(f"{where} is not an ONNX model (a zip, a pickle or a web page); refused")
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # any parser failure: not an ONNX model
        raise ModelError(f"{where} is not a valid ONNX model ({_first_line(exc)}); refused") from None
    if any(onnx.external_data_helper.uses_external_data(t) for t in _tensors(model.graph)):
        raise ModelError(f"{where} keeps its weights in external data files; geoseg pulls single-file ONNX models; refused")
    try:
        onnx.checker.check_model(path)
    except Exception as exc:  # onnx.checker.ValidationError and the C++ checker's other failures
        raise ModelError(f"{where} fails the ONNX checker ({_first_line(exc)}); refused") from None
    _check_card(entry, path, where)


def _check_card(entry: ZooEntry, path: str, where: str) -> None:
    """The model's card reads (its metadata); a catalogued detector is one, in a layout geoseg decodes."""
    try:
        card = find_card(path, "onnx")
    except ModelError as exc:
        raise ModelError(f"{where}: {str(exc).replace(path + ': ', '')}; refused") from None
    if entry.task == "detection" and (card is None or card.detector is None):
        raise ModelError(
            f"{where}: the catalogue says detection but the file's metadata names no detector (model_type: Detector, "
            "det_type); refused"
        )


def _tensors(graph) -> list:
    """Every tensor a graph holds: initializers (sparse ones too) and node attributes, subgraphs included."""
    out = [*graph.initializer, *(s.values for s in graph.sparse_initializer)]
    for node in graph.node:
        for attr in node.attribute:
            out += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                out += _tensors(sub)
    return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
