"""Masks to map layers: polygonise per chunk, merge across seams, measure, reproject, write styled files."""

from __future__ import annotations

from typing import Any

__all__ = ["vectorize"]


def __getattr__(name: str) -> Any:
    if name == "vectorize":
        from geoseg.vector.run import vectorize

        return vectorize
    raise AttributeError(f"module 'geoseg.vector' has no attribute {name!r}")
