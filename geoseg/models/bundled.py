"""Models that ship with geoseg: ONNX files inside the package, made by the project (no torch here).

Each bundled model is an ONNX file in ``geoseg/models/weights`` with its card in the ONNX
metadata; :mod:`geoseg.recipes` rebuilds every one of them from the project's own
code and data (``python -m geoseg.recipes``):

- ``ships``: a U-Net trained by ``geoseg train`` on Sentinel-2 L2A ports (10 m, green, red
  and nir reflectance; Copernicus Sentinel data via the sen2ships labels);
- ``buildings``: a U-Net trained on 0.3 m aerial RGB of four African and Asian places
  (OpenAerialMap imagery, OpenStreetMap footprints), carried to 0.3-0.6 m;
- ``tanks``: storage tanks as a geometric rule (bright roof circles 10-100 m across found
  by gradient voting on concentric rings), no training data;
- ``forest`` and ``water``: NDVI > 0.5 and NDWI > 0 (McFeeters 1996) spectral-index rules;
- ``vessels``: blood vessels in colour fundus photographs (haemoglobin absorbs green: a
  local-contrast rule);
- ``clouds``: DLR's ukis-csmask cloud/shadow network, read from that package's wheel
  (``pip install 'geoseg[clouds]'``), with a card built from its statistics file.

Nothing is ever downloaded and nothing in a bundled file is code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from geoseg.errors import ModelError
from geoseg.models.card_sources import onnx_metadata

__all__ = ["BUNDLED", "BundledModel", "bundled_card", "bundled_path"]


@dataclass(frozen=True)
class BundledModel:
    """A bundled model: its name and where it comes from (``weights`` file or a ``package``)."""

    name: str
    source: str
    file: str


BUNDLED: dict[str, BundledModel] = {
    "forest": BundledModel("forest", "weights", "forest.onnx"),
    "water": BundledModel("water", "weights", "water.onnx"),
    "vessels": BundledModel("vessels", "weights", "vessels.onnx"),
    "clouds": BundledModel("clouds", "package", "4b_l2a"),
    "buildings": BundledModel("buildings", "weights", "buildings.onnx"),
    "ships": BundledModel("ships", "weights", "ships.onnx"),
    "tanks": BundledModel("tanks", "weights", "tanks.onnx"),
}


def _csmask_card(variant: str) -> dict:
    """Card of a ukis-csmask ONNX model, from its JSON statistics (reflectance x 10000 inputs)."""
    import importlib.resources

    try:
        folder = importlib.resources.files("ukis_csmask")
    except ModuleNotFoundError:
        raise ModelError("the clouds model comes with an optional extra: pip install 'geoseg[clouds]' (ukis-csmask)") from None
    meta = json.loads((folder / f"model_{variant}.json").read_text())
    stats = meta["data"]["dataset_statistics"]
    names = {"swir16": "swir1", "swir22": "swir2"}
    return {
        "name": "clouds",
        "version": meta["model"]["version"],
        "task": "area",
        "description": "Clouds and cloud shadows in Sentinel-2 / Landsat L2A reflectance (DLR ukis-csmask U-Net).",
        "license": "Apache-2.0 (ukis-csmask, German Aerospace Center)",
        "classes": [
            {"id": 0, "name": "clear", "color": [200, 200, 200]},
            {"id": 1, "name": "cloud", "color": [255, 255, 255]},
            {"id": 2, "name": "cloud_shadow", "color": [60, 60, 60]},
        ],
        "bands": [names.get(b, b) for b in stats["band_names"]],
        # the network takes reflectance in [0, 1] standardised; rasters store reflectance x 10000
        "scaling": {"method": "meanstd", "mean": [m * 1e4 for m in stats["img"][0]], "std": [v * 1e4 for v in stats["img"][1]]},
        "gsd_m": 30.0,
        "tile": int(meta["data"]["target_size"][0]),
        "halo": 32,
        "size_multiple": 32,
        "activation": "softmax",
        "training": {"source": "ukis-csmask " + meta["model"]["version"], "architecture": meta["model"]["encoder_name"]},
    }


def weights_dir() -> str:
    """The folder of the bundled ONNX files inside the installed package."""
    import importlib.resources

    return str(importlib.resources.files("geoseg.models") / "weights")


def _weights_file(name: str) -> str:

    path = os.path.join(weights_dir(), BUNDLED[name].file)
    if not os.path.isfile(path):
        raise ModelError(
            f"bundled model {name!r}: {path} is missing from this installation; reinstall geoseg, or rebuild it with "
            "python -m geoseg.recipes"
        )
    return path


def bundled_card(name: str) -> dict:
    """The card (a dictionary) of bundled model ``name``, as stored in its ONNX metadata."""
    m = BUNDLED[name]
    if m.source == "package":
        return _csmask_card(m.file)

    meta = onnx_metadata(_weights_file(name))
    if "geoseg_card" not in meta:
        raise ModelError(f"bundled model {name!r}: its file carries no card; rebuild it with python -m geoseg.recipes")
    return json.loads(meta["geoseg_card"])


def bundled_path(name: str) -> str:
    """Path of bundled model ``name`` (an ONNX file)."""
    m = BUNDLED[name]
    if m.source == "package":
        import importlib.resources

        bundled_card(name)  # a clear error when the extra is missing
        return str(importlib.resources.files("ukis_csmask") / f"model_{m.file}.onnx")
    return _weights_file(name)
