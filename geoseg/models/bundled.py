"""Models that ship with geoseg, built offline from the package's own code.

``forest`` and ``water`` are spectral-index rules written as torch modules (so they run
through the same engine, on CPU or GPU): NDVI = (nir - red) / (nir + red) > 0.5 for forest
(dense, closed canopy; NASA Earth Observatory: dense vegetation such as temperate and tropical
forests gives NDVI of about 0.6-0.9, shrub and grassland 0.2-0.3) and NDWI = (green - nir) /
(green + nir) > 0 for open water (McFeeters 1996). They are exported once as TorchScript with
their card embedded into a per-user cache (``$GEOSEG_CACHE``, default ``~/.cache/geoseg``).

``buildings``, ``ships`` and ``tanks`` are small U-Nets trained by geoseg's own ``train`` on
scenes the package generates (recipe: :mod:`geoseg.models.recipes`), shipped as TorchScript
files inside the package (``geoseg/models/weights``) with cards that record the recipe and
the validation metrics.

``vessels`` finds blood vessels in colour fundus photographs (plain RGB images) from the
physics of haemoglobin's green absorption: a local-contrast rule, also a torch module.

``clouds`` is the cloud / cloud-shadow U-Net that DLR ships inside the ``ukis-csmask`` wheel
(Apache-2.0; ``pip install 'geoseg[clouds]'``), read from the installed package, with a card
built from the statistics file beside it. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

__all__ = ["BUNDLED", "BundledModel", "bundled_card", "bundled_path"]


@dataclass(frozen=True)
class BundledModel:
    """A bundled model: its card (as a dictionary) and how to build it (or which package file it is)."""

    name: str
    card: dict
    builder: str
    args: tuple


def _csmask_card(variant: str) -> dict:
    """Card of a ukis-csmask ONNX model, from its JSON statistics (reflectance x 10000 inputs)."""
    import importlib.resources

    from geoseg.errors import ModelError

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


def _index_card(name: str, description: str, label: str, color: list[int], bands: list[str], source: str) -> dict:
    """The card of a two-class spectral-index model (ratios: any common band scale works)."""
    return {
        "name": name,
        "version": "1",
        "task": "area",
        "description": description,
        "license": "MIT (geoseg)",
        "classes": [{"id": 0, "name": "other", "color": [200, 200, 200]}, {"id": 1, "name": label, "color": color}],
        "bands": bands,
        "scaling": {"method": "none"},
        "tile": 512,
        "halo": 0,
        "size_multiple": 1,
        "activation": "softmax",
        "training": {"method": "physics: spectral index threshold", "source": source},
    }


BUNDLED: dict[str, BundledModel] = {
    "forest": BundledModel(
        "forest",
        _index_card(
            "forest",
            "Forest as NDVI = (nir - red) / (nir + red) > 0.5 (dense closed canopy).",
            "forest",
            [34, 139, 34],
            ["nir", "red"],
            "NASA Earth Observatory, Measuring Vegetation (NDVI)",
        ),
        "nd",
        (0.5,),
    ),
    "water": BundledModel(
        "water",
        _index_card(
            "water",
            "Open water as NDWI = (green - nir) / (green + nir) > 0 (McFeeters 1996).",
            "water",
            [0, 110, 200],
            ["green", "nir"],
            "McFeeters (1996), Int. J. Remote Sensing 17(7)",
        ),
        "nd",
        (0.0,),
    ),
    "vessels": BundledModel(
        "vessels",
        {
            "name": "vessels",
            "version": "1",
            "task": "area",
            "description": "Blood vessels in colour fundus photographs: green darker than its 23 px surroundings by > 7 %.",
            "license": "MIT (geoseg)",
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
        },
        "darklines",
        (11, 0.07),
    ),
    "clouds": BundledModel("clouds", {}, "package", ("4b_l2a",)),
    # small U-Nets trained by geoseg's own `train` on its generated scenes (geoseg/models/recipes.py)
    "buildings": BundledModel("buildings", {}, "weights", ("buildings.pt",)),
    "ships": BundledModel("ships", {}, "weights", ("ships.pt",)),
    "tanks": BundledModel("tanks", {}, "weights", ("tanks.pt",)),
}


def _weights_file(name: str) -> str:
    import importlib.resources

    from geoseg.errors import ModelError

    path = str(importlib.resources.files("geoseg.models") / "weights" / BUNDLED[name].args[0])
    if not os.path.isfile(path):
        raise ModelError(
            f"bundled model {name!r}: {path} is missing from this installation; reinstall geoseg, or rebuild it with "
            "python -m geoseg.models.recipes"
        )
    return path


def _embedded_card(path: str) -> dict:
    import zipfile

    with zipfile.ZipFile(path) as z:
        hit = [n for n in z.namelist() if n.endswith("extra/geoseg_card.json")]
        return json.loads(z.read(hit[0]).decode()) if hit else {}


def bundled_card(name: str) -> dict:
    """The card (a dictionary) of bundled model ``name``."""
    m = BUNDLED[name]
    if m.builder == "weights":
        return _embedded_card(_weights_file(name))
    return _csmask_card(m.args[0]) if m.builder == "package" else m.card


def _cache_dir() -> str:
    root = os.environ.get("GEOSEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "geoseg")
    return os.path.join(root, "models")


def bundled_path(name: str) -> str:
    """Path of bundled model ``name`` as TorchScript with its card embedded (built on first use)."""
    import tempfile

    import torch

    from geoseg.models.indices import DarkLines, NormalizedDifference

    m = BUNDLED[name]
    if m.builder == "weights":
        return _weights_file(name)
    if m.builder == "package":
        import importlib.resources

        bundled_card(name)  # a clear error when the extra is missing
        return str(importlib.resources.files("ukis_csmask") / f"model_{m.args[0]}.onnx")
    folder = _cache_dir()
    import hashlib

    key = hashlib.sha256(json.dumps([m.card, m.builder, m.args], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(folder, f"{name}-v{m.card['version']}-{key}-torch{torch.__version__.split('+')[0]}.pt")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    module = NormalizedDifference(*m.args) if m.builder == "nd" else DarkLines(*m.args) if m.builder == "darklines" else None
    if module is None:  # pragma: no cover - registry and builders are defined together
        raise KeyError(m.builder)
    scripted = torch.jit.script(module.eval())
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".pt.tmp")
    os.close(fd)
    torch.jit.save(scripted, tmp, _extra_files={"geoseg_card.json": json.dumps(m.card)})
    os.chmod(tmp, 0o644)  # a shared cache stays readable for others
    os.replace(tmp, path)
    return path
