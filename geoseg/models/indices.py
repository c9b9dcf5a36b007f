"""Physics-based models: spectral-index rules written as torch modules.

They run through the same engine (and on GPU) as learned models. Thresholds:
NDVI > 0.3 for dense green vegetation and NDWI (McFeeters 1996, green/NIR) > 0 for open
water are the conventional cut-offs in the remote-sensing literature.
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["IndexLandcover", "export_index_landcover"]


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
    """Save :class:`IndexLandcover` as TorchScript at ``path``; returns the path."""
    path = os.fspath(path)
    torch.jit.save(torch.jit.script(IndexLandcover()), path)
    return path
