"""Scenes from STAC: a static catalog/collection on disk (an item a scene), or a STAC API search (a day a scene).

A STAC item's band assets (one file per band, as Sentinel-2 and Landsat ship) are stacked
into a small VRT beside the outputs (``.geoseg-stac/<scene>.vrt``, :mod:`geoseg.workflows.stack`),
with band descriptions set to the band names, so the engine matches them to a model card like
any raster. Remote assets (``https://``, ``s3://``) stay remote: each chunk task reads its
window with HTTP range requests.

A STAC API search (``stac: https://...`` with ``collections``, ``datetime``, ``query`` or
``filter``, the workflow's AOI as ``intersects``) groups the items found by acquisition day:
the items of one day and one CRS (tiles of one pass in one UTM zone) are mosaicked band by band
into one scene named by the date (by the date and the EPSG code when the day's tiles lie in
several zones). A ``query`` the API does not support (its landing page does not conform to the
query extension) is applied to the items by geoseg itself; a CQL2 ``filter`` is refused there.
HTTP requests are bounded and retried (:mod:`geoseg.workflows.stac_http`).

Over 400 lines because both STAC inputs (a static catalog and an API search) end in the same scenes here.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from typing import Any

from geoseg.errors import InputError
from geoseg.io.dates import date_text
from geoseg.io.remote import is_http_url, is_remote, redact
from geoseg.workflows.scene import Scene, slug
from geoseg.workflows.spec import Imagery
from geoseg.workflows.stac_http import open_client, read_catalog
from geoseg.workflows.stack import asset_crs, stack_vrt

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
        obj = read_catalog(im.stac)
        items = [obj] if isinstance(obj, pystac.Item) else list(obj.get_items(recursive=True))
    except Exception as exc:  # pystac, urllib3 and the file system raise several types for unreadable or invalid files
        reason = redact(" ".join(str(exc).split()))[:300]
        raise InputError(f"{redact(im.stac)}: not a STAC catalog, collection or item pystac can read ({reason})") from None
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
        out.append(Scene(vrt, _item_date(item), name, stamp, (item.id,), (_item_href(item, ""),)))
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


def _first_matches(items: Iterable[Any], query: dict[str, dict[str, Any]] | None, max_items: int | None) -> list[Any]:
    """The items that pass ``query`` (all without one), taken page by page until ``max_items`` of them are found."""
    found = []
    for item in items:
        if query is None or _matches(item, query):
            found.append(item)
            if max_items and len(found) >= max_items:
                break
    return found


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
        At most this many items (after ``query``: a search filtered by geoseg stops once this many match).
    client : pystac_client.Client, optional
        An API already opened at ``url``.

    Raises
    ------
    InputError
        The API cannot be reached or refuses the search, or ``filter`` is given to an API without the filter extension.
    """
    from pystac_client.conformance import ConformanceClasses

    client = client or open_client(url)
    local = query if query and not client.conforms_to(ConformanceClasses.QUERY) else None
    if filter and not client.conforms_to(ConformanceClasses.FILTER):
        raise InputError(
            f"{redact(url)}: the STAC API does not support filter (CQL2); use query: {{property: {{lt: value}}}}, "
            "which geoseg applies itself when an API lacks it"
        )
    advertised = {(link.extra_fields.get("method") or "GET").upper() for link in client.get_links("search")}
    try:
        search = client.search(
            collections=collections, bbox=bbox, intersects=intersects, datetime=datetime,
            query=None if local else query, filter=filter, max_items=None if local else max_items,
            method="POST" if "POST" in advertised or not advertised else "GET",  # an API may offer GET only
        )  # fmt: skip
        found = _first_matches(search.items(), local, max_items)
    except Exception as exc:  # requests' errors, pystac-client's APIError, a datetime it cannot parse
        reason = redact(" ".join(str(exc).split()))[:200]
        busy = re.search(r"too many (?:429|5\d\d) error|max retries exceeded|timed out", reason, re.IGNORECASE)
        fix = "the server kept failing after retries: try again later" if busy else "check imagery's search keys"
        raise InputError(f"{redact(url)}: the STAC API search failed ({reason}); {fix}") from None
    return sorted(found, key=lambda it: (_item_date(it) or "", it.id))


def _item_href(item: Any, api: str) -> str:
    """Where ``item`` lives: its self link (an API item without one: the API's item URL), a URL redacted."""
    from urllib.parse import quote

    href = item.get_self_href() or ""
    if not href and is_http_url(api) and item.collection_id:
        href = f"{api.rstrip('/')}/collections/{quote(item.collection_id)}/items/{quote(item.id)}"
    return redact(href) if is_remote(href) else href


def _item_crs(item: Any, href: str) -> str:
    """The CRS of the item's asset at ``href``: its ``proj:code``/``proj:epsg`` (the asset's, else the item's), else GDAL's."""
    asset = next((a for a in item.get_assets().values() if (a.get_absolute_href() or a.href) == href), None)
    for fields in ([asset.extra_fields] if asset is not None else []) + [item.properties]:
        code, epsg = fields.get("proj:code"), fields.get("proj:epsg")
        if isinstance(code, str) and code:
            return code.upper()
        if type(epsg) is int:
            return f"EPSG:{epsg}"
    return asset_crs(href)


def _crs_label(crs: str) -> str:
    """A CRS in a scene name: ``EPSG32631`` for ``EPSG:32631``, else a short hash of its definition."""
    import hashlib

    if re.fullmatch(r"[A-Za-z]+:[0-9A-Za-z.]+", crs):
        return crs.replace(":", "").upper()
    return f"crs{hashlib.sha256(crs.encode()).hexdigest()[:8]}"


def _groups(items: Iterable[Any], assets: dict[str, str] | None, origin: str) -> dict[tuple[str, str], list[tuple]]:
    """(day, CRS) -> the items of that day in that CRS, each as (item, bands, scaling), by item id."""
    groups: dict[tuple[str, str], list[tuple]] = {}
    for item in sorted(items, key=lambda it: (_item_date(it) or "", it.id)):
        bands, scaling = _item_bands(item, assets, origin)
        crs = _item_crs(item, bands[0][1])
        groups.setdefault((_item_date(item) or f"item-{item.id}", crs), []).append((item, bands, scaling))
    return dict(sorted(groups.items(), key=lambda kv: kv[0]))


def _common_scaling(origin: str, label: str, members: list[tuple]) -> list[tuple]:
    """The bands' ``raster:bands`` scale and offset, the same in every item of a mosaic (refused when they differ)."""
    first, scaling0 = members[0][0], members[0][2]
    names = [b for b, _ in members[0][1]]
    for item, _, scaling in members[1:]:
        for band, a, b in zip(names, scaling0, scaling, strict=True):
            if a != b:
                raise InputError(
                    f"{redact(origin)}: items {first.id} and {item.id} of {label} give band {band} different raster:bands "
                    f"scale/offset ({a[0]}, {a[1]} and {b[0]}, {b[1]}), and a mosaic band has one; narrow imagery's "
                    "query or datetime to items of one processing baseline"
                )
    return scaling0


def _group_scene(day: str, name: str, members: list[tuple], folder: str, origin: str) -> Scene:
    """One scene of a day's items in one CRS: their bands mosaicked in one VRT, their ids, links and ledger stamp."""
    label = f"the STAC items of {day}" + ("" if name == slug(day) else f" ({name})")
    names = [b for b, _ in members[0][1]]
    for item, bands, _ in members:
        if [b for b, _ in bands] != names:
            raise InputError(f"{redact(origin)}: items of {day} have different bands ({item.id}); map them in imagery.assets")
    stacked = [(band, [bands[k][1] for _, bands, _ in members]) for k, band in enumerate(names)]
    vrt = stack_vrt(label, stacked, folder, name, _common_scaling(origin, label, members))
    stamp = [{"id": item.id, **_item_stamp(item, [h for _, h in bands])} for item, bands, _ in members]
    items = [item for item, _, _ in members]
    hrefs = tuple(h for h in (_item_href(item, origin) for item in items) if h)
    date = day if not day.startswith("item-") else None
    return Scene(vrt, date, name, json.dumps(stamp, sort_keys=True, default=str), tuple(it.id for it in items), hrefs)


def day_scenes(items: Iterable[Any], assets: dict[str, str] | None, folder: str, origin: str) -> list[Scene]:
    """Items grouped by acquisition day and CRS, each group one scene: its items mosaicked band by band in one VRT.

    A day whose items lie in several CRSs (Sentinel-2 tiles of two UTM zones over one AOI) gives a
    scene per CRS, named ``<date>-EPSG<code>``; a day in one CRS is named by its date. An item
    without a date is a scene of its own, named by its id. Every item of a scene must give each
    band the same ``raster:bands`` scale and offset. ``origin`` is the API's URL (messages, item links).
    """
    groups = _groups(items, assets, origin)
    zones: dict[str, int] = {}
    for day, _ in groups:
        zones[day] = zones.get(day, 0) + 1
    return [
        _group_scene(day, slug(day if zones[day] == 1 else f"{day}-{_crs_label(crs)}"), members, folder, origin)
        for (day, crs), members in groups.items()
    ]


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

    search_keys = im.search_keys()
    if im.stac and is_http_url(im.stac):
        client = open_client(im.stac)
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
