"""How the bundled ``buildings``, ``ships`` and ``tanks`` networks were made: ``python -m geoseg.models.recipes OUT``.

Each is trained by :func:`geoseg.models.train.train` (what ``geoseg train`` runs) on
scenes geoseg generates (:mod:`geoseg.sample`): the sample AOI's training half
(``train_half.gpkg``, a checkerboard of 512 px squares) on both dates, plus both dates
of a second scene from another seed. The sample AOI's other half is never seen and is
what the bundled models are scored on (``tests/test_bundled.py``).

Inputs were chosen to have a chance on real imagery: percentile scaling per raster (any
radiometric scale), band-ratio, brightness, contrast and noise augmentation, a range of
pixel sizes (``gsd_range_m`` in the card), and for buildings and tanks a visible-band
input trained with grey-scale draws so that a panchromatic band mapped to red, green and
blue is in distribution.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

__all__ = ["RECIPES", "train_bundled"]

_COMMON: dict[str, Any] = {
    "version": "1",
    "task": "objects",
    # unclipped: ships, tanks and roofs are often brighter than the 98th percentile
    "scaling": {"method": "percentile", "low": 2, "high": 98, "clip": False},
    "tile": 256,
    "halo": 32,
    "activation": "softmax",
    "architecture": {"name": "geoseg.unet", "args": {"width": 16, "depth": 3}},
    "license": "BSD-3-Clause (trained by geoseg on its own generated scenes)",
}

#: card and training settings of each bundled network
RECIPES: dict[str, dict[str, Any]] = {
    "buildings": {
        "card": {
            **_COMMON,
            "name": "buildings",
            "description": "Building footprints (U-Net trained by geoseg on its generated scenes; visible bands or pan)",
            "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "building", "color": "#e6194b"}],
            "bands": ["red", "green", "blue"],
            "gsd_range_m": [2, 3],
        },
        "train": {"steps": 60, "epochs": 8, "scales": (1.0, 1.5), "gray": 0.3, "object_share": 0.7},
    },
    "ships": {
        "card": {
            **_COMMON,
            "name": "ships",
            "description": "Ships and boats on water (U-Net trained by geoseg on its generated scenes; blue, green, red, nir)",
            "classes": [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "ship", "color": "#f58231"}],
            "bands": ["blue", "green", "red", "nir"],
            "gsd_range_m": [2, 10],
        },
        "train": {"steps": 50, "epochs": 6, "scales": (1.0, 5.0), "gray": 0.0, "object_share": 0.7},
    },
    "tanks": {
        "card": {
            **_COMMON,
            "name": "tanks",
            "description": "Storage tanks (U-Net trained by geoseg on its generated scenes; visible bands or pan)",
            "classes": [
                {"id": 0, "name": "background", "color": [0, 0, 0]},
                {"id": 1, "name": "storage_tank", "color": "#911eb4"},
            ],
            "bands": ["red", "green", "blue"],
            "gsd_range_m": [2, 4],
        },
        "train": {"steps": 40, "epochs": 5, "scales": (1.0, 2.0), "gray": 0.3, "object_share": 0.7},
    },
}


def _scenes(work: str) -> dict[str, str]:
    from geoseg.sample import make_sample

    out = {}
    for seed, name in ((42, "sample"), (7, "extra")):
        folder = os.path.join(work, name)
        if not os.path.exists(os.path.join(folder, "train_half.gpkg")):
            make_sample(folder, seed=seed)
        out[name] = folder
    return out


def train_bundled(out_dir: str, work: str, names: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """Train the bundled networks into ``out_dir`` (``NAME.pt`` with embedded cards)."""
    from geoseg.models.card import card_from_dict
    from geoseg.models.train import TrainConfig, train

    scenes = _scenes(work)
    s, e = scenes["sample"], scenes["extra"]
    images = [f"{s}/scene.tif", f"{s}/scene_after.tif", f"{e}/scene.tif", f"{e}/scene_after.tif"]
    labels = [f"{s}/labels.gpkg", f"{s}/labels.gpkg", f"{e}/labels.gpkg", f"{e}/labels.gpkg"]
    layers: list[str | None] = ["truth", "truth_after", "truth", "truth_after"]
    aois: list[str | None] = [f"{s}/train_half.gpkg", f"{s}/train_half.gpkg", None, None]
    os.makedirs(out_dir, exist_ok=True)
    report = {}
    for name in names or list(RECIPES):
        r = RECIPES[name]
        card = card_from_dict(r["card"], f"recipe {name}")
        cfg = TrainConfig(
            images=images,
            labels=labels,
            layers=layers,
            aois=aois,
            out=os.path.join(out_dir, f"{name}.pt"),
            block=256,
            seed=seed,
            **r["train"],
        )
        t0 = time.perf_counter()
        res = train(cfg, card, resume=True, progress=lambda rec, n=name: print(n, rec, flush=True))
        report[name] = {"seconds": round(time.perf_counter() - t0, 1), **res}
    return report


if __name__ == "__main__":  # pragma: no cover - run by hand to rebuild the bundled networks
    out = sys.argv[1] if len(sys.argv) > 1 else "geoseg/models/weights"
    work = sys.argv[2] if len(sys.argv) > 2 else "/tmp/geoseg-recipes"
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else None
    print(train_bundled(out, work, names))
