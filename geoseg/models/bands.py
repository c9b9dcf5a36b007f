"""Which raster bands a model's named bands are: the ``--bands`` option and band descriptions.

A card names its input bands (``blue``, ``green``, ``red``, ``nir``, ...); a raster describes
its bands (``B04``, ``SR_B5``, ``Red``) or not at all. :func:`match_bands` pairs them, with
:data:`BAND_ALIASES` and the user's ``--bands`` mapping (:func:`parse_band_option`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from geoseg.errors import ModelError

__all__ = ["BAND_ALIASES", "match_bands", "parse_band_option"]

#: band names and the descriptions that mean them (Sentinel-2 B02..B12, Landsat 8/9 Collection 2 SR_B2..SR_B7,
#: plain words). Bare Landsat numbers (B5 = nir on Landsat 8, red edge on Sentinel-2) are ambiguous: map them with
#: --bands instead.
BAND_ALIASES: dict[str, tuple[str, ...]] = {
    "coastal": ("coastal", "aerosol", "b01"),
    "blue": ("blue", "b", "b02", "sr_b2"),
    "green": ("green", "g", "b03", "sr_b3"),
    "red": ("red", "r", "b04", "sr_b4"),
    "rededge1": ("rededge1", "re1", "b05"),
    "rededge2": ("rededge2", "re2", "b06"),
    "rededge3": ("rededge3", "re3", "b07"),
    "nir": ("nir", "near infrared", "near-infrared", "b08", "b8a", "sr_b5"),
    "swir1": ("swir1", "swir 1", "swir16", "sr_b6"),
    "swir2": ("swir2", "swir 2", "swir22", "sr_b7"),
    "pan": ("pan", "panchromatic"),
}


def parse_band_option(value: str | None) -> tuple[tuple[int, ...] | None, dict[str, int]]:
    """Parse ``--bands``: ``3,2,1`` (indices in model order) or ``nir=4,red=3`` (names).

    Returns
    -------
    indices : tuple of int or None
    mapping : dict of str to int
    """
    if not value:
        return None, {}
    items = [v.strip() for v in value.split(",") if v.strip()]
    number = re.compile(r"[0-9]+")
    if all("=" in v for v in items):
        mapping: dict[str, int] = {}
        for v in items:
            k, _, b = (x.strip() for x in v.partition("="))
            if not k or not number.fullmatch(b) or int(b) < 1:
                raise ModelError(f"bands={value!r}: {v!r} must be NAME=BAND with a 1-based band number, e.g. nir=4")
            if k.lower() in mapping:
                raise ModelError(f"bands={value!r}: {k!r} is given twice")
            mapping[k.lower()] = int(b)
        return None, mapping
    if any("=" in v for v in items):
        raise ModelError(f"bands={value!r}: give 1-based band numbers (3,2,1) or NAME=BAND pairs (nir=4,red=3), not a mix")
    if all(number.fullmatch(v) and int(v) >= 1 for v in items):
        return tuple(int(v) for v in items), {}
    raise ModelError(f"bands={value!r}: band numbers start at 1, e.g. 3,2,1")


def match_bands(
    wanted: Sequence[str],
    descriptions: Sequence[str | None],
    mapping: Mapping[str, int] | None = None,
    origin: str = "raster",
) -> tuple[int, ...]:
    """Find the raster band (1-based) for each band name a model wants.

    Order of evidence: the user's ``name=band`` mapping, then band descriptions (with
    :data:`BAND_ALIASES`, e.g. ``B08`` is ``nir``), then, when the raster has exactly as
    many bands as the model wants and none is described, file order.

    Raises
    ------
    ModelError
        A wanted band cannot be found; the message lists the raster's bands and the fix.
    """
    mapping = {k.lower(): v for k, v in (mapping or {}).items()}
    unknown = sorted(set(mapping) - set(wanted))
    if unknown:
        raise ModelError(
            f"{origin}: band_map= names {', '.join(unknown)} are not bands of the model (it takes {', '.join(wanted)})"
        )
    count = len(descriptions)
    for k, b in mapping.items():
        if b > count:
            raise ModelError(f"{origin}: band_map={{{k!r}: {b}}} but the raster has {count} band(s)")
    desc = [(d or "").strip().lower() for d in descriptions]
    out = []
    for name in wanted:
        if name in mapping:
            out.append(mapping[name])
            continue
        aliases = BAND_ALIASES.get(name, (name,))
        hits = [i + 1 for i, d in enumerate(desc) if d and (d == name or d in aliases)]
        if hits:
            out.append(hits[0])
            continue
        if not any(desc) and count == len(wanted) and not mapping:
            _announce_order(wanted, origin)
            return tuple(range(1, count + 1))
        shown = ", ".join(f"{i + 1}={d or '?'}" for i, d in enumerate(desc))
        if count == 1 and set(wanted) <= {"red", "green", "blue"} and not mapping:
            raise ModelError(
                f"{origin}: one band (panchromatic?) but the model takes {', '.join(wanted)}; run it in pan mode with "
                f"band_map={{{', '.join(repr(b) + ': 1' for b in wanted)}}}"
            )
        raise ModelError(
            f"{origin}: the model needs band {name!r} (bands {', '.join(wanted)}) but no raster band is described as it "
            f"(bands: {shown}); map it with band_map={{'{name}': N}}"
        )
    return tuple(out)


#: rasters whose assumed band order was announced already (once per raster and order in a process)
_ANNOUNCED: set[tuple[str, tuple[str, ...]]] = set()


def _announce_order(wanted: Sequence[str], origin: str) -> None:
    """Say once, as one logging warning, that undescribed bands are taken in the model's order, and how to set them."""
    import logging

    if (origin, tuple(wanted)) in _ANNOUNCED:
        return
    _ANNOUNCED.add((origin, tuple(wanted)))
    order = ", ".join(f"{i}={name}" for i, name in enumerate(wanted, start=1))
    mapping = ", ".join(f"{name!r}: N" for name in wanted)
    logging.getLogger(__name__).warning(
        "%s: no band descriptions; assuming the model's band order %s; if that is wrong, give bands=(...) "
        "(band numbers in the model's order) or band_map={%s}",
        origin,
        order,
        mapping,
    )
