"""Percentiles and per-round summaries (pure Python, no numpy needed)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks.

    The same definition as numpy's default (``method="linear"``), so figures compare with
    other tools' output.

    Raises:
        ValueError: when ``values`` is empty or ``q`` is outside 0..100.
    """
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be within 0..100, got {q}")
    position = (len(data) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return data[low]
    return data[low] + (data[high] - data[low]) * (position - low)


def intervals(stamps: Sequence[float]) -> list[float]:
    """Differences between consecutive timestamps (``len(stamps) - 1`` of them)."""
    return [b - a for a, b in itertools.pairwise(stamps)]


def summarize_rounds(rounds: Sequence[Sequence[float]], scale: float = 1.0) -> dict[str, float]:
    """p50 and p99 of repeated rounds of samples, in ``scale`` units.

    ``p50`` is the median of the rounds' medians (one noisy round on a shared machine moves
    it little); ``p99`` pools every sample, because a round holds too few samples for its
    own 99th percentile to mean anything. ``mean`` and ``n`` are over the pooled samples.

    Raises:
        ValueError: when there is no sample at all.
    """
    pooled = [v for r in rounds for v in r]
    if not pooled:
        raise ValueError("no samples")
    medians = [percentile(r, 50) for r in rounds if r]
    return {
        "p50": statistics.median(medians) * scale,
        "p99": percentile(pooled, 99) * scale,
        "mean": statistics.fmean(pooled) * scale,
        "n": float(len(pooled)),
        "rounds": float(len(medians)),
    }


__all__ = ["intervals", "percentile", "summarize_rounds"]
