"""The per-step gain dJ = J(theta') - J(theta), measured: pure functions over sequence log-probs and rewards.

J(theta) is the mean over prompts x_i of the expected reward E_{y ~ pi_theta(.|x_i)} r(x_i, y). From M samples per
prompt drawn from pi_theta *once*, the gain of any other parameters theta' is an expectation under pi_theta:

    J(theta') - J(theta) = mean_i E_{pi_theta}[(w - 1) (r - b_i)],   w = pi_theta'(y|x_i) / pi_theta(y|x_i),

for any baseline b_i that does not depend on the sample itself (E[w - 1] = 0). The leave-one-out mean of the other
M - 1 rewards of the same prompt is such a baseline (the samples are independent), so

    g_i = (1/M) sum_j (w_ij - 1) (r_ij - mean_{k != j} r_ik)

is an unbiased estimate of prompt i's gain, and dJ_hat = mean_i g_i (`importance_gain`). The baseline removes most
of the variance a plain `(w - 1) r` has; including the sample's own reward in its baseline (the batch mean) is the
classic mistake: it shrinks the estimate by (1 - 1/M) (`tests/test_gain.py` shows that variant failing).
One set of samples serves every theta'(lambda) of a probe, so the differences between lambdas are paired.

The interval is a percentile bootstrap over prompts (the prompts are the independent units), 95% by default.
`direct_gain` is the plain estimate from fresh samples of theta' and of theta (unbiased, much noisier): the probe
uses it at a few lambdas to check the importance estimate. `fit_gain_curve` fits the paper's parabola
dJ(lambda) - dJ(0) = a lambda + b lambda^2 (Eq. 7-11: a ~ eta c, b ~ -L eta^2 v^2 / 2) and its argmax;
`gain_curve_with_interval` adds a bootstrap interval of the argmax over prompts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

GAIN_RESAMPLES = 2000
GAIN_SEED = 0


def _group(prompt_ids) -> tuple[np.ndarray, int]:
    """(index of each sample's prompt in 0..P-1, P), prompts in order of first appearance."""
    ids = np.asarray(prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # unique's sorted order -> order of first appearance
    return order[inverse], len(first)


def _as_float64(x) -> np.ndarray:
    return (x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64))


def per_prompt_gains(new_logps, old_logps, rewards, prompt_ids) -> np.ndarray:
    """g_i of the module docstring for every prompt `[P]` (prompts in order of first appearance): the importance
    weight w = exp(new - old) of each sample, its reward minus the leave-one-out mean of its prompt's other rewards.
    A prompt with one sample uses baseline 0 (still unbiased, noisier)."""
    new, old, r = _as_float64(new_logps), _as_float64(old_logps), _as_float64(rewards)
    if not (new.shape == old.shape == r.shape) or new.ndim != 1:
        raise ValueError(f"new_logps, old_logps and rewards must be 1-D of one length, got {new.shape}, {old.shape}, "
                         f"{r.shape}")
    group, num = _group(prompt_ids)
    if len(group) != len(r):
        raise ValueError(f"prompt_ids has {len(group)} entries for {len(r)} samples")
    count = np.bincount(group, minlength=num).astype(np.float64)
    total = np.bincount(group, weights=r, minlength=num)
    others = count[group] - 1
    baseline = np.where(others > 0, (total[group] - r) / np.maximum(others, 1), 0.0)
    terms = np.expm1(new - old) * (r - baseline)
    return np.bincount(group, weights=terms, minlength=num) / count


def bootstrap_mean(per_prompt: np.ndarray, *, resamples: int = GAIN_RESAMPLES, seed: int = GAIN_SEED,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean over prompts and its percentile-bootstrap interval (prompts resampled)."""
    x = np.asarray(per_prompt, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    means = x[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(x.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def importance_gain(new_logps, old_logps, rewards, prompt_ids, *, resamples: int = GAIN_RESAMPLES,
                    seed: int = GAIN_SEED, level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high) of J(theta') - J(theta) from samples drawn from theta: sequence log-probs under
    theta' and theta `[n]`, rewards `[n]`, prompt ids `[n]` (the module docstring); 95% bootstrap over prompts."""
    return bootstrap_mean(per_prompt_gains(new_logps, old_logps, rewards, prompt_ids), resamples=resamples,
                          seed=seed, level=level)


def per_prompt_direct(new_rewards, new_prompt_ids, old_rewards, old_prompt_ids) -> np.ndarray:
    """Per prompt: mean reward of fresh samples from theta' minus mean reward of fresh samples from theta
    (both sets cover the same prompts; prompts in order of first appearance in `new_prompt_ids`)."""
    new_group, num = _group(new_prompt_ids)
    old_ids = np.asarray(old_prompt_ids.tolist() if isinstance(old_prompt_ids, torch.Tensor) else old_prompt_ids)
    new_ids = np.asarray(new_prompt_ids.tolist() if isinstance(new_prompt_ids, torch.Tensor) else new_prompt_ids)
    position = {pid: new_group[i] for i, pid in enumerate(new_ids)}
    if set(old_ids.tolist()) != set(position):
        raise ValueError("direct_gain: the two sample sets must cover the same prompts")
    old_group = np.array([position[p] for p in old_ids.tolist()])

    def means(group, r):
        return np.bincount(group, weights=_as_float64(r), minlength=num) / np.bincount(group, minlength=num)

    return means(new_group, new_rewards) - means(old_group, old_rewards)


def direct_gain(new_rewards, new_prompt_ids, old_rewards, old_prompt_ids, **bootstrap) -> tuple[float, float, float]:
    """(estimate, low, high) of J(theta') - J(theta) from fresh samples of each, paired by prompt."""
    return bootstrap_mean(per_prompt_direct(new_rewards, new_prompt_ids, old_rewards, old_prompt_ids), **bootstrap)


class GainCurve(NamedTuple):
    """dJ(lambda) - dJ(0) = linear * lambda + quadratic * lambda^2, fitted by least squares over the grid."""

    linear: float  # a ~ eta * c
    quadratic: float  # b ~ -(L eta^2 / 2) v^2: negative when the curve is a downward parabola
    r2: float  # of the fit, on the measured gains relative to lambda = 0
    best_lambda: float  # argmax of the fit over [min(grid), max(grid)] (the vertex when inside)

    def gain_at(self, lam: float) -> float:
        return self.linear * lam + self.quadratic * lam * lam


def fit_gain_curve(lambdas, gains, weights=None) -> GainCurve:
    """Least-squares `a lambda + b lambda^2` through the origin to `gains - gains[lambda == 0]` (the grid must hold
    0), weighted by `weights` (e.g. 1 / se^2 of each point; None: equal), and the fitted curve's argmax on the grid's
    range. The theory is a small-lambda expansion, so the weights let the precise points near 0 lead."""
    lam, g = np.asarray(lambdas, dtype=np.float64), np.asarray(gains, dtype=np.float64)
    zero = np.flatnonzero(lam == 0)
    if len(zero) == 0:
        raise ValueError("the lambda grid must contain 0 (the gain is measured relative to it)")
    w = np.ones_like(lam) if weights is None else np.asarray(weights, dtype=np.float64)
    rel = g - g[zero[0]]
    design = np.stack([lam, lam * lam], axis=1)
    root = np.sqrt(w)
    (a, b), *_ = np.linalg.lstsq(design * root[:, None], rel * root, rcond=None)
    fitted = design @ np.array([a, b])
    mean = (w * rel).sum() / w.sum() if w.sum() > 0 else 0.0
    total = (w * (rel - mean) ** 2).sum()
    r2 = float(1 - (w * (rel - fitted) ** 2).sum() / total) if total > 0 else float("nan")
    low, high = lam.min(), lam.max()
    candidates = [low, high] + ([-a / (2 * b)] if b < 0 and low <= -a / (2 * b) <= high else [])
    best = max(candidates, key=lambda x: a * x + b * x * x)
    return GainCurve(float(a), float(b), r2, float(best))


def point_weights(lambdas, per_prompt: np.ndarray) -> np.ndarray:
    """1 / se^2 of each lambda's dJ(lambda) - dJ(0) over prompts (0 for the lambda = 0 point itself)."""
    lam = np.asarray(lambdas, dtype=np.float64)
    rel = per_prompt - per_prompt[int(np.flatnonzero(lam == 0)[0])]
    se = rel.std(axis=1, ddof=1) / np.sqrt(rel.shape[1])
    weights = np.zeros_like(se)
    np.divide(1.0, se ** 2, out=weights, where=se > 0)
    return weights


def gain_curve_with_interval(lambdas, per_prompt: np.ndarray, *, resamples: int = GAIN_RESAMPLES,
                             seed: int = GAIN_SEED, level: float = 0.95) -> tuple[GainCurve, float, float]:
    """The weighted fit (`point_weights`) to the per-lambda means of `per_prompt [len(lambdas), P]` and a
    percentile-bootstrap interval of its argmax, resampling prompts jointly for every lambda (the samples are
    shared, so the curve moves as one)."""
    per_prompt = np.asarray(per_prompt, dtype=np.float64)
    weights = point_weights(lambdas, per_prompt)
    curve = fit_gain_curve(lambdas, per_prompt.mean(axis=1), weights)
    idx = np.random.default_rng(seed).integers(0, per_prompt.shape[1], (resamples, per_prompt.shape[1]))
    best = np.array([fit_gain_curve(lambdas, per_prompt[:, i].mean(axis=1), weights).best_lambda for i in idx])
    tail = (1 - level) / 2 * 100
    return curve, float(np.percentile(best, tail)), float(np.percentile(best, 100 - tail))


# ---------------------------------------------------------------------------------------------- the readout
# A probe's result is read from its measured grid points and their intervals; the parabola fit is a summary. On one
# shared sample set the importance estimate is smooth in lambda whatever the truth, so a high R^2 is no evidence
# for a parabola, and the fit's argmax lands mid-grid on flat, noisy curves.

def _relative(per_prompt, lambdas) -> np.ndarray:
    """dJ(lambda) - dJ(0) per prompt [len(lambdas), P] (paired on the shared samples)."""
    lam = np.asarray(lambdas, dtype=np.float64)
    zero = np.flatnonzero(lam == 0)
    if len(zero) == 0:
        raise ValueError("the lambda grid must contain 0 (the gain is measured relative to it)")
    per_prompt = np.asarray(per_prompt, dtype=np.float64)
    return per_prompt - per_prompt[zero[0]]


def best_point_probability(per_prompt, *, resamples: int = GAIN_RESAMPLES, seed: int = GAIN_SEED) -> list[float]:
    """One probability per grid lambda: the share of bootstrap resamples in which that point has the largest mean
    gain. Prompts are resampled jointly for every lambda (the samples are shared, so the curve moves as one);
    ties split evenly. Where no point has most of the mass, the grid cannot tell its points apart."""
    x = np.asarray(per_prompt, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, x.shape[1], (resamples, x.shape[1]))
    counts = np.zeros(x.shape[0])
    for i in idx:
        means = x[:, i].mean(axis=1)
        best = np.flatnonzero(means >= means.max() - 1e-15 * max(1.0, abs(means.max())))
        counts[best] += 1.0 / len(best)
    return (counts / resamples).tolist()


def share_of_best(per_prompt, lambdas, target: float, *, resamples: int = GAIN_RESAMPLES, seed: int = GAIN_SEED,
                  level: float = 0.95) -> list | None:
    """[share, low, high]: the measured gain at the grid point `target` relative to lambda = 0, as a share of the
    best grid point's (both measured, dJ(lambda) - dJ(0)), with a percentile-bootstrap interval over prompts (the
    best point re-chosen in every resample, so the interval carries the choice). None where no point gains over
    lambda = 0 (the best is 0 itself: no share to speak of)."""
    lam = [float(v) for v in lambdas]
    rel = _relative(per_prompt, lam)
    t = lam.index(float(target))
    means = rel.mean(axis=1)
    if means.max() <= 0:
        return None
    idx = np.random.default_rng(seed).integers(0, rel.shape[1], (resamples, rel.shape[1]))
    shares = []
    for i in idx:
        m = rel[:, i].mean(axis=1)
        if m.max() > 0:
            shares.append(m[t] / m.max())
    tail = (1 - level) / 2 * 100
    low, high = (np.percentile(shares, tail), np.percentile(shares, 100 - tail)) if shares else (np.nan, np.nan)
    return [float(means[t] / means.max()), float(low), float(high)]


def importance_ess(new_logps, old_logps) -> tuple[float, float]:
    """(effective sample size (sum w)^2 / sum w^2, the largest weight's share of sum w) of the importance weights
    w = pi_theta'(y) / pi_theta(y) over the shared samples. ESS near the sample count: the estimate is as good as
    fresh samples; far below it (under 10%): a few samples carry the estimate and its interval is optimistic."""
    log_w = _as_float64(new_logps) - _as_float64(old_logps)
    w = np.exp(log_w - log_w.max())  # scale-free: both numbers are ratios
    return float(w.sum() ** 2 / (w * w).sum()), float(w.max() / w.sum())


def relative_gain_pvalues(per_prompt, lambdas) -> list[float]:
    """Two-sided p-values of dJ(lambda) - dJ(0) = 0 for every grid lambda but 0, from the paired per-prompt gains
    `[lambda, prompt]` (one-sample t over prompts, `scipy.stats.ttest_1samp`): the family a probe's intervals
    form, for `stats.multiplicity`. Differences without spread give p = 1 (all 0) or 0 (all one nonzero value)."""
    from scipy import stats as scipy_stats

    per = np.asarray(per_prompt, dtype=np.float64)
    lams = [float(x) for x in lambdas]
    zero = lams.index(0.0)
    out = []
    for i, lam in enumerate(lams):
        if i == zero:
            continue
        diff = per[i] - per[zero]
        if len(diff) < 2 or np.all(diff == diff[0]):
            out.append(1.0 if diff[0] == 0 else 0.0)
        else:
            out.append(float(scipy_stats.ttest_1samp(diff, 0.0).pvalue))
    return out
