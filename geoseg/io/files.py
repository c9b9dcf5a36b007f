"""The files behind a raster: which files GDAL reads for it, their fingerprint, and the declared-size guard.

A raster is a path to GDAL but may be many files (a VRT's sources, nested VRTs, sidecars).
:func:`dataset_files` lists them, :func:`file_fingerprint` keys everything that must change
when any of them is rewritten (resumable writes, the workflow ledger), and
:func:`check_declared_size` refuses a header that declares far more pixels than the files hold.
"""

from __future__ import annotations

import os

import numpy as np

from geoseg.errors import InputError
from geoseg.io.frames import local_file, video_frame
from geoseg.io.gdal import quiet_rasterio_georeference
from geoseg.io.remote import gdal_path, has_secret, is_remote, redact, remote_fingerprint

__all__ = [
    "MAX_PIXELS",
    "MAX_SPARSE_RATIO",
    "check_declared_size",
    "content_stamp",
    "dataset_files",
    "file_fingerprint",
    "files_digest",
    "remote_sources",
    "size_mtime",
]

#: GDAL configuration of the listing reads (as the raster reads use; :mod:`geoseg.io.raster` extends it).
LIST_GDAL_OPTIONS: dict[str, str | int] = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_CACHEMAX": 32, "VSI_CACHE": "TRUE"}

#: Most pixels (width x height) a raster may declare; ``GEOSEG_MAX_PIXELS`` raises or lowers it.
MAX_PIXELS = 100_000_000_000
#: Most uncompressed bytes per byte on disk a raster of over :data:`SPARSE_MIN_PIXELS` pixels may
#: declare (well past what deflate or zstd reach on real tiled data: a sparse or forged header);
#: ``GEOSEG_MAX_SPARSE_RATIO`` changes it (0 turns the check off).
MAX_SPARSE_RATIO = 10_000
SPARSE_MIN_PIXELS = 100_000_000


def size_mtime(path: str) -> str:
    """``size-mtime_ns`` of a local file; empty for what cannot be stat'ed (/vsi paths, URLs)."""
    if is_remote(path):
        return ""
    try:
        st = os.stat(local_file(path))
    except OSError:  # /vsi paths, URLs
        return ""
    return f"{st.st_size}-{st.st_mtime_ns}"


def dataset_files(path: str, max_depth: int = 8) -> list[str]:
    """Every local file GDAL reads for the raster ``path``: itself, then (sorted) the sources of a
    VRT (nested VRTs followed) and any sidecar GDAL opens with it; ``[path]`` for anything GDAL
    cannot open (vector files, /vsi paths, URLs).
    """
    import rasterio

    root = local_file(path)
    if video_frame(path) is not None or is_remote(path) or not os.path.isfile(root):
        return [root]
    quiet_rasterio_georeference()
    found: dict[str, None] = {}
    todo = [(os.path.abspath(root), 0)]
    while todo:
        p, depth = todo.pop()
        if p in found:
            continue
        found[p] = None
        if depth > 0 and not p.lower().endswith(".vrt"):
            continue  # a plain source: its own sidecars are not listed (GDAL's reads do not look for them either)
        if depth > max_depth:
            continue
        try:
            with rasterio.Env(**LIST_GDAL_OPTIONS), rasterio.open(p) as ds:
                listed = list(ds.files)
        except Exception:  # not a raster (an AOI, a mask of another kind): the file alone
            continue
        base = os.path.dirname(p)
        for f in listed:
            if f.startswith("/vsi") or "://" in f:
                continue
            f = f if os.path.isabs(f) else os.path.join(base, f)
            todo.append((os.path.abspath(f), depth + 1))
    first, *rest = found
    return [first, *sorted(rest)]


def file_fingerprint(path: str, content: bool = False) -> str:
    """``absolute path:size:mtime_ns`` of a file (the path alone when it cannot be stat'ed; a remote one's
    redacted URL, size and ETag or Last-Modified: :func:`geoseg.io.remote.remote_fingerprint`),
    followed by a digest of the size and mtime of every other file it is read from (a VRT's
    sources, nested VRTs).

    A VRT naming signed URLs (re-signed, hence rewritten, for every run), or any VRT when
    ``content`` is set (a STAC scene's), is keyed by its text with the secrets redacted instead
    of its path and mtime (:func:`content_stamp`).

    Keys that must change when any file behind a raster is rewritten (resumable writes, the
    workflow ledger).
    """
    if is_remote(path):  # HTTP metadata (size, ETag), never a download; the URL's secrets left out
        return remote_fingerprint(gdal_path(path))
    stamp = size_mtime(path)
    if not stamp:
        return path
    own = content_stamp(path, always=content) or f"{os.path.abspath(path)}:{stamp.replace('-', ':')}"
    others = dataset_files(path)[1:]
    return f"{own}+{files_digest(others)}" if others else own


def _vrt_text(path: str) -> str | None:
    """The XML of a local VRT file (None for anything else, or one too big to be a VRT of sources)."""
    if not path.lower().endswith(".vrt") or is_remote(path):
        return None
    try:
        if os.path.getsize(path) > 16 * 1024 * 1024:
            return None
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def content_stamp(path: str, always: bool = False) -> str | None:
    """``vrt:<digest>`` of a VRT's text with its secrets redacted, when it holds a secret (or ``always``); else None.

    A VRT of signed URLs is rewritten whenever they are signed again: its mtime says nothing, its
    redacted text says which files, grid and bands it reads.
    """
    import hashlib

    text = _vrt_text(path)
    if text is None or not (always or has_secret(text)):
        return None
    return "vrt:" + hashlib.sha256(redact(text).encode(errors="surrogateescape")).hexdigest()[:16]


def remote_sources(path: str, max_depth: int = 8) -> list[str]:
    """The remote GDAL paths a raster reads: ``[path]`` for a remote one, a local VRT's remote sources
    (nested VRTs followed, from their XML: nothing is opened), else none.
    """
    import xml.etree.ElementTree as ET

    if is_remote(path):
        return [gdal_path(path)]
    found: dict[str, None] = {}
    todo, seen = [(path, 0)], set()
    while todo:
        vrt, depth = todo.pop()
        text = _vrt_text(vrt)
        if text is None or vrt in seen or depth > max_depth:
            continue
        seen.add(vrt)
        try:
            root = ET.fromstring(text)
        except (ET.ParseError, ValueError):
            continue
        for el in root.iter():
            if el.tag not in ("SourceFilename", "SourceDataset") or not (el.text or "").strip():
                continue
            name = el.text.strip()
            if is_remote(name):
                found[gdal_path(name)] = None
            elif el.get("relativeToVRT") == "1" or (el.tag == "SourceDataset" and not os.path.isabs(name)):
                todo.append((os.path.join(os.path.dirname(vrt), name), depth + 1))
            else:
                todo.append((name, depth + 1))
    return list(found)


def files_digest(files: list[str]) -> str:
    """A short digest of ``files``' paths, sizes and mtimes (a missing file counts as missing)."""
    import hashlib

    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode(errors="surrogateescape"))
        except OSError:
            h.update(f"{f}:missing\n".encode(errors="surrogateescape"))
    return h.hexdigest()[:16]


def _limit(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r} is not a number; set it to a number or unset it") from None
    if not value >= 0:
        raise InputError(f"{name}={raw!r} must be a number >= 0; set it to a number or unset it")
    return value


def check_declared_size(path: str, ds, files: list[str], max_pixels: float | None = None, on_disk: int | None = None) -> None:
    """Refuse (:class:`InputError`) a raster whose declared size is past the cap, or out of all
    proportion to its bytes on disk (``files``: every file it is read from; ``on_disk``: their
    size when known otherwise, e.g. a remote file's from its HTTP headers).
    """
    pixels = ds.width * ds.height
    cap = _limit("GEOSEG_MAX_PIXELS", MAX_PIXELS) if max_pixels is None else max_pixels
    if pixels > cap:
        raise InputError(
            f"{path}: declares {ds.width} x {ds.height} pixels ({pixels:.3g}), more than geoseg's limit of {cap:.3g}; "
            "crop it (gdal_translate -srcwin) or raise the limit with GEOSEG_MAX_PIXELS"
        )
    ratio_max = _limit("GEOSEG_MAX_SPARSE_RATIO", MAX_SPARSE_RATIO)
    if pixels <= SPARSE_MIN_PIXELS or ratio_max == 0 or not ds.count:
        return
    if on_disk is None:
        if any(f.startswith("/vsi") or "://" in f for f in ds.files):  # a VRT of remote files: its bytes are not on disk
            return
        try:
            on_disk = sum(os.path.getsize(f) for f in files)
        except OSError:  # a remote file whose server gave no size
            return
    raw = pixels * ds.count * max(np.dtype(d).itemsize for d in ds.dtypes)
    if on_disk > 0 and raw / on_disk > ratio_max:
        raise InputError(
            f"{path}: declares {ds.width} x {ds.height} x {ds.count} {ds.dtypes[0]} pixels ({raw / 1e9:.3g} GB) in "
            f"{on_disk / 1e6:.3g} MB on disk (more than {ratio_max:g}:1): a sparse or damaged raster; check it with gdalinfo, "
            "or set GEOSEG_MAX_SPARSE_RATIO=0 if it is meant to be mostly empty"
        )
