"""``geoseg train``: train a card's network on rasters and labels; write ONNX with the card inside."""

from __future__ import annotations

import click

from geoseg.commands.options import class_field_option, label_values_option, parse_bands, threads_option


@click.command()
@click.option("--images", "-i", multiple=True, required=True, help="Training raster (repeat for several).")
@click.option(
    "--labels", "-l", multiple=True, required=True, help="Vector labels or label rasters: one for all images or one per image."
)
@label_values_option
@click.option("--layer", multiple=True, help="Labels layer: one for all images or one per image.")
@class_field_option
@click.option("--label-class", default=None, help="Class of every label when they have no class attribute.")
@click.option("--card", "card_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Model card (YAML/JSON).")
@click.option("--out", "-o", required=True, help="ONNX model to write (.onnx, card inside); the checkpoint is OUT.ckpt.")
@click.option("--aoi", multiple=True, help="Vector file limiting where training looks: one for all images or one per image.")
@click.option("--bands", default=None, help="Card band names to raster bands, e.g. nir=4,red=3 (default: band descriptions).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Optimiser steps per epoch.")
@click.option("--batch", type=click.IntRange(min=1), default=16, show_default=True, help="Chips per step.")
@click.option("--chip", type=click.IntRange(min=32), default=128, show_default=True, help="Chip side in model pixels.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Share of blocks kept for validation.")
@click.option("--block", type=click.IntRange(min=32), default=512, show_default=True, help="Split block side in pixels.")
@click.option("--val-chips", type=click.IntRange(min=1), default=48, show_default=True, help="Validation chips per epoch.")
@click.option("--lr", type=float, default=3e-3, show_default=True, help="AdamW learning rate (cosine decay).")
@click.option("--scales", default="1,1", show_default=True, help="Pixel-size range as multiples of the images' (e.g. 1,4).")
@click.option("--gray", type=float, default=0.0, show_default=True, help="Share of chips turned grey (for pan imagery).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@threads_option("torch threads [all cores].")
@click.option(
    "--radiometry",
    multiple=True,
    help="Reflectance cards: how the images store reflectance (s2-l2a, s2-l2a-harmonized, sentinelhub-raw16, reflectance "
    "or scale=S,offset=O); one for all images or one per image [from metadata, else the value range].",
)
@click.option(
    "--augment",
    type=click.Choice(["default", "reflectance"]),
    default=None,
    help="Radiometric augmentation [reflectance for reflectance cards, else default].",
)
@click.option("--select", type=click.Choice(["best", "last"]), default="best", show_default=True, help="Epoch to export.")
@click.option(
    "--hard-negatives",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.0,
    show_default=True,
    help="Share of chips centred on mined false positives (mined at 40 % and 70 % of the epochs).",
)
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Binary models: class 1 from this probability on (baked into the exported model).")  # fmt: skip
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt.")
@click.pass_context
def train(ctx: click.Context, images, labels, label_values, layer, class_field, label_class, card_path, out, aoi, bands,
          epochs, steps, batch, chip, val_fraction, block, val_chips, lr, scales, gray, device, seed, threads,
          radiometry, augment, select, hard_negatives, threshold, resume) -> None:  # fmt: skip
    """Train the card's network on rasters and labels (vector or raster); write ONNX with the card embedded."""
    from geoseg.io.labels import parse_label_values
    from geoseg.models.card import card_from_dict
    from geoseg.models.card_sources import load_text
    from geoseg.models.train_config import TrainConfig, parse_scales
    from geoseg.train.run import train as run_train

    with open(card_path) as f:
        card = card_from_dict(load_text(f.read(), card_path), card_path)
    band_idx, band_map = parse_bands(bands)
    if band_idx is not None:
        raise click.BadParameter("give card band names, e.g. --bands nir=4,red=3 (training matches bands by name)")
    cfg = TrainConfig(
        images=list(images),
        labels=list(labels),
        out=out,
        layers=list(layer) or [None],
        class_field=class_field,
        label_class=label_class,
        label_values=parse_label_values(label_values),
        aois=list(aoi) or [None],
        band_map=band_map,
        epochs=epochs,
        steps=steps,
        batch=batch,
        chip=chip,
        val_fraction=val_fraction,
        block=block,
        val_chips=val_chips,
        lr=lr,
        scales=parse_scales(scales),
        gray=gray,
        device=device,
        seed=seed,
        threads=threads,
        radiometry=list(radiometry) or [None],
        augment=augment or ("reflectance" if card.scaling.method == "reflectance" else "default"),
        select=select,
        hard_negatives=hard_negatives,
        threshold=threshold,
    )

    def show(rec: dict) -> None:
        if not ctx.obj["quiet"]:
            iou = ", ".join("-" if v is None else f"{v:.3f}" for v in rec["iou"])
            click.echo(f"epoch {rec['epoch']}: loss {rec['loss']:.4f}, validation IoU per class [{iou}], {rec['seconds']:.0f} s")

    res = run_train(cfg, card, resume=resume, progress=show)
    click.echo(f"model: {res['model']} (best epoch {res['best_epoch']}, validation IoU {res['metrics']['iou']})")
    click.echo(f"checkpoint: {res['checkpoint']}")
