"""``geoseg sample``: generate the sample AOI."""

from __future__ import annotations

import click


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size", type=click.IntRange(min=512), default=2048, show_default=True, help="Scene size in pixels (2 m).")
@click.option("--seed", type=int, default=42, show_default=True)
def sample(out_dir: str, size: int, seed: int) -> None:
    """Generate the sample AOI into OUT_DIR: two dates, labels.gpkg, the landcover.onnx index model, aoi.geojson."""
    from geoseg.sample import make_sample

    paths = make_sample(out_dir, size=size, seed=seed)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")
