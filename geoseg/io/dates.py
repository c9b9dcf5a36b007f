"""The acquisition date of a raster: from its metadata, else from its file name."""

from __future__ import annotations

import re

from geoseg.io.remote import remote_env, remote_name

__all__ = ["raster_date"]

_DATE = re.compile(r"(?<!\d)(\d{4})[-_]?(\d{2})[-_]?(\d{2})(?!\d)")


def raster_date(path: str) -> str | None:
    """Acquisition date (``YYYY-MM-DD``) from the raster's metadata, else from its file name."""
    import rasterio

    try:
        with remote_env(path), rasterio.open(path) as ds:
            tags = ds.tags()
    except rasterio.errors.RasterioIOError:
        tags = {}

    def valid(m) -> str | None:
        import datetime

        if not m:
            return None
        try:
            return datetime.date(*(int(g) for g in m.groups())).isoformat()
        except ValueError:
            return None

    for key in ("ACQUISITION_DATE", "DATE_ACQUIRED", "datetime"):
        hit = valid(_DATE.search(tags.get(key, "").replace(":", "-")))
        if hit:
            return hit
    name = remote_name(path)  # a URL's query (a signed URL's date and token) is no acquisition date
    hit = valid(_DATE.search(name))
    if hit:
        return hit
    hit = valid(_DATE.search(tags.get("TIFFTAG_DATETIME", "").replace(":", "-")))  # often the processing time: last
    if hit:
        return hit
    year = re.search(r"(?<!\d)(19|20)\d{2}(?!\d)", name)
    return year.group(0) if year else None
