"""Fidelity and latency numbers, on plain numpy arrays.

Fidelity is measured on the uint8 images process() returns (what a user gets), against the fp32 reference of the
same weights: PSNR (inf for identical images), max and mean absolute error. Latency summaries follow the
hackathon's script, which drops the first call as warm-up; percentiles use numpy's linear interpolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PIXEL_MAX = 255.0


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _pair(a, b)
    return float(np.mean((a - b) ** 2))


def psnr_from_mse(value: float) -> float:
    return math.inf if value == 0.0 else 10.0 * math.log10(PIXEL_MAX ** 2 / value)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; math.inf when they are identical."""
    return psnr_from_mse(mse(a, b))


def max_abs_error(a: np.ndarray, b: np.ndarray) -> int:
    a, b = _pair(a, b)
    return int(np.max(np.abs(a - b)))


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    a, b = _pair(a, b)
    return float(np.mean(np.abs(a - b)))


@dataclass(frozen=True)
class Fidelity:
    psnr_db: float
    mse: float
    max_abs_error: int
    mean_abs_error: float


def compare(result: np.ndarray, reference: np.ndarray) -> Fidelity:
    m = mse(result, reference)
    return Fidelity(psnr_db=psnr_from_mse(m), mse=m, max_abs_error=max_abs_error(result, reference),
                    mean_abs_error=mean_abs_error(result, reference))


@dataclass(frozen=True)
class LatencySummary:
    """Over the timed calls (warm-up excluded). All None when nothing was timed."""

    count: int
    mean_ms: "float | None"
    median_ms: "float | None"
    p90_ms: "float | None"
    min_ms: "float | None"
    max_ms: "float | None"


def summarize_latency(latencies_ms) -> LatencySummary:
    values = np.asarray(list(latencies_ms), dtype=np.float64)
    if values.size == 0:
        return LatencySummary(0, None, None, None, None, None)
    return LatencySummary(count=int(values.size), mean_ms=float(values.mean()), median_ms=float(np.median(values)),
                          p90_ms=float(np.percentile(values, 90)), min_ms=float(values.min()),
                          max_ms=float(values.max()))
