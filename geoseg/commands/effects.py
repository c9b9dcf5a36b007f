"""``geoseg effects``: photo effects driven by a segmentation model."""

from __future__ import annotations

import click

from geoseg.commands.options import overwrite_option


@click.group()
def effects() -> None:
    """Photo effects driven by a segmentation model (plain images: PNG, JPEG)."""


@effects.command("portrait-blur")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Image to write (.png, .jpg, ...).")
@click.option(
    "--model",
    default="mediapipe",
    show_default=True,
    help="mediapipe (selfie model from the mediapipe wheel: $GEOSEG_MEDIAPIPE_WHEEL), a mediapipe .whl, a .tflite, "
    "or a person TorchScript .pt / ONNX .onnx (RGB in [0, 1]).",
)
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True), help="Background blur in pixels [1.5% of the longer side].")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    show_default=True,
    help="Pixels with at least this person probability are left unchanged.",
)
@click.option("--feather", type=click.FloatRange(min=0), default=None, help="Soft edge on the background side, pixels [sigma/3].")
@click.option("--mask-out", default=None, type=click.Path(dir_okay=False), help="Also write the matte (255 = person) here.")
@overwrite_option
@click.pass_context
def portrait_blur_cmd(ctx: click.Context, image, out, model, sigma, threshold, feather, mask_out, overwrite) -> None:
    """Blur the background of the portrait IMAGE, leaving the person pixels unchanged ("portrait mode")."""
    from geoseg.effects import portrait_blur

    r = portrait_blur(
        image, out, model, sigma=sigma, threshold=threshold, feather=feather, mask_out=mask_out, overwrite=overwrite
    )
    if not ctx.obj["quiet"]:
        also = f" and {r['mask']}" if r["mask"] else ""
        share = f"person {100 * r['person_fraction']:.1f}% of {r['width']}x{r['height']} px"
        click.echo(f"wrote {r['out']}{also}: {share} in {r['seconds']:.2f} s")
