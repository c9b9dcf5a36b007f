"""``geoseg evaluate``: score a class mask against vector or raster labels."""

from __future__ import annotations

import click

from geoseg.commands.options import class_field_option, label_values_option


@click.command()
@click.argument("pred", type=click.Path(dir_okay=False))
@click.option(
    "--labels",
    required=True,
    type=click.Path(dir_okay=False),
    help="Vector labels (any format and CRS) or a label raster (.png/.tif).",
)
@label_values_option
@click.option("--layer", default=None, help="Layer of the labels file [first].")
@class_field_option
@click.option("--label-class", default=None, help="Class of every label when they carry none (e.g. building).")
@click.option(
    "--iou",
    "iou_threshold",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Object match IoU (0: any overlap, the rule for ships at 10 m).",
)
@click.option(
    "--min-area",
    type=click.FloatRange(min=0),
    default=None,
    help="Leave out predicted objects smaller than this (m2) [the model's object rules carried by the mask, else 0].",
)
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write the scores as JSON here.")
@click.pass_context
def evaluate(ctx: click.Context, pred, labels, label_values, layer, class_field, label_class, iou_threshold, min_area,
             json_out) -> None:  # fmt: skip
    """Score the class mask PRED against labels: per-class IoU, precision, recall, F1 (= Dice) and object F1.

    Vector labels, or a label raster of class values (scored pixel by pixel, every class).
    """
    from geoseg.evaluate import evaluate as run_evaluate
    from geoseg.evaluate import format_table
    from geoseg.io.labels import parse_label_values

    result = run_evaluate(
        pred,
        labels,
        layer=layer,
        class_field=class_field,
        label_class=label_class,
        iou_threshold=iou_threshold,
        label_values=parse_label_values(label_values),
        min_area=min_area,
    )
    if json_out:
        from geoseg.io.outdir import write_json_atomic

        write_json_atomic(json_out, result, indent=2)
    if not ctx.obj["quiet"]:
        click.echo(format_table(result))
