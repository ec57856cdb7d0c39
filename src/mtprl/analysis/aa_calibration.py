"""A/A calibration of a verdict method: how often it calls noise a difference, and how many runs a real one needs.

Given R runs of one configuration (each a `[questions]` row of per-question accuracies), any split of them into two
disjoint groups of n is an A/A comparison: no real difference, so every "better" or "worse" is a false positive.
`false_positive_rate` applies a method to many random splits and counts; the binomial interval (Clopper-Pearson,
`scipy.stats.binomtest`) is over the splits, which reuse the same R runs, so it is narrower than the rate's real
uncertainty; the synthetic tests (tests/test_verdicts.py) check the rate with independent experiments instead.

`power_table` turns the seed-to-seed spread of the run means into the runs per arm that Welch's t (the verdict of
`mtprl.core.stats.compare_arms`) needs to detect a given difference at a given power, by simulating the verdict on normal
run means (`welch_power`). The spread is an estimate from R runs, so the table also gives the runs needed at the
upper end of its chi-square interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from ..core.stats import LEVEL, compare_arms, question_seed_bootstrap

SPLIT_SEED = 0
RUNS_LIMIT = 256  # runs_needed answers None past this many runs per arm


def random_splits(n_runs: int, n: int, count: int, seed: int = SPLIT_SEED) -> list[tuple[list[int], list[int]]]:
    """`count` random splits of run indices 0..n_runs-1 into two disjoint groups of `n` (numpy `default_rng(seed)`,
    one `permutation(n_runs)` per split: its first n are group A, the next n group B)."""
    if 2 * n > n_runs:
        raise ValueError(f"random_splits: two groups of {n} need {2 * n} runs, have {n_runs}")
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(count):
        order = rng.permutation(n_runs)
        splits.append((sorted(order[:n].tolist()), sorted(order[n:2 * n].tolist())))
    return splits


def welch_verdict(a, b) -> str:
    """The verdict mtprl publishes (`compare_arms`)."""
    return compare_arms(a, b).verdict


def question_seed_bootstrap_verdict(a, b) -> str:
    """The old verdict (seeds and questions resampled, `stats.question_seed_bootstrap`), 1000 resamples."""
    return question_seed_bootstrap(a, b, resamples=1000).verdict


def question_bootstrap_verdict(a, b, resamples: int = 1000, seed: int = 0) -> str:
    """A deliberately broken method: the per-question mean difference resampled over questions only, so the
    run-to-run noise never enters (the interval of a method that treats the question as the unit)."""
    diff = np.asarray(a, dtype=np.float64).mean(axis=0) - np.asarray(b, dtype=np.float64).mean(axis=0)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return "better" if low > 0 else "worse" if high < 0 else "no detectable difference"


METHODS: dict[str, Callable] = {
    "welch_run_means": welch_verdict,
    "question_seed_bootstrap": question_seed_bootstrap_verdict,
    "question_bootstrap": question_bootstrap_verdict,
}


@dataclass(frozen=True)
class Rate:
    """Share of A/A splits called "better" or "worse", with its Clopper-Pearson interval over the splits."""

    positives: int
    splits: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        return self.positives / self.splits

    def as_dict(self) -> dict:
        return {"positives": self.positives, "splits": self.splits, "rate": self.rate, "low": self.low,
                "high": self.high}


def rate_of(positives: int, total: int) -> Rate:
    ci = scipy_stats.binomtest(positives, total).proportion_ci(confidence_level=0.95, method="exact")
    return Rate(positives, total, float(ci.low), float(ci.high))


def false_positive_rate(runs, n: int, *, splits: int = 1000, method: Callable = welch_verdict,
                        seed: int = SPLIT_SEED) -> Rate:
    """`runs` `[R, questions]` of one configuration; `method(a, b)` returns a verdict string."""
    runs = np.asarray(runs, dtype=np.float64)
    positives = sum(method(runs[a], runs[b]) != "no detectable difference"
                    for a, b in random_splits(len(runs), n, splits, seed))
    return rate_of(positives, splits)


def welch_power(effect: float, sd: float, n: int, level: float = LEVEL, draws: int = 20000, seed: int = 0) -> float:
    """Power of the verdict (Welch's t on run means, two-sided, `level`) to call `effect` with n runs per arm whose
    run means spread by `sd` (normal): the share of `draws` simulated comparisons whose interval excludes 0 on the
    right side. Simulated rather than the noncentral t with df = 2n - 2: Welch's df falls below 2n - 2 whenever
    the two samples' spreads differ, and at n = 3-5 that costs several points of power."""
    if n < 2:
        return 0.0
    rng = np.random.default_rng(seed)
    a = rng.normal(effect, sd, (draws, n))
    b = rng.normal(0.0, sd, (draws, n))
    va, vb = a.var(axis=1, ddof=1) / n, b.var(axis=1, ddof=1) / n
    df = (va + vb) ** 2 / (va ** 2 / (n - 1) + vb ** 2 / (n - 1))
    low = a.mean(axis=1) - b.mean(axis=1) - scipy_stats.t.ppf(0.5 + level / 2, df) * np.sqrt(va + vb)
    return float(np.mean(low > 0))


def runs_needed(effect: float, sd: float, power: float = 0.8, level: float = LEVEL,
                limit: int = RUNS_LIMIT) -> int | None:
    """The fewest runs per arm with `welch_power` >= `power` (None past `limit`): doubling, then bisection (the
    power grows with n)."""
    def enough(n):
        return welch_power(effect, sd, n, level) >= power

    low, high = 1, 2  # enough(low) is false (one run has no interval)
    while not enough(high):
        if high >= limit:
            return None
        low, high = high, min(2 * high, limit)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return high


def sd_upper(sd: float, runs: int, level: float = LEVEL) -> float:
    """Upper end of the chi-square interval of a standard deviation estimated from `runs` values."""
    df = runs - 1
    return float(sd * math.sqrt(df / scipy_stats.chi2.ppf((1 - level) / 2, df)))


def power_table(run_means, effects=(0.02, 0.03, 0.05), power: float = 0.8) -> dict:
    """Runs per arm needed for each effect (accuracy units), at the measured spread of `run_means` and at the upper
    end of its 95% interval."""
    run_means = np.asarray(run_means, dtype=np.float64)
    sd = float(run_means.std(ddof=1))
    upper = sd_upper(sd, len(run_means))
    return {"sd": sd, "sd_upper": upper, "runs": len(run_means), "power": power,
            "rows": [{"effect": e, "runs_needed": runs_needed(e, sd, power),
                      "runs_needed_at_sd_upper": runs_needed(e, upper, power)} for e in effects]}


def variance_components(runs, k: int) -> dict:
    """The run-level and evaluation (question-sampling) parts of the spread of run means: each run's mean carries
    evaluation noise of variance sum_q p_q (1 - p_q) / (k - 1) / Q^2 (k samples per question, unbiased); what the
    spread of run means has beyond it is the training run's own."""
    runs = np.asarray(runs, dtype=np.float64)
    q = runs.shape[1]
    eval_var = float(np.mean(np.sum(runs * (1 - runs), axis=1) / max(k - 1, 1) / q ** 2))
    total = float(runs.mean(axis=1).var(ddof=1))
    return {"run_mean_sd": math.sqrt(total), "evaluation_sd": math.sqrt(eval_var),
            "training_run_sd": math.sqrt(max(total - eval_var, 0.0))}
