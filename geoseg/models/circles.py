"""Storage tanks as geometry: bright roof circles found by gradient voting on concentric rings.

There is no permissively licensed tank training set, and tanks are geometry more than
texture: a cylinder 10-100 m across seen from above is a circle, its roof (fixed or
floating) usually brighter than the ground, a floating roof crossed by the crescent shadow
of its own wall. :class:`RoofCircles` is that rule as a torch module, so it runs through
the same engine (and exports to ONNX like the learned models):

1. a grey image (the mean of the input bands, percentile-scaled by the card), smoothed;
2. Sobel gradients at three pyramid levels (x1, x2, x4), so every ring kernel stays small;
3. for each radius, four quadrant ring kernels sum the gradient component pointing at the
   centre (numerator) and the gradient magnitude (denominator) on the ring: a bright disc
   scores 1 in every sector, a straight edge or a corner scores in one or two only. The
   circle must have an inward edge in every sector, and the mean inward gradient must exceed
   a contrast floor (faint texture never makes a circle);
4. non-maximum suppression over space and neighbouring radii keeps one centre per circle;
5. each kept centre paints its disc at full resolution (a transposed convolution with a
   disc kernel), and the output is two logits, 0 = background, 1 = storage tank.

The model works at one pixel size (``gsd_m`` in its card, 2 m); the engine resamples other
rasters to it, so radii in pixels are radii in metres. Receptive radius: twice the largest
radius plus the suppression window (the card's halo covers it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["RoofCircles", "ring_radii"]


def ring_radii(r_min: float, r_max: float, step: float) -> list[float]:
    """Radii from ``r_min`` to ``r_max`` (pixels) in geometric steps of ``step``."""
    out, r = [], r_min
    while r <= r_max * 1.0001:
        out.append(round(r, 3))
        r *= step
    return out


SECTORS = 8


def _ring_kernels(radii: list[float], size: int) -> torch.Tensor:
    """``(len(radii) * 2 * SECTORS, 3, size, size)``: per radius a numerator (on gx, gy) per sector of the
    ring, then a denominator (on |g|) per sector.
    """
    c = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    d = torch.sqrt(xx**2 + yy**2)
    ux, uy = xx / d.clamp(min=1e-6), yy / d.clamp(min=1e-6)
    ang = torch.atan2(yy, xx)  # sectors centred on the axes and the diagonals
    quad = torch.remainder(torch.round(ang / (2 * math.pi / SECTORS)), SECTORS).long()
    out = []
    for r in radii:
        w = (1 - (d - r).abs()).clamp(min=0)  # a one-pixel ring, linearly weighted
        for q in range(SECTORS):
            wq = w * (quad == q)
            wq = wq / wq.sum().clamp(min=1e-6)
            k = torch.zeros(3, size, size)
            k[0], k[1] = -ux * wq, -uy * wq  # gradient pointing at the centre (bright inside)
            out.append(k)
        for q in range(SECTORS):
            wq = w * (quad == q)
            k = torch.zeros(3, size, size)
            k[2] = wq / wq.sum().clamp(min=1e-6)
            out.append(k)
    return torch.stack(out)


def _disc_kernels(radii: list[float], stride: int) -> tuple[torch.Tensor, int]:
    """Transposed-convolution kernels painting a disc of each radius (full-resolution pixels)
    around the centre of a level pixel of ``stride`` full-resolution pixels; returns (kernels, pad).
    """
    pad = math.ceil(max(radii)) + 1
    size = 2 * pad + stride
    c = pad + (stride - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size) - c, torch.arange(size) - c, indexing="ij")
    d = torch.sqrt(xx**2 + yy**2)
    k = torch.stack([(d <= r).float() for r in radii])  # (R, size, size)
    return k[:, None], pad  # conv_transpose2d weight: (in=R, out/groups=1, kh, kw) with groups=R


class _Level(nn.Module):
    """Ring voting, suppression and disc painting at one pyramid level."""

    def __init__(self, radii_full: list[float], stride: int, contrast: float, min_score: float) -> None:
        super().__init__()
        self.stride = stride
        self.radii = [r / stride for r in radii_full]  # in level pixels
        size = 2 * math.ceil(max(self.radii) + 1) + 1
        self.pad = size // 2
        self.register_buffer("rings", _ring_kernels(self.radii, size))
        disc, self.paint_pad = _disc_kernels(radii_full, stride)
        self.register_buffer("discs", disc)
        self.n = len(self.radii)
        self.contrast = contrast
        self.min_score = min_score
        self.nms = [2 * max(1, round(0.7 * r)) + 1 for r in self.radii]

    def scores(self, grad: torch.Tensor) -> torch.Tensor:
        """Circle scores ``(N, R, h, w)`` at this level: the mean inward gradient on the ring where every
        sector's inward share passes ``min_score``, the mean passes ``contrast`` and the weakest sector
        0.4 ``contrast``; else 0.
        """
        n, _, h, w = grad.shape
        v = F.conv2d(F.pad(grad, (self.pad,) * 4, mode="replicate"), self.rings)  # (N, R*8, h, w)
        v = v.reshape(n, self.n, 2 * SECTORS, h, w)
        num, den = v[:, :, :SECTORS], v[:, :, SECTORS:]
        ratio = (num / (den + 1e-3)).min(dim=2).values
        weakest = num.min(dim=2).values  # an edge all the way round, not at a few points
        strength = num.mean(dim=2)  # peaks where the ring sits on the edge: the radius is measured here
        ok = (strength > self.contrast) & (weakest > 0.4 * self.contrast) & (ratio > self.min_score)
        return torch.where(ok, strength, torch.zeros_like(strength))

    def paint(self, score: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        """Discs ``(N, 1, H, W)`` of the circles whose score is a local maximum over space, the
        neighbouring radii and every other radius of every level (``best``, at this level's grid).
        """
        peaks = []
        for k in range(self.n):
            s = score[:, k : k + 1]
            win = self.nms[k]
            m = F.max_pool2d(s, win, stride=1, padding=win // 2)
            lo, hi = max(0, k - 1), min(self.n, k + 2)
            across = F.max_pool2d(score[:, lo:hi].amax(dim=1, keepdim=True), 3, stride=1, padding=1)
            other = F.max_pool2d(best, win, stride=1, padding=win // 2)
            peaks.append(((s >= m) & (s >= across) & (s >= other - 1e-6) & (s > 0)).to(score.dtype))
        peak = torch.cat(peaks, dim=1)  # (N, R, h, w)
        painted = F.conv_transpose2d(peak, self.discs, stride=self.stride, padding=self.paint_pad, groups=self.n)
        return painted.amax(dim=1, keepdim=True)


class RoofCircles(nn.Module):
    """Two logits per pixel: 1 = inside a bright roof circle of radius ``r_min``-``r_max`` pixels.

    Parameters
    ----------
    r_min, r_max : float
        Radii searched, in pixels of the model's pixel size.
    step : float
        Ratio between neighbouring radii (1.1 = radii 10 % apart: a diameter is found to within ~5 %).
    contrast : float
        Floor of the mean inward gradient on the ring (scaled grey units per pixel).
    min_score : float
        Floor of the weakest quadrant's share of inward gradient (1 = a perfect bright disc).
    """

    def __init__(
        self, r_min: float = 3.5, r_max: float = 25.0, step: float = 1.1, contrast: float = 0.15, min_score: float = 0.8
    ) -> None:
        super().__init__()
        radii = ring_radii(r_min, r_max, step)
        # level 0 up to 6 px, level 1 (x2) up to 12 px, level 2 (x4) beyond: ring kernels stay <= 15 px
        groups = [[r for r in radii if r < 6], [r for r in radii if 6 <= r < 12], [r for r in radii if r >= 12]]
        self.levels = nn.ModuleList([_Level(g, 2**k, contrast, min_score) for k, g in enumerate(groups) if g])
        self.strides = [lv.stride for lv in self.levels]
        sob = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0
        self.register_buffer("sobel", torch.stack([sob, sob.t()])[:, None])  # (2, 1, 3, 3): d/dx, d/dy
        g = torch.exp(-(torch.arange(-2, 3, dtype=torch.float32) ** 2) / 2)
        g = g / g.sum()
        self.register_buffer("blur", (g[:, None] * g[None, :])[None, None])

    def _gradients(self, grey: torch.Tensor) -> torch.Tensor:
        grey = F.conv2d(F.pad(grey, (2, 2, 2, 2), mode="replicate"), self.blur)
        d = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), self.sobel)
        mag = torch.sqrt(d[:, :1] ** 2 + d[:, 1:] ** 2 + 1e-12)
        return torch.cat([d, mag], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 2, H, W)`` for ``(N, bands, H, W)``; H and W multiples of 4."""
        grey = x.mean(dim=1, keepdim=True)
        scores = []
        for level in self.levels:
            g = grey if level.stride == 1 else F.avg_pool2d(grey, level.stride)
            scores.append(level.scores(self._gradients(g)))
        # the best circle score of any radius at each full-resolution pixel
        best = torch.zeros_like(grey)
        for level, s in zip(self.levels, scores, strict=True):
            b = s.amax(dim=1, keepdim=True)
            if level.stride > 1:
                b = F.interpolate(b, scale_factor=float(level.stride), mode="nearest")
            best = torch.maximum(best, b)
        painted = torch.zeros_like(grey)
        for level, s in zip(self.levels, scores, strict=True):
            b = best if level.stride == 1 else F.max_pool2d(best, level.stride)
            painted = torch.maximum(painted, level.paint(s, b))
        tank = 20.0 * painted - 10.0
        return torch.cat([torch.zeros_like(tank), tank], dim=1)
