"""The sample AOI: a seeded, generated two-date 4-band scene in a real UTM zone, with labels.

A harbour district near Hamburg at 2 m: a building quarter with roads, a harbour basin with
ships, a tank farm on a concrete pad, forest and grassland, a lake. The second date has part
of the forest cleared, new buildings, and other ships. Ground truth comes from the same
shapes that paint the scene. Everything is made by geoseg itself (no downloads), under the
project's licence.
"""

from __future__ import annotations

import json
import os

import numpy as np

from geoseg.vector.geometry import pixel_to_world
from geoseg.vector.writers import GPKG_VERSION

__all__ = ["make_sample"]

# Near Hamburg's harbour, UTM zone 32N; 2 m pixels.
CRS = "EPSG:32632"
ORIGIN = (561000.0, 5934000.0)
RES = 2.0


def _field(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Smooth noise in [0, 1]: coarse random grid, bilinearly upsampled."""
    n = size // scale + 2
    coarse = rng.random((n, n))
    idx = np.arange(size) / scale
    i0 = idx.astype(int)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    out = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    return (out - out.min()) / (np.ptp(out) + 1e-9)


#: class ids of the truth rasters and labels
CLASSES = {0: "other", 1: "forest", 2: "water", 3: "building", 4: "ship", 5: "storage_tank"}
#: mean reflectance x 10000 (blue, green, red, nir); every land surface has NDWI below -0.1 so the
#: 4 % noise does not turn it into water specks
SPECTRA = {
    "grass": (450, 800, 750, 1750),
    "road": (1500, 1600, 1700, 2100),
    "bare": (1100, 1350, 1700, 2100),
    "forest": (300, 600, 350, 3600),
    "water": (700, 650, 450, 250),
    "ship": (2400, 2500, 2600, 3300),
    "tank": (3000, 3050, 3100, 3800),
    "pad": (1800, 1850, 1900, 2300),
}
ROOFS = ((2000, 2050, 2100, 2600), (900, 1000, 2300, 2800), (1600, 1700, 1800, 2200), (1300, 1250, 1200, 1700))
DATES = ("2024-06-15", "2025-06-20")


def _rect(cx: float, cy: float, length: float, width: float, angle: float):
    import shapely
    from shapely import affinity

    box = shapely.box(cx - length / 2, cy - width / 2, cx + length / 2, cy + width / 2)
    return affinity.rotate(box, angle, origin=(cx, cy))


def _layout(rng: np.random.Generator, size: int) -> dict:
    """Shapes in pixel coordinates (x = column, y = row) for both dates.

    The shapes are drawn in a fixed order from ``rng`` (the same seed gives the same scene):
    water, forest, building quarter, tank farm, the second date's changes, then the ships.
    """
    s = size
    basin, water = _water(rng, s)
    forest = _forest(rng, s, water)
    quarter, road_u, buildings = _building_quarter(rng, s)
    pad, tanks = _tank_farm(rng, s)
    forest = forest.difference(pad.buffer(4))
    # second date: a clear-cut in the forest, new buildings on grassland, other ships
    cut, new_buildings = _second_date(rng, s, forest, water, quarter, pad)
    return {
        "water": water,
        "forest": forest,
        "roads": road_u,
        "buildings": buildings,
        "pad": pad,
        "tanks": tanks,
        "ships": [_ships(rng, s, basin, 24), _ships(rng, s, basin, 20)],
        "cut": cut,
        "new_buildings": new_buildings,
    }


def _water(rng: np.random.Generator, s: int) -> tuple:
    """The harbour basin (a wavy band across the south) and all water (basin and a lake)."""
    import shapely

    t = np.linspace(0, 1, 200)
    top = 0.64 * s + 0.02 * s * np.sin(t * 9 + rng.random() * 6)
    bottom = 0.86 * s + 0.02 * s * np.sin(t * 7 + rng.random() * 6)
    basin = shapely.Polygon(list(zip(t * s, top, strict=True)) + list(zip(t[::-1] * s, bottom[::-1], strict=True)))
    lake = shapely.Point(0.15 * s, 0.55 * s).buffer(0.05 * s, 64)
    return basin, shapely.union_all([basin, lake])


def _forest(rng: np.random.Generator, s: int, water):
    """A lobed blob in the north-east and a few woods, off the water."""
    import shapely

    angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    radius = 0.2 * s * (1 + 0.18 * np.sin(3 * angles + rng.random() * 6) + 0.08 * np.sin(7 * angles))
    forest = shapely.Polygon(np.column_stack([0.76 * s + radius * np.cos(angles), 0.26 * s + 0.8 * radius * np.sin(angles)]))
    woods = [shapely.Point(x * s, y * s).buffer(r * s, 32) for x, y, r in ((0.1, 0.92, 0.04), (0.35, 0.93, 0.03))]
    return shapely.union_all([forest, *woods]).difference(water)


def _building_quarter(rng: np.random.Generator, s: int) -> tuple:
    """The quarter in the north-west, its road grid (one geometry), and buildings in the blocks between roads."""
    import shapely

    step = 64
    roads, buildings = [], []
    quarter = shapely.box(0.03 * s, 0.03 * s, 0.5 * s, 0.5 * s)
    for k in range(int(0.03 * s), int(0.5 * s), step):
        roads.append(shapely.box(k, 0.03 * s, k + 6, 0.5 * s))
        roads.append(shapely.box(0.03 * s, k, 0.5 * s, k + 6))
    road_u = shapely.union_all(roads)
    for bx in range(int(0.03 * s) + 6, int(0.5 * s) - step // 2, step):
        for by in range(int(0.03 * s) + 6, int(0.5 * s) - step // 2, step):
            for _ in range(rng.integers(1, 4)):
                ln, wd = rng.uniform(8, 22), rng.uniform(6, 14)
                cx, cy = bx + rng.uniform(12, step - 18), by + rng.uniform(12, step - 18)
                b = _rect(cx, cy, ln, wd, rng.choice([0.0, 90.0]) + rng.uniform(-4, 4))
                if rng.random() < 0.25:  # an L-shaped building
                    b = shapely.union_all([b, _rect(cx + ln / 3, cy + wd * 0.8, ln / 3, wd, 0.0)])
                b = b.intersection(quarter)
                if not b.intersects(road_u) and not any(b.buffer(2).intersects(o) for o in buildings):
                    buildings.append(b)
    return quarter, road_u, buildings


def _tank_farm(rng: np.random.Generator, s: int) -> tuple:
    """A concrete pad east of the quarter, north of the basin, with two rows of tanks."""
    import shapely

    pad = shapely.box(0.55 * s, 0.5 * s, 0.95 * s, 0.61 * s)
    tanks = []
    for x in np.arange(0.57 * s, 0.93 * s, 0.05 * s):
        for y in (0.525 * s, 0.585 * s):
            r = rng.uniform(6, 12)
            tanks.append(shapely.Point(x + rng.uniform(-3, 3), y + rng.uniform(-2, 2)).buffer(r, 32))
    return pad, tanks


def _second_date(rng: np.random.Generator, s: int, forest, water, quarter, pad) -> tuple:
    """A clear-cut in the forest, and up to 14 new buildings on free grassland."""
    import shapely

    angle = rng.uniform(0, 180)
    cut = _rect(0.78 * s, 0.3 * s, 0.18 * s, 0.1 * s, angle).intersection(forest)
    taken = shapely.union_all([water, forest, quarter, pad])
    new_buildings: list = []
    for _ in range(3000):  # bounded: small scenes get fewer new buildings
        if len(new_buildings) == 14:
            break
        b = _rect(rng.uniform(0.25 * s, 0.5 * s), rng.uniform(0.52 * s, 0.62 * s), rng.uniform(10, 20), rng.uniform(8, 12), 0)
        if not b.buffer(3).intersects(taken) and not any(b.buffer(3).intersects(o) for o in new_buildings):
            new_buildings.append(b)
    return cut, new_buildings


def _ships(rng: np.random.Generator, s: int, basin, n: int) -> list:
    """Up to ``n`` ships well inside the basin, apart from each other."""
    out: list = []
    inner = basin.buffer(-12)
    for _ in range(200 * n):  # bounded: small scenes get fewer ships
        if len(out) == n:
            break
        ln, wd = rng.uniform(20, 75), rng.uniform(5, 12)
        cx, cy = rng.uniform(0.03 * s, 0.97 * s), rng.uniform(0.66 * s, 0.84 * s)
        sh = _rect(cx, cy, ln, wd, rng.uniform(0, 180))
        if inner.contains(sh) and not any(sh.buffer(6).intersects(o) for o in out):
            out.append(sh)
    return out


def _paint(rng: np.random.Generator, size: int, lay: dict, date: int) -> tuple[np.ndarray, np.ndarray]:
    """Reflectance (4, size, size) uint16 and the truth class map for one date."""
    from rasterio import features

    def burn(geoms, value: int, out: np.ndarray) -> None:
        geoms = [g for g in (geoms if isinstance(geoms, list) else [geoms]) if not g.is_empty]
        if geoms:
            features.rasterize([(g, value) for g in geoms], out=out, default_value=value)

    # layer ids: 0 grass, 1 forest, 2 water, 3 building, 4 ship, 5 tank, 6 road, 7 pad, 8 bare
    layer = np.zeros((size, size), np.uint8)
    burn(lay["forest"], 1, layer)
    if date == 1:
        burn(lay["cut"], 8, layer)
    burn(lay["water"], 2, layer)
    burn(lay["roads"], 6, layer)
    burn(lay["pad"], 7, layer)
    roofs = np.zeros((size, size), np.uint8)
    blds = lay["buildings"] + (lay["new_buildings"] if date == 1 else [])
    for k, b in enumerate(blds):
        burn(b, 3, layer)
        burn(b, 1 + k % len(ROOFS), roofs)
    burn(lay["tanks"], 5, layer)
    burn(lay["ships"][date], 4, layer)
    spectra = {0: "grass", 1: "forest", 2: "water", 4: "ship", 5: "tank", 6: "road", 7: "pad", 8: "bare"}
    refl = np.zeros((4, size, size), np.float32)
    for lid, name in spectra.items():
        sel = layer == lid
        refl[:, sel] = np.asarray(SPECTRA[name], np.float32)[:, None]
    for k, roof in enumerate(ROOFS, start=1):
        sel = (layer == 3) & (roofs == k)
        refl[:, sel] = np.asarray(roof, np.float32)[:, None]
    canopy = 0.85 + 0.3 * _field(rng, size, 12)  # crowns: nir texture in the forest
    refl[3] = np.where(layer == 1, refl[3] * canopy, refl[3])
    light = 0.95 + 0.1 * _field(rng, size, 512)  # haze / illumination, smooth
    refl *= light[None] * (1 + 0.04 * rng.standard_normal(refl.shape).astype(np.float32))
    truth = np.zeros((size, size), np.uint8)
    for lid, cid in ((1, 1), (2, 2), (3, 3), (4, 4), (5, 5)):
        truth[layer == lid] = cid
    return np.clip(refl, 1, 10000).astype(np.uint16), truth


def _labels(lay: dict, truth: np.ndarray, date: int, transform, path: str, layer: str) -> None:
    import geopandas as gpd
    import shapely
    from rasterio import features

    rows: list[tuple[str, object]] = []
    mask = np.isin(truth, (1, 2))
    for geom, value in features.shapes(truth, mask=mask, transform=transform):
        rows.append((CLASSES[int(value)], shapely.geometry.shape(geom)))

    def world(geoms: list) -> list:
        return list(pixel_to_world(np.asarray(geoms, dtype=object), transform)) if geoms else []

    blds = lay["buildings"] + (lay["new_buildings"] if date == 1 else [])
    rows += [("building", g) for g in world(blds)]
    rows += [("ship", g) for g in world(lay["ships"][date])]
    rows += [("storage_tank", g) for g in world(lay["tanks"])]
    df = gpd.GeoDataFrame({"class": [r[0] for r in rows], "date": DATES[date]}, geometry=[r[1] for r in rows], crs=CRS)
    df.to_file(path, layer=layer, driver="GPKG", VERSION=GPKG_VERSION)


def make_sample(out_dir: str | os.PathLike, size: int = 2048, seed: int = 42) -> dict[str, str]:
    """Write the sample AOI into ``out_dir``: two dates, labels, a physics model and an AOI.

    Files: ``scene.tif`` (first date), ``scene_after.tif`` (second date), ``labels.gpkg``
    (layers ``truth``, ``truth_after``, ``forest_loss``, ``new_building``), ``landcover.onnx``,
    ``aoi.geojson``.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Folder to write into (created).
    size : int
        Scene width and height in pixels (2 m pixels).
    seed : int
        Random seed; the same seed gives the same files.

    Returns
    -------
    dict
        Paths of the written files.
    """
    from rasterio.transform import from_origin

    from geoseg.models.indices import export_index_landcover  # lazy: torch

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    lay = _layout(rng, size)
    transform = from_origin(*ORIGIN, RES, RES)
    labels = os.path.join(out_dir, "labels.gpkg")
    if os.path.exists(labels):
        os.remove(labels)
    paths = {}
    for date, name in enumerate(("scene.tif", "scene_after.tif")):
        data, truth = _paint(rng, size, lay, date)
        path = os.path.join(out_dir, name)
        _write_scene(path, data, transform, date)
        paths["scene" if date == 0 else "scene_after"] = path
        _labels(lay, truth, date, transform, labels, "truth" if date == 0 else "truth_after")
    _change_labels(lay, transform, labels)
    paths["labels"] = labels
    paths["model"] = export_index_landcover(os.path.join(out_dir, "landcover.onnx"))
    paths["aoi"] = _write_aoi(os.path.join(out_dir, "aoi.geojson"), size)
    paths.update(write_halves(out_dir, size))
    return paths


def _write_scene(path: str, data: np.ndarray, transform, date: int) -> None:
    """One date's 4-band reflectance as a tiled GeoTIFF, with band names, scales and its acquisition date."""
    import rasterio

    size = data.shape[1]
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 4,
        "dtype": "uint16",
        "crs": CRS,
        "transform": transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "nodata": 0,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for b, band in enumerate(("blue", "green", "red", "nir"), start=1):
            dst.set_band_description(b, band)
        dst.scales = (1e-4,) * 4  # reflectance = value x 0.0001 (what a STAC raster:bands entry says)
        dst.offsets = (0.0,) * 4
        dst.update_tags(ACQUISITION_DATE=DATES[date], TIFFTAG_DATETIME=DATES[date].replace("-", ":") + " 10:30:00")


def _change_labels(lay: dict, transform, labels: str) -> None:
    """The change layers ``forest_loss`` and ``new_building`` of ``labels.gpkg``."""
    import geopandas as gpd

    change = {
        "forest_loss": [lay["cut"]] if not lay["cut"].is_empty else [],
        "new_building": lay["new_buildings"],
    }
    for layer, geoms in change.items():
        world = pixel_to_world(np.array(geoms, dtype=object), transform) if geoms else []
        gpd.GeoDataFrame({"class": [layer] * len(world)}, geometry=list(world), crs=CRS).to_file(
            labels, layer=layer, driver="GPKG", VERSION=GPKG_VERSION
        )


def _write_aoi(path: str, size: int) -> str:
    """The AOI: a pentagon inside the scene, in lon/lat (EPSG:4326), as GeoJSON."""
    from pyproj import Transformer

    to_ll = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    x0, y0 = ORIGIN
    ext = size * RES
    pts = [(0.1, 0.2), (0.6, 0.05), (0.95, 0.4), (0.8, 0.9), (0.2, 0.85), (0.1, 0.2)]
    ring = [list(to_ll.transform(x0 + fx * ext, y0 - fy * ext)) for fx, fy in pts]
    ring = [[round(x, 7), round(y, 7)] for x, y in ring][::-1]  # counter-clockwise exterior (RFC 7946)
    with open(path, "w") as f:
        json.dump(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "properties": {"name": "sample AOI"},
                        "geometry": {"type": "Polygon", "coordinates": [ring]},
                    }
                ],
            },
            f,
        )
    return path


def write_halves(out_dir: str, size: int, block: int = 512) -> dict[str, str]:
    """Split the scene into a checkerboard of ``block`` px squares: ``train_half.gpkg`` (the
    squares whose row + column is even) and ``holdout_half.gpkg`` (the others), in the scene's
    CRS. Bundled models are trained on the first and scored on the second.
    """
    import geopandas as gpd
    import shapely

    x0, y0 = ORIGIN
    n = -(-size // block)
    halves: dict[str, list] = {"train_half": [], "holdout_half": []}
    for r in range(n):
        for c in range(n):
            x1, y1 = x0 + c * block * RES, y0 - r * block * RES
            box = shapely.box(x1, y1 - min(block, size - r * block) * RES, x1 + min(block, size - c * block) * RES, y1)
            halves["train_half" if (r + c) % 2 == 0 else "holdout_half"].append(box)
    out = {}
    for name, boxes in halves.items():
        path = os.path.join(out_dir, f"{name}.gpkg")
        if os.path.exists(path):
            os.remove(path)
        half = gpd.GeoDataFrame({"name": [name]}, geometry=[shapely.union_all(boxes)], crs=CRS)
        half.to_file(path, driver="GPKG", VERSION=GPKG_VERSION)
        out[name] = path
    return out
