"""Physics-based models: spectral-index rules written as torch modules.

They run through the same engine (and on GPU) as learned models. Thresholds:
NDVI > 0.3 for dense green vegetation and NDWI (McFeeters 1996, green/NIR) > 0 for open
water are the conventional cut-offs in the remote-sensing literature.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from geoseg.models.export import export_onnx

__all__ = ["DarkLines", "IndexLandcover", "NormalizedDifference", "export_index_landcover"]


class IndexLandcover(nn.Module):
    """Classes 0 = other, 1 = vegetation (NDVI > 0.3), 2 = water (NDWI > 0).

    Takes bands blue, green, red, nir (any scale; indices are ratios). Outputs logits
    whose argmax applies the thresholds, water first.
    """

    def __init__(self, ndvi_threshold: float = 0.3, ndwi_threshold: float = 0.0, sharpness: float = 20.0) -> None:
        super().__init__()
        self.ndvi_threshold = ndvi_threshold
        self.ndwi_threshold = ndwi_threshold
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 3, H, W)`` from a ``(N, 4, H, W)`` blue/green/red/nir batch."""
        green, red, nir = x[:, 1], x[:, 2], x[:, 3]
        eps = 1e-6
        ndvi = (nir - red) / (nir + red + eps)
        ndwi = (green - nir) / (green + nir + eps)
        k = self.sharpness
        other = torch.zeros_like(ndvi)
        veg = k * (ndvi - self.ndvi_threshold)
        water = k * (ndwi - self.ndwi_threshold) + 10.0 * (ndwi > self.ndwi_threshold).to(x.dtype)
        return torch.stack([other, veg, water], dim=1)


def export_index_landcover(path: str | os.PathLike) -> str:
    """Save :class:`IndexLandcover` as ONNX (card inside) at ``path``; returns the path."""
    path = os.fspath(path)
    card = {
        "name": "landcover",
        "version": "1",
        "task": "area",
        "description": "Vegetation (NDVI > 0.3) and open water (NDWI > 0, McFeeters 1996); a physics rule.",
        "classes": [
            {"id": 0, "name": "other", "color": [200, 200, 200]},
            {"id": 1, "name": "vegetation", "color": [60, 180, 75]},
            {"id": 2, "name": "water", "color": [0, 110, 200]},
        ],
        "bands": ["blue", "green", "red", "nir"],
        "size_multiple": 1,
    }
    return export_onnx(IndexLandcover(), card, path, 4, example_size=32)


class NormalizedDifference(nn.Module):
    """Two classes from a normalised difference of two input bands: 1 where ``(a - b) / (a + b) > threshold``.

    The input has two bands ``(a, b)`` in that order (any common scale); the output is two logits
    whose argmax applies the threshold and whose softmax grows smoothly with the index.
    """

    def __init__(self, threshold: float, sharpness: float = 20.0) -> None:
        super().__init__()
        self.threshold = threshold
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 2, H, W)`` from a ``(N, 2, H, W)`` batch."""
        a, b = x[:, 0], x[:, 1]
        nd = (a - b) / (a + b + 1e-6)
        positive = self.sharpness * (nd - self.threshold)
        return torch.stack([torch.zeros_like(nd), positive], dim=1)


class DarkLines(nn.Module):
    """Two classes: 1 where a band is darker than its neighbourhood by more than ``threshold`` (relative).

    For blood vessels in colour fundus photographs: haemoglobin absorbs green light (its
    absorption peaks at 542 and 577 nm), so vessels are the pixels whose green value lies
    well below the mean of the surrounding ``(2 * radius + 1)``-pixel square. Pixels darker
    than ``fov_level`` on average (outside the camera's circular field of view) are never
    vessels. Receptive-field radius: ``radius`` (give the engine a halo of at least that).

    The input is ``(N, 3, H, W)`` red, green, blue (0-255); the output two logits.
    """

    def __init__(self, radius: int = 11, threshold: float = 0.07, fov_level: float = 25.0, sharpness: float = 50.0) -> None:
        super().__init__()
        self.radius = radius
        self.threshold = threshold
        self.fov_level = fov_level
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 2, H, W)``."""
        g = x[:, 1:2]
        r = self.radius
        local = nn.functional.avg_pool2d(nn.functional.pad(g, (r, r, r, r), mode="reflect"), 2 * r + 1, stride=1)
        contrast = (local - g) / (local + 1.0)
        fov = (x.mean(dim=1, keepdim=True) > self.fov_level).to(x.dtype)
        vessel = self.sharpness * (contrast - self.threshold) * fov - 10.0 * (1.0 - fov)
        return torch.cat([torch.zeros_like(vessel), vessel], dim=1)
