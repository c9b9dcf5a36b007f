"""Library messages speak the Python API (``tile=``, ``overwrite=True``); the command line says its flags.

:func:`as_flags` rewrites a :class:`~geoseg.errors.GeosegError` message for the command that
raised it: ``pass overwrite=True`` becomes ``pass --overwrite``, ``lower tile=`` becomes
``lower --tile``, ``resample=False`` becomes ``--no-resample``, ``bands=[3, 2, 1]`` becomes
``--bands 3,2,1`` and ``band_map={'nir': 4}`` becomes ``--bands nir=4``. The table comes from the
commands' own click options, so a renamed flag can never leave a stale hint behind.
:class:`FlagsFilter` does the same for the library's logged warnings.
"""

from __future__ import annotations

import logging
import re

import click

__all__ = ["API_NAMES", "FlagsFilter", "as_flags"]

#: Keyword arguments of the library whose command-line option has another name.
API_NAMES = {
    "aois": "aoi",
    "band_map": "bands",
    "kind": "scheduler",
    "layers": "layer",
    "num_threads": "threads",
    "vectorize": "vectorize_",
}

_KEYWORD = re.compile(
    r"(?<![\w.=/-])(?P<name>[a-z][a-z0-9_]*)="
    r"(?P<value>True\b|False\b|\{[^{}]*\}|\([^()]*\)|\[[^\[\]]*\]|[^\s,;)]*)"
)
_PAIR = re.compile(r"""['"]?(?P<key>[^'":,\s{}]+)['"]?\s*:\s*['"]?(?P<value>[^'",\s{}]+)['"]?""")
_QUOTED = re.compile(r"""(['"])(?P<text>[^'"\s]*)\1""")


def _cli_value(value: str) -> str:
    """A Python literal as the command line writes it.

    ``{'nir': 4, 'red': 3}`` -> ``nir=4,red=3``, ``[3, 2, 1]`` -> ``3,2,1``, ``'cpu'`` -> ``cpu``.
    """
    if value.startswith("{"):
        return ",".join(f"{m['key']}={m['value']}" for m in _PAIR.finditer(value))
    if value[:1] in ("(", "["):
        return ",".join(v.strip() for v in value[1:-1].split(",") if v.strip())
    quoted = _QUOTED.fullmatch(value)
    return quoted["text"] if quoted else value


def _options(commands: list[click.Command]) -> dict[str, click.Option]:
    """Parameter name -> option, the first command that declares it winning."""
    table: dict[str, click.Option] = {}
    for command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and any(o.startswith("--") for o in param.opts):
                table.setdefault(param.name or "", param)
    return table


def as_flags(message: str, command: click.Command | None = None) -> str:
    """``message`` with the library's keyword arguments written as ``command``'s flags.

    Parameters
    ----------
    message : str
        A library message (``"...; pass overwrite=True or choose another out_dir="``).
    command : click.Command, optional
        The command that ran; its options win, then every other command's.

    Returns
    -------
    str
        The message for the command line (``"...; pass --overwrite or choose another --out"``).
        Names that are no option of any command stay as they are.
    """
    from geoseg.commands import COMMANDS

    table = _options(([command] if command is not None else []) + list(COMMANDS))

    def flag(m: re.Match[str]) -> str:
        option = table.get(API_NAMES.get(m["name"], m["name"])) or table.get(m["name"])
        if option is None:
            return m[0]
        long = next(o for o in option.opts if o.startswith("--"))
        value = m["value"]
        if value == "True":
            return long
        if value == "False":
            negative = [o for o in option.secondary_opts if o.startswith("--")]
            return negative[0] if negative else f"--no-{long[2:]}"
        value = _cli_value(value)
        return f"{long} {value}" if value else long

    return _KEYWORD.sub(flag, message)


class FlagsFilter(logging.Filter):
    """A logging filter that words the library's log records for the command line (:func:`as_flags`).

    Parameters
    ----------
    command : click.Command, optional
        The command that runs; its options win.
    """

    def __init__(self, command: click.Command | None = None) -> None:
        super().__init__()
        self.command = command

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record``'s message (its arguments merged in) with flags; never drops a record."""
        message = record.getMessage()
        flagged = as_flags(message, self.command)
        if flagged != message:
            record.msg, record.args = flagged, ()
        return True
