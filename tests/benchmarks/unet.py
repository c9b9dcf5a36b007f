"""The benchmark's speed probe: a small, fixed, fully-convolutional 3-level U-Net.

Channels 16/32/64 on the three encoder levels and a 128-channel bottleneck below the third
pooling; two 3x3 conv + BatchNorm + ReLU per level, 2x2 max-pool down, 2x2 transposed conv
up, skip connections by concatenation, a 1x1 head to ``classes`` logits. Three poolings,
so any input whose height and width are multiples of 8 works. The weights come from a
fixed seed: the outputs mean nothing, the net only has the cost of a real one (about
18.6 GFLOP per 1x3x512x512 tile, multiply-adds counted twice; see :func:`count_flops`).

It takes raw band values (0..255 or 0..65535) as float32; the first layer is a plain conv,
so no scaling is needed for a speed probe.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["UNet", "build", "count_flops", "export_onnx", "export_torchscript"]

SEED = 20240601


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """3-level U-Net: ``in_ch`` bands in, ``classes`` logit channels out, same H and W."""

    def __init__(self, in_ch: int = 3, classes: int = 2, base: int = 16) -> None:
        super().__init__()
        c1, c2, c3, c4 = base, 2 * base, 4 * base, 8 * base
        self.enc1 = _block(in_ch, c1)
        self.enc2 = _block(c1, c2)
        self.enc3 = _block(c2, c3)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(c3, c4)
        self.up3 = nn.ConvTranspose2d(c4, c3, 2, stride=2)
        self.dec3 = _block(2 * c3, c3)
        self.up2 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec2 = _block(2 * c2, c2)
        self.up1 = nn.ConvTranspose2d(c2, c1, 2, stride=2)
        self.dec1 = _block(2 * c1, c1)
        self.head = nn.Conv2d(c1, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        b = self.bottleneck(self.pool(e3))
        d3 = self.dec3(torch.cat([self.up3(b), e3], dim=1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


def build(in_ch: int = 3, classes: int = 2, base: int = 16, seed: int = SEED) -> UNet:
    """The net with fixed-seed weights (BatchNorm statistics randomised too), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    net = UNet(in_ch, classes, base)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(1.0 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
    return net.eval()


def count_flops(net: nn.Module, shape: tuple[int, int, int, int] = (1, 3, 512, 512)) -> float:
    """FLOPs of one forward pass (multiply-adds x 2) of the convolutions, counted by hooks.

    Conv2d: ``2 * Cin/groups * kh * kw * Cout * Hout * Wout``; ConvTranspose2d: ``2 * Cin *
    kh * kw * Cout/groups * Hin * Win``. BatchNorm, ReLU, pooling and concatenation (well
    under 1% here) are left out, as FLOP counters usually do.
    """
    total = 0.0

    def conv_hook(m: nn.Conv2d, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += 2.0 * (m.in_channels // m.groups) * kh * kw * out.shape[1] * out.shape[2] * out.shape[3] * out.shape[0]

    def tconv_hook(m: nn.ConvTranspose2d, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        x = inp[0]
        kh, kw = m.kernel_size
        total += 2.0 * x.shape[1] * kh * kw * (m.out_channels // m.groups) * x.shape[2] * x.shape[3] * x.shape[0]

    handles = []
    for m in net.modules():
        if isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(tconv_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
    try:
        with torch.inference_mode():
            net(torch.zeros(shape))
    finally:
        for h in handles:
            h.remove()
    return total


def export_torchscript(net: nn.Module, path: str, in_ch: int = 3) -> str:
    """Trace the net and save it as a TorchScript archive (any H, W divisible by 8)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.9+ deprecates TorchScript; geoseg still loads it
        with torch.inference_mode():
            traced = torch.jit.trace(net, torch.zeros(1, in_ch, 64, 64))
        traced = torch.jit.freeze(traced)
        torch.jit.save(traced, path)
    return path


def export_onnx(net: nn.Module, path: str, in_ch: int = 3, opset: int = 17) -> str:
    """Export to ONNX with dynamic batch, height and width axes."""
    x = torch.zeros(1, in_ch, 64, 64)
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    kwargs = {"input_names": ["input"], "output_names": ["logits"], "dynamic_axes": axes, "opset_version": opset}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        # The TorchScript-based exporter: it needs no onnxscript (the dynamo exporter does).
        torch.onnx.export(net, (x,), path, dynamo=False, **kwargs)
    return path
