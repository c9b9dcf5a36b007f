"""Options and arguments that several commands share, each declared once (as rasterio's ``rio/options.py``).

Every decorator adds the option with the same name, default and help text wherever it is
used; where a command's help differs (the ``--workers`` default, what ``--threads`` sets),
the decorator takes that text. Only click is imported here: ``geoseg --help`` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

__all__ = [
    "check_threads",
    "class_field_option",
    "cluster_options",
    "label_values_option",
    "out_dir_option",
    "overwrite_option",
    "parse_bands",
    "threads_option",
    "workflow_argument",
    "workflow_out_option",
]

F = TypeVar("F", bound=Callable[..., Any])


def _stack(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several click decorators as one, listed in ``--help`` in the order given."""

    def apply(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


def check_threads(value: int | None) -> int | None:
    """``--threads`` within what this machine can run (OpenMP crashes on absurd thread counts).

    Parameters
    ----------
    value : int or None
        The option's value.

    Returns
    -------
    int or None
        ``value``, unchanged.

    Raises
    ------
    click.BadParameter
        ``value`` is more than :func:`geoseg.engine.plan.max_threads`.
    """
    if value is None:
        return None
    from geoseg.engine.plan import max_threads

    if value > max_threads():
        raise click.BadParameter(f"{value} is more than {max_threads()} ({os.cpu_count() or 1} core(s) here)")
    return value


def parse_bands(value: str | None) -> tuple[tuple[int, ...] | None, dict[str, int]]:
    """A ``--bands`` value as band numbers (``3,2,1``) or card band names (``nir=4,red=3``).

    Parameters
    ----------
    value : str or None
        The option's value.

    Returns
    -------
    tuple
        1-based band numbers (or None) and a mapping of card band names to band numbers.

    Raises
    ------
    click.BadParameter
        The value cannot be read.
    """
    from geoseg.errors import ModelError
    from geoseg.models.bands import parse_band_option

    try:
        return parse_band_option(value)
    except ModelError as exc:
        raise click.BadParameter(str(exc)) from None


#: ``--out/-o DIR`` of the commands that write an output folder (required).
out_dir_option = click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")

#: ``--out/-o DIR`` of the workflow commands (default: the workflow's own folder).
workflow_out_option = click.option(
    "--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Output folder [the workflow's]."
)

#: The WORKFLOW file argument of ``run``, ``schedule`` and ``runs``.
workflow_argument = click.argument("workflow", type=click.Path(dir_okay=False))

#: ``--overwrite``: replace existing outputs.
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace existing outputs (otherwise an error).")

#: ``--label-values`` of the commands that read label rasters.
label_values_option = click.option(
    "--label-values", default=None, help="Label raster values to classes, e.g. 0=membrane,255=cell (or 255=ignore)."
)

#: ``--class-field`` of the commands that read vector labels.
class_field_option = click.option(
    "--class-field", default="class", show_default=True, help="Label attribute with the class name or id."
)


def cluster_options(workers_help: str) -> Callable[[F], F]:
    """``--scheduler`` and ``--workers``: where the Dask work runs.

    Parameters
    ----------
    workers_help : str
        Help text of ``--workers`` (each command has its own default).

    Returns
    -------
    callable
        A decorator adding both options.
    """
    return _stack(
        click.option(
            "--scheduler",
            default="auto",
            show_default=True,
            help="auto (in-process: threads for up to 2 chunks, else a local cluster whose worker runs in this process; "
            "worker processes with GPUs or --workers > 1), local (a cluster of worker processes), threads, synchronous "
            "or tcp://HOST:PORT.",
        ),
        click.option("--workers", type=click.IntRange(min=1), default=None, help=workers_help),
    )


def threads_option(help: str) -> Callable[[F], F]:
    """``--threads``: model (or torch) threads, checked against this machine's cores.

    Parameters
    ----------
    help : str
        Help text (what the threads run, and the default).

    Returns
    -------
    callable
        A decorator adding the option.
    """
    return click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        callback=lambda _ctx, _param, v: check_threads(v),
        help=help,
    )
