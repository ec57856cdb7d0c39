"""Statistics: paired bootstrap intervals over questions and seeds (a difference told from noise), correlations
(Pearson, Spearman), quantiles, mean and standard deviation. The report and the benchmarks use these.

Paired bootstrap intervals over questions and seeds.

Two arms are evaluated on the same held-out questions with the same seeds, so the comparison is paired:
D[s, q] = accuracy of the arm on question q with seed s minus the baseline's (each an average over k samples).
The bootstrap resamples seeds and questions with replacement (two levels: both are sources of noise) and takes
the mean of D over the resampled grid; the 2.5% and 97.5% percentiles of those means are the 95% interval.
Protocol, so anyone can reproduce an interval exactly: numpy `default_rng(seed)`; per resample first
`integers(0, S, S)` (seeds) then `integers(0, Q, Q)` (questions).
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

import numpy as np

BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0


class PairedDifference(NamedTuple):
    mean: float  # mean of D over all seeds and questions (= difference of the arms' mean accuracies)
    low: float  # 2.5% bootstrap percentile
    high: float  # 97.5% bootstrap percentile
    seeds: int
    questions: int

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


def verdict(low: float, high: float) -> str:
    """Words for a 95% interval of arm - baseline."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no detectable difference"


def paired_bootstrap(arm, baseline, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     level: float = 0.95) -> PairedDifference:
    """95% interval of mean(arm - baseline) from per-seed, per-question accuracies `[S, Q]` (same seeds in the
    same order, same questions in the same order)."""
    arm, baseline = np.asarray(arm, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if arm.shape != baseline.shape or arm.ndim != 2 or 0 in arm.shape:
        raise ValueError(f"paired_bootstrap needs two [seeds, questions] arrays of one shape, got {arm.shape} and "
                         f"{baseline.shape}")
    diff = arm - baseline
    n_seeds, n_questions = diff.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for b in range(resamples):
        s = rng.integers(0, n_seeds, n_seeds)
        q = rng.integers(0, n_questions, n_questions)
        means[b] = diff[np.ix_(s, q)].mean()
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), n_seeds, n_questions)


def pearson_r(xs, ys) -> float:
    """Pearson correlation; nan when fewer than 2 points or a constant series."""
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"pearson_r needs equal lengths, got {n} and {len(ys)}")
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def _ranks(xs) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_r(xs, ys) -> float:
    """Spearman rank correlation (Pearson r of the ranks, ties averaged)."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman_r needs equal lengths, got {len(xs)} and {len(ys)}")
    return pearson_r(_ranks(list(xs)), _ranks(list(ys)))


def quantile(values, q) -> float:
    """Linear-interpolation quantile (numpy's default); nan for no values."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
