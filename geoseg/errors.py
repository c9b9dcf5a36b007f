"""Exceptions and warnings raised by geoseg.

Every error derives from :class:`GeosegError` and also from the built-in exception that
matches its meaning, so ``except ValueError`` or ``except OSError`` keeps working for
callers who do not know geoseg. Messages say what went wrong *and* how to fix it.
"""

from __future__ import annotations

__all__ = [
    "DeviceError",
    "DiskFullError",
    "GeosegError",
    "InputError",
    "ModelError",
    "NotGeoreferencedWarning",
    "OutputError",
    "OutputExistsError",
    "RasterReadError",
]


class GeosegError(Exception):
    """Root of all geoseg errors."""


class InputError(GeosegError, ValueError):
    """An input (raster, AOI, option value) cannot be used as given."""


class RasterReadError(GeosegError, OSError):
    """A raster could not be opened or a window of it could not be read."""


class OutputExistsError(GeosegError, FileExistsError):
    """An output already exists and ``overwrite`` was not asked for."""


class OutputError(GeosegError, OSError):
    """An output could not be written."""


class DiskFullError(OutputError):
    """An output could not be written because the disk (or the file size limit or quota) is full.

    ``reason`` is the cause in the operating system's words (``No space left on device``,
    ``File too large``, ...), when known; :func:`geoseg.io.outdir.disk_full_error` sets it.
    """

    reason: str | None = None


class ModelError(GeosegError, ValueError):
    """A model could not be loaded, or does not fit the input it was given."""


class DeviceError(GeosegError, RuntimeError):
    """The requested compute device is not available (never silently replaced)."""


class NotGeoreferencedWarning(UserWarning):
    """The input has no CRS or geotransform; outputs are in pixel coordinates."""


_warned_not_georeferenced = False


def warn_not_georeferenced(path: str) -> None:
    """Say once per process that outputs are in pixel coordinates (a plain image: no CRS)."""
    global _warned_not_georeferenced
    if _warned_not_georeferenced:
        return
    _warned_not_georeferenced = True
    import warnings

    warnings.warn(
        f"{path} is not georeferenced: geoseg works in pixel coordinates (outputs have no CRS)",
        NotGeoreferencedWarning,
        stacklevel=3,
    )
