"""Scores of the bundled models on real imagery (../shared/data), with no tuning to its labels.

    python -m tests.benchmarks.real_scores [--data ../shared/data] [--out /tmp/geoseg-real]

Prints a table: ships on the Sentinel-2 Casablanca chip (15 labelled vessels), buildings on the
SpaceNet Atlanta panchromatic tile (43 footprints; the pan band given as red, green and blue), and
forest on the Landsat Pucallpa composites (no labels: forest area per date and the loss between).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _stack(paths: list[str], names: list[str], out: str) -> str:
    import rasterio

    with rasterio.open(paths[0]) as ds:
        prof = ds.profile
    prof.update(count=len(paths), driver="GTiff")
    with rasterio.open(out, "w", **prof) as dst:
        for b, (p, n) in enumerate(zip(paths, names, strict=True), start=1):
            with rasterio.open(p) as ds:
                dst.write(ds.read(1), b)
            dst.set_band_description(b, n)
    return out


def main() -> None:
    import geoseg
    from geoseg.evaluate import evaluate
    from geoseg.vector import vectorize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", default=os.environ.get("GEOSEG_TEST_DATA", os.path.join(os.path.dirname(__file__), "../../../shared/data"))
    )
    ap.add_argument("--out", default="/tmp/geoseg-real")
    args = ap.parse_args()
    geo = os.path.join(os.path.abspath(args.data), "geo")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with geoseg.scheduler("threads"):
        # ships: Sentinel-2 L2A 10 m (8.3 m on the ground) Casablanca
        d = os.path.join(geo, "sen2ships_casablanca")
        bands = [os.path.join(d, f"casablanca_2023-04-26_S2L2A_{b}.tif") for b in ("B02", "B03", "B04", "B08")]
        stack = _stack(bands, ["blue", "green", "red", "nir"], os.path.join(args.out, "casablanca.tif"))
        t = time.perf_counter()
        geoseg.write(geoseg.predict(stack, "ships"), os.path.join(args.out, "ships"), overwrite=True)
        r = evaluate(
            os.path.join(args.out, "ships", "mask.tif"), os.path.join(d, "casablanca_vessels.geojson"), label_class="ship"
        )
        rows.append(("ships", "Sentinel-2 Casablanca", r["classes"]["ship"], time.perf_counter() - t))
        # buildings: SpaceNet Atlanta pan 0.5 m, resampled on the fly to the model's 2 m
        d = os.path.join(geo, "spacenet_atlanta_buildings")
        t = time.perf_counter()
        res = geoseg.predict(os.path.join(d, "sample_geotiff.tif"), "buildings", band_map={"red": 1, "green": 1, "blue": 1})
        geoseg.write(res, os.path.join(args.out, "buildings"), overwrite=True)
        r = evaluate(
            os.path.join(args.out, "buildings", "mask.tif"), os.path.join(d, "geotiff_labels.geojson"), label_class="building"
        )
        rows.append(("buildings", "SpaceNet Atlanta pan", r["classes"]["building"], time.perf_counter() - t))
        # forest: Landsat Pucallpa (bands SWIR1, NIR, Red, Green), 2000 and 2020
        d = os.path.join(geo, "landsat_pucallpa_forest")
        areas = {}
        for year in (2000, 2020):
            out = os.path.join(args.out, f"forest_{year}")
            res = geoseg.predict(os.path.join(d, f"pucallpa_landsat_{year}.tif"), "forest", band_map={"nir": 2, "red": 3})
            geoseg.write(res, out, overwrite=True)
            rep = vectorize(os.path.join(out, "mask.tif"), out, formats=["gpkg"], overwrite=True, project=False)
            import pyogrio

            df = pyogrio.read_dataframe(
                os.path.join(out, "geoseg.gpkg"), layer="forest", columns=["area_m2"], read_geometry=False
            )
            areas[year] = (float(df["area_m2"].sum()) / 1e4, rep["features"])
    print(f"{'model':<10} {'data':<24} {'IoU':>6} {'prec':>6} {'recall':>6} {'obj F1':>7} {'true/pred/tp':>14} {'s':>6}")
    for model, data, c, s in rows:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        tp = f"{c['objects_true']}/{c['objects_pred']}/{c['object_tp']}"
        scores = f"{f(c['iou']):>6} {f(c['precision']):>6} {f(c['recall']):>6} {f(c['object_f1']):>7}"
        print(f"{model:<10} {data:<24} {scores} {tp:>14} {s:>6.1f}")
    for year, (ha, n) in areas.items():
        print(f"forest     Landsat Pucallpa {year}: {ha:,.0f} ha in {n} polygons")
    print(f"forest     loss 2000 -> 2020 (area difference): {areas[2000][0] - areas[2020][0]:,.0f} ha")
    with open(os.path.join(args.out, "scores.json"), "w") as fh:
        json.dump({"rows": [(m, d, c) for m, d, c, _ in rows], "forest_ha": areas}, fh, indent=2, default=np.asarray)


if __name__ == "__main__":
    main()
