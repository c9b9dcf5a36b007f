"""Training batches as tensors: chips read and scaled, augmented, and finished as the engine's tiles.

The sampler (:class:`geoseg.train.chips.ChipSampler`) reads the chips; this module only
turns them into tensors at the chip size, draws the augmentation (:class:`Augment`) and
applies the card's last scaling.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from geoseg.models.train_config import Augment

__all__ = ["augment", "finish_inputs", "read_batch"]


def read_batch(sampler: Any, draws: list, split: str, chip: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read and scale a batch of chips, resized to ``chip`` pixels (area average where read coarser).

    Parameters
    ----------
    sampler : geoseg.train.chips.ChipSampler
        Reads each draw; its images carry their resolved scaling.
    draws : list
        Draws from :meth:`geoseg.train.chips.ChipSampler.windows`.
    split : str
        ``train`` or ``val``: labels outside it are ignored.
    chip : int
        Chip side in model pixels.

    Returns
    -------
    x, y, valid : torch.Tensor
        ``(N, bands, chip, chip)`` inputs in the augmentation's units (0 where invalid),
        ``(N, chip, chip)`` int64 labels, ``(N, chip, chip)`` bool input validity.
    """
    xs, ys, vs = [], [], []
    for draw in draws:
        x, y, valid, k = sampler.read(draw, split)
        x = sampler.images[k].scaling.apply(x.astype(np.float32))
        x[:, ~valid] = 0.0
        t = torch.from_numpy(np.ascontiguousarray(x))[None]
        v = torch.from_numpy(valid.astype(np.float32))[None, None]
        if t.shape[-1] != chip:
            t = F.interpolate(t, size=(chip, chip), mode="area")
            v = F.interpolate(v, size=(chip, chip), mode="area")
        xs.append(t[0])
        ys.append(torch.from_numpy(y.astype(np.int64)))
        vs.append(v[0, 0] > 0.999)
    return torch.stack(xs), torch.stack(ys), torch.stack(vs)


def finish_inputs(x: torch.Tensor, valid: torch.Tensor, post: Any) -> torch.Tensor:
    """The card's last normalisation (reflectance cards), then invalid pixels to 0 as the engine does.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, bands, H, W)`` inputs.
    valid : torch.Tensor
        ``(N, H, W)`` bool.
    post : Scaling or None
        Applied to ``x`` before invalid pixels are zeroed.

    Returns
    -------
    torch.Tensor
    """
    if post is not None:
        x = torch.from_numpy(post.apply(x.numpy()))
    return x.masked_fill(~valid[:, None], 0.0)


def augment(
    x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, gen: torch.Generator, gray: float, aug: Augment
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Geometric and radiometric augmentation of a batch (see :class:`~geoseg.models.train_config.Augment`).

    Parameters
    ----------
    x, y, valid : torch.Tensor
        A batch from :func:`read_batch`.
    gen : torch.Generator
        Every draw comes from it (the same seed gives the same batch).
    gray : float
        Probability that a chip's bands are all replaced by their mean.
    aug : Augment
        The radiometric ranges.

    Returns
    -------
    x, y, valid : torch.Tensor
        Rotated and flipped together; ``x`` with gains, contrast, offsets and noise.
    """
    n, c = x.shape[:2]
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x, y, valid = torch.rot90(x, k, (2, 3)), torch.rot90(y, k, (1, 2)), torch.rot90(valid, k, (1, 2))
    if torch.rand(1, generator=gen) < 0.5:
        x, y, valid = x.flip(3), y.flip(2), valid.flip(2)
    rnd = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    band_gain = torch.exp((rnd(n, c, 1, 1) - 0.5) * 2 * aug.band_gain)
    gain = torch.exp((rnd(n, 1, 1, 1) - 0.5) * 2 * aug.gain)
    if aug.contrast:
        mean = x.mean(dim=(2, 3), keepdim=True)
        contrast = 1 - aug.contrast + 2 * aug.contrast * rnd(n, 1, 1, 1)
        x = mean + (x - mean) * contrast
    offset = aug.offset_low + (aug.offset_high - aug.offset_low) * rnd(n, 1, 1, 1)
    if aug.band_offset:
        offset = offset + (rnd(n, c, 1, 1) - 0.5) * 2 * aug.band_offset
    x = x * gain * band_gain + offset
    if gray > 0:
        g = (rnd(n, 1, 1, 1) < gray).float()
        x = g * x.mean(dim=1, keepdim=True).expand_as(x) + (1 - g) * x
    x = x + torch.randn(x.shape, generator=gen) * (aug.noise * rnd(n, 1, 1, 1))
    return x.contiguous(), y.contiguous(), valid.contiguous()
