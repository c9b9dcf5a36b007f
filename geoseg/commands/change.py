"""``geoseg change``: map change between two dates."""

from __future__ import annotations

import click

from geoseg.commands.options import cluster_options, out_dir_option, overwrite_option


@click.command()
@click.argument("before", type=click.Path(dir_okay=False))
@click.argument("after", type=click.Path(dir_okay=False))
@click.option("--model", "-m", required=True, help="Model run on both dates (bundled name or file).")
@out_dir_option
@click.option("--grid", default=None, type=click.Path(dir_okay=False), help="Raster whose grid both dates use [BEFORE].")
@click.option("--aoi", default=None, type=click.Path(dir_okay=False), help="Vector file limiting the area.")
@click.option("--bands-before", default=None, help="Band mapping of BEFORE, e.g. nir=2,red=3.")
@click.option("--bands-after", default=None, help="Band mapping of AFTER.")
@click.option("--clouds", is_flag=True, help="Leave out cloud and shadow pixels of either date (bundled clouds model).")
@click.option("--mask-model", default=None, help="Any model whose non-background classes make pixels unusable.")
@click.option("--min-area", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Minimum mapping unit (m²).")
@click.option("--format", "formats", default="geojson,gpkg", show_default=True, help="Any of geojson,gpkg,fgb,parquet.")
@click.option("--resampling", default="bilinear", show_default=True, help="How AFTER is resampled onto the grid.")
@click.option("--date-before", default=None, help="Date of BEFORE [its metadata or file name].")
@click.option("--date-after", default=None, help="Date of AFTER [its metadata or file name].")
@cluster_options("Worker processes for the local cluster.")
@overwrite_option
@click.pass_context
def change(ctx: click.Context, before, after, model, out_dir, grid, aoi, bands_before, bands_after, clouds, mask_model,
           min_area, formats, resampling, date_before, date_after, scheduler, workers, overwrite) -> None:  # fmt: skip
    """Map change between BEFORE and AFTER: change.tif (transition codes), polygons, hectares per transition."""
    from geoseg.change import change as run_change
    from geoseg.change import format_change
    from geoseg.engine import scheduler as use_scheduler
    from geoseg.engine.preflight import raster_chunks
    from geoseg.io.outdir import removed_if_failed

    if clouds and mask_model:
        raise click.BadParameter("give --clouds or --mask-model, not both")
    with removed_if_failed(out_dir), use_scheduler(scheduler, workers=workers, chunks=raster_chunks(grid or before, aoi)):
        report = run_change(
            before,
            after,
            model,
            out_dir,
            grid=grid,
            aoi=aoi,
            bands_before=bands_before,
            bands_after=bands_after,
            mask_model="clouds" if clouds else mask_model,
            min_area=min_area,
            formats=tuple(f.strip() for f in formats.split(",") if f.strip()),
            resampling=resampling,
            date_before=date_before,
            date_after=date_after,
            overwrite=overwrite,
            progress=not ctx.obj["quiet"],  # a bar on a terminal, plain lines in logs and CI
        )
    if not ctx.obj["quiet"]:
        click.echo(format_change(report))
        click.echo(f"wrote {out_dir}/change.tif, run.json, geoseg.gpkg, vectors/ in {report['seconds']:.1f} s")
        if report.item:
            click.echo(f"wrote {report.item} (STAC Item of the outputs)")
