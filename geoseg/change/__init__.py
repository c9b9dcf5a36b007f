"""Change detection between two dates: align, segment both, code the transitions, map them (see :mod:`geoseg.change.run`)."""

from __future__ import annotations

from geoseg.change.areas import hectares
from geoseg.change.codes import Transition, transitions
from geoseg.change.run import ChangeReport, change, format_change

__all__ = ["ChangeReport", "Transition", "change", "format_change", "hectares", "transitions"]
