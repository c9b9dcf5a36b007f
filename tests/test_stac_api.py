"""Workflows and ``geoseg.stac_scenes`` against a real STAC API (rustac's server) on 127.0.0.1.

The items' assets are small COGs served with byte ranges by ``tests/servers.py``; the API is
``rustac serve`` with its in-memory backend, loaded from a collection and an items file and
started (and stopped) by the tests with a bounded wait. That backend conforms to item search
but not to the query or filter extensions, so ``query`` is applied by geoseg here.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from tests.servers import free_port, range_server

CRS = "EPSG:32631"
X0, Y0, RES, SIZE = 500000.0, 5000000.0, 10.0, 192
#: item id -> (date, cloud cover, x offset of its tile in pixels); "far" lies outside the AOI, "old" before the dates
ITEMS = {
    "s2-2024-01-10": ("2024-01-10", 5, 0),
    "s2-2024-03-15": ("2024-03-15", 55, 0),  # too cloudy
    "s2-2024-05-20": ("2024-05-20", 10, 0),
    "far-2024-02-01": ("2024-02-01", 1, 5000),  # 50 km east
    "old-2023-06-01": ("2023-06-01", 1, 0),
}
NEW = {"s2-2024-06-11": ("2024-06-11", 2, 0)}
BANDS = {"B04": "red", "B08": "nir", "B03": "green"}


def _rustac() -> str:
    exe = Path(sys.executable).with_name("rustac")
    found = str(exe) if exe.exists() else shutil.which("rustac")
    if not found:
        pytest.skip("rustac (pip install rustac) is not installed: no STAC API server to test against")
    return found


def _data(item: str) -> np.ndarray:
    """Three bands with forest (high NDVI) and open land, different for every item."""
    rng = np.random.default_rng(zlib.crc32(item.encode()))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    forest = np.sin(xx / 13.0 + len(item)) * np.cos(yy / 17.0 + rng.uniform(0, 3)) > 0
    red = np.where(forest, 300, 1500) + rng.integers(0, 200, (SIZE, SIZE))
    nir = np.where(forest, 3500, 1800) + rng.integers(0, 200, (SIZE, SIZE))
    green = (red + nir) // 2
    return np.stack([red, nir, green]).astype("uint16")


def _write_item_files(folder: Path, item: str, dx: int, crs: str = CRS) -> None:
    """The item's band COGs in ``folder`` and the same pixels as one local 3-band GeoTIFF (the reference)."""
    data = _data(item)
    transform = from_origin(X0 + dx * RES, Y0, RES, RES)
    profile = {"width": SIZE, "height": SIZE, "dtype": "uint16", "crs": crs, "transform": transform, "nodata": 0}
    for k, key in enumerate(BANDS):
        with rasterio.open(folder / f"{item}_{key}.tif", "w", driver="COG", count=1, blocksize=64, **profile) as ds:
            ds.write(data[k], 1)
    with rasterio.open(folder / f"{item}_local.tif", "w", driver="GTiff", count=3, **profile) as ds:
        ds.write(data)
        ds.descriptions = tuple(BANDS.values())


def _item(item: str, date: str, cloud: int, dx: int, url: str, crs: str = CRS) -> dict:
    from pyproj import Transformer

    to_ll = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform
    x0, x1, y1, y0 = X0 + dx * RES, X0 + (dx + SIZE) * RES, Y0, Y0 - SIZE * RES
    ring = [to_ll(x, y) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
    lons, lats = [p[0] for p in ring], [p[1] for p in ring]
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "id": item,
        "collection": "s2",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "properties": {"datetime": f"{date}T10:30:00Z", "eo:cloud_cover": cloud, "updated": "2024-07-01T00:00:00Z"},
        "links": [],
        "assets": {key: {"href": f"{url}/{item}_{key}.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                         "roles": ["data"], "eo:bands": [{"name": key, "common_name": name}]}
                   for key, name in BANDS.items()},
    }  # fmt: skip


@contextlib.contextmanager
def stac_api(folder: Path, items: list[dict]) -> Iterator[str]:
    """``rustac serve`` on 127.0.0.1 with ``items`` in collection ``s2``; its URL while the block runs (bounded wait)."""
    exe = _rustac()
    collection = {
        "type": "Collection", "stac_version": "1.0.0", "id": "s2", "description": "test tiles", "license": "CC0-1.0",
        "links": [], "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]}, "temporal": {"interval": [[None, None]]}},
    }  # fmt: skip
    (folder / "collection.json").write_text(json.dumps(collection))
    (folder / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    port = free_port()
    log = (folder / "rustac.log").open("w")
    proc = subprocess.Popen(
        [exe, "serve", "-a", f"127.0.0.1:{port}", str(folder / "collection.json"), str(folder / "items.json")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/collections/s2/items", timeout=2) as r:
                    if len(json.load(r)["features"]) >= min(len(items), 1):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"rustac serve did not come up: {(folder / 'rustac.log').read_text()[-500:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def cogs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """The band COGs of every item, served with byte ranges: (folder, base URL)."""
    folder = tmp_path_factory.mktemp("cogs")
    for item, (_, _, dx) in {**ITEMS, **NEW}.items():
        _write_item_files(folder, item, dx)
    with range_server(folder) as served:
        yield folder, served.url


def _aoi(path: Path) -> Path:
    """An AOI inside the tiles at X0 (not the far one), in EPSG:4326."""
    from pyproj import Transformer

    to_ll = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform
    x0, x1, y0, y1 = X0 + 300, X0 + 1500, Y0 - 1600, Y0 - 200
    ring = [list(to_ll(x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))  # fmt: skip
    return path


WORKFLOW = """name: stacapi
aoi: aoi.geojson
imagery:
  stac: {url}
  collections: [s2]
  datetime: 2024-01-01/2024-06-30
  query: {{eo:cloud_cover: {{lt: 20}}}}
  assets: {{red: B04, nir: B08}}
models: [forest]
outputs: {{folder: out, formats: [geojson], quicklook: false}}
scheduler: synchronous
"""


def test_search_finds_the_items_of_the_aoi_dates_and_cloud_filter(cogs: tuple[Path, str], tmp_path: Path) -> None:
    from geoseg.io.aoi import aoi_lonlat
    from geoseg.workflows.stac import search_items

    _, base = cogs
    items = [_item(i, *v, base) for i, v in ITEMS.items()]
    with stac_api(tmp_path, items) as url:
        aoi = aoi_lonlat(_aoi(tmp_path / "aoi.geojson"))
        everything = search_items(url, collections=["s2"])
        found = search_items(url, collections=["s2"], intersects=aoi, datetime="2024-01-01/2024-06-30",
                             query={"eo:cloud_cover": {"lt": 20}})  # fmt: skip
        one = search_items(url, collections=["s2"], intersects=aoi, datetime="2024-01-01/2024-06-30", max_items=1)
        assert len(everything) == len(ITEMS)
        assert [it.id for it in found] == ["s2-2024-01-10", "s2-2024-05-20"]
        assert [it.id for it in one] == ["s2-2024-01-10"]
        from geoseg.errors import InputError

        with pytest.raises(InputError, match="does not support filter"):
            search_items(url, filter={"op": "<", "args": [{"property": "eo:cloud_cover"}, 20]})
    with pytest.raises(InputError, match="not a STAC API geoseg can open"):
        search_items(url)  # the server is gone


def test_workflow_on_a_stac_api_equals_the_local_files_and_runs_only_what_is_new(cogs: tuple[Path, str], tmp_path: Path) -> None:
    import geoseg
    from geoseg.workflows.run import run_workflow

    folder, base = cogs
    _aoi(tmp_path / "aoi.geojson")
    items = [_item(i, *v, base) for i, v in ITEMS.items()]
    api = tmp_path / "api"
    api.mkdir()
    with stac_api(api, items) as url:
        f = tmp_path / "w.yaml"
        f.write_text(WORKFLOW.format(url=url))
        s = run_workflow(f)
        assert s["units"] == {"done": 2, "skipped": 0, "failed": 0}
        assert [e["date"] for e in s["images"]] == ["2024-01-10", "2024-05-20"]
        for entry, item in zip(s["images"], ["s2-2024-01-10", "s2-2024-05-20"], strict=True):
            record = json.loads((Path(entry["models"]["forest"]["folder"]) / "item.json").read_text())
            links = [ln["href"] for ln in record["links"] if ln["rel"] == "derived_from"]
            assert links == [f"{url}/collections/s2/items/{item}"]  # the item.json names the STAC item it came from
        again = run_workflow(f)
        assert again["units"] == {"done": 0, "skipped": 2, "failed": 0}
    for entry, item in zip(s["images"], ["s2-2024-01-10", "s2-2024-05-20"], strict=True):
        assert "/vsicurl/" in Path(entry["image"]).read_text()  # read remotely, window by window
        with geoseg.scheduler("synchronous"):
            ref = geoseg.segment(str(folder / f"{item}_local.tif"), "forest", tmp_path / "ref" / item,
                                 aoi=str(tmp_path / "aoi.geojson"))  # fmt: skip
        with rasterio.open(ref.mask) as a, rasterio.open(Path(entry["folder"]) / "forest" / "mask.tif") as b:
            assert a.transform == b.transform and a.shape == b.shape
            np.testing.assert_array_equal(a.read(1), b.read(1))
            assert {0, 1, 255} <= set(np.unique(b.read(1)))  # forest, other land, outside the AOI
    # a new item appears on the server: the scheduled run processes only it
    api2 = tmp_path / "api2"
    api2.mkdir()
    with stac_api(api2, items + [_item(i, *v, base) for i, v in NEW.items()]) as url:
        f.write_text(WORKFLOW.format(url=url))
        third = run_workflow(f)
    assert third["units"] == {"done": 1, "skipped": 2, "failed": 0}
    assert [e["date"] for e in third["images"]] == ["2024-01-10", "2024-05-20", "2024-06-11"]
    # the provider reprocesses one item (its `updated` changes): that day is redone, nothing else
    items[0]["properties"]["updated"] = "2024-08-01T00:00:00Z"
    api3 = tmp_path / "api3"
    api3.mkdir()
    with stac_api(api3, items + [_item(i, *v, base) for i, v in NEW.items()]) as url:
        f.write_text(WORKFLOW.format(url=url))
        fourth = run_workflow(f)
    assert fourth["units"] == {"done": 1, "skipped": 2, "failed": 0}
    assert "2024-01-10" in fourth["images"][0]["models"]["forest"]["folder"]


def test_search_keys_need_an_api_and_an_empty_search_says_so(cogs: tuple[Path, str], tmp_path: Path) -> None:
    from geoseg.errors import InputError
    from geoseg.workflows.run import run_workflow
    from geoseg.workflows.spec import load_workflow

    f = tmp_path / "w.yaml"
    f.write_text("name: x\nimagery: {stac: cat.json, datetime: 2024-01-01}\nmodels: [forest]\noutputs: {folder: o}\n")
    with pytest.raises(InputError, match=r"w\.yaml:2: imagery: .*datetime searches a STAC API: give stac: https://"):
        load_workflow(f)
    f.write_text("name: x\nimagery: {stac: 'http://127.0.0.1:9/', datetime: 2024-01-01}\nmodels: [forest]\noutputs: {folder: o}")
    im = load_workflow(f).imagery_spec()
    assert im.stac == "http://127.0.0.1:9/" and im.datetime == "2024-01-01"  # a URL stays a URL; a bare date is that day
    _, base = cogs
    with stac_api(tmp_path, [_item(i, *v, base) for i, v in ITEMS.items()]) as url:
        f.write_text(WORKFLOW.format(url=url).replace("2024-01-01/2024-06-30", "2030-01-01/2030-12-31"))
        (tmp_path / "aoi.geojson").write_text("")
        _aoi(tmp_path / "aoi.geojson")
        with pytest.raises(InputError, match="the search found no items; widen imagery's datetime, query or filter"):
            run_workflow(f)


def test_stac_scenes_groups_a_days_items_into_one_mosaic(cogs: tuple[Path, str], tmp_path: Path) -> None:
    """Two tiles of one day are one scene: a VRT placing each tile's pixels where they lie."""
    import geoseg

    folder, base = cogs
    tiles = [_item("a-2024-01-10", "2024-01-10", 3, 0, base), _item("b-2024-01-10", "2024-01-10", 3, SIZE, base)]
    for t, dx in zip(tiles, (0, SIZE), strict=True):
        _write_item_files(folder, t["id"], dx)
    with stac_api(tmp_path, tiles) as url:
        days = geoseg.stac_scenes(url, tmp_path / "o", collections=["s2"], assets=["B04", "B08"])
    assert [(d.date, d.name, d.items) for d in days] == [("2024-01-10", "2024-01-10", ("a-2024-01-10", "b-2024-01-10"))]
    with rasterio.open(days[0].path) as ds:
        assert ds.width == 2 * SIZE and ds.descriptions == ("B04", "B08")
        assert ds.transform == from_origin(X0, Y0, RES, RES)
        np.testing.assert_array_equal(ds.read(1, window=((0, SIZE), (SIZE, 2 * SIZE))), _data("b-2024-01-10")[0])


def test_a_vrt_of_remote_tiles_as_large_as_a_sentinel2_tile_is_not_taken_for_a_sparse_file(
    cogs: tuple[Path, str], tmp_path: Path
) -> None:
    """A day's VRT names its COGs by URL: the few bytes on disk say nothing of the pixels it holds."""
    from geoseg.io.raster import open_source
    from geoseg.workflows.stack import stack_vrt

    _, base = cogs
    far = _item("far-2024-02-01", "2024-02-01", 1, 5000, base)["assets"]  # 5000 px east: the mosaic spans 5192 px
    near = _item("s2-2024-01-10", "2024-01-10", 1, 0, base)["assets"]
    vrt = stack_vrt("two tiles", [("red", [near["B04"]["href"], far["B04"]["href"]])], str(tmp_path / "v"), "wide")
    text = Path(vrt).read_text().replace(f'rasterXSize="{5000 + SIZE}"', 'rasterXSize="11000"')
    Path(vrt).write_text(text.replace('rasterYSize="192"', 'rasterYSize="11000"'))
    src = open_source(vrt)  # 1.2e8 pixels declared in a 1 kB file: refused as sparse before
    assert (src.geobox.width, src.geobox.height) == (11000, 11000)


def test_a_day_across_two_utm_zones_is_a_scene_per_zone(cogs: tuple[Path, str], tmp_path: Path) -> None:
    """Sentinel-2 tiles of one pass in two UTM zones: a mosaic per zone, named by date and EPSG code."""
    import geoseg

    folder, base = cogs
    west = _item("w31-2024-01-10", "2024-01-10", 3, 0, base)
    west["properties"]["proj:code"] = CRS  # declared: no need to open the asset to know its zone
    east = _item("e32-2024-01-10", "2024-01-10", 3, 0, base, crs="EPSG:32632")  # no proj fields: GDAL tells
    _write_item_files(folder, west["id"], 0)
    _write_item_files(folder, east["id"], 0, crs="EPSG:32632")
    with stac_api(tmp_path, [west, east]) as url:
        days = geoseg.stac_scenes(url, tmp_path / "o", collections=["s2"], assets=["B04", "B08"])
    assert [(d.date, d.name, d.items) for d in days] == [
        ("2024-01-10", "2024-01-10-EPSG32631", ("w31-2024-01-10",)),
        ("2024-01-10", "2024-01-10-EPSG32632", ("e32-2024-01-10",)),
    ]
    assert [d.item_hrefs for d in days] == [(f"{url}/collections/s2/items/{i}",) for i in ("w31-2024-01-10", "e32-2024-01-10")]
    for day, item, epsg in zip(days, (west, east), (32631, 32632), strict=True):
        with rasterio.open(day.path) as ds:
            assert ds.crs.to_epsg() == epsg and ds.transform == from_origin(X0, Y0, RES, RES)
            np.testing.assert_array_equal(ds.read(1), _data(item["id"])[0])


def test_the_items_of_a_mosaic_must_scale_each_band_alike(cogs: tuple[Path, str], tmp_path: Path) -> None:
    """Each item's raster:bands scale/offset is read; a day mixing two conventions in one band is refused."""
    import geoseg
    from geoseg.errors import InputError

    folder, base = cogs
    tiles = [_item("sa-2024-01-10", "2024-01-10", 3, 0, base), _item("sb-2024-01-10", "2024-01-10", 3, SIZE, base)]
    for t, dx in zip(tiles, (0, SIZE), strict=True):
        _write_item_files(folder, t["id"], dx)
        t["assets"]["B04"]["raster:bands"] = [{"scale": 0.0001, "offset": -0.1}]
    (tmp_path / "same").mkdir()
    (tmp_path / "mixed").mkdir()
    with stac_api(tmp_path / "same", tiles) as url:
        (day,) = geoseg.stac_scenes(url, tmp_path / "o", collections=["s2"], assets=["B04", "B08"])
    with rasterio.open(day.path) as ds:
        assert ds.scales[0] == pytest.approx(0.0001) and ds.offsets[0] == pytest.approx(-0.1)
    tiles[1]["assets"]["B04"]["raster:bands"] = [{"scale": 0.0001, "offset": 0}]  # processing baseline before 04.00
    with stac_api(tmp_path / "mixed", tiles) as url:
        with pytest.raises(InputError, match=r"sa-2024-01-10 and sb-2024-01-10 .* band B04 different raster:bands"):
            geoseg.stac_scenes(url, tmp_path / "o2", collections=["s2"], assets=["B04", "B08"])


def _static_api(folder: Path, base: str, pages: list[list[dict]]) -> None:
    """A STAC API as static files for :func:`range_server`: a landing page and search pages linked by ``next``."""
    spec = "https://api.stacspec.org/v1.0.0"
    landing = {
        "type": "Catalog", "stac_version": "1.0.0", "id": "static-api", "description": "search pages as files",
        "conformsTo": [f"{spec}/core", f"{spec}/item-search"],
        "links": [{"rel": "self", "href": f"{base}/"}, {"rel": "root", "href": f"{base}/"},
                  {"rel": "search", "href": f"{base}/search", "method": "GET", "type": "application/geo+json"}],
    }  # fmt: skip
    (folder / "index.html").write_text(json.dumps(landing))
    for k, page in enumerate(pages, start=1):
        links = [{"rel": "next", "href": f"{base}/search-{k + 1}", "method": "GET"}] if k < len(pages) else []
        name = "search" if k == 1 else f"search-{k}"
        (folder / name).write_text(json.dumps({"type": "FeatureCollection", "features": page, "links": links}))


def _count(served: object, path: str) -> int:
    """Requests for ``path`` once the server has logged them (it logs after sending: a client may be done first)."""
    time.sleep(0.2)
    return served.count(path)


def test_a_query_geoseg_applies_itself_stops_at_max_items(tmp_path: Path) -> None:
    """An API without the query extension: geoseg filters the pages, and reads no page past the max_items-th match."""
    from geoseg.workflows.stac import search_items

    with range_server(tmp_path) as served:
        items = {i: _item(i, *v, served.url) for i, v in ITEMS.items()}
        pages = [[items["s2-2024-03-15"], items["s2-2024-01-10"]], [items["s2-2024-05-20"], items["far-2024-02-01"]],
                 [items["old-2023-06-01"]]]  # fmt: skip
        _static_api(tmp_path, served.url, pages)
        cloudless = {"eo:cloud_cover": {"lt": 20}}
        one = search_items(served.url, query=cloudless, max_items=1)
        assert [it.id for it in one] == ["s2-2024-01-10"]
        assert _count(served, "/search") == 1 and _count(served, "/search-2") == 0 and _count(served, "/search-3") == 0
        two = search_items(served.url, query=cloudless, max_items=2)
        assert [it.id for it in two] == ["s2-2024-01-10", "s2-2024-05-20"]
        assert _count(served, "/search-2") == 1 and _count(served, "/search-3") == 0
        every = search_items(served.url, query=cloudless)
        assert len(every) == 4 and _count(served, "/search-3") == 1


def test_a_busy_api_answering_503_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """503s from the landing page and the search are retried with back-off; past the last retry, one line."""
    from geoseg.errors import InputError
    from geoseg.workflows import stac_http
    from geoseg.workflows.stac import search_items

    monkeypatch.setattr(stac_http, "BACKOFF_S", 0.01)
    with range_server(tmp_path) as served:
        _static_api(tmp_path, served.url, [[_item(i, *v, served.url) for i, v in ITEMS.items()]])
        served.fail_next["/"] = 1
        served.fail_next["/search"] = 2
        assert len(search_items(served.url)) == len(ITEMS)
        assert _count(served, "/search") == 3  # the landing page's 503 retried too
        served.fail_next["/search"] = 100
        busy = r"the STAC API search failed \(.*503.*\); the server kept failing after retries: try again later"
        with pytest.raises(InputError, match=busy):
            search_items(served.url)
        assert _count(served, "/search") == 3 + 1 + stac_http.RETRIES


def _static_catalog(folder: Path, base: str, cogs_url: str) -> None:
    """A static catalog of one item (assets on the COG server) as files for :func:`range_server`."""
    item = _item("s2-2024-01-10", "2024-01-10", 5, 0, cogs_url)
    item["links"] = [{"rel": "root", "href": "../catalog.json"}, {"rel": "parent", "href": "../catalog.json"}]
    (folder / "items").mkdir()
    (folder / "items" / "s2.json").write_text(json.dumps(item))
    catalog = {"type": "Catalog", "stac_version": "1.0.0", "id": "cat", "description": "one item",
               "links": [{"rel": "root", "href": "./catalog.json"}, {"rel": "item", "href": "./items/s2.json"}]}  # fmt: skip
    (folder / "catalog.json").write_text(json.dumps(catalog))


def test_a_static_catalog_over_http_is_read_through_503s(
    cogs: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file of the catalog (the root, then its item by its link) is fetched with retries."""
    from geoseg.workflows import stac_http
    from geoseg.workflows.spec import Imagery
    from geoseg.workflows.stac import catalog_scenes

    monkeypatch.setattr(stac_http, "BACKOFF_S", 0.01)
    served_folder = tmp_path / "served"
    served_folder.mkdir()
    with range_server(served_folder) as served:
        _static_catalog(served_folder, served.url, cogs[1])
        served.fail_next["/catalog.json"] = 2
        served.fail_next["/items/s2.json"] = 2
        im = Imagery(stac=f"{served.url}/catalog.json", assets={"red": "B04", "nir": "B08"})
        (scene,) = catalog_scenes(im, str(tmp_path / "out" / ".geoseg-stac"))
        assert _count(served, "/catalog.json") >= 3 and _count(served, "/items/s2.json") == 3
    assert scene.items == ("s2-2024-01-10",) and scene.item_hrefs == (f"{served.url}/items/s2.json",)
    with rasterio.open(scene.path) as ds:
        np.testing.assert_array_equal(ds.read(1), _data("s2-2024-01-10")[0])


def test_a_static_catalog_server_that_never_answers_fails_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that accepts the connection and says nothing: a timeout, retries, then one line (no hang)."""
    from geoseg.errors import InputError
    from geoseg.workflows import stac_http
    from geoseg.workflows.spec import Imagery
    from geoseg.workflows.stac import catalog_scenes

    monkeypatch.setattr(stac_http, "CATALOG_TIMEOUT_S", 0.5)
    monkeypatch.setattr(stac_http, "RETRIES", 1)
    monkeypatch.setattr(stac_http, "BACKOFF_S", 0.01)
    outcome: list[BaseException] = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections wait in the backlog: accepted by the kernel, never answered
        im = Imagery(stac=f"http://127.0.0.1:{silent.getsockname()[1]}/catalog.json")

        def read() -> None:
            try:
                catalog_scenes(im, str(tmp_path))
            except BaseException as exc:
                outcome.append(exc)

        started = time.monotonic()
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), "reading a catalog from a silent server hung"
    assert time.monotonic() - started < 10
    assert len(outcome) == 1 and isinstance(outcome[0], InputError)
    assert "not a STAC catalog" in str(outcome[0]) and "timed out" in str(outcome[0]).lower()
