"""Models that ship with geoseg, built offline from the package's own code.

``forest`` and ``water`` are spectral-index rules written as torch modules (so they run
through the same engine, on CPU or GPU): NDVI = (nir - red) / (nir + red) > 0.5 for forest
(dense, closed canopy; NASA Earth Observatory: dense vegetation such as temperate and tropical
forests gives NDVI of about 0.6-0.9, shrub and grassland 0.2-0.3) and NDWI = (green - nir) /
(green + nir) > 0 for open water (McFeeters 1996). They are exported once as TorchScript with
their card embedded into a per-user cache (``$GEOSEG_CACHE``, default ``~/.cache/geoseg``);
nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

__all__ = ["BUNDLED", "BundledModel", "bundled_path"]


@dataclass(frozen=True)
class BundledModel:
    """A bundled model: its card (as a dictionary) and how to build it."""

    name: str
    card: dict
    builder: str
    args: tuple


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
}


def _cache_dir() -> str:
    root = os.environ.get("GEOSEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "geoseg")
    return os.path.join(root, "models")


def bundled_path(name: str) -> str:
    """Path of bundled model ``name`` as TorchScript with its card embedded (built on first use)."""
    import tempfile

    import torch

    from geoseg.models.indices import NormalizedDifference

    m = BUNDLED[name]
    folder = _cache_dir()
    path = os.path.join(folder, f"{name}-v{m.card['version']}-torch{torch.__version__.split('+')[0]}.pt")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    module = NormalizedDifference(*m.args) if m.builder == "nd" else None
    if module is None:  # pragma: no cover - registry and builders are defined together
        raise KeyError(m.builder)
    scripted = torch.jit.script(module.eval())
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".pt.tmp")
    os.close(fd)
    torch.jit.save(scripted, tmp, _extra_files={"geoseg_card.json": json.dumps(m.card)})
    os.replace(tmp, path)
    return path
