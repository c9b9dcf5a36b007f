"""Leave-one-place-out machinery of the recipes: places, training runs, predictions, pooled scores.

A recipe (an entry of :data:`geoseg.train.recipes.RECIPES`) is trained on all places but
one and scored on the one left out, for every place (:func:`leave_one_out`); the decision
threshold is the one with the best mean object F1 over the places left out. Models are
scored with :func:`geoseg.evaluate.evaluate` on the engine's masks, thresholded here.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Place",
    "building_places",
    "casablanca",
    "leave_one_out",
    "predict_place",
    "score_place",
    "ship_places",
    "train_on",
    "trained",
]


@dataclass
class Place:
    """One place of a training set: its images, their labels, and how the images store reflectance."""

    name: str
    images: list[str]
    labels: list[str]
    radiometry: str | None = None
    label_class: str = "ship"
    extra: dict[str, Any] = field(default_factory=dict)


def ship_places(data: str) -> list[Place]:
    """The ten Sentinel-2 ports of ``train/sen2ships_ports`` (Sentinel Hub 16-bit exports)."""
    folder = os.path.join(data, "train", "sen2ships_ports")
    out = []
    for img in sorted(glob.glob(os.path.join(folder, "*_S2L2A_*.tif"))):
        port = os.path.basename(img).split("_")[0]
        out.append(Place(port, [img], [os.path.join(folder, f"{port}_vessels.geojson")], "sentinelhub-raw16", "ship"))
    return out


def casablanca(data: str, work: str) -> Place:
    """The Casablanca chip (never trained on): its single-band files stacked into one GeoTIFF with band names."""
    import numpy as np
    import rasterio

    d = os.path.join(data, "geo", "sen2ships_casablanca")
    names = ["B02", "B03", "B04", "B08", "B11"]
    out = os.path.join(work, "casablanca_S2L2A.tif")
    if not os.path.exists(out):
        os.makedirs(work, exist_ok=True)
        bands = []
        for b in names:
            with rasterio.open(os.path.join(d, f"casablanca_2023-04-26_S2L2A_{b}.tif")) as ds:
                bands.append(ds.read(1))
                prof = ds.profile
        prof.update(count=len(names), driver="GTiff", tiled=True, blockxsize=256, blockysize=256, compress="deflate")
        with rasterio.open(out + ".tmp", "w", **prof) as dst:
            dst.write(np.stack(bands))
            for k, b in enumerate(names, start=1):
                dst.set_band_description(k, b)
        os.replace(out + ".tmp", out)
    return Place("casablanca", [out], [os.path.join(d, "casablanca_vessels.geojson")], "sentinelhub-raw16", "ship")


def building_places(data: str) -> list[Place]:
    """The four places of ``train/oam_buildings``, two mosaics each."""
    folder = os.path.join(data, "train", "oam_buildings")
    places: dict[str, Place] = {}
    for img in sorted(glob.glob(os.path.join(folder, "*_z19_[0-9].tif"))):
        stem = os.path.basename(img)[:-4]
        place = stem.rsplit("_z19_", 1)[0]
        p = places.setdefault(place, Place(place, [], [], None, "building"))
        p.images.append(img)
        p.labels.append(os.path.join(folder, f"{stem}_buildings.geojson"))
    return list(places.values())


def train_on(
    recipe: dict[str, Any], places: list[Place], out: str, seed: int = 0, scale_steps: float = 1.0, log=print
) -> dict[str, Any]:
    """Train ``recipe`` (an entry of :data:`geoseg.train.recipes.RECIPES`) on ``places`` into ``out``
    (ONNX) with ``geoseg train``; returns its report.
    """
    from geoseg.models.card import card_from_dict  # lazy: numpy; python -m geoseg.recipes stays light
    from geoseg.models.train_config import TrainConfig  # lazy: numpy; python -m geoseg.recipes stays light
    from geoseg.train.run import train  # lazy: torch

    images = [im for p in places for im in p.images]
    labels = [lb for p in places for lb in p.labels]
    radiometry = [p.radiometry for p in places for _ in p.images]
    settings = dict(recipe["train"])
    settings["steps"] = max(1, round(settings["steps"] * scale_steps))
    cfg = TrainConfig(
        images=images,
        labels=labels,
        out=out,
        label_class=places[0].label_class,
        radiometry=radiometry,
        seed=seed,
        **settings,
    )
    t0 = time.perf_counter()
    res = train(  # resume=True: an interrupted run continues from OUT.ckpt
        cfg,
        card_from_dict(recipe["card"], f"recipe {recipe['card']['name']}"),
        resume=True,
        progress=lambda rec: log(f"    epoch {rec['epoch']}: loss {rec['loss']:.3f} ({rec['seconds']} s)"),
    )
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def predict_place(model: str, place: Place, work: str) -> list[str]:
    """Run ``model`` on every image of ``place`` (threads scheduler); returns the output folders
    (each with ``mask.tif`` and float32 ``probabilities.tif``).
    """
    import geoseg

    outs = []
    for k, img in enumerate(place.images):
        out = os.path.join(work, f"{place.name}_{k}")
        outs.append(out)
        done = [os.path.join(out, f) for f in ("mask.tif", "probabilities.tif")]
        if all(os.path.exists(f) and os.path.getmtime(f) > os.path.getmtime(model) for f in done):
            continue  # outputs of this very model file (newer than it): scoring again needs no prediction
        res = geoseg.predict(img, model, probabilities=True, radiometry=place.radiometry)
        geoseg.write(res, out, overwrite=True, probabilities_dtype="float32")
    return outs


def _threshold_mask(out: str, threshold: float) -> str:
    """A copy of ``out/mask.tif`` with class 1 where its probability is at least ``threshold``."""
    import numpy as np
    import rasterio

    dst_path = os.path.join(out, f"mask_t{threshold:.2f}.tif")
    with rasterio.open(os.path.join(out, "mask.tif")) as m, rasterio.open(os.path.join(out, "probabilities.tif")) as p:
        mask = m.read(1)
        prob = p.read(2)
        prof = m.profile
        tags = m.tags()
        cmap = m.colormap(1)
    new = np.where(mask == 255, 255, (np.nan_to_num(prob, nan=0.0) >= threshold).astype(np.uint8))
    prof.update(driver="GTiff")
    prof.pop("blockxsize", None)
    prof.pop("blockysize", None)
    prof["tiled"] = False
    with rasterio.open(dst_path, "w", **prof) as dst:
        dst.write(new, 1)
        dst.update_tags(**tags)
        dst.write_colormap(1, cmap)
    return dst_path


def score_place(
    outs: list[str], place: Place, thresholds: tuple[float, ...], iou: float, rules: dict[str, float] | None = None
) -> dict[float, dict[str, Any]]:
    """Object and pixel scores of ``place`` at each threshold (summed over its images).

    ``rules`` are the recipe card's object rules (``min_area_m2``, ``max_length_m``): objects that
    break them are left out of the scores, as the shipped model's polygon layers leave them out.
    """
    rules = rules or {}
    from geoseg.evaluate import evaluate  # lazy: numpy; python -m geoseg.recipes stays light

    cls = place.label_class
    res: dict[float, dict[str, Any]] = {}
    for t in thresholds:
        tot = {"objects_true": 0, "objects_pred": 0, "object_tp": 0, "pixels_tp": 0.0, "pixels_true": 0, "pixels_pred": 0}
        for out, labels in zip(outs, place.labels, strict=True):
            r = evaluate(
                _threshold_mask(out, t),
                labels,
                label_class=cls,
                iou_threshold=iou,
                min_area=rules.get("min_area_m2", 0.0),
                max_length=rules.get("max_length_m"),
            )
            row = r["classes"].get(cls) or {}
            for k in ("objects_true", "objects_pred", "object_tp", "pixels_true", "pixels_pred"):
                tot[k] += row.get(k, 0) or 0
            tot["pixels_tp"] += (row.get("recall") or 0.0) * (row.get("pixels_true") or 0)
        res[t] = _summarise(tot)
    return res


def _summarise(t: dict[str, Any]) -> dict[str, Any]:
    tp, n_true, n_pred = t["object_tp"], t["objects_true"], t["objects_pred"]
    ptp = t["pixels_tp"]
    union = t["pixels_true"] + t["pixels_pred"] - ptp
    return {
        "objects_true": n_true,
        "objects_pred": n_pred,
        "object_tp": tp,
        "object_precision": round(tp / n_pred, 3) if n_pred else None,
        "object_recall": round(tp / n_true, 3) if n_true else None,
        "object_f1": round(2 * tp / (n_true + n_pred), 3) if n_true + n_pred else None,
        "pixel_iou": round(ptp / union, 3) if union else None,
    }


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(sum(vals) / len(vals), 3) if vals else None


def trained(recipe: dict[str, Any], places: list[Place], model: str, scale_steps: float, log) -> float | None:
    """Train ``model`` unless it exists (a model already trained is scored again, not retrained);
    returns its training time in seconds, kept beside it in ``MODEL.seconds`` (None if unknown).
    """
    seconds = model + ".seconds"
    if not os.path.exists(model):
        res = train_on(recipe, places, model, scale_steps=scale_steps, log=log)
        with open(seconds, "w") as f:
            f.write(str(res["seconds"]))
    if not os.path.exists(seconds):
        return None
    with open(seconds) as f:
        return float(f.read())


def leave_one_out(recipe: dict[str, Any], places: list[Place], work: str, scale_steps: float = 1.0, log=print) -> dict[str, Any]:
    """Train ``recipe`` on all places but one and score the one left out, for every place."""
    r, name = recipe, recipe["card"]["name"]
    os.makedirs(work, exist_ok=True)
    per: dict[str, dict[float, dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for held in places:
        log(f"  {name}: leave out {held.name}")
        rest = [p for p in places if p is not held]
        model = os.path.join(work, f"lopo_{held.name}.onnx")
        took = trained(recipe, rest, model, scale_steps, log)
        if took is not None:
            seconds[held.name] = took
        outs = predict_place(model, held, os.path.join(work, f"lopo_{held.name}"))
        per[held.name] = score_place(outs, held, r["thresholds"], r["match_iou"], r["card"].get("objects"))
        log(f"    {held.name}: " + ", ".join(f"t{t}: F1 {v['object_f1']}" for t, v in per[held.name].items()))
    # one threshold for every place: the best mean object F1 over the places left out
    best = max(r["thresholds"], key=lambda t: (_mean([per[p][t] for p in per], "object_f1") or 0.0, -abs(t - 0.5)))
    rows = {p: per[p][best] for p in per}
    return {
        "threshold": best,
        "per_place": rows,
        "mean": {k: _mean(list(rows.values()), k) for k in ("object_f1", "object_precision", "object_recall", "pixel_iou")},
        "by_threshold": {
            str(t): {k: _mean([per[p][t] for p in per], k) for k in ("object_f1", "pixel_iou")} for t in r["thresholds"]
        },
        "train_seconds": seconds,
    }
