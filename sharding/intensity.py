"""Raw intensities -> uint8, the one rule every reader and the writer share.

Two rules, chosen by modality (compared case-insensitively):

* ``"ct"``: a fixed window. With ``level, width = cfg.ct_window``, ``lo = level - width / 2`` and
  ``hi = level + width / 2``, every value ``v`` maps to::

      floor((clip(v, lo, hi) - lo) * 255.0 / (hi - lo) + 0.5)

  computed in float64, left to right (``v`` cast to float64 first; multiply by 255 before dividing,
  so integer inputs such as HU give exact halves: 40 HU in [-160, 240] is 127.5 -> 128). NaN maps
  to 0.

* anything else (MR, PET, US, 16-bit PNGs...): percentile clipping. ``lo, hi`` are
  ``np.percentile`` (default linear interpolation, float64) of the whole array at
  ``cfg.mr_percentiles``, ignoring NaNs; then the same formula as above with those ``lo, hi``.
  When ``hi <= lo`` (a constant image) every pixel maps to 0. NaN maps to 0. An all-NaN array maps
  to zeros.

A uint8 array with a modality other than CT is returned as is (the same object): 2D corpora store
already-mapped 8-bit images. The percentiles are computed over every element, so a whole volume is
mapped with one ``lo, hi`` (slices of one case stay comparable).
"""

from __future__ import annotations

import numpy as np

from sharding.config import ShardingConfig
from sharding.format import CT_WINDOW, PERCENTILES

__all__ = [
    "intensity_record",
    "is_ct",
    "linear_uint8",
    "percentile_bounds",
    "percentile_to_uint8",
    "record_bounds",
    "to_uint8",
    "window_bounds",
    "window_to_uint8",
]

# elements converted per step: bounds the float64 temporaries (~32 MB) for large volumes
_CHUNK = 4 * 1024 * 1024


def is_ct(modality: str) -> bool:
    """True when ``modality`` names CT (case-insensitive, surrounding spaces ignored)."""
    return modality.strip().lower() == "ct"


def linear_uint8(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``floor((clip(v, lo, hi) - lo) * 255 / (hi - lo) + 0.5)`` as uint8; NaN -> 0."""
    out = np.zeros(image.shape, dtype=np.uint8)
    if not hi > lo:
        return out
    span = float(hi) - float(lo)
    flat_in = image.reshape(-1)
    flat_out = out.reshape(-1)
    for start in range(0, flat_in.size, _CHUNK):
        v = flat_in[start : start + _CHUNK].astype(np.float64)
        np.clip(v, lo, hi, out=v)
        v -= lo
        v *= 255.0
        v /= span
        v += 0.5
        np.floor(v, out=v)
        np.nan_to_num(v, copy=False, nan=0.0)
        flat_out[start : start + _CHUNK] = v.astype(np.uint8)
    return out


def window_to_uint8(image: np.ndarray, *, level: float, width: float) -> np.ndarray:
    """Map ``[level - width/2, level + width/2]`` linearly onto 0..255 (see module docstring).

    Arguments:
      image: any real array (e.g. HU), any shape.
      level, width: the window; width > 0.

    Returns:
      uint8 array of the same shape.
    """
    lo, hi = window_bounds(level, width)
    return linear_uint8(np.asarray(image), lo, hi)


def window_bounds(level: float, width: float) -> tuple[float, float]:
    """``(level - width / 2, level + width / 2)``; ``ValueError`` unless width > 0."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return float(level) - float(width) / 2.0, float(level) + float(width) / 2.0


def percentile_bounds(image: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """``(lo, hi)`` = percentiles of all non-NaN elements (linear interpolation), as floats.

    Returns ``(0.0, 0.0)`` for an empty or all-NaN array.
    """
    arr = np.asarray(image)
    if arr.size == 0:
        return 0.0, 0.0
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        arr = arr[~np.isnan(arr)]
        if arr.size == 0:
            return 0.0, 0.0
    lo, hi = np.percentile(arr, [float(percentiles[0]), float(percentiles[1])])
    return float(lo), float(hi)


def percentile_to_uint8(image: np.ndarray, *, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip to the given percentiles of ``image`` and map linearly onto 0..255.

    Arguments:
      image: any real array, any shape (all elements share one ``lo, hi``).
      percentiles: ``(low, high)`` in 0..100.

    Returns:
      uint8 array of the same shape.
    """
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    lo, hi = percentile_bounds(arr, (percentiles[0], percentiles[1]))
    return linear_uint8(arr, lo, hi)


def to_uint8(image: np.ndarray, *, modality: str, cfg: ShardingConfig) -> np.ndarray:
    """Raw intensities -> uint8 by the rule of the module docstring.

    Arguments:
      image: (H, W), (H, W, C) or (Z, H, W) array of raw intensities (HU for CT).
      modality: "ct" (any case) uses ``cfg.ct_window``; anything else ``cfg.mr_percentiles``.
      cfg: the sharding section.

    Returns:
      uint8 array of the same shape (``image`` itself for uint8 non-CT input).
    """
    arr = np.asarray(image)
    if is_ct(modality):
        level, width = cfg.ct_window
        return window_to_uint8(arr, level=level, width=width)
    if arr.dtype == np.uint8:
        return arr
    lo_p, hi_p = cfg.mr_percentiles
    return percentile_to_uint8(arr, percentiles=(lo_p, hi_p))


def intensity_record(image: np.ndarray, *, modality: str, cfg: ShardingConfig) -> dict:
    """The rule ``to_uint8`` applies to ``image``, as stored in a volume's attrs (``format.py``).

    Arguments:
      image: the whole volume's raw intensities.
      modality: as for ``to_uint8``.
      cfg: the sharding section.

    Returns:
      ``{"mapping": "ct_window", "level", "width"}``, or ``{"mapping": "percentiles",
      "percentiles", "lo", "hi"}`` with the bounds those percentiles give for ``image``.
    """
    if is_ct(modality):
        level, width = cfg.ct_window
        return {"mapping": CT_WINDOW, "level": float(level), "width": float(width)}
    lo, hi = percentile_bounds(image, (cfg.mr_percentiles[0], cfg.mr_percentiles[1]))
    return {
        "mapping": PERCENTILES,
        "percentiles": [float(p) for p in cfg.mr_percentiles],
        "lo": lo,
        "hi": hi,
    }


def record_bounds(record: dict) -> tuple[float, float]:
    """The ``lo, hi`` of an ``intensity_record``, for ``linear_uint8`` (a slice mapped with them
    equals the 2D sample of the same slice).

    Raises ``ValueError`` (``KeyError`` / ``TypeError`` for missing or mistyped fields) for
    anything ``intensity_record`` does not write.
    """
    mapping = record.get("mapping")
    if mapping == CT_WINDOW:
        return window_bounds(float(record["level"]), float(record["width"]))
    if mapping == PERCENTILES:
        return float(record["lo"]), float(record["hi"])
    raise ValueError(f"unknown mapping {mapping!r}")
