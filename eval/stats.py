"""Confidence intervals of the benchmark: the Student-t interval of a mean over seeds, and of the
seed-by-seed (paired) difference of two methods.

Within a seed of experiments/benchmark.py every method starts from the same base and is evaluated
on the same noise and conditions, so the difference of two methods' values at one seed removes
what the seed's base and evaluation noise add to both; its mean over seeds, with the interval
mean +- t_{n-1, (1 + level) / 2} sd / sqrt(n), is what the verdict reads.
"""

import math

import numpy as np
from scipy import stats as _stats


def _finite(values):
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def t_interval(values, level=0.95):
    """dict(n, mean, sd, half, lo, hi) of the finite ``values``: the Student-t interval of their
    mean at ``level`` (sd with n - 1). With one value the interval is None; with none, everything
    but n is None."""
    v = np.asarray(_finite(values), dtype=np.float64)
    n = len(v)
    out = dict(n=n, mean=None, sd=None, half=None, lo=None, hi=None)
    if n == 0:
        return out
    out["mean"] = float(v.mean())
    if n < 2:
        return out
    sd = float(v.std(ddof=1))
    half = float(_stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))
    return dict(out, sd=sd, half=half, lo=out["mean"] - half, hi=out["mean"] + half)


def paired(a, b, level=0.95):
    """The differences a[i] - b[i] of the pairs (seeds) where both are finite, with their
    t-interval: dict(t_interval(...), values=[...])."""
    d = [x - y for x, y in zip(a, b) if _finite([x]) and _finite([y])]
    return dict(t_interval(d, level), values=d)


def verdict(ci, higher_is_better=True):
    """'better' / 'worse' when the interval excludes 0 on that side, 'not separable' when it
    holds 0, None without an interval."""
    if ci.get("lo") is None:
        return None
    if ci["lo"] > 0:
        return "better" if higher_is_better else "worse"
    if ci["hi"] < 0:
        return "worse" if higher_is_better else "better"
    return "not separable"
