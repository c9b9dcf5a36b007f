"""The ``geoseg`` command: a thin layer over the library (heavy imports happen per command)."""

from __future__ import annotations

import logging
import os
import sys

import click

from geoseg._version import __version__


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    names = ["geoseg"] + (["distributed"] if verbose >= 2 else [])  # Dask's own INFO chatter only with -vv
    for name in names:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)


class _Group(click.Group):
    """Turns geoseg errors into one clear line and exit status 1 (traceback with -v)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            from geoseg.errors import GeosegError

            if not isinstance(exc, GeosegError) or (ctx.obj and ctx.obj.get("verbose", 0) > 0):
                raise
            click.echo(f"geoseg: error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug); show tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bar.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Segment large rasters with PyTorch/ONNX models on Dask, without seams."""
    ctx.ensure_object(dict)
    ctx.obj.update(verbose=verbose, quiet=quiet)
    _setup_logging(verbose, quiet)


def _parse_bands(value: str | None) -> tuple[tuple[int, ...] | None, dict[str, int]]:
    from geoseg.errors import ModelError
    from geoseg.models.card import parse_band_option

    try:
        return parse_band_option(value)
    except ModelError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("src")
@click.option("--model", "-m", required=True, help="TorchScript .pt / ONNX .onnx file, or a bundled model (geoseg models).")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--tile", type=click.IntRange(min=8), default=None, help="Model input size in pixels [card, else 512].")
@click.option("--halo", type=click.IntRange(min=0), default=None, help="Context pixels at each tile edge [card, else 32].")
@click.option(
    "--blend",
    type=click.Choice(["crop", "cosine"]),
    default="crop",
    show_default=True,
    help="Stitching: centre crop, or normalised cosine blend.",
)
@click.option(
    "--chunk", type=click.IntRange(min=1), default=None, help="Pixels per Dask task side, rounded to whole tiles [2048]."
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Tiles per forward pass [1 on CPU, 8 on CUDA].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (CUDA missing is an error).")
@click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True, help="Autocast precision."
)
@click.option("--scheduler", default="local", show_default=True, help="local, threads, synchronous or tcp://HOST:PORT.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes for the local cluster [1 on CPU; one per GPU]."
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Model threads per worker [cores / workers].")
@click.option(
    "--aoi", type=click.Path(dir_okay=False), default=None, help="Vector file (any CRS): segment only inside its polygons."
)
@click.option(
    "--bands",
    default=None,
    help="1-based bands in model order (3,2,1) or names for the card's bands (nir=4,red=3) [card + descriptions, else all].",
)
@click.option("--probabilities", is_flag=True, help="Also write probabilities.tif (one band per class).")
@click.option("--probabilities-dtype", type=click.Choice(["uint8", "float32"]), default="uint8", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (otherwise an error).")
@click.option(
    "--vectorize", "vectorize_", is_flag=True, help="Also write polygon layers (defaults of `geoseg vectorize`) into DIR."
)
@click.pass_context
def predict(
    ctx: click.Context,
    src: str,
    model: str,
    out_dir: str,
    tile,
    halo,
    blend,
    chunk,
    batch_size,
    device,
    precision,
    scheduler,
    workers,
    threads,
    aoi,
    bands,
    probabilities,
    probabilities_dtype,
    overwrite,
    vectorize_,
) -> None:
    """Segment the raster SRC with MODEL; write DIR/mask.tif (COG), run.json and, on request, probabilities.tif."""
    from geoseg.engine import predict as run_predict
    from geoseg.engine import scheduler as use_scheduler
    from geoseg.engine import write
    from geoseg.engine.write import check_output_dir

    check_output_dir(out_dir, overwrite)  # fail before starting a cluster
    band_idx, band_map = _parse_bands(bands)
    quiet = ctx.obj["quiet"]
    progress = sys.stderr.isatty() and not quiet
    with use_scheduler(scheduler, workers=workers, device=device) as sched:
        result = run_predict(
            src,
            model,
            bands=band_idx,
            band_map=band_map,
            aoi=aoi,
            tile=tile,
            halo=halo,
            chunk=chunk,
            blend=blend,
            batch_size=batch_size,
            device="cuda" if sched.gpus and device == "auto" else device,
            precision=precision,
            num_threads=threads or sched.num_threads,
            probabilities=probabilities,
            resources=sched.resources,
        )
        report = write(
            result,
            out_dir,
            overwrite=overwrite,
            probabilities_dtype=probabilities_dtype,
            progress=progress,
            extra={
                "scheduler": {"kind": sched.kind, "address": sched.address, "workers": sched.workers, "gpus": list(sched.gpus)}
            },
        )
        vreport = None
        if vectorize_:
            from geoseg.vector import vectorize

            vreport = vectorize(os.path.join(out_dir, "mask.tif"), out_dir, overwrite=overwrite, progress=progress)
    if not quiet:
        t = report["timings"]
        px = report["output_grid"]["width"] * report["output_grid"]["height"]
        click.echo(
            f"wrote {out_dir}/mask.tif ({report['output_grid']['width']}x{report['output_grid']['height']}, "
            f"{px / max(t['total_s'], 1e-9) / 1e6:.2f} MP/s, {report['tiles']['total']} tiles, "
            f"{report['tiles']['skipped_empty']} skipped as empty) in {t['total_s']:.1f} s"
        )
        for w in report["warnings"]:
            click.echo(f"warning: {w}", err=True)
        if vreport:
            _echo_vectors(out_dir, vreport)


def _echo_vectors(out_dir: str, report: dict) -> None:
    layers = ", ".join(f"{ly['name']} {ly['features']}" for ly in report["layers"]) or "none"
    click.echo(f"wrote {report['features']} polygons to {out_dir} ({layers}) in {report['timings']['total_s']:.1f} s")


@main.command()
@click.argument("mask", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option(
    "--probabilities", default=None, type=click.Path(dir_okay=False), help="Scores from [probabilities.tif beside MASK]."
)
@click.option("--classes", default=None, help="Class names or values, comma-separated, or 'all' [all but background].")
@click.option("--min-area", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Drop polygons below this (m²).")
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
@click.option("--format", "formats", default="geojson,gpkg", show_default=True, help="Any of geojson,gpkg,fgb,parquet.")
@click.option("--precision", type=click.IntRange(1, 15), default=None, help="GeoJSON decimals [7 ~ 1 cm; more for finer pixels].")
@click.option("--regularize", is_flag=True, help="Right-angled building footprints.")
@click.option("--no-project", is_flag=True, help="Skip the QGIS project (project.qgz).")
@click.option("--chunk", type=click.IntRange(min=64), default=2048, show_default=True, help="Pixels per Dask task side.")
@click.option("--scheduler", default="local", show_default=True, help="local, threads, synchronous or tcp://HOST:PORT.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes for the local cluster [cores].")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (otherwise an error).")
@click.pass_context
def vectorize(
    ctx: click.Context,
    mask: str,
    out_dir: str,
    probabilities,
    classes,
    min_area,
    simplify,
    connectivity,
    crs,
    formats,
    precision,
    regularize,
    no_project,
    chunk,
    scheduler,
    workers,
    overwrite,
) -> None:
    """Turn the class mask MASK into polygon layers, one per class, styled for QGIS."""
    from geoseg.engine import scheduler as use_scheduler
    from geoseg.vector import vectorize as run_vectorize

    quiet = ctx.obj["quiet"]
    with use_scheduler(scheduler, workers=workers or (os.cpu_count() or 1), device="cpu"):
        report = run_vectorize(
            mask,
            out_dir,
            probabilities=probabilities,
            classes=[c for c in classes.split(",") if c.strip()] if classes else None,
            min_area=min_area,
            simplify=simplify,
            connectivity=int(connectivity),
            crs=crs,
            formats=[f for f in formats.split(",") if f.strip()],
            precision=precision,
            regularize=regularize,
            chunk=chunk,
            project=not no_project,
            overwrite=overwrite,
            progress=sys.stderr.isatty() and not quiet,
        )
    if not quiet:
        _echo_vectors(out_dir, report)


@main.command()
@click.argument("pred", type=click.Path(dir_okay=False))
@click.option("--labels", required=True, type=click.Path(dir_okay=False), help="Vector labels (any format and CRS).")
@click.option("--layer", default=None, help="Layer of the labels file [first].")
@click.option("--class-field", default="class", show_default=True, help="Label attribute with the class name or id.")
@click.option("--label-class", default=None, help="Class of every label when they carry none (e.g. building).")
@click.option("--iou", "iou_threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="Object match IoU.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write the scores as JSON here.")
@click.pass_context
def evaluate(ctx: click.Context, pred, labels, layer, class_field, label_class, iou_threshold, json_out) -> None:
    """Score the class mask PRED against vector labels: per-class IoU, precision, recall, F1 and object F1."""
    import json

    from geoseg.evaluate import evaluate as run_evaluate
    from geoseg.evaluate import format_table

    result = run_evaluate(
        pred, labels, layer=layer, class_field=class_field, label_class=label_class, iou_threshold=iou_threshold
    )
    if json_out:
        from geoseg.io.cog import atomic_path, fsync_replace

        tmp = atomic_path(json_out)
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        fsync_replace(tmp, json_out)
    if not ctx.obj["quiet"]:
        click.echo(format_table(result))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the cards as JSON.")
def models(as_json: bool) -> None:
    """List the bundled models (offline, made by geoseg) with their cards."""
    import json

    from geoseg.errors import ModelError
    from geoseg.models.bundled import BUNDLED, bundled_card

    cards = {}
    for name in BUNDLED:
        try:
            cards[name] = bundled_card(name)
        except ModelError as exc:
            cards[name] = {"unavailable": str(exc)}
    if as_json:
        click.echo(json.dumps(cards, indent=2))
        return
    for name, c in cards.items():
        if "unavailable" in c:
            click.echo(f"{name}: {c['unavailable']}")
            continue
        classes = ", ".join(x["name"] for x in c["classes"])
        click.echo(f"{name} (v{c['version']}, {c['task']}): {c['description']}")
        click.echo(f"    bands: {', '.join(c['bands'])}; classes: {classes}; licence: {c['license']}")


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size", type=click.IntRange(min=512), default=2048, show_default=True, help="Scene size in pixels (2 m).")
@click.option("--seed", type=int, default=42, show_default=True)
def sample(out_dir: str, size: int, seed: int) -> None:
    """Generate the sample AOI into OUT_DIR: two dates, labels.gpkg, the landcover.pt index model, aoi.geojson."""
    from geoseg.sample import make_sample

    paths = make_sample(out_dir, size=size, seed=seed)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


if __name__ == "__main__":  # pragma: no cover
    main()
