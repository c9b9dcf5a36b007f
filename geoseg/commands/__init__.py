"""The ``geoseg`` commands: one thin module per command (or close group), shared options in :mod:`.options`.

Each module imports only click at load time; the library is imported inside the command
that needs it, so ``geoseg --help`` stays fast. :mod:`geoseg.cli` registers them on the
group with :func:`register`.
"""

from __future__ import annotations

import click

from geoseg.commands.change import change
from geoseg.commands.effects import effects
from geoseg.commands.evaluate import evaluate
from geoseg.commands.models import models
from geoseg.commands.predict import predict
from geoseg.commands.sample import sample
from geoseg.commands.train import train
from geoseg.commands.vectorize import vectorize
from geoseg.commands.workflows import run_cmd, runs_cmd, schedule_cmd

__all__ = ["COMMANDS", "register"]

#: Every command, in the order ``geoseg --help`` has always registered them.
COMMANDS: list[click.Command] = [
    predict,
    vectorize,
    evaluate,
    models,
    train,
    change,
    run_cmd,
    schedule_cmd,
    runs_cmd,
    sample,
    effects,
]


def register(group: click.Group) -> None:
    """Add every geoseg command to ``group``.

    Parameters
    ----------
    group : click.Group
        The ``geoseg`` group (:func:`geoseg.cli.main`).
    """
    for command in COMMANDS:
        group.add_command(command)
