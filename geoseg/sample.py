"""The sample AOI: a seeded, generated 4-band scene in a real UTM zone, a physics model, an AOI.

Everything here is made by geoseg itself (no downloads), under the project's licence.
"""

from __future__ import annotations

import json
import os

import numpy as np

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


def make_sample(out_dir: str | os.PathLike, size: int = 1024, seed: int = 42) -> dict[str, str]:
    """Write ``scene.tif``, ``landcover.pt`` and ``aoi.geojson`` into ``out_dir``.

    Parameters
    ----------
    out_dir : str or os.PathLike
        Folder to write into (created).
    size : int
        Scene width and height in pixels.
    seed : int
        Random seed; the same seed gives the same files.

    Returns
    -------
    dict
        Paths of the written files.
    """
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import from_origin

    from geoseg.models.indices import export_index_landcover

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    water = _field(rng, size, 256) < 0.3
    forest = (_field(rng, size, 96) > 0.55) & ~water
    bare = ~water & ~forest
    # reflectance x 10000 for blue, green, red, nir
    refl = np.zeros((4, size, size), dtype=np.float32)
    for mask, spec in ((water, (600, 800, 500, 300)), (forest, (300, 600, 350, 3500)), (bare, (900, 1100, 1300, 1700))):
        for b in range(4):
            refl[b][mask] = spec[b]
    # buildings: bright rectangles on bare ground
    for _ in range(size // 8):
        r, c = rng.integers(0, size - 20, 2)
        h, w = rng.integers(6, 20, 2)
        if bare[r : r + h, c : c + w].all():
            refl[:, r : r + h, c : c + w] = np.array([1800, 1900, 2000, 2100], dtype=np.float32)[:, None, None]
    refl *= 1 + 0.05 * rng.standard_normal(refl.shape).astype(np.float32)
    data = np.clip(refl, 1, 10000).astype(np.uint16)
    scene = os.path.join(out_dir, "scene.tif")
    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 4,
        "dtype": "uint16",
        "crs": CRS,
        "transform": from_origin(*ORIGIN, RES, RES),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "nodata": 0,
    }
    with rasterio.open(scene, "w", **profile) as dst:
        dst.write(data)
        for b, name in enumerate(("blue", "green", "red", "nir"), start=1):
            dst.set_band_description(b, name)
    model = export_index_landcover(os.path.join(out_dir, "landcover.pt"))
    # AOI: a pentagon inside the scene, in lon/lat (EPSG:4326)
    to_ll = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    x0, y0 = ORIGIN
    ext = size * RES
    pts = [(0.1, 0.2), (0.6, 0.05), (0.95, 0.4), (0.8, 0.9), (0.2, 0.85), (0.1, 0.2)]
    ring = [list(to_ll.transform(x0 + fx * ext, y0 - fy * ext)) for fx, fy in pts]
    ring = [[round(x, 7), round(y, 7)] for x, y in ring][::-1]  # counter-clockwise exterior (RFC 7946)
    aoi = os.path.join(out_dir, "aoi.geojson")
    with open(aoi, "w") as f:
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
    return {"scene": scene, "model": model, "aoi": aoi}
