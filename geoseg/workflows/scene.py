"""A workflow's scene: one dated raster (a file, or STAC items' band assets stacked in a VRT), and its file-safe name."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["MAX_NAME", "Scene", "slug"]

#: Longest file or folder name made from a scene or item name (bytes stay far below 255).
MAX_NAME = 80


@dataclass(frozen=True)
class Scene:
    """One dated raster of a workflow.

    ``stamp`` is what else identifies its content beyond the files' sizes and mtimes (a STAC
    item's id, ``updated`` time and its assets' ``file:checksum``/``file:size``, and the hrefs
    of remote assets that cannot be stat'ed); it goes into the ledger's hash. ``items`` are the
    ids of the STAC items behind it (empty for files), ``item_hrefs`` where those items live (their
    self links, URLs redacted): the ``derived_from`` links of the item.json a run writes.
    """

    path: str
    date: str | None
    name: str
    stamp: str = ""
    items: tuple[str, ...] = ()
    item_hrefs: tuple[str, ...] = ()


def slug(text: str) -> str:
    """A file-name-safe version of ``text``: never ``.``/``..`` or hidden, never longer than :data:`MAX_NAME`."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_").lstrip(".").strip("_") or "scene"
    if len(out) > MAX_NAME:
        out = f"{out[: MAX_NAME - 9]}-{hashlib.sha256(text.encode(errors='surrogateescape')).hexdigest()[:8]}"
    return out
