"""``geoseg vectorize``: a class mask to polygon layers, one per class (or one with a value field), styled for QGIS."""

from __future__ import annotations

import os

import click

from geoseg.commands.options import cluster_options, out_dir_option, overwrite_option


def echo_vectors(out_dir: str, report: dict) -> None:
    """Say what :func:`geoseg.vector.vectorize` wrote (its ``report``) into ``out_dir``, on one line."""
    layers = ", ".join(f"{ly['name']} {ly['features']}" for ly in report["layers"]) or "none"
    click.echo(f"wrote {report['features']} polygons to {out_dir} ({layers}) in {report['timings']['total_s']:.1f} s")


@click.command()
@click.argument("mask", type=click.Path(dir_okay=False))
@out_dir_option
@click.option(
    "--probabilities", default=None, type=click.Path(dir_okay=False), help="Scores from [probabilities.tif beside MASK]."
)
@click.option("--classes", default=None, help="Class names or values, comma-separated, or 'all' [all but background].")
@click.option(
    "--min-area",
    type=click.FloatRange(min=0),
    default=None,
    help="Drop polygons below this (m²) [the model's object rules carried by the mask, else 0].",
)
@click.option(
    "--min-pixels",
    type=click.IntRange(min=0),
    default=None,
    help="Minimum mapping unit of area classes, in pixels; 0 keeps every patch [the model's, carried by the mask].",
)
@click.option(
    "--simplify",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Topology-preserving tolerance (m); 0 = exact.",
)
@click.option(
    "--connectivity",
    type=click.Choice(["4", "8"]),
    default="4",
    show_default=True,
    help="4 joins pixels through edges only (GDAL's default); 8 also through corners.",
)
@click.option("--crs", default=None, help="CRS of GeoPackage/FlatGeobuf/GeoParquet [the mask's]; GeoJSON is always EPSG:4326.")
@click.option(
    "--format",
    "formats",
    default="geojson,gpkg",
    show_default=True,
    help="Any of geojson,gpkg,fgb,parquet,coco (COCO instances in pixel coordinates; added by default for plain images).",
)
@click.option("--precision", type=click.IntRange(1, 15), default=None, help="GeoJSON decimals [7 ~ 1 cm; more for finer pixels].")
@click.option("--regularize", is_flag=True, help="Right-angled building footprints.")
@click.option(
    "--field",
    default=None,
    help="One layer with the pixel value in this attribute (as gdal_polygonize -f), for rasters of values "
    "such as a loss year, instead of one layer per value.",
)
@click.option("--no-project", is_flag=True, help="Skip the QGIS project (project.qgz).")
@click.option("--chunk", type=click.IntRange(min=64), default=2048, show_default=True, help="Pixels per Dask task side.")
@cluster_options("Worker processes for the local cluster [cores].")
@overwrite_option
@click.pass_context
def vectorize(
    ctx: click.Context,
    mask: str,
    out_dir: str,
    probabilities,
    classes,
    min_area,
    min_pixels,
    simplify,
    connectivity,
    crs,
    formats,
    precision,
    regularize,
    field,
    no_project,
    chunk,
    scheduler,
    workers,
    overwrite,
) -> None:
    """Turn the class mask MASK into polygon layers, one per class (one layer with --field), styled for QGIS."""
    from geoseg.engine import scheduler as use_scheduler
    from geoseg.engine.preflight import mask_chunks
    from geoseg.io.outdir import removed_if_failed
    from geoseg.vector import vectorize as run_vectorize

    quiet = ctx.obj["quiet"]
    with (
        removed_if_failed(out_dir),  # a failed run leaves no empty folder behind
        use_scheduler(
            scheduler, workers=workers or (os.cpu_count() or 1), device="cpu", chunks=mask_chunks(mask, probabilities, chunk)
        ),
    ):
        report = run_vectorize(
            mask,
            out_dir,
            probabilities=probabilities,
            classes=[c for c in classes.split(",") if c.strip()] if classes else None,
            min_area=min_area,
            min_pixels=min_pixels,
            simplify=simplify,
            connectivity=int(connectivity),
            crs=crs,
            formats=[f for f in formats.split(",") if f.strip()],
            precision=precision,
            regularize=regularize,
            field=field,
            chunk=chunk,
            project=not no_project,
            overwrite=overwrite,
            progress=not quiet,  # a bar on a terminal, plain lines in logs and CI
        )
    if not quiet:
        echo_vectors(out_dir, report)
