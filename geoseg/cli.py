"""The ``geoseg`` command: the click group, its one-line errors, stop signals and logging.

The commands live in :mod:`geoseg.commands` (one thin module each, shared options declared
once in :mod:`geoseg.commands.options`); heavy imports happen inside each command.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click

from geoseg._version import __version__
from geoseg.commands import register
from geoseg.commands.flags import FlagsFilter
from geoseg.io.remote import RedactFilter, redact

#: read by geoseg.engine.cluster (``DASK_LOG_ENV``): the file Dask's own log lines go to, in every process of a run
DASK_LOG_ENV = "GEOSEG_DASK_LOG"


_REDACT = RedactFilter()


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_REDACT)  # a signed URL's token never reaches a log line
    if logging.lastResort is not None:  # other libraries' warnings (GDAL's retries quote the URL) print through it
        logging.lastResort.addFilter(_REDACT)  # one filter, however often the CLI runs in a process
    handler.addFilter(FlagsFilter())  # log lines name flags, as the one-line error does
    names = ["geoseg"] + (["distributed"] if verbose >= 2 else [])  # Dask's own INFO chatter only with -vv
    for name in names:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
    # Dask's worker errors (with their tracebacks) and nanny warnings: to a file of this run, named by the one-line
    # error if the command fails, unless -v (then the terminal, as Dask prints them)
    if verbose:
        os.environ.pop(DASK_LOG_ENV, None)
    else:
        import tempfile

        os.environ[DASK_LOG_ENV] = os.path.join(tempfile.gettempdir(), f"geoseg-{os.getpid()}.log")
        _dask_log(keep=False)  # a file an earlier process of the same id left


def _dask_log(keep: bool) -> str | None:
    """The file Dask logged to in this run, if it holds anything; removed unless ``keep`` (the command failed)."""
    path = os.environ.get(DASK_LOG_ENV)
    if not path or not os.path.isfile(path) or not path.endswith(f"geoseg-{os.getpid()}.log"):
        return None
    if keep and os.path.getsize(path) > 0:
        return path
    try:
        os.remove(path)
    except OSError:
        pass
    return None


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
                result = super().invoke(ctx)
            _dask_log(keep=False)
            return result
        except KeyboardInterrupt as exc:
            import signal

            _quiet_shutdown()  # a KeyboardInterrupt that did not come through the handler (another thread's)
            _dask_log(keep=False)
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
            from geoseg.commands.flags import as_flags
            from geoseg.errors import GeosegError

            if not isinstance(exc, GeosegError) or (ctx.obj and ctx.obj.get("verbose", 0) > 0):
                raise
            # one line: drop indented traceback text a message may embed (TorchScript errors carry one)
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln[:1].isspace()]
            lines = [ln for ln in lines if not ln.startswith("Traceback ")]
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            log = _dask_log(keep=True)
            details = f" (details in {log})" if log else ""
            line = as_flags(redact(" ".join(lines)), command)  # API keywords as flags; no URL's token
            click.echo(f"geoseg: error: {line}{details}", err=True)
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


register(main)  # every command, from geoseg.commands (one module each; options shared in geoseg.commands.options)


if __name__ == "__main__":  # pragma: no cover
    main()
