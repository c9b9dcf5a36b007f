"""The ``geoseg`` command: a thin layer over the library (heavy imports happen per command)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

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


def _one_line_warnings(quiet: bool) -> None:
    """Geoseg's own warnings (a plain image in pixel coordinates, ...) as one ``geoseg: warning:`` line each."""
    import warnings

    from geoseg.errors import NotGeoreferencedWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, NotGeoreferencedWarning):
            if not quiet:
                click.echo(f"geoseg: warning: {message}", err=True)
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) raised as an exception in the main thread, as Ctrl-C is.

    Every ``with`` block then unwinds as it does on Ctrl-C: the local cluster is closed, locks
    are released, a child run of ``geoseg schedule`` is stopped and logged.
    """

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _signum(exc: KeyboardInterrupt) -> int:
    import signal

    return getattr(exc, "signum", int(signal.SIGINT))


@contextmanager
def _stop_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (where their handler is the default: nohup is respected).

    The first signal raises; later ones are ignored while the command closes down, and a third
    one ends the process at once.
    """
    import _thread
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        if not received and _in_finaliser(frame):
            # an exception raised inside a garbage-collector callback or __del__ is printed and dropped:
            # deliver the signal again a moment later, outside it
            threading.Timer(0.05, _thread.interrupt_main, (signum,)).start()
            return
        received.append(signum)
        if len(received) == 1:
            _quiet_shutdown()
            raise Interrupted(signum)
        if len(received) >= 3:  # a third signal while closing down: the user insists
            os._exit(128 + signum)

    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) in (signal.SIG_DFL, signal.default_int_handler):
            previous[s] = signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _in_finaliser(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside a ``__del__`` or a garbage-collector callback (where exceptions are dropped)."""
    import gc

    callbacks = {getattr(getattr(cb, "__func__", cb), "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code in callbacks:
            return True
        frame = frame.f_back
    return False


def _quiet_shutdown() -> None:
    """On a stop signal: Dask's event-loop thread and its nannies report the cancelled work (``AllExit``,
    ``CancelledError``, a worker killed after the close timeout) as tracebacks; they are not news to whoever
    stopped the command. Shown with -vv.
    """
    if logging.getLogger("distributed").getEffectiveLevel() <= logging.DEBUG:
        return
    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class _Group(click.Group):
    """Turns geoseg errors into one clear line and exit status 1 (traceback with -v).

    A stop signal becomes one line and the shell's status for it (130 for Ctrl-C, 143 for SIGTERM).
    """

    def invoke(self, ctx: click.Context):
        try:
            with _stop_signals():
                return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            import signal

            _quiet_shutdown()  # a KeyboardInterrupt that did not come through the handler (another thread's)
            signum = _signum(exc)
            click.echo(f"geoseg: {'interrupted (Ctrl-C)' if signum == signal.SIGINT else f'stopped by {exc}'}", err=True)
            ctx.exit(128 + signum)
        except click.UsageError as exc:  # a bad option value is a bad input too: one line, exit 1
            if ctx.obj and ctx.obj.get("verbose", 0) > 0:
                raise
            where = exc.ctx.command_path if exc.ctx else ctx.command_path
            fix = f"fix {exc.param.get_error_hint(exc.ctx)}; " if isinstance(exc, click.BadParameter) and exc.param else ""
            click.echo(f"geoseg: error: {exc.format_message().rstrip('.')}; {fix}see '{where} --help'", err=True)
            ctx.exit(1)
        except Exception as exc:
            from geoseg.errors import GeosegError

            if not isinstance(exc, GeosegError) or (ctx.obj and ctx.obj.get("verbose", 0) > 0):
                raise
            # one line: drop indented traceback text a message may embed (TorchScript errors carry one)
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln[:1].isspace()]
            lines = [ln for ln in lines if not ln.startswith("Traceback ")]
            click.echo(f"geoseg: error: {' '.join(lines)}", err=True)
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
    _one_line_warnings(quiet)


def _check_threads(value: int | None) -> int | None:
    """``--threads`` within what this machine can run (OpenMP crashes on absurd thread counts)."""
    if value is None:
        return None
    from geoseg.engine.graph import max_threads

    if value > max_threads():
        raise click.BadParameter(f"{value} is more than {max_threads()} ({os.cpu_count() or 1} core(s) here)")
    return value


def _parse_bands(value: str | None) -> tuple[tuple[int, ...] | None, dict[str, int]]:
    from geoseg.errors import ModelError
    from geoseg.models.card import parse_band_option

    try:
        return parse_band_option(value)
    except ModelError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.argument("src")
@click.option("--model", "-m", required=True, help="A bundled model (geoseg models), or an ONNX / .pt2 / TorchScript file.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
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
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    callback=lambda _ctx, _param, v: _check_threads(v),
    help="Model threads per worker [cores / workers].",
)
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
    """Segment the raster SRC with MODEL; write DIR/mask.tif (COG), run.json and, on request, probabilities.tif."""
    from geoseg.engine import predict as run_predict
    from geoseg.engine import scheduler as use_scheduler
    from geoseg.engine import write
    from geoseg.engine.write import check_output_dir
    from geoseg.io.frames import list_frames

    check_output_dir(out_dir, overwrite)  # fail before starting a cluster
    band_idx, band_map = _parse_bands(bands)
    quiet = ctx.obj["quiet"]
    progress = sys.stderr.isatty() and not quiet
    frames = None if src.startswith("/vsi") or "://" in src else list_frames(src)

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
            "device": "cuda" if sched.gpus and device == "auto" else device,
            "precision": precision,
            "num_threads": threads or sched.num_threads,
            "resources": sched.resources,
            "resample": resample,
            "radiometry": radiometry,
            "trust_model": trust_model,
            "tta": int(tta) if tta else None,
        }

    if frames:  # a folder of frames, a video, a multi-page TIFF: one engine run per frame
        from geoseg.sequences import predict_frames

        def on_frame(frame, row) -> None:
            if not quiet:
                objects = f", {sum(row['objects'].values())} objects" if "objects" in row else ""
                click.echo(f"frame {frame.index + 1}/{len(frames)} {frame.name}: {row['seconds']:.1f} s{objects}")

        with use_scheduler(scheduler, workers=workers, device=device) as sched:
            seq = predict_frames(
                src,
                model,
                out_dir,
                vectorize=vectorize_,
                overwrite=overwrite,
                progress=progress,
                on_frame=on_frame,
                **engine_options(sched),
            )
        if not quiet:
            tracks = f", {seq['objects']} objects in {seq['tracks']} tracks ({out_dir}/coco.json)" if "coco" in seq else ""
            click.echo(
                f"wrote {len(seq['frames'])} frames to {out_dir} ({seq['reused_frames']} already done){tracks} "
                f"in {seq['seconds']:.1f} s"
            )
        return
    with use_scheduler(scheduler, workers=workers, device=device) as sched:
        result = run_predict(src, model, probabilities=probabilities, **engine_options(sched))
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
        png = f" and {report['outputs']['mask_png']}" if "mask_png" in report["outputs"] else ""
        click.echo(
            f"wrote {out_dir}/mask.tif{png} ({report['output_grid']['width']}x{report['output_grid']['height']}, "
            f"{px / max(t['total_s'], 1e-9) / 1e6:.2f} MP/s, {report['tiles']['total']} tiles, "
            f"{report['tiles']['skipped_empty']} skipped as empty) in {t['total_s']:.1f} s"
        )
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
@click.option(
    "--min-area",
    type=click.FloatRange(min=0),
    default=None,
    help="Drop polygons below this (m²) [the model's object rules carried by the mask, else 0].",
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
@click.option(
    "--labels",
    required=True,
    type=click.Path(dir_okay=False),
    help="Vector labels (any format and CRS) or a label raster (.png/.tif).",
)
@click.option("--label-values", default=None, help="Label raster values to classes, e.g. 0=membrane,255=cell (or 255=ignore).")
@click.option("--layer", default=None, help="Layer of the labels file [first].")
@click.option("--class-field", default="class", show_default=True, help="Label attribute with the class name or id.")
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
@click.option("--images", "-i", multiple=True, required=True, help="Training raster (repeat for several).")
@click.option(
    "--labels", "-l", multiple=True, required=True, help="Vector labels or label rasters: one for all images or one per image."
)
@click.option("--label-values", default=None, help="Label raster values to classes, e.g. 0=membrane,255=cell (or 255=ignore).")
@click.option("--layer", multiple=True, help="Labels layer: one for all images or one per image.")
@click.option("--class-field", default="class", show_default=True, help="Label attribute with the class name or id.")
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
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    callback=lambda _ctx, _param, v: _check_threads(v),
    help="torch threads [all cores].",
)
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
    from geoseg.models.card import card_from_dict, load_text
    from geoseg.models.train import TrainConfig, parse_scales
    from geoseg.models.train import train as run_train

    with open(card_path) as f:
        card = card_from_dict(load_text(f.read(), card_path), card_path)
    band_idx, band_map = _parse_bands(bands)
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


@main.command()
@click.argument("before", type=click.Path(dir_okay=False))
@click.argument("after", type=click.Path(dir_okay=False))
@click.option("--model", "-m", required=True, help="Model run on both dates (bundled name or file).")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
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
@click.option("--scheduler", default="local", show_default=True, help="local, threads, synchronous or tcp://HOST:PORT.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes for the local cluster.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (otherwise an error).")
@click.pass_context
def change(ctx: click.Context, before, after, model, out_dir, grid, aoi, bands_before, bands_after, clouds, mask_model,
           min_area, formats, resampling, date_before, date_after, scheduler, workers, overwrite) -> None:  # fmt: skip
    """Map change between BEFORE and AFTER: change.tif (transition codes), polygons, hectares per transition."""
    from geoseg.change import change as run_change
    from geoseg.change import format_change
    from geoseg.engine import scheduler as use_scheduler

    if clouds and mask_model:
        raise click.BadParameter("give --clouds or --mask-model, not both")
    with use_scheduler(scheduler, workers=workers):
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
        )
    if not ctx.obj["quiet"]:
        click.echo(format_change(report))
        click.echo(f"wrote {out_dir}/change.tif, run.json, geoseg.gpkg, vectors/ in {report['seconds']:.1f} s")


@main.command("run")
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Output folder [the workflow's].")
@click.pass_context
def run_cmd(ctx: click.Context, workflow: str, out_dir: str | None) -> None:
    """Run the workflow file WORKFLOW: every model, masks, polygons, a summary and a quicklook PNG."""
    from geoseg.workflows.run import format_summary, run_workflow

    quiet = ctx.obj["quiet"]
    summary = run_workflow(workflow, out_dir, echo=None if quiet else click.echo)
    if not quiet:
        click.echo(format_summary(summary))


@main.command("schedule")
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Output folder [the workflow's].")
@click.option("--max-runs", type=click.IntRange(min=1), default=None, help="Stop after this many runs [run until Ctrl-C].")
@click.pass_context
def schedule_cmd(ctx: click.Context, workflow: str, out_dir: str | None, max_runs: int | None) -> None:
    """Run WORKFLOW on its cron 'schedule:' (UTC), one run at a time, logging each to schedule.log."""
    from geoseg.workflows.schedule import schedule

    schedule(workflow, out_dir, max_runs=max_runs, echo=None if ctx.obj["quiet"] else click.echo)


@main.command("runs")
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Output folder [the workflow's].")
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON.")
def runs_cmd(workflow: str, out_dir: str | None, as_json: bool) -> None:
    """Print the run ledger of WORKFLOW: every unit of work, its status and timing, and every run."""
    import json

    from geoseg.errors import InputError
    from geoseg.workflows.ledger import LEDGER_NAME, Ledger
    from geoseg.workflows.spec import load_workflow

    wf = load_workflow(workflow, out=out_dir)
    folder = os.path.abspath(out_dir) if out_dir else wf.outputs.folder
    if not os.path.exists(os.path.join(folder, LEDGER_NAME)):
        raise InputError(f"{folder}: no {LEDGER_NAME}: the workflow has not run into this folder yet (geoseg run {workflow})")
    ledger = Ledger(folder)
    units, runs = ledger.units(), ledger.runs()
    ledger.close()
    if as_json:
        click.echo(json.dumps({"units": units, "runs": runs}, indent=2))
        return
    click.echo(f"{'unit':<44} {'kind':<8} {'status':<12} {'run':>4} {'seconds':>8}  finished")
    for u in units:
        secs = "-" if u["seconds"] is None else f"{u['seconds']:.1f}"
        click.echo(f"{u['id']:<44} {u['kind']:<8} {u['status']:<12} {u['run'] or '-':>4} {secs:>8}  {u['finished'] or '-'}")
        if u["error"]:
            click.echo(f"    error: {u['error']}")
    for r in runs:
        click.echo(
            f"run {r['run']}: {r['started']} -> {r['finished'] or '-'} {r['status']}: "
            f"{r['done']} done, {r['skipped']} skipped, {r['failed']} failed"
        )


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size", type=click.IntRange(min=512), default=2048, show_default=True, help="Scene size in pixels (2 m).")
@click.option("--seed", type=int, default=42, show_default=True)
def sample(out_dir: str, size: int, seed: int) -> None:
    """Generate the sample AOI into OUT_DIR: two dates, labels.gpkg, the landcover.onnx index model, aoi.geojson."""
    from geoseg.sample import make_sample

    paths = make_sample(out_dir, size=size, seed=seed)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")


@main.group()
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
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (otherwise an error).")
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


if __name__ == "__main__":  # pragma: no cover
    main()
