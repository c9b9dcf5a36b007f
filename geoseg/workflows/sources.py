"""Scenes of a workflow: files, a glob, or STAC (a static catalog, or a STAC API search), each with a date.

STAC items become scenes in :mod:`geoseg.workflows.stac` (band assets stacked in a VRT).
"""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import replace

from geoseg.errors import InputError
from geoseg.io.dates import filename_date, raster_date
from geoseg.io.remote import failure_kind, gdal_path, is_remote, permanent_error, redact, remote_env, remote_name
from geoseg.workflows.scene import Scene, slug
from geoseg.workflows.spec import Imagery

__all__ = ["scenes"]


def _has_crs(path: str) -> bool:
    """Whether GDAL finds a CRS on ``path`` (True for files it cannot open: the reader reports those)."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with remote_env(path), rasterio.open(path) as ds:
                return ds.crs is not None
    except RasterioIOError as exc:
        if is_remote(path) and failure_kind(str(exc)) == "permanent":  # a 404 or 403: one line now, the URL redacted
            raise permanent_error(path, str(exc)) from None
        return True


def scenes(im: Imagery, work_folder: str, aoi: str | None = None) -> list[Scene]:
    """The workflow's scenes, sorted by date (then name); dates from metadata or file names.

    Parameters
    ----------
    im : Imagery
        The workflow's imagery.
    work_folder : str
        The output folder (STAC scenes' VRTs go to its ``.geoseg-stac``).
    aoi : str, optional
        The workflow's AOI file: a STAC API search's ``intersects``.

    Raises
    ------
    InputError
        A glob that matches nothing, a file that does not exist, an unreadable catalog.
    """
    if im.stac:
        from geoseg.workflows.stac import api_or_catalog

        found = api_or_catalog(im, work_folder, aoi)
    else:
        paths = sorted(globlib.glob(im.glob)) if im.glob else list(im.files or [])
        if im.glob and not paths:
            raise InputError(f"imagery glob {im.glob!r} matches no file; fix the pattern")
        paths = [gdal_path(p) for p in paths]  # a URL read where it is (GDAL's /vsicurl/, /vsis3/ ...), never downloaded
        for p in paths:
            if not is_remote(p) and not os.path.exists(p):
                raise InputError(f"imagery {p} does not exist; fix the path in 'imagery'")
            # workflows map places: a plain image (no CRS) is refused before any work, with the way out
            if not _has_crs(p):
                raise InputError(
                    f"{redact(p)}: has no CRS, and workflows map georeferenced imagery; assign one (gdal_edit.py -a_srs "
                    "EPSG:...) or run plain images with geoseg predict IMAGE|FOLDER|VIDEO"
                )
        dated = [(p, filename_date(remote_name(p)) if im.date_from == "filename" else raster_date(p)) for p in paths]
        found = [Scene(p, d, slug(os.path.splitext(remote_name(p))[0])) for p, d in dated]
    names = [s.name for s in found]
    if len(set(names)) != len(names):  # same file names in different folders: add the date, then a counter
        seen: dict[str, int] = {}
        unique = []
        for s in found:
            seen[s.name] = seen.get(s.name, 0) + 1
            unique.append(replace(s, name=s.name if seen[s.name] == 1 else f"{s.name}-{seen[s.name]}"))
        found = unique
    return sorted(found, key=lambda s: (s.date or "", s.name))
