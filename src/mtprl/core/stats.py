"""Statistics: the verdict behind every "better / worse" (`compare_arms`), correlations (Pearson, Spearman),
quantiles, mean and standard deviation. The report, `mtprl compare`, the probe and the scripts use these.

Verdicts: the training run is the unit of replication.
An RL comparison's dominant noise is the training run: two runs of one configuration that differ only in their seed
end up several points apart (reports/calibration: the seed-to-seed spread of the demo's Detach arm), far more than
the held-out questions' sampling noise. `compare_arms` therefore reduces each run to one number, its mean accuracy
over the shared questions (and their k samples), and puts Welch's t interval (`scipy.stats.ttest_ind`,
`equal_var=False`) on the difference of the two arms' run means. The question-level noise is reported beside it as
its own component (`question_se`: the standard error that resampling questions alone would give, which is what an
interval that treats the question as the unit measures). The arms' runs are not paired: two runs of two arms with
one seed share only their start, not their random numbers, so a pairing would add nothing but a wrong df.

Calibration (reports/calibration, `mtprl.analysis.aa_calibration`): on 1000 A/A splits of 16 runs of one configuration the
share of "better"/"worse" stays at or below 5% at 2, 3 and 5 runs per arm. The old interval
(`question_seed_bootstrap`, seeds and questions resampled) held its level on those runs too, but not where a run
shifts an arm as a whole (`scripts/synthetic_aa.py`: 18% of A/A experiments called a difference at 2 seeds), nor
on arms whose runs spread more than that configuration's; the run-as-unit interval does not depend on either.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95


def verdict(low: float, high: float) -> str:
    """Words for an interval of arm - baseline."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no detectable difference"


@dataclass(frozen=True)
class ArmComparison:
    """arm - baseline, with the training run as the unit (`compare_arms`)."""

    mean: float  # difference of the arms' mean accuracies (each arm: the mean of its runs' means)
    low: float  # Welch's t interval at `level` (infinite where fewer than 2 runs in an arm)
    high: float
    runs: tuple[int, int]  # runs of the arm, runs of the baseline
    questions: int
    se: float  # standard error of `mean` from the run-to-run spread (what the interval uses)
    df: float  # Welch-Satterthwaite degrees of freedom (nan where undefined)
    question_se: float  # the question-level component: the standard error resampling questions alone would give
    run_sd: tuple[float, float]  # standard deviation of the run means, per arm (nan for one run)
    level: float = LEVEL

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    @property
    def seeds(self) -> int:
        """The smaller arm's run count (what limits the interval)."""
        return min(self.runs)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "runs": list(self.runs),
                "questions": self.questions, "se": self.se, "df": self.df, "question_se": self.question_se,
                "run_sd": list(self.run_sd), "level": self.level, "verdict": self.verdict,
                "method": "welch_t_on_run_means"}


def _runs_by_items(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]  # one number per run
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"compare_arms: {name} must be a [runs, questions] array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"compare_arms: {name} holds non-finite values")
    return values


def _question_se(per_question: np.ndarray) -> float:
    """Standard error of the mean over questions of a per-question difference: what resampling questions alone
    would give."""
    return float(per_question.std(ddof=1) / math.sqrt(len(per_question))) if len(per_question) > 1 else float("nan")


def welch_interval(arm_means, base_means, level: float = LEVEL) -> tuple[float, float, float, float]:
    """(difference, low, high, df) of Welch's t interval on two samples of run means (`scipy.stats.ttest_ind`,
    `equal_var=False`); an infinite interval where an arm has fewer than 2 runs; a point interval where both arms'
    runs agree exactly (no spread to scale)."""
    a, b = np.asarray(arm_means, dtype=np.float64), np.asarray(base_means, dtype=np.float64)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, -math.inf, math.inf, float("nan")
    if a.var() == 0 and b.var() == 0:
        return diff, diff, diff, float("nan")
    result = scipy_stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence_level=level)
    return diff, float(ci.low), float(ci.high), float(result.df)


def compare_arms(arm, baseline, *, level: float = LEVEL) -> ArmComparison:
    """arm - baseline from `[runs, questions]` accuracies (each run one training run, each entry that run's average
    over its k samples of one held-out question; both arms on the same questions, run counts may differ; a 1-D
    array is one number per run). The interval is Welch's t on the run means (SPEC §12); `question_se` is the
    question-level noise of the same difference, reported beside it."""
    arm, baseline = _runs_by_items(arm, "arm"), _runs_by_items(baseline, "baseline")
    if arm.shape[1] != baseline.shape[1]:
        raise ValueError(f"compare_arms: the arms must share their questions, got {arm.shape[1]} and "
                         f"{baseline.shape[1]} per run")
    arm_means, base_means = arm.mean(axis=1), baseline.mean(axis=1)
    diff, low, high, df = welch_interval(arm_means, base_means, level)
    sd = tuple(float(m.std(ddof=1)) if len(m) > 1 else float("nan") for m in (arm_means, base_means))
    se = math.sqrt(sd[0] ** 2 / len(arm_means) + sd[1] ** 2 / len(base_means)) if min(map(len, (arm_means,
                                                                                                  base_means))) > 1 else math.inf
    question_se = _question_se(arm.mean(axis=0) - baseline.mean(axis=0))
    return ArmComparison(diff, low, high, (arm.shape[0], baseline.shape[0]), arm.shape[1], se, df, question_se, sd,
                         level)


def compare_to_reference(arm, reference, k: int, *, level: float = LEVEL) -> ArmComparison:
    """arm - a fixed model evaluated once (the starting model every run begins from): `arm` `[runs, questions]`,
    `reference` `[questions]` (its average over k samples per question). `compare_summary_to_reference` on the
    arm's run means, with the question-level part filled in."""
    arm = _runs_by_items(arm, "arm")
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    if ref.shape[0] != arm.shape[1]:
        raise ValueError(f"compare_to_reference: {ref.shape[0]} reference questions, {arm.shape[1]} per run")
    means = arm.mean(axis=1)
    sd = float(means.std(ddof=1)) if len(means) > 1 else float("nan")
    result = compare_summary_to_reference((float(means.mean()), sd, len(means)), ref, k, level=level)
    return dataclasses.replace(result, question_se=_question_se(arm.mean(axis=0) - ref))


def compare_summary_to_reference(arm: tuple[float, float, int], reference, k: int, *,
                                 level: float = LEVEL) -> ArmComparison:
    """arm (mean, sd, runs of its run means) - a fixed model's one evaluation `reference` `[questions]` (average
    over k samples each). The reference has no run-to-run spread, only its evaluation's sampling noise: the variance
    of its mean, sum_q p_q (1 - p_q) / (k - 1) / Q^2 (unbiased per question), is added to the arm's s^2 / n, with
    Welch-Satterthwaite degrees of freedom (the reference's term has Q (k - 1))."""
    mean, sd, n = arm
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    q = len(ref)
    diff = float(mean - ref.mean())
    if n < 2:
        return ArmComparison(diff, -math.inf, math.inf, (n, 1), q, math.inf, float("nan"), float("nan"),
                             (float("nan"), 0.0), level)
    ref_var = float(np.sum(ref * (1 - ref)) / max(k - 1, 1) / q ** 2)
    arm_var = sd ** 2 / n
    se = math.sqrt(arm_var + ref_var)
    if se == 0:
        return ArmComparison(diff, diff, diff, (n, 1), q, 0.0, float("nan"), float("nan"), (sd, 0.0), level)
    df = (arm_var + ref_var) ** 2 / (arm_var ** 2 / (n - 1) + ref_var ** 2 / (q * max(k - 1, 1)))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * se
    return ArmComparison(diff, diff - half, diff + half, (n, 1), q, se, float(df), float("nan"), (sd, 0.0), level)


def mean_interval(run_values, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of a quantity measured once per training run: Student's t over the runs (the run the
    unit); an infinite interval for one run."""
    values = np.asarray(run_values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, -math.inf, math.inf
    sd = float(values.std(ddof=1))
    if sd == 0:
        return mean, mean, mean
    low, high = scipy_stats.t.interval(level, len(values) - 1, loc=mean, scale=sd / math.sqrt(len(values)))
    return mean, float(low), float(high)


def compare_summaries(arm: tuple[float, float, int], baseline: tuple[float, float, int], *,
                      level: float = LEVEL) -> ArmComparison:
    """`compare_arms` from each arm's (mean, standard deviation, runs) of its run means: the same Welch interval,
    written out (the reports committed before per_question.json kept only these); `question_se` is unknown (nan)."""
    (ma, sa, na), (mb, sb, nb) = arm, baseline
    diff = ma - mb
    if na < 2 or nb < 2:
        return ArmComparison(diff, -math.inf, math.inf, (na, nb), 0, math.inf, float("nan"), float("nan"),
                             (sa if na > 1 else float("nan"), sb if nb > 1 else float("nan")), level)
    va, vb = sa ** 2 / na, sb ** 2 / nb
    se = math.sqrt(va + vb)
    if se == 0:
        return ArmComparison(diff, diff, diff, (na, nb), 0, 0.0, float("nan"), float("nan"), (sa, sb), level)
    df = (va + vb) ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * se
    return ArmComparison(diff, diff - half, diff + half, (na, nb), 0, se, df, float("nan"), (sa, sb), level)


def holm_reject(pvalues, alpha: float = 1 - LEVEL) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected with the family-wise error held at `alpha`."""
    p = np.asarray(pvalues, dtype=np.float64)
    reject = np.zeros(len(p), dtype=bool)
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        if p[i] > alpha / (len(p) - rank):
            break
        reject[i] = True
    return reject.tolist()


def bh_reject(pvalues, alpha: float = 1 - LEVEL) -> list[bool]:
    """Benjamini-Hochberg: which hypotheses are rejected with the false-discovery rate held at `alpha`
    (`scipy.stats.false_discovery_control`)."""
    p = np.asarray(pvalues, dtype=np.float64)
    if len(p) == 0:
        return []
    return (scipy_stats.false_discovery_control(p, method="bh") <= alpha).tolist()


def multiplicity(pvalues, alpha: float = 1 - LEVEL) -> dict:
    """How many of a family of tests read as differences uncorrected, after Holm (family-wise) and after
    Benjamini-Hochberg (false discovery): a readout that prints many intervals says this beside them."""
    p = list(pvalues)
    return {"tests": len(p), "uncorrected": int(sum(x <= alpha for x in p)),
            "holm": holm_reject(p, alpha), "bh": bh_reject(p, alpha),
            "holm_count": int(sum(holm_reject(p, alpha))), "bh_count": int(sum(bh_reject(p, alpha)))}


class BootstrapDifference(NamedTuple):
    mean: float
    low: float
    high: float
    seeds: int
    questions: int

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)


BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0


def question_seed_bootstrap(arm, baseline, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                            level: float = LEVEL) -> BootstrapDifference:
    """The interval mtprl used before `compare_arms` (kept only so that the A/A calibration can show its false-positive
    rate beside the new method's): D[s, q] = arm - baseline for seed s (paired by position) and question q, seeds
    and questions resampled with replacement, the percentile interval of the grid mean. Too narrow where a run
    shifts an arm as a whole (scripts/synthetic_aa.py); never use it for a verdict.
    Protocol (the old reports' numbers): numpy `default_rng(seed)`; per resample `integers(0, S, S)` then
    `integers(0, Q, Q)`."""
    arm, baseline = np.asarray(arm, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if arm.shape != baseline.shape or arm.ndim != 2 or 0 in arm.shape:
        raise ValueError(f"question_seed_bootstrap needs two [seeds, questions] arrays of one shape, got {arm.shape} "
                         f"and {baseline.shape}")
    diff = arm - baseline
    n_seeds, n_questions = diff.shape
    rng = np.random.default_rng(seed)
    seed_idx = np.empty((resamples, n_seeds), dtype=np.int64)
    question_idx = np.empty((resamples, n_questions), dtype=np.int64)
    for b in range(resamples):  # the draw order of the protocol; the means are taken at once below
        seed_idx[b] = rng.integers(0, n_seeds, n_seeds)
        question_idx[b] = rng.integers(0, n_questions, n_questions)
    # mean over the resampled grid = mean over resampled seeds of (row means over the resampled questions)
    row_means = np.stack([diff[:, question_idx[b]].mean(axis=1) for b in range(resamples)])  # [B, S]
    means = np.take_along_axis(row_means, seed_idx, axis=1).mean(axis=1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return BootstrapDifference(float(diff.mean()), float(low), float(high), n_seeds, n_questions)


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
