"""Scenes from STAC: a static catalog/collection on disk (an item a scene), or a STAC API search (a day a scene).

A STAC item's band assets (one file per band, as Sentinel-2 and Landsat ship) are stacked
into a small VRT beside the outputs (``.geoseg-stac/<scene>.vrt``, :mod:`geoseg.workflows.stack`),
with band descriptions set to the band names, so the engine matches them to a model card like
any raster. Remote assets (``https://``, ``s3://``) stay remote: each chunk task reads its
window with HTTP range requests.

A STAC API search (``stac: https://...`` with ``collections``, ``datetime``, ``query`` or
``filter``, the workflow's AOI as ``intersects``) groups the items found by acquisition day:
the items of one day (tiles of one pass) are mosaicked band by band into one scene named by
the date. A ``query`` the API does not support (its landing page does not conform to the
query extension) is applied to the items by geoseg itself; a CQL2 ``filter`` is refused there.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

from geoseg.errors import InputError
from geoseg.io.dates import date_text
from geoseg.io.remote import is_http_url, is_remote, redact
from geoseg.workflows.scene import Scene, slug
from geoseg.workflows.spec import Imagery
from geoseg.workflows.stack import stack_vrt

__all__ = ["api_or_catalog", "asset_map", "catalog_scenes", "day_scenes", "search_items", "stac_scenes"]

#: Operators of the STAC API query extension that geoseg applies itself when an API lacks it.
QUERY_OPS = {
    "eq": lambda v, x: v == x,
    "neq": lambda v, x: v != x,
    "lt": lambda v, x: v < x,
    "lte": lambda v, x: v <= x,
    "gt": lambda v, x: v > x,
    "gte": lambda v, x: v >= x,
    "in": lambda v, x: v in x,
}
#: Seconds a STAC API may take to answer one request.
API_TIMEOUT_S = 60


def _raster_scaling(asset: Any) -> tuple[float | None, float | None]:
    """An asset's STAC ``raster:bands`` scale and offset (None when it gives none or odd values)."""
    rb = asset.extra_fields.get("raster:bands") or []
    if len(rb) != 1 or not isinstance(rb[0], dict):
        return (None, None)

    def num(v: Any) -> float | None:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    scale, offset = num(rb[0].get("scale")), num(rb[0].get("offset"))
    return (None, None) if scale == 0 else (scale, offset)


def asset_map(assets: dict[str, str] | list[str] | None) -> dict[str, str] | None:
    """Band name -> asset key (a list of asset keys names each band by its key)."""
    if assets is None or isinstance(assets, dict):
        return assets
    return {key: key for key in assets}


def _item_bands(item: Any, assets: dict[str, str] | None, origin: str) -> tuple[list[tuple[str, str]], list[tuple]]:
    """The item's bands as (name, href) and their ``raster:bands`` scaling: by ``assets``, else eo:bands common names."""
    found = item.get_assets()
    if assets:
        missing = [k for k in assets.values() if k not in found]
        if missing:
            raise InputError(
                f"{redact(origin)}: item {item.id} has no asset {missing[0]!r} (it has {', '.join(found)}); fix imagery.assets"
            )
        bands = [(name, found[key].get_absolute_href() or found[key].href) for name, key in assets.items()]
        return bands, [_raster_scaling(found[key]) for key in assets.values()]
    bands, scaling = [], []
    for asset in found.values():
        eo = asset.extra_fields.get("eo:bands") or []
        if len(eo) == 1 and eo[0].get("common_name"):
            bands.append((eo[0]["common_name"], asset.get_absolute_href() or asset.href))
            scaling.append(_raster_scaling(asset))
    if not bands:
        raise InputError(f"{redact(origin)}: item {item.id} has no assets with eo:bands common names; map them in imagery.assets")
    return bands, scaling


def _item_stamp(item: Any, hrefs: list[str]) -> dict[str, Any]:
    """What identifies an item's pixels besides the local files' sizes and mtimes (see :class:`Scene`)."""
    assets = []
    for key, asset in sorted(item.get_assets().items()):
        href = asset.get_absolute_href() or asset.href
        if href not in hrefs:
            continue
        extra = asset.extra_fields
        remote = redact(href) if is_remote(href) else None  # a signed href's token never reaches the ledger
        assets.append([key, extra.get("file:checksum"), extra.get("file:size"), extra.get("updated"), remote])
    return {"updated": item.properties.get("updated"), "assets": assets}


def _item_date(item: Any) -> str | None:
    """The item's acquisition day: its ``datetime``, else its ``start_datetime``."""
    return date_text(item.datetime or item.common_metadata.start_datetime)


def catalog_scenes(im: Imagery, folder: str) -> list[Scene]:
    """A static STAC catalog, collection or item (a file, or a URL pystac reads): a scene per item.

    Items with the same id (or ids that make the same file name) each get their own VRT and
    scene name, told apart by where the item lives; the same item listed twice is one scene.
    """
    import hashlib

    import pystac

    try:
        obj = pystac.read_file(im.stac)
    except Exception as exc:  # pystac raises several types for unreadable or invalid files
        raise InputError(
            f"{redact(im.stac)}: not a STAC catalog, collection or item pystac can read ({redact(str(exc))})"
        ) from None
    items = [obj] if isinstance(obj, pystac.Item) else list(obj.get_items(recursive=True))
    if not items:
        raise InputError(f"{redact(im.stac)}: the catalog has no items")
    slugs = [slug(item.id) for item in items]
    out, seen_items = [], set()
    for item, name in zip(items, slugs, strict=True):
        where = item.get_self_href() or ""
        if (item.id, where) in seen_items:
            continue
        seen_items.add((item.id, where))
        if slugs.count(name) > 1:
            name = f"{name}-{hashlib.sha256(f'{where}|{item.id}'.encode(errors='surrogateescape')).hexdigest()[:8]}"
        bands, scaling = _item_bands(item, asset_map(im.assets), im.stac)
        vrt = stack_vrt(f"STAC item {item.id!r}", [(b, [h]) for b, h in bands], folder, name, scaling)
        stamp = json.dumps(_item_stamp(item, [h for _, h in bands]), sort_keys=True, default=str)
        out.append(Scene(vrt, _item_date(item), name, stamp, (item.id,)))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # the same id at the same place, yet different items: nothing tells them apart
        raise InputError(
            f"{redact(im.stac)}: STAC item {dup[0]!r} is listed twice with different content; give each item its own id"
        )
    return out


def _matches(item: Any, query: dict[str, dict[str, Any]]) -> bool:
    """Whether ``item``'s properties pass every condition of a STAC API ``query`` (missing or odd values do not)."""
    for prop, conditions in query.items():
        value = item.properties.get(prop)
        if value is None:
            return False
        for op, target in conditions.items():
            try:
                if not QUERY_OPS[op](value, target):
                    return False
            except TypeError:  # a string compared with a number: not a match
                return False
    return True


def _open_client(url: str) -> Any:
    """The STAC API at ``url`` (its landing page read); one-line errors when it cannot be reached."""
    from pystac_client import Client

    try:
        return Client.open(url, timeout=API_TIMEOUT_S)
    except Exception as exc:  # requests' and pystac-client's errors: unreachable, not JSON, not STAC
        reason = " ".join(str(exc).split())[:200]
        raise InputError(
            f"{redact(url)}: not a STAC API geoseg can open ({redact(reason)}); check the URL and that the server is up"
        ) from None


def search_items(
    url: str,
    *,
    collections: list[str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    intersects: dict[str, Any] | None = None,
    datetime: str | None = None,
    query: dict[str, dict[str, Any]] | None = None,
    filter: dict[str, Any] | None = None,
    max_items: int | None = None,
    client: Any = None,
) -> list[Any]:
    """Search a STAC API: the items found (pystac Items), oldest first.

    Parameters
    ----------
    url : str
        The API's landing page.
    collections : list of str, optional
        Collection ids to search.
    bbox : (float, float, float, float), optional
        West, south, east, north in degrees (EPSG:4326).
    intersects : dict, optional
        A GeoJSON geometry in EPSG:4326 (instead of ``bbox``).
    datetime : str, optional
        An instant or an interval, ``2024-01-01/2024-06-30`` (open ends as ``..``).
    query : dict, optional
        STAC API query extension, e.g. ``{"eo:cloud_cover": {"lt": 20}}``; applied by geoseg when
        the API does not conform to the extension.
    filter : dict, optional
        A CQL2-JSON filter (the API must conform to the filter extension).
    max_items : int, optional
        At most this many items (after ``query``).
    client : pystac_client.Client, optional
        An API already opened at ``url``.

    Raises
    ------
    InputError
        The API cannot be reached or refuses the search, or ``filter`` is given to an API without the filter extension.
    """
    from pystac_client.conformance import ConformanceClasses

    client = client or _open_client(url)
    local = query if query and not client.conforms_to(ConformanceClasses.QUERY) else None
    if filter and not client.conforms_to(ConformanceClasses.FILTER):
        raise InputError(
            f"{redact(url)}: the STAC API does not support filter (CQL2); use query: {{property: {{lt: value}}}}, "
            "which geoseg applies itself when an API lacks it"
        )
    try:
        search = client.search(
            collections=collections, bbox=bbox, intersects=intersects, datetime=datetime,
            query=None if local else query, filter=filter, max_items=None if local else max_items,
        )  # fmt: skip
        found = [item for item in search.items() if local is None or _matches(item, local)]
    except Exception as exc:  # requests' errors, pystac-client's APIError, a datetime it cannot parse
        reason = " ".join(str(exc).split())[:200]
        raise InputError(f"{redact(url)}: the STAC API search failed ({redact(reason)}); check imagery's search keys") from None
    found = found[:max_items] if max_items else found
    return sorted(found, key=lambda it: (_item_date(it) or "", it.id))


def day_scenes(items: Iterable[Any], assets: dict[str, str] | None, folder: str, origin: str) -> list[Scene]:
    """Items grouped by acquisition day, each day one scene: its items mosaicked band by band in one VRT.

    An item without a date is a scene of its own, named by its id.
    """
    days: dict[str, list[Any]] = {}
    for item in items:
        days.setdefault(_item_date(item) or f"item-{item.id}", []).append(item)
    out = []
    for day, group in days.items():
        group = sorted(group, key=lambda it: it.id)
        per_item = [_item_bands(item, assets, origin) for item in group]
        names = [b for b, _ in per_item[0][0]]
        for item, (bands, _) in zip(group, per_item, strict=True):
            if [b for b, _ in bands] != names:
                raise InputError(f"{redact(origin)}: items of {day} have different bands ({item.id}); map them in imagery.assets")
        stacked = [(name, [bands[k][1] for bands, _ in per_item]) for k, name in enumerate(names)]
        name = slug(day)
        vrt = stack_vrt(f"the STAC items of {day}", stacked, folder, name, per_item[0][1])
        stamp = [
            {"id": item.id, **_item_stamp(item, [h for _, h in bands])} for item, (bands, _) in zip(group, per_item, strict=True)
        ]
        date = day if not day.startswith("item-") else None
        out.append(Scene(vrt, date, name, json.dumps(stamp, sort_keys=True, default=str), tuple(it.id for it in group)))
    return out


def stac_scenes(
    url: str,
    folder: str | os.PathLike,
    *,
    collections: list[str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    aoi: str | os.PathLike | dict[str, Any] | None = None,
    datetime: str | None = None,
    query: dict[str, dict[str, Any]] | None = None,
    filter: dict[str, Any] | None = None,
    assets: dict[str, str] | list[str] | None = None,
    max_items: int | None = None,
    client: Any = None,
) -> list[Scene]:
    """Search a STAC API and make a scene per acquisition day, ready for :func:`geoseg.segment`.

    Parameters
    ----------
    url : str
        The STAC API (its landing page), e.g. ``https://earth-search.aws.element84.com/v1``.
    folder : str or os.PathLike
        Where the scenes' VRTs are written (``folder/.geoseg-stac/<date>.vrt``).
    collections, bbox, datetime, query, filter, max_items
        The search, as for :func:`search_items`.
    aoi : str, os.PathLike or dict, optional
        The search geometry: a vector file (any CRS) or a GeoJSON geometry in EPSG:4326.
    assets : dict or list of str, optional
        Band name -> asset key (``{"red": "B04"}``), or a list of asset keys (each band named by
        its key); default: the assets' ``eo:bands`` common names.
    client : pystac_client.Client, optional
        The API already opened at ``url``.

    Returns
    -------
    list of Scene
        One per day, oldest first: ``path`` (a VRT of the day's assets, read remotely window by
        window), ``date``, ``name`` (the date), ``items`` (the item ids).

    Examples
    --------
    >>> days = geoseg.stac_scenes(url, "out", collections=["sentinel-2-l2a"], aoi="aoi.gpkg",
    ...                           datetime="2024-05-01/2024-05-31", query={"eo:cloud_cover": {"lt": 20}},
    ...                           assets={"blue": "blue", "green": "green", "red": "red", "nir": "nir"})
    >>> geoseg.segment(days[0].path, "forest", f"out/{days[0].name}")  # doctest: +SKIP
    """
    intersects = aoi or None
    if isinstance(aoi, (str, os.PathLike)):
        from geoseg.io.aoi import aoi_lonlat

        intersects = aoi_lonlat(aoi)
    items = search_items(
        url, collections=collections, bbox=bbox, intersects=intersects, datetime=datetime, query=query,
        filter=filter, max_items=max_items, client=client,
    )  # fmt: skip
    return day_scenes(items, asset_map(assets), os.path.join(os.fspath(folder), ".geoseg-stac"), url)


def api_or_catalog(im: Imagery, folder: str, aoi: str | None) -> list[Scene]:
    """The imagery's STAC scenes: searched when ``stac`` is an API, else read from the catalog (a file or URL)."""
    from pystac_client.conformance import ConformanceClasses

    search_keys = [k for k in ("collections", "datetime", "query", "filter", "max_items") if getattr(im, k) is not None]
    if im.stac and is_http_url(im.stac):
        client = _open_client(im.stac)
        if client.conforms_to(ConformanceClasses.ITEM_SEARCH):
            found = stac_scenes(
                im.stac, folder, collections=im.collections, aoi=aoi, datetime=im.datetime, query=im.query,
                filter=im.filter, assets=im.assets, max_items=im.max_items, client=client,
            )  # fmt: skip
            if not found:
                raise InputError(f"{redact(im.stac)}: the search found no items; widen imagery's datetime, query or filter")
            return found
    if search_keys:
        raise InputError(
            f"imagery.{search_keys[0]}: searches a STAC API, and {redact(im.stac)} is a static catalog (read whole); remove it"
        )
    return catalog_scenes(im, os.path.join(folder, ".geoseg-stac"))
