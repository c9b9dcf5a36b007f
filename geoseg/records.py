"""Typed reports that read like the JSON record they wrote.

Functions that write outputs (vectorize, change) return a report object holding the record
they also wrote as JSON for users (``vectors.json``, ``run.json``) plus what only memory
holds (areas, the nested reports of their steps, the files written). Callers pass the
object on instead of reading the files back. Pure: no geoseg imports, no third-party imports.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["Record", "hectares_text"]


class Record(Mapping[str, Any]):
    """Base of a report: indexable like its JSON ``record`` (``report["layers"]``), read-only.

    Subclasses are frozen dataclasses (``eq=False``: a report equals a mapping with the same
    items, as :class:`~collections.abc.Mapping` compares) whose first field is ``record`` (a dict).
    """

    record: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)


def hectares_text(value: float) -> str:
    """Hectares as people read them in logs and tables: two decimals, thousands separated (``10,489.95``).

    JSON records keep the full value; only what is printed is rounded.
    """
    return f"{value:,.2f}"
