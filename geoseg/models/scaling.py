"""How raw band values become model inputs: a card's ``scaling``, checked, resolved per raster, applied per tile."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from geoseg.errors import ModelError

__all__ = ["SCALING_METHODS", "Scaling"]

SCALING_METHODS = ("none", "divide", "meanstd", "minmax", "percentile", "reflectance")


@dataclass(frozen=True)
class Scaling:
    """How raw band values become model inputs.

    ``none``; ``divide`` by ``value``; ``meanstd`` ``(x - mean) / std`` per band;
    ``minmax`` ``(x - low) / (high - low)`` per band, clipped to [0, 1] unless ``clip`` is
    false (bright targets above ``high`` keep their contrast); ``percentile``:
    like ``minmax`` with ``low``/``high`` as percentiles of the whole raster, turned into
    values once before any tile runs (per-tile statistics would put seams into the result);
    ``reflectance``: surface reflectance (0-1), optionally ``(reflectance - mean) / std``,
    whatever convention the raster stores it in (:mod:`geoseg.io.radiometry` finds it per
    raster; resolved into ``meanstd`` on raw values before any tile runs); with
    ``dark_percentile`` each band's darkest reflectance over the whole raster (that
    percentile: water, shadow) is subtracted first (dark-object subtraction: haze and sun
    glint that lift a whole scene are taken out, and the storage offset cancels).
    """

    method: str = "none"
    value: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    clip: bool = True
    dark_percentile: float | None = None

    def validate(self, n_bands: int | None, origin: str) -> None:
        """Raise :class:`ModelError` (naming ``origin``) if the parameters do not fit the method."""
        m = self.method
        if m not in SCALING_METHODS:
            raise ModelError(f"{origin}: scaling method {m!r} is unknown; use one of {', '.join(SCALING_METHODS)}")
        need = {"divide": ("value",), "meanstd": ("mean", "std"), "minmax": ("low", "high"), "percentile": ("low", "high")}
        for key in need.get(m, ()):
            if getattr(self, key) is None:
                raise ModelError(f"{origin}: scaling {m!r} needs {key!r}")
        if m == "divide" and not self.value:
            raise ModelError(f"{origin}: scaling 'divide' needs a non-zero value")
        values = [self.value] if self.value is not None else []
        for key in ("mean", "std", "low", "high"):
            values += list(getattr(self, key) or ())
        if not all(np.isfinite(values)):
            raise ModelError(f"{origin}: scaling values must be finite numbers")
        # inputs reach the model as float32: a factor past its range makes every pixel inf or 0
        big = float(np.finfo(np.float32).max)
        tiny = float(np.finfo(np.float32).tiny)
        if any(abs(v) > big for v in values):
            raise ModelError(f"{origin}: scaling values must lie within float32's range (|v| <= {big:.3g}); fix the card")
        divisors = [self.value] if m == "divide" else list(self.std or ()) if m in ("meanstd", "reflectance") else []
        if m == "minmax" and self.low and self.high and (len(self.low) == len(self.high) or 1 in (len(self.low), len(self.high))):
            lo_, hi_ = np.broadcast_arrays(np.asarray(self.low, np.float64), np.asarray(self.high, np.float64))
            divisors += [float(d) for d in hi_ - lo_]
        if any(d is not None and 0 < abs(d) < tiny for d in divisors):
            raise ModelError(
                f"{origin}: scaling divides by {min(abs(d) for d in divisors if d):.3g}, which overflows float32 "
                f"(divisors must be at least {tiny:.3g}); fix the card's scaling"
            )
        used = {
            "none": (),
            "divide": ("value",),
            "meanstd": ("mean", "std"),
            "minmax": ("low", "high"),
            "percentile": ("low", "high"),
            "reflectance": ("mean", "std"),
        }
        used["reflectance"] = ("mean", "std", "dark_percentile")
        keys = ("value", "mean", "std", "low", "high", "dark_percentile")
        extra = [k for k in keys if getattr(self, k) is not None and k not in used[m]]
        if extra:
            raise ModelError(f"{origin}: scaling {m!r} does not use {', '.join(extra)}; give the method that does")
        if m in ("minmax", "percentile"):
            if len(self.low) != len(self.high) and 1 not in (len(self.low), len(self.high)):
                raise ModelError(f"{origin}: scaling low and high need the same number of values")
            lo, hi = np.broadcast_arrays(np.asarray(self.low), np.asarray(self.high))
            if not np.all(hi > lo):
                raise ModelError(f"{origin}: scaling needs high > low for every band")
        for key in ("mean", "std", "low", "high"):
            v = getattr(self, key)
            if v is not None and n_bands is not None and len(v) not in (1, n_bands):
                raise ModelError(f"{origin}: scaling {key} has {len(v)} values for {n_bands} bands; give one or one per band")
        dp = self.dark_percentile
        if dp is not None and not (isinstance(dp, (int, float)) and 0 <= dp <= 50):
            raise ModelError(f"{origin}: scaling dark_percentile must be a percentile from 0 to 50, got {dp!r}")
        if m == "reflectance" and (self.mean is None) != (self.std is None):
            raise ModelError(f"{origin}: scaling 'reflectance' takes both mean and std (of reflectance), or neither")
        if m in ("meanstd", "reflectance") and any(s <= 0 for s in self.std or ()):
            raise ModelError(f"{origin}: scaling std must be positive")
        if m == "percentile" and not (min(self.low or (0,)) >= 0 and max(self.high or (100,)) <= 100):
            raise ModelError(f"{origin}: percentile scaling needs 0 <= low < high <= 100")

    def resolve(self, percentiles: Any = None, radiometry: Any = None, n_bands: int = 1) -> Scaling:
        """The scaling one raster's tiles get: no method left that needs the whole raster.

        ``percentile`` becomes ``minmax`` with values from ``percentiles(low, high)`` (two
        per-band arrays computed on the whole raster). ``reflectance`` becomes ``meanstd`` on
        the raw values: with the raster's ``radiometry`` (``reflectance = value * scale +
        offset``, a :class:`geoseg.io.radiometry.Radiometry`) and the card's ``mean``/``std``,
        ``(value * scale + offset - mean) / std = (value - (mean - offset) / scale) / (std / scale)``.
        """
        if self.method == "reflectance":
            if radiometry is None:
                raise ModelError("reflectance scaling needs the raster's radiometry resolved first; this is a geoseg bug")
            scale, offset = radiometry.per_band(n_bands)
            mean = np.broadcast_to(np.asarray(self.mean or (0.0,), np.float64), (n_bands,))
            std = np.broadcast_to(np.asarray(self.std or (1.0,), np.float64), (n_bands,))
            if self.dark_percentile is not None:  # (value - dark) x scale: the storage offset cancels
                if percentiles is None:
                    raise ModelError("dark-object subtraction needs the raster's percentiles; this is a geoseg bug")
                dark, _ = percentiles((self.dark_percentile,), (self.dark_percentile,))
                raw_mean = np.asarray(dark, np.float64) + mean / scale
            else:
                raw_mean = (mean - offset) / scale
            return Scaling(
                "meanstd",
                mean=tuple(float(v) for v in raw_mean),
                std=tuple(float(v) for v in std / np.abs(scale)),
            )
        if self.method != "percentile":
            return self
        lo, hi = percentiles(self.low, self.high)
        hi = np.where(np.asarray(hi) > np.asarray(lo), hi, np.asarray(lo) + 1.0)
        return Scaling("minmax", low=tuple(float(v) for v in lo), high=tuple(float(v) for v in hi), clip=self.clip)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scale a float32 ``(bands, h, w)`` or ``(n, bands, h, w)`` array (bands on axis -3)."""
        m = self.method
        if m == "none":
            return x

        # float64 inputs (or parameters beyond float32's range, e.g. resolved percentiles of float64
        # data) are scaled in float64; values that do not fit float32 afterwards come back as +-inf
        # (never silently wrapped) for the caller to count and mask
        params = [self.value or 0.0, *(self.mean or ()), *(self.std or ()), *(self.low or ()), *(self.high or ())]
        wide = x.dtype == np.float64 or any(abs(v) > 1e30 or 0 < abs(v) < 1e-30 for v in params)
        dt = np.float64 if wide else np.float32

        def per_band(v: tuple[float, ...]) -> np.ndarray:
            return np.asarray(v, dt).reshape(-1, 1, 1)

        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            x = x.astype(dt, copy=False)
            if m == "divide":
                y = x / dt(self.value)
            elif m == "meanstd":
                y = (x - per_band(self.mean)) / per_band(self.std)
            elif m == "minmax":
                lo, hi = per_band(self.low), per_band(self.high)
                y = (x - lo) / (hi - lo)
                y = np.clip(y, 0.0, 1.0) if self.clip else y
            else:
                raise ModelError(f"{m} scaling must be resolved for the raster before tiles run; this is a geoseg bug")
            return y.astype(np.float32, copy=False)
