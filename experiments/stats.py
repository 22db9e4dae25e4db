"""Statistics over replicates (seeds): summaries and paired differences with 95% intervals.

Values that are missing (None) or not finite (NaN, inf) are left out everywhere; ``n`` always
counts the values (or pairs) that were used.
"""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Sequence

from scipy import stats as scipy_stats


def _finite(value) -> float | None:
    """``value`` as a float, or None when it is missing or not a finite number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def summarize(values: Iterable) -> dict:
    """Mean and sample standard deviation of the finite values.

    Returns ``{"mean", "std", "n"}``: ``mean`` is the arithmetic mean, ``std`` the sample standard
    deviation (ddof=1, the spread of one replicate around the mean, not the standard error of the
    mean), 0.0 when there is a single value; ``n`` the number of finite values used (None and NaN
    are left out). With no finite value: ``{"mean": None, "std": None, "n": 0}``."""
    kept = [v for v in (_finite(x) for x in values) if v is not None]
    if not kept:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(kept), "std": statistics.stdev(kept) if len(kept) > 1 else 0.0, "n": len(kept)}


def paired_difference(a: Sequence, b: Sequence) -> dict:
    """The paired differences ``a[i] - b[i]`` (pairs matched by position; a pair is used only when
    both values are finite) and a Student-t 95% confidence interval of their mean.

    Returns ``{"mean", "std", "n", "ci95": [lo, hi], "significant"}``: ``mean`` is the mean
    difference, ``std`` the sample standard deviation of the differences (ddof=1; 0.0 for one
    pair), ``n`` the number of pairs used; ``ci95`` is ``mean -/+ t(0.975, n-1) * std / sqrt(n)``
    (t: Student's t quantile with n-1 degrees of freedom, ``scipy.stats.t.ppf``), the 95% interval
    of the mean difference under the usual assumption of independent, roughly normal differences.
    ``significant`` is True when that interval excludes 0 (a two-sided paired t-test at the 5%
    level). Differences that are all the same (std 0) give a zero-width interval at their mean:
    significant unless that mean is 0. With fewer than 2 pairs there is no interval: ``ci95`` is ``[None, None]`` and
    ``significant`` False; with none, ``mean`` and ``std`` are None too."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values against {len(b)}; pairs need the same length")
    diffs = []
    for x, y in zip(a, b):
        x, y = _finite(x), _finite(y)
        if x is not None and y is not None:
            diffs.append(x - y)
    summary = summarize(diffs)
    n = summary["n"]
    if n < 2:
        return {**summary, "ci95": [None, None], "significant": False}
    half = float(scipy_stats.t.ppf(0.975, n - 1)) * summary["std"] / math.sqrt(n)
    lo, hi = summary["mean"] - half, summary["mean"] + half
    return {**summary, "ci95": [lo, hi], "significant": bool(lo > 0.0 or hi < 0.0)}


__all__ = ["summarize", "paired_difference"]
