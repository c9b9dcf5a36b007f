"""Acquisition dates, read one way everywhere: from a raster's metadata, a file name, or a STAC item's datetime.

Every date is checked to be a real day (``2024-13-45`` is no date): :func:`filename_date` for
names, :func:`tags_date` for a raster's tags (then its name), :func:`date_text` for a datetime
or text, :func:`raster_date` for a raster path.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from geoseg.io.remote import remote_env, remote_name

__all__ = ["date_text", "filename_date", "raster_date", "tags_date"]

_DATE = re.compile(r"(?<!\d)(\d{4})[-_]?(\d{2})[-_]?(\d{2})(?!\d)")
_YEAR = re.compile(r"(?<!\d)(19|20)\d{2}(?!\d)")
#: Tags that hold the acquisition date, in the order they are trusted.
DATE_TAGS = ("ACQUISITION_DATE", "DATE_ACQUIRED", "datetime")


def _first_day(text: str) -> str | None:
    """The first ``YYYY[-_]MM[-_]DD`` in ``text`` that is a real day, as ``YYYY-MM-DD``."""
    for m in _DATE.finditer(text):
        try:
            return datetime.date(*(int(g) for g in m.groups())).isoformat()
        except ValueError:
            continue
    return None


def filename_date(name: str) -> str | None:
    """The date in a file name (``S2_20240105.tif``, ``2024-01-05_scene.tif``) checked to be a real day,
    else its year (``ortho_2023.tif``), else None.

    Parameters
    ----------
    name : str
        A file name (a URL's query and folders left out by the caller: see :func:`geoseg.io.remote.remote_name`).
    """
    day = _first_day(name)
    if day:
        return day
    year = _YEAR.search(name)
    return year.group(0) if year else None


def tags_date(tags: dict[str, str], name: str) -> str | None:
    """Acquisition date from a raster's tags (:data:`DATE_TAGS`), else its file ``name``, else ``TIFFTAG_DATETIME``
    (often the processing time: last), else the name's year.
    """
    for key in DATE_TAGS:
        hit = _first_day(tags.get(key, "").replace(":", "-"))
        if hit:
            return hit
    hit = _first_day(name) or _first_day(tags.get("TIFFTAG_DATETIME", "").replace(":", "-"))
    return hit or filename_date(name)


def date_text(value: Any) -> str | None:
    """``YYYY-MM-DD`` of a datetime, a date or an ISO text (a STAC item's ``datetime``); None when there is none."""
    if isinstance(value, (datetime.datetime, datetime.date)):
        return (value.date() if isinstance(value, datetime.datetime) else value).isoformat()
    return _first_day(value) if isinstance(value, str) else None


def raster_date(path: str) -> str | None:
    """Acquisition date (``YYYY-MM-DD``) from the raster's metadata, else from its file name (see :func:`tags_date`)."""
    import rasterio

    try:
        with remote_env(path), rasterio.open(path) as ds:
            tags = ds.tags()
    except rasterio.errors.RasterioIOError:
        tags = {}
    return tags_date(tags, remote_name(path))  # a URL's query (a signed URL's date and token) is no acquisition date
