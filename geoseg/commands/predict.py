"""``geoseg predict``: segment a raster (or a sequence of frames) and write its mask, run.json and, on request, polygons."""

from __future__ import annotations

import os
import sys

import click

from geoseg.commands.options import cluster_options, out_dir_option, overwrite_option, parse_bands, threads_option
from geoseg.commands.vectorize import echo_vectors


@click.command()
@click.argument("src")
@click.option(
    "--model",
    "-m",
    required=True,
    help="A bundled model (geoseg models), a pulled one (geoseg models pull NAME), or an ONNX / .pt2 / TorchScript file.",
)
@out_dir_option
@click.option(
    "--radiometry",
    default=None,
    help="Reflectance models: how SRC stores reflectance: s2-l2a (ESA, baseline >= 04.00), s2-l2a-harmonized, "
    "sentinelhub-raw16, reflectance, landsat-c2-l2 or scale=S,offset=O [metadata, else guessed and logged].",
)
@click.option(
    "--tta",
    type=click.Choice(["1", "2", "4", "8"]),
    default=None,
    help="Test-time augmentation: dihedral views per tile, logits averaged [the card's, else 1].",
)
@click.option(
    "--trust-model",
    is_flag=True,
    help="Load a TorchScript file whose code runs at load or touches files (refused otherwise). Only for files you made.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    help="Binary models: class 1 where its probability is at least this [card (Deepness seg_thresh), else the larger class].",
)
@click.option(
    "--conf",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    help="Detectors: lowest box score kept [the card's, e.g. Deepness det_conf].",
)
@click.option(
    "--iou",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    help="Detectors: IoU above which a box suppresses a lower-scored one of its class [the card's, det_iou_thresh].",
)
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
    "--chunk",
    type=click.IntRange(min=1),
    default=None,
    help="Pixels per Dask task side, rounded to whole tiles [1536 on CPU, 2048 on CUDA].",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Tiles per forward pass [1 on CPU, 8 on CUDA].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (CUDA missing is an error).")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fast", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="fast: bf16 on CPUs with AVX-512 BF16/AMX (ONNX through OpenVINO: pip install 'geoseg[fast]'), fp16 on GPUs; "
    "masks agree >= 99.5 % with fp32. run.json records the arithmetic used.",
)
@cluster_options("Worker processes for the local cluster [1 on CPU; one per GPU].")
@threads_option("Model threads per worker [cores / workers].")
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
@overwrite_option
@click.option(
    "--resample/--no-resample",
    default=True,
    show_default=True,
    help="Resample tiles to the card's pixel size when the raster's differs by up to 4x.",
)
@click.option(
    "--vectorize", "vectorize_", is_flag=True, help="Also write polygon layers (defaults of `geoseg vectorize`) into DIR."
)
@click.pass_context
def predict(
    ctx: click.Context,
    src: str,
    model: str,
    out_dir: str,
    radiometry,
    tta,
    trust_model,
    threshold,
    conf,
    iou,
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
    resample,
    vectorize_,
) -> None:
    """Segment the raster SRC (a path, or a URL: https://, s3://, gs://, az://, read in windows, never downloaded)
    with MODEL; write DIR/mask.tif (COG), run.json and, on request, probabilities.tif.

    A detector MODEL (ONNX with Deepness/GeoDeep metadata model_type Detector) writes its boxes as polygon
    layers instead (DIR/geoseg.gpkg, DIR/vectors/*.geojson, project.qgz) and run.json; no mask.
    """
    from geoseg.engine import scheduler as use_scheduler
    from geoseg.io.outdir import removed_if_failed
    from geoseg.pipeline import segment

    band_idx, band_map = parse_bands(bands)
    quiet = ctx.obj["quiet"]
    progress = not quiet  # a bar on a terminal, plain lines in logs and CI

    def engine_options(sched) -> dict:
        return {
            "bands": band_idx,
            "band_map": band_map,
            "aoi": aoi,
            "tile": tile,
            "halo": halo,
            "chunk": chunk,
            "blend": blend,
            "batch_size": batch_size,
            "precision": precision,
            **sched.predict_options(device, threads),
            "resample": resample,
            "radiometry": radiometry,
            "trust_model": trust_model,
            "tta": int(tta) if tta else None,
            "threshold": threshold,
            "conf": conf,
            "iou": iou,
        }

    with removed_if_failed(out_dir):  # a failed run leaves no empty folder behind
        frames, source, model, chunks = _preflight(
            src, model, out_dir, overwrite, bands=band_idx, band_map=band_map, aoi=aoi, chunk=chunk, trust_model=trust_model
        )
        with use_scheduler(scheduler, workers=workers, device=device, chunks=chunks) as sched:
            if frames:  # a folder of frames, a video, a multi-page TIFF: one engine run per frame
                # a line per frame says how far it is; bars only where they redraw in place
                frames_progress = progress and sys.stderr.isatty()
                _frames(src, model, out_dir, frames, vectorize_, overwrite, frames_progress, quiet, engine_options(sched))
                return
            done = segment(
                source,  # opened once, by the preflight, with the model's bands
                model,
                out_dir,
                vectorize={} if vectorize_ else None,
                overwrite=overwrite,
                progress=progress,
                probabilities_dtype=probabilities_dtype,
                extra={"scheduler": sched.record()},
                probabilities=probabilities,
                **engine_options(sched),
            )
    if not quiet:
        if done.mask is None:  # a detector: layers, no mask
            _echo_detections(out_dir, done.run, done.vectors)
            return
        _echo_run(out_dir, done.run)
        if done.vectors:
            echo_vectors(out_dir, done.vectors)
        if done.item:
            click.echo(f"wrote {done.item} (STAC Item of the outputs)")


def _preflight(src: str, model: str, out_dir: str, overwrite: bool, **checked) -> tuple[list | None, object, object, int]:
    """Everything checked before a scheduler starts (and before torch, onnxruntime or Dask are imported).

    Returns the frames (None for one raster), the source (for one raster: opened with the model's
    bands), the model (resolved, for one raster) and the job's size in chunks (one per frame for a
    sequence), which ``--scheduler auto`` decides by.
    """
    from geoseg.engine.preflight import check_predict
    from geoseg.engine.write import check_output_dir
    from geoseg.io.frames import list_frames

    check_output_dir(out_dir, overwrite)
    frames = None if src.startswith("/vsi") or "://" in src else list_frames(src)
    if frames:
        return frames, src, model, len(frames)
    pre = check_predict(src, model, **checked)  # bands, band_map, aoi, chunk, trust_model
    return None, pre.source, pre.spec, pre.chunks


def _frames(src, model, out_dir, frames, vectorize_, overwrite, progress, quiet, options) -> None:
    """Every frame through the pipeline, a line per frame."""
    from geoseg.sequences import predict_frames

    def on_frame(frame, row) -> None:
        if not quiet:
            objects = f", {sum(row['objects'].values())} objects" if "objects" in row else ""
            click.echo(f"frame {frame.index + 1}/{len(frames)} {frame.name}: {row['seconds']:.1f} s{objects}")

    seq = predict_frames(
        src, model, out_dir, vectorize=vectorize_, overwrite=overwrite, progress=progress, on_frame=on_frame, **options
    )
    if not quiet:
        tracks = f", {seq['objects']} objects in {seq['tracks']} tracks ({out_dir}/coco.json)" if "coco" in seq else ""
        click.echo(
            f"wrote {len(seq['frames'])} frames to {out_dir} ({seq['reused_frames']} already done){tracks} "
            f"in {seq['seconds']:.1f} s"
        )


def _echo_run(out_dir: str, report) -> None:
    """Say what :func:`geoseg.write` wrote, on one line."""
    t = report["timings"]
    grid = report["output_grid"]
    px = grid["width"] * grid["height"]
    png = f" and {report['outputs']['mask_png']}" if "mask_png" in report["outputs"] else ""
    click.echo(
        f"wrote {out_dir}/mask.tif{png} ({grid['width']}x{grid['height']}, "
        f"{px / max(t['total_s'], 1e-9) / 1e6:.2f} MP/s, {report['tiles']['total']} tiles, "
        f"{report['tiles']['skipped_empty']} skipped as empty) in {t['total_s']:.1f} s"
    )


def _echo_detections(out_dir: str, report, vectors) -> None:
    """Say what a detector found and where its layers are, on two lines."""
    found = report["detections"]
    per_class = ", ".join(f"{name} {n}" for name, n in found["classes"].items()) or "none"
    click.echo(f"found {found['total']} objects ({per_class}) in {report['timings']['total_s']:.1f} s; no mask (a detector)")
    files = [f for f in vectors.files() if f.endswith((".gpkg", ".geojson", ".fgb", ".parquet", ".qgz"))]
    click.echo(f"wrote {', '.join(os.path.join(out_dir, f) for f in files)}")
