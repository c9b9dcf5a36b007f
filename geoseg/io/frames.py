"""Inputs made of several images: a folder of frames, a video, a multi-page TIFF.

Every frame becomes a path the raster reader opens inside a task, so the engine sees one
image at a time and nothing else changes:

- a folder: each image file in it (sorted by name);
- a multi-page TIFF whose pages share one size (a z-stack, a time series): GDAL's
  ``GTIFF_DIR:<page>:<file>`` for each page. A pyramidal TIFF (pages shrinking by
  level, or reduced-resolution pages GDAL already treats as overviews) is one image: its
  full-resolution page;
- a video: ``<file>#frame=<n>``, decoded by imageio (PyAV) inside the read task, so
  tasks still carry only a path.

Depends on :mod:`geoseg.errors` only; imageio is imported when a video is read.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from geoseg.errors import InputError, RasterReadError
from geoseg.io.gdal import quiet_rasterio_georeference

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "Frame", "list_frames", "local_file", "read_video_frame", "video_frame"]

#: Image files a folder of frames may hold (GDAL reads them all).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2")
#: Files read as videos (imageio with its PyAV plugin).
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")

_FRAME_REF = re.compile(r"^(?P<file>.+)#frame=(?P<index>\d+)$")
_GTIFF_DIR = re.compile(r"^GTIFF_DIR:(?P<page>\d+):(?P<file>.+)$")


@dataclass(frozen=True)
class Frame:
    """One image of a multi-image input.

    Parameters
    ----------
    path : str
        What the raster reader opens: a file, ``GTIFF_DIR:<page>:<file>`` or ``<video>#frame=<n>``.
    name : str
        A file-system-safe name for this frame's outputs (``frame_000012``, ``page_0003``, a file stem).
    index : int
        Position in the input (0-based).
    """

    path: str
    name: str
    index: int


def video_frame(path: str) -> tuple[str, int] | None:
    """``(video file, frame index)`` for a ``<video>#frame=<n>`` path, else None."""
    m = _FRAME_REF.match(path)
    if m and m.group("file").lower().endswith(VIDEO_EXTENSIONS):
        return m.group("file"), int(m.group("index"))
    return None


def local_file(path: str) -> str:
    """The file on disk behind a reader path (a video frame or a TIFF page), else ``path`` itself."""
    ref = video_frame(path)
    if ref:
        return ref[0]
    m = _GTIFF_DIR.match(path)
    return m.group("file") if m else path


def _imageio():
    try:
        import imageio.v3 as iio
    except ImportError as exc:
        raise InputError("reading videos needs imageio and PyAV; pip install 'geoseg[video]'") from exc
    return iio


_LOCK = threading.Lock()
_READERS: OrderedDict[str, object] = OrderedDict()  # open imageio readers of this process, most recent last
_DECODED: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()  # the last few decoded frames


@atexit.register
def _close_readers() -> None:
    """Close the kept video readers before the interpreter tears modules down (their finalisers need them)."""
    with _LOCK:
        while _READERS:
            with contextlib.suppress(Exception):
                _READERS.popitem()[1].close()


def _reader(path: str, version: int):
    """An open imageio/PyAV reader for ``path``, kept for the next frames (call under ``_LOCK``)."""
    key = f"{path}:{version}"
    if key in _READERS:
        _READERS.move_to_end(key)
        return _READERS[key]
    iio = _imageio()
    reader = iio.imopen(path, "r", plugin="pyav")
    _READERS[key] = reader
    while len(_READERS) > 2:  # closing is slow (the plugin runs the garbage collector): keep two open
        _READERS.popitem(last=False)[1].close()
    return reader


def read_video_frame(path: str, index: int) -> np.ndarray:
    """Decode frame ``index`` of a video as ``(height, width, 3)`` uint8 RGB.

    The process keeps the video open and the last few frames decoded, so the tasks and the
    planning steps of one frame decode it once, and the next frame seeks from there.

    Raises
    ------
    RasterReadError
        The video cannot be decoded or has fewer frames.
    """
    try:
        key = (path, int(index), os.stat(path).st_mtime_ns)  # a rewritten file is decoded afresh
        with _LOCK:
            if key in _DECODED:
                _DECODED.move_to_end(key)
                return _DECODED[key]
            frame = _reader(path, key[2]).read(index=int(index))
    except ImportError as exc:
        raise InputError(f"{path}: reading videos needs PyAV; pip install 'geoseg[video]'") from exc
    except Exception as exc:  # PyAV raises its own error types (FFmpegError, InvalidDataError, ...)
        raise RasterReadError(
            f"{path}: cannot decode frame {index} ({exc}); check the file plays (ffprobe) and its length"
        ) from exc
    if frame.ndim == 2:
        frame = frame[:, :, None]
    frame = np.ascontiguousarray(frame[:, :, :3] if frame.shape[2] >= 3 else frame)
    frame.setflags(write=False)  # shared by every read of this frame in the process
    with _LOCK:
        _DECODED[key] = frame
        while len(_DECODED) > 4:
            _DECODED.popitem(last=False)
    return frame


def _video_frames(path: str) -> list[Frame]:
    iio = _imageio()
    try:
        props = iio.improps(path, plugin="pyav")
        n = int(props.n_images or 0) if props.n_images is not None else 0
        if n <= 0:  # containers without a frame count (Matroska, WebM): count by decoding once
            n = sum(1 for _ in iio.imiter(path, plugin="pyav"))
    except ImportError as exc:
        raise InputError(f"{path}: reading videos needs PyAV; pip install 'geoseg[video]'") from exc
    except Exception as exc:  # PyAV raises its own error types for broken files
        raise RasterReadError(f"{path}: not a video imageio/PyAV can decode ({exc}); check the file plays (ffprobe)") from exc
    if n == 0:
        raise InputError(f"{path}: the video has no frames; check the file")
    width = max(6, len(str(n - 1)))
    return [Frame(f"{path}#frame={i}", f"frame_{i:0{width}d}", i) for i in range(n)]


def _tiff_pages(path: str) -> list[Frame] | None:
    """Pages of a multi-page TIFF of equal size, or None for a one-image (or pyramidal) TIFF."""
    import rasterio
    from rasterio.errors import RasterioIOError

    quiet_rasterio_georeference()
    try:
        with rasterio.open(path) as ds:
            subs = list(ds.subdatasets)
            size = (ds.width, ds.height)
            pages = [s for s in subs if _GTIFF_DIR.match(s)]  # every page, the first one (GTIFF_DIR:1) included
            if len(pages) < 2:
                return None
            sizes = []
            for s in pages:
                with rasterio.open(s) as page:
                    sizes.append((page.width, page.height))
    except RasterioIOError:
        return None  # not a readable TIFF: the raster reader says so, as for any other file
    if any(s != size for s in sizes):
        # pages of different sizes: a pyramid (full resolution first); the engine reads the first page
        return None
    width = max(4, len(str(len(pages))))
    return [Frame(s, f"page_{i:0{width}d}", i) for i, s in enumerate(pages)]


def list_frames(path: str | os.PathLike) -> list[Frame] | None:
    """The frames of a multi-image input, or None when ``path`` is one image.

    Parameters
    ----------
    path : str or os.PathLike
        A folder of images, a video file, a TIFF (multi-page stacks give one frame per
        page) or any single raster.

    Returns
    -------
    list of Frame or None

    Raises
    ------
    InputError
        A folder without images.
    RasterReadError
        A video or TIFF that cannot be decoded.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        files = sorted(
            f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f))
        )
        if not files:
            raise InputError(f"{path}: the folder holds no images ({', '.join(IMAGE_EXTENSIONS)}); give a folder of frames")
        stems = [os.path.splitext(f)[0] for f in files]
        names = stems if len(set(stems)) == len(stems) else [f.replace(".", "_") for f in files]
        return [Frame(os.path.join(path, f), n, i) for i, (f, n) in enumerate(zip(files, names, strict=True))]
    if path.lower().endswith(VIDEO_EXTENSIONS):
        if not os.path.isfile(path):
            raise RasterReadError(f"{path}: no such file; check the path")
        return _video_frames(path)
    if path.lower().endswith((".tif", ".tiff")) and os.path.isfile(path):
        return _tiff_pages(path)
    return None
