"""Ground-truth-free threshold calibration: Otsu's level of the CAM values, and the CAM power that
maps it onto a reference threshold (pure numpy).

IRN's constants (CAM background 0.15, conf_fg 0.30, conf_bg 0.05, label background 0.25)
were tuned on ImageNet-initialised CAMs. CAMs of another backbone or dataset are sharper
or more diffuse, and the same constants then cut in the wrong place. `relative` mode
estimates where a set of CAMs separates foreground from background (Otsu's threshold of
the per-pixel max CAM over all images) and raises the CAMs to the power γ that moves
that level onto the reference (γ = ln(reference) / ln(otsu)); every constant then
applies to CAM^γ. Monotone, so the per-pixel argmax over classes is unchanged.
"""

from __future__ import annotations

import math

import numpy as np

HISTOGRAM_BINS = 256


def value_histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Counts of `values` (clipped to [0, 1]) in `bins` equal bins; int64 (bins,)."""
    clipped = np.clip(np.asarray(values, dtype=np.float64).ravel(), 0.0, 1.0)
    return np.bincount(np.minimum((clipped * bins).astype(np.int64), bins - 1), minlength=bins).astype(np.int64)


def otsu_threshold(histogram: np.ndarray) -> float:
    """Otsu's threshold of a histogram over [0, 1] with equal bins: the level (a bin edge) that
    maximises the between-class variance. Returns a value in (0, 1)."""
    counts = np.asarray(histogram, dtype=np.float64)
    bins = counts.size
    centres = (np.arange(bins) + 0.5) / bins
    total = counts.sum()
    if total == 0:
        raise ValueError("empty histogram")
    weight_low = np.cumsum(counts)[:-1] / total  # class below edge k+1
    mean_low_sum = np.cumsum(counts * centres)[:-1] / total
    mean_all = (counts * centres).sum() / total
    weight_high = 1.0 - weight_low
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * weight_low - mean_low_sum) ** 2 / (weight_low * weight_high)
    between = np.nan_to_num(between, nan=-1.0)
    return float((np.argmax(between) + 1) / bins)


def relative_power(otsu: float, reference: float) -> float:
    """γ with otsu**γ == reference (both in (0, 1))."""
    if not (0.0 < otsu < 1.0 and 0.0 < reference < 1.0):
        raise ValueError(f"levels must lie in (0, 1): otsu {otsu}, reference {reference}")
    return math.log(reference) / math.log(otsu)
