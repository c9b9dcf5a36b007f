"""Network architectures geoseg can build from a card (for state-dict models and training).

A state dict is only tensors; the architecture that takes them is named in the card
(``architecture: {name: geoseg.unet, args: {...}}``) and looked up here, in a fixed
registry: a card can never make geoseg import or run arbitrary code. ``smp.<Class>``
names build a ``segmentation_models_pytorch`` architecture when that package is
installed (``encoder_weights`` is forced to ``None``: weights come from the state
dict, never from the internet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from geoseg.errors import ModelError

__all__ = ["UNet", "build_architecture"]


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """A small U-Net: ``depth`` poolings, ``width * 2**k`` channels, bilinear upsampling.

    Parameters
    ----------
    in_channels : int
        Input bands.
    classes : int
        Output channels (class logits).
    width : int
        Channels of the first level.
    depth : int
        Number of 2x poolings; inputs must be a multiple of ``2**depth``.
    """

    def __init__(self, in_channels: int = 3, classes: int = 2, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_channels < 1 or classes < 1:
            raise ModelError(
                f"UNet: in_channels, classes, width and depth must be >= 1 (got {in_channels}, {classes}, {width}, {depth})"
            )
        chans = [width * 2**k for k in range(depth + 1)]
        self.down = nn.ModuleList([_Block(in_channels, chans[0])] + [_Block(chans[k], chans[k + 1]) for k in range(depth)])
        self.up = nn.ModuleList([_Block(chans[k + 1] + chans[k], chans[k]) for k in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, classes, H, W)`` for ``(N, in_channels, H, W)`` inputs."""
        skips: list[torch.Tensor] = []
        for k, block in enumerate(self.down):
            if k > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def build_architecture(name: str, args: dict[str, Any], in_channels: int, classes: int, origin: str) -> nn.Module:
    """Build the architecture a card names, with freshly initialised weights.

    Parameters
    ----------
    name : str
        ``geoseg.unet`` or ``smp.<Architecture>`` (e.g. ``smp.Unet``).
    args : dict
        Keyword arguments of the architecture (``in_channels``/``classes`` come from the card).
    in_channels, classes : int
        Input bands and output channels.
    origin : str
        Where the card came from, for messages.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    ModelError
        An unknown name, a missing optional package or arguments the architecture rejects.
    """
    args = dict(args)
    if name == "geoseg.unet":
        factory: Any = UNet
        if not (1 <= int(args.get("width", 16)) <= 256 and 1 <= int(args.get("depth", 3)) <= 6):
            raise ModelError(f"{origin}: geoseg.unet needs 1 <= width <= 256 and 1 <= depth <= 6, got {args}")
        args.setdefault("in_channels", in_channels)
        args.setdefault("classes", classes)
    elif name.startswith("smp."):
        try:
            import segmentation_models_pytorch as smp
        except ImportError as exc:
            raise ModelError(
                f"{origin}: architecture {name!r} needs segmentation_models_pytorch; pip install segmentation-models-pytorch"
            ) from exc
        factory = getattr(smp, name[4:], None)
        if not isinstance(factory, type) or not issubclass(factory, nn.Module):
            raise ModelError(
                f"{origin}: segmentation_models_pytorch has no architecture {name[4:]!r} (e.g. Unet, FPN, DeepLabV3Plus)"
            )
        args.setdefault("in_channels", in_channels)
        args.setdefault("classes", classes)
        args["encoder_weights"] = None  # the state dict has the weights; never download
    else:
        raise ModelError(f"{origin}: unknown architecture {name!r}; use geoseg.unet or smp.<Architecture> (e.g. smp.Unet)")
    try:
        return factory(**args)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:  # smp raises KeyError for unknown encoders
        raise ModelError(f"{origin}: architecture {name!r} rejects its arguments {args} ({exc}); fix architecture.args") from exc
