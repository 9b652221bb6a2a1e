"""Spread of timed rounds and of ratios between providers timed in the same rounds.

A benchmark row keeps its per-round times (``round_s``). Rows measured together are
*interleaved*: every round runs each provider once (in rotating order), so round i of one
provider and round i of another saw the same machine state. A ratio between two such rows is
taken per round and then summarised (``paired_ratio``): machine-wide slow phases cancel
instead of moving one side of the ratio. Rows from different runs fall back to the ratio of
medians, with the interval their quartiles allow (``ratio_interval``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

NOISY_SPREAD = 0.10  # IQR / median above this marks a row as noisy


def quartiles(data: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3) of ``data`` (inclusive method; one value gives that value thrice)."""
    if not data:
        raise ValueError("quartiles of an empty sequence")
    if len(data) == 1:
        return data[0], data[0], data[0]
    q1, med, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return q1, med, q3


def summarize(round_s: Sequence[float], iterations: int = 1) -> dict[str, Any]:
    """pytest-benchmark-shaped ``stats`` of per-call round times in seconds."""
    q1, med, q3 = quartiles(round_s)
    return {
        "median": med,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": min(round_s),
        "max": max(round_s),
        "mean": statistics.fmean(round_s),
        "stddev": statistics.stdev(round_s) if len(round_s) > 1 else 0.0,
        "rounds": len(round_s),
        "iterations": iterations,
    }


def relative_spread(stats: dict[str, Any]) -> float | None:
    """IQR / median of a stats dict, or None when it lacks the quartiles."""
    med, iqr = stats.get("median"), stats.get("iqr")
    if iqr is None and stats.get("q1") is not None and stats.get("q3") is not None:
        iqr = stats["q3"] - stats["q1"]
    if not med or iqr is None or med <= 0:
        return None
    return float(iqr) / float(med)


def is_noisy(spread: float | None, threshold: float = NOISY_SPREAD) -> bool:
    return spread is not None and spread > threshold


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float] | None:
    """(q1, median, q3) of ``num[i] / den[i]`` over rounds timed together; None when the two
    lists cannot be paired (different lengths, empty, a zero time)."""
    if not num or len(num) != len(den) or any(d <= 0 for d in den):
        return None
    return quartiles([a / b for a, b in zip(num, den, strict=True)])


def ratio_interval(num: dict[str, Any], den: dict[str, Any]) -> tuple[float, float] | None:
    """The (low, high) range of num/den that the two rows' quartiles allow (unpaired rows)."""
    try:
        lo, hi = num["q1"] / den["q3"], num["q3"] / den["q1"]
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None
