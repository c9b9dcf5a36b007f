"""How every bundled model is made, and how it is scored: ``python -m geoseg.recipes [NAME ...]``.

Each bundled file in ``geoseg/models/weights`` is rebuilt from the project's own code and,
for the learned models, from real labelled data (``--data``, the ``shared/data`` folder
described in its SOURCES.md):

- ``ships``: ``geoseg train`` on the ten Sentinel-2 L2A ports of ``train/sen2ships_ports``
  (green, red, nir as reflectance; the exports store reflectance x 65535). Scored
  leave-one-port-out (train on nine, score the tenth, for every port; a predicted ship
  matches a labelled one when their polygons intersect), then the shipped model, trained
  on all ten, on the Casablanca chip no training ever saw. The decision threshold is chosen
  on the pooled leave-one-out predictions and baked into the exported model.
- ``buildings``: ``geoseg train`` on the 0.3 m OpenAerialMap mosaics of four places in
  ``train/oam_buildings`` (red, green, blue; alpha is the valid mask), at 0.3-0.6 m, with
  grey chips so a panchromatic band mapped to red, green and blue is in distribution.
  Scored leave-one-place-out (IoU >= 0.5, the SpaceNet rule).
- ``tanks``: :class:`geoseg.models.circles.RoofCircles`, a geometric rule (no data).
- ``forest``, ``water``, ``vessels``: spectral-index and local-contrast rules
  (:mod:`geoseg.models.indices`).

Every model is exported as ONNX with its card (metrics, data, attribution) inside. The
scores printed here are the ones the cards and the README carry. This module is the recipe
table and the building; the folds are :mod:`geoseg.train.folds`; the command is
``geoseg/recipes.py``, which runs :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Any

from geoseg.train.folds import building_places, casablanca, leave_one_out, predict_place, score_place, ship_places, trained

__all__ = ["PHYSICS", "RECIPES", "build", "main"]

SENTINEL = "Contains modified Copernicus Sentinel data 2022-2023 (free and open)"
OAM = "imagery: OpenAerialMap contributors, CC BY 4.0; footprints: (c) OpenStreetMap contributors, ODbL 1.0"

RECIPES: dict[str, dict[str, Any]] = {
    "ships": {
        "card": {
            "name": "ships",
            "version": "2",
            "task": "objects",
            "description": (
                "Ships over about 1000 m2 on Sentinel-2 L2A at 10 m (green, red, nir as surface reflectance, any storage "
                "convention): a U-Net trained by geoseg on ten ports; its false ships are mostly quay edges, pier heads "
                "and bright roofs near water"
            ),
            "license": f"BSD-3-Clause (geoseg); trained on sen2ships labels (MIT). {SENTINEL}",
            "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "ship", "color": "#f58231"}],
            "bands": ["green", "red", "nir"],
            # reflectance less each band's darkest 1 %: haze and glint that lift a whole scene are taken out
            "scaling": {"method": "reflectance", "mean": [0.0], "std": [0.1], "dark_percentile": 1},
            "gsd_range_m": [5.5, 12.0],
            "tile": 384,
            "halo": 64,
            "activation": "softmax",
            "architecture": {"name": "geoseg.unet", "args": {"width": 16, "depth": 4}},
            "tta": 8,
            # the labelled vessels are 40-434 m long and over 1000 m2: smaller specks are boats the labels leave
            # out, longer lines are breakwaters and piers
            "objects": {"min_area_m2": 1000, "max_length_m": 500},
        },
        "train": {
            "epochs": 12,
            "steps": 150,
            "batch": 12,
            "chip": 96,
            "lr": 2e-3,
            "scales": (1.0, 1.3),
            "object_share": 0.4,
            "hard_negatives": 0.25,
            "val_fraction": 0.0,
            "select": "last",
            # after dark-object subtraction the dark end sits at 0: small offsets, gains for sun and water colour
            "augment": {"preset": "reflectance", "offset_low": -0.005, "offset_high": 0.01, "band_offset": 0.003},
            "val_chips": 24,
        },
        "match_iou": 0.0,  # a predicted ship matches a labelled one when they intersect
        "thresholds": (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    },
    "buildings": {
        "card": {
            "name": "buildings",
            "version": "2",
            "task": "objects",
            "description": (
                "Building footprints in aerial or satellite RGB at 0.3-0.6 m: a U-Net trained by geoseg on four African "
                "and Asian places; weak on dense joined roofs, and on panchromatic imagery (runs as red=green=blue)"
            ),
            "license": f"BSD-3-Clause (geoseg); trained on {OAM}",
            "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "building", "color": "#e6194b"}],
            "bands": ["red", "green", "blue"],
            "scaling": {"method": "percentile", "low": 2, "high": 98, "clip": False},
            "gsd_range_m": [0.28, 0.6],
            "tile": 512,
            "halo": 64,
            "activation": "softmax",
            "architecture": {"name": "geoseg.unet", "args": {"width": 16, "depth": 4}},
            # cars, specks and fragments: 25 m2 scored best on the pooled folds (10: mean F1 0.377, 25: 0.402,
            # 50: 0.404 at threshold 0.7); a tenth of the OSM footprints here are smaller (p10 21 m2)
            "objects": {"min_area_m2": 25},
        },
        "train": {
            "epochs": 12,
            "steps": 150,
            "batch": 8,
            "chip": 160,
            "lr": 2e-3,
            "scales": (1.0, 2.0),
            "object_share": 0.6,
            "gray": 0.2,
            "val_fraction": 0.0,
            "select": "last",
            "augment": "default",
            "val_chips": 16,
        },
        # one place no training of the shipped model sees: the tests score the shipped model on it
        "holdout": "nepal_kavre",
        "match_iou": 0.5,
        "thresholds": (0.3, 0.4, 0.5, 0.6, 0.7),
    },
}

#: rule models: card and builder
PHYSICS: dict[str, dict[str, Any]] = {
    "forest": {
        "builder": ("nd", 0.5),
        "card": {
            "description": "Forest as NDVI = (nir - red) / (nir + red) > 0.5 (dense closed canopy).",
            "label": "forest",
            "color": [34, 139, 34],
            "bands": ["nir", "red"],
            "source": "NASA Earth Observatory, Measuring Vegetation (NDVI)",
        },
    },
    "water": {
        "builder": ("nd", 0.0),
        "card": {
            "description": "Open water as NDWI = (green - nir) / (green + nir) > 0 (McFeeters 1996).",
            "label": "water",
            "color": [0, 110, 200],
            "bands": ["green", "nir"],
            "source": "McFeeters (1996), Int. J. Remote Sensing 17(7)",
        },
    },
}


def _index_card(name: str, c: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "version": "1",
        "task": "area",
        "description": c["description"],
        "license": "BSD-3-Clause (geoseg)",
        "classes": [{"id": 0, "name": "other", "color": [200, 200, 200]}, {"id": 1, "name": c["label"], "color": c["color"]}],
        "bands": c["bands"],
        "scaling": {"method": "none"},
        "tile": 512,
        "halo": 0,
        "size_multiple": 1,
        "activation": "softmax",
        "training": {"method": "physics: spectral index threshold", "source": c["source"]},
    }


VESSELS_CARD: dict[str, Any] = {
    "name": "vessels",
    "version": "1",
    "task": "area",
    "description": "Blood vessels in colour fundus photographs: green darker than its 23 px surroundings by > 7 %.",
    "license": "BSD-3-Clause (geoseg)",
    "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "vessel", "color": [220, 30, 30]}],
    "bands": ["red", "green", "blue"],
    "scaling": {"method": "none"},
    "tile": 512,
    "halo": 16,
    "size_multiple": 1,
    "activation": "softmax",
    "training": {
        "method": "physics: haemoglobin absorbs green light; local contrast threshold (receptive radius 11 px)",
        "source": "geoseg (no training data)",
    },
}

TANKS_CARD: dict[str, Any] = {
    "name": "tanks",
    "version": "2",
    "task": "objects",
    "description": (
        "Storage tanks as bright roof circles 14-100 m across (gradient voting on concentric rings at 2 m; "
        "visible bands or pan): a geometric rule, no training data"
    ),
    "license": "BSD-3-Clause (geoseg)",
    "classes": [
        {"id": 0, "name": "background", "color": [0, 0, 0]},
        {"id": 1, "name": "storage_tank", "color": "#911eb4"},
    ],
    "bands": ["red", "green", "blue"],
    "scaling": {"method": "percentile", "low": 2, "high": 98, "clip": False},
    "gsd_m": 2.0,
    "tile": 384,
    "halo": 64,
    "size_multiple": 4,
    "activation": "softmax",
    "training": {
        "method": "geometry: a bright disc has an inward edge in all 8 sectors of a ring; strongest ring per centre",
        "radii_px": [3.5, 25.0],
        "source": "geoseg (no training data)",
    },
}


def build(
    name: str, data: str, out_dir: str, work: str, folds: bool = True, scale_steps: float = 1.0, log=print
) -> dict[str, Any]:
    """Build bundled model ``name`` into ``out_dir/NAME.onnx``; returns its report (also in the card)."""
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    if name in PHYSICS or name in ("vessels", "tanks"):
        return _build_rule(name, out_dir)
    r = RECIPES[name]
    places = ship_places(data) if name == "ships" else building_places(data)
    report: dict[str, Any] = {"data": [p.name for p in places]}
    threshold = 0.5
    if folds:
        report["leave_one_out"] = leave_one_out(r, places, os.path.join(work, "lopo"), scale_steps, log)
        threshold = report["leave_one_out"]["threshold"]
    held = r.get("holdout")
    shipped_on = [p for p in places if p.name != held]
    log(f"  {name}: the shipped model, on {', '.join(p.name for p in shipped_on)} (threshold {threshold})")
    reuse = os.path.join(work, "lopo", f"lopo_{held}.onnx") if held else None
    if reuse and os.path.exists(reuse):  # the fold that left out the held-out place is the shipped model
        final = reuse
        report["train_seconds"] = report.get("leave_one_out", {}).get("train_seconds", {}).get(held)
    else:
        final = os.path.join(work, f"{name}.onnx")
        report["train_seconds"] = trained(r, shipped_on, final, scale_steps, log)
    report["holdout"] = held
    report["threshold"] = threshold
    # the shipped model on every place (seen in training) and on the held-out test chip
    shipped: dict[str, Any] = {}
    tests = [casablanca(data, work)] if name == "ships" else []
    for p in [*places, *tests]:
        outs = predict_place(final, p, os.path.join(work, f"shipped_{p.name}"))
        shipped[p.name] = score_place(outs, p, (threshold,), r["match_iou"], r["card"].get("objects"))[threshold]
    report["shipped"] = shipped
    _finish(name, final, out_dir, threshold, report)
    return report


def _finish(name: str, model: str, out_dir: str, threshold: float, report: dict[str, Any]) -> None:
    """Re-export the trained network with the chosen threshold and the scores in its card."""
    import math

    import onnx

    from geoseg.models.card_sources import onnx_metadata  # lazy: numpy; python -m geoseg.recipes stays light

    card = json.loads(onnx_metadata(model)["geoseg_card"])
    card["metrics"] = {**card.get("metrics", {}), **_card_metrics(report)}
    # object rules are post-processing, chosen with the threshold on the pooled folds: the recipe's win;
    # so are the words about the model (description, licence): they may change after training
    for key in ("objects", "description", "license"):
        if key in RECIPES.get(name, {}).get("card", {}):
            card[key] = RECIPES[name]["card"][key]
    card["training"] = {**card.get("training", {}), "threshold": threshold}
    proto = onnx.load(model)
    if abs(threshold - 0.5) > 1e-9:  # class 1 from `threshold` on: add -logit(threshold) to its logit
        _add_logit_bias(proto, [0.0, -math.log(threshold / (1 - threshold))])
    for p in proto.metadata_props:
        if p.key == "geoseg_card":
            p.value = json.dumps(card, sort_keys=True, default=str)
    tmp = os.path.join(out_dir, f".{name}.onnx.tmp")
    onnx.save(proto, tmp)
    os.replace(tmp, os.path.join(out_dir, f"{name}.onnx"))


def _add_logit_bias(proto, bias: list[float]) -> None:
    """Append ``logits + bias`` (per channel) to an ONNX graph's single output."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = proto.graph
    out = g.output[0]
    raw = f"{out.name}_before_bias"
    for node in g.node:
        node.output[:] = [raw if o == out.name else o for o in node.output]
    g.initializer.append(numpy_helper.from_array(np.asarray(bias, np.float32).reshape(1, -1, 1, 1), "geoseg_logit_bias"))
    g.node.append(helper.make_node("Add", [raw, "geoseg_logit_bias"], [out.name], name="geoseg_threshold"))


def _card_metrics(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "leave_one_out" in report:
        lo = report["leave_one_out"]
        out["leave_one_place_out"] = {"mean": lo["mean"], "per_place": lo["per_place"], "threshold": lo["threshold"]}
    out["shipped_model"] = report.get("shipped", {})
    out["train_seconds"] = report.get("train_seconds")
    return out


def _build_rule(name: str, out_dir: str) -> dict[str, Any]:
    from geoseg.models.circles import RoofCircles  # lazy: torch
    from geoseg.models.export import export_onnx  # lazy: torch
    from geoseg.models.indices import DarkLines, NormalizedDifference  # lazy: torch

    if name in PHYSICS:
        _, threshold = PHYSICS[name]["builder"]
        module, card, channels = NormalizedDifference(threshold), _index_card(name, PHYSICS[name]["card"]), 2
    elif name == "vessels":
        module, card, channels = DarkLines(11, 0.07), VESSELS_CARD, 3
    else:
        module, card, channels = RoofCircles(), TANKS_CARD, 3
    path = os.path.join(out_dir, f"{name}.onnx")
    export_onnx(module, card, path, channels, example_size=128)
    return {"model": path}


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - run by hand to rebuild the bundled models
    """Command line: rebuild bundled models, print their scores."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=["forest", "water", "vessels", "tanks", "ships", "buildings"])
    ap.add_argument("--data", default=os.environ.get("GEOSEG_TEST_DATA", "../shared/data"), help="the shared/data folder")
    weights = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "weights")
    ap.add_argument("--out", default=weights, help="where NAME.onnx goes")
    ap.add_argument("--work", default="/tmp/geoseg-recipes", help="scratch folder (fold models, predictions)")
    ap.add_argument("--no-folds", action="store_true", help="skip the leave-one-place-out scores")
    ap.add_argument("--steps", type=float, default=1.0, help="scale every run's optimiser steps (e.g. 0.1 for a smoke run)")
    ap.add_argument("--fresh", action="store_true", help="delete the scratch folder first")
    args = ap.parse_args(argv)
    if args.fresh and os.path.isdir(args.work):
        shutil.rmtree(args.work)
    for name in args.names:
        t0 = time.perf_counter()
        print(f"{name}: building", flush=True)
        work = os.path.join(args.work, name)
        rep = build(name, args.data, args.out, work, not args.no_folds, args.steps, log=lambda s: print(s, flush=True))
        print(json.dumps({name: rep, "seconds": round(time.perf_counter() - t0, 1)}, indent=1, default=str), flush=True)
