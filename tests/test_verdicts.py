"""The verdict method (`mtprl.core.stats.compare_arms`) where the answer is known.

Synthetic experiments with a known run-level and question-level variance: each training run draws a run effect
u ~ N(0, sigma_run) that shifts every question's success probability, and each question is answered k times
(binomial). Under no real difference the share of "better"/"worse" must stay at or below 5% at 2, 3 and 5 runs per
arm, whatever the ratio of the two noises; a method that resamples the questions only (the run never enters) is
shown to fail the same test, and so is the old seeds-and-questions bootstrap at 2-3 seeds.
"""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mtprl.analysis.aa_calibration import (METHODS, false_positive_rate, power_table, random_splits, runs_needed,
                                  variance_components, welch_power)
from mtprl.core.stats import compare_arms, compare_summaries, compare_to_reference, question_seed_bootstrap

QUESTIONS, K = 200, 8


def synthetic_runs(rng, n_runs, sigma_run, shift=0.0, difficulty=None):
    """[n_runs, QUESTIONS] per-question accuracies (correct / K)."""
    if difficulty is None:
        difficulty = np.random.default_rng(123).uniform(0.05, 0.7, QUESTIONS)  # the shared held-out questions
    u = rng.normal(0.0, sigma_run, (n_runs, 1))
    p = np.clip(difficulty[None, :] + shift + u, 0.0, 1.0)
    return rng.binomial(K, p) / K


def aa_rate(method, n, sigma_run, experiments=400, seed=0):
    """Share of independent A/A experiments (fresh runs each time) that `method` calls a difference."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(experiments):
        runs = synthetic_runs(rng, 2 * n, sigma_run)
        hits += method(runs[:n], runs[n:]) != "no detectable difference"
    return hits / experiments


def _upper_ok(rate, experiments=400, level=0.05):
    """Not significantly above `level` (one-sided binomial test at 1%): the rate's sampling noise allowed for."""
    return scipy_stats.binomtest(round(rate * experiments), experiments, level, alternative="greater").pvalue > 0.01


@pytest.mark.parametrize("sigma_run", [0.0, 0.03])  # evaluation noise only; training runs dominating
@pytest.mark.parametrize("n", [2, 3, 5])
def test_welch_on_run_means_holds_its_false_positive_rate(n, sigma_run):
    rate = aa_rate(METHODS["welch_run_means"], n, sigma_run)
    assert _upper_ok(rate), f"n={n}, sigma_run={sigma_run}: false-positive rate {rate:.3f}"


@pytest.mark.parametrize("n", [2, 3, 5])
def test_question_only_bootstrap_fails_the_same_test(n):
    """The broken variant: questions resampled, run means never compared: with run noise it calls noise a
    difference most of the time."""
    rate = aa_rate(METHODS["question_bootstrap"], n, 0.03, experiments=200)
    assert rate > 0.3, rate


def test_old_seed_and_question_bootstrap_fails_at_two_seeds():
    """The interval the reports used before: at 2 seeds its seed level has 3 distinct multisets."""
    rate = aa_rate(lambda a, b: question_seed_bootstrap(a, b, resamples=400).verdict, 2, 0.03, experiments=150)
    assert rate > 0.15, rate


def test_interval_covers_a_real_difference():
    """With a true shift of 5 points the interval covers the arms' true difference at about 95%."""
    rng = np.random.default_rng(7)
    difficulty = np.random.default_rng(123).uniform(0.05, 0.6, QUESTIONS)
    truth = np.mean(np.clip(difficulty + 0.05, 0, 1)) - np.mean(difficulty)
    covered = 0
    for _ in range(400):
        a = synthetic_runs(rng, 3, 0.02, shift=0.05, difficulty=difficulty)
        b = synthetic_runs(rng, 3, 0.02, difficulty=difficulty)
        c = compare_arms(a, b)
        covered += c.low <= truth <= c.high
    assert 0.91 <= covered / 400 <= 0.99


def test_compare_arms_equals_welch_by_hand():
    arm = np.array([[1.0, 0.5, 0.25], [0.75, 0.5, 0.5], [1.0, 1.0, 0.25]])
    base = np.array([[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]])
    a, b = arm.mean(axis=1), base.mean(axis=1)
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 2
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    c = compare_arms(arm, base)
    assert c.mean == pytest.approx(a.mean() - b.mean())
    assert (c.low, c.high) == pytest.approx((c.mean - half, c.mean + half))
    assert c.df == pytest.approx(df)
    assert c.runs == (3, 2) and c.questions == 3
    per_q = arm.mean(axis=0) - base.mean(axis=0)
    assert c.question_se == pytest.approx(per_q.std(ddof=1) / math.sqrt(3))


def test_compare_arms_refuses_and_degrades_clearly():
    one = np.array([[1.0, 0.0]])
    two = np.array([[1.0, 0.0], [0.5, 0.5]])
    c = compare_arms(one, two)
    assert math.isinf(c.low) and math.isinf(c.high) and c.verdict == "no detectable difference"
    with pytest.raises(ValueError, match="share their questions"):
        compare_arms(two, two[:, :1])
    with pytest.raises(ValueError, match="non-finite"):
        compare_arms([[float("nan")]], two[:, :1])


def test_compare_to_reference_holds_its_false_positive_rate():
    """Runs of a model that does not move against that model's one evaluation: at or below 5%."""
    rng = np.random.default_rng(3)
    difficulty = np.random.default_rng(123).uniform(0.05, 0.7, QUESTIONS)
    hits = 0
    for _ in range(400):
        reference = rng.binomial(K, difficulty) / K
        runs = synthetic_runs(rng, 3, 0.0, difficulty=difficulty)
        hits += compare_to_reference(runs, reference, K).verdict != "no detectable difference"
    assert _upper_ok(hits / 400), hits / 400


def test_splits_are_disjoint_and_reproducible():
    splits = random_splits(16, 5, 50, seed=1)
    assert splits == random_splits(16, 5, 50, seed=1)
    for a, b in splits:
        assert len(a) == len(b) == 5 and not set(a) & set(b)
    with pytest.raises(ValueError, match="need 12 runs"):
        random_splits(10, 6, 1)


def test_false_positive_rate_on_one_set_of_runs():
    rng = np.random.default_rng(11)
    runs = synthetic_runs(rng, 16, 0.03)
    welch = false_positive_rate(runs, 3, splits=300, method=METHODS["welch_run_means"])
    broken = false_positive_rate(runs, 3, splits=300, method=METHODS["question_bootstrap"])
    assert welch.rate < broken.rate and broken.rate > 0.3
    assert welch.low <= welch.rate <= welch.high


def test_power_matches_simulation_of_the_verdict():
    """welch_power (vectorised simulation) against the share of compare_arms verdicts (scipy, one call each) on
    other simulated run means; and the noncentral t with df = 2n - 2, which ignores Welch's lower df, overstates it."""
    rng = np.random.default_rng(5)
    sd, effect, n = 0.015, 0.03, 4
    hits = sum(compare_arms(rng.normal(effect, sd, n), rng.normal(0, sd, n)).verdict == "better"
               for _ in range(2000))
    assert hits / 2000 == pytest.approx(welch_power(effect, sd, n), abs=0.03)
    t = scipy_stats.t.ppf(0.975, 2 * n - 2)
    nct = scipy_stats.nct.sf(t, 2 * n - 2, effect / (sd * math.sqrt(2 / n)))
    assert nct > welch_power(effect, sd, n) + 0.03
    need = runs_needed(effect, sd)
    assert welch_power(effect, sd, need) >= 0.8 > welch_power(effect, sd, need - 1)
    table = power_table(rng.normal(0, sd, 16), effects=(0.03, 0.05))
    assert [r["effect"] for r in table["rows"]] == [0.03, 0.05]
    assert all(r["runs_needed_at_sd_upper"] >= r["runs_needed"] for r in table["rows"])


def test_variance_components_recover_the_known_run_noise():
    rng = np.random.default_rng(9)
    runs = synthetic_runs(rng, 400, 0.03)
    parts = variance_components(runs, K)
    assert parts["training_run_sd"] == pytest.approx(0.03, rel=0.12)
    assert parts["evaluation_sd"] == pytest.approx(math.sqrt(np.mean(runs * (1 - runs)) / (K - 1) / QUESTIONS),
                                                   rel=0.05)


def test_compare_summaries_equals_compare_arms():
    """The interval from (mean, sd, runs) alone (what the older report.json files kept) is compare_arms'."""
    rng = np.random.default_rng(2)
    a, b = rng.random((3, 20)), rng.random((4, 20))
    full = compare_arms(a, b)
    ma, mb = a.mean(axis=1), b.mean(axis=1)
    short = compare_summaries((ma.mean(), ma.std(ddof=1), 3), (mb.mean(), mb.std(ddof=1), 4))
    assert (short.mean, short.low, short.high, short.df) == pytest.approx((full.mean, full.low, full.high, full.df))
    assert math.isinf(compare_summaries((0.3, 0.0, 1), (0.2, 0.01, 3)).low)


def _script(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_script_on_synthetic_runs(tmp_path):
    """scripts/calibrate_verdicts.py reads per_question.json and writes the rates, the power table and a figure;
    on runs with run-level noise the published method stays near 5% and the question-only bootstrap does not."""
    import json

    rng = np.random.default_rng(4)
    runs = synthetic_runs(rng, 12, 0.03)
    kept = {"runs": [{"label": "detach", "seed": s, "k": K, "correct_per_question": (row * K).round().astype(int).tolist()}
                     for s, row in enumerate(runs)]}
    (tmp_path / "per_question.json").write_text(json.dumps(kept))
    _script("calibrate_verdicts").main([str(tmp_path), "--splits", "40"])
    result = json.loads((tmp_path / "calibration.json").read_text())
    rates = result["false_positive_rates"]
    assert rates["question_bootstrap"]["3"]["rate"] > 0.3
    assert rates["welch_run_means"]["3"]["rate"] < rates["question_bootstrap"]["3"]["rate"]
    assert result["run_means"] == pytest.approx(runs.mean(axis=1).tolist())
    assert (tmp_path / "calibration.png").stat().st_size > 10_000
    assert "| 3 |" in (tmp_path / "calibration.md").read_text()


def test_holm_and_bh_against_hand_computation():
    from mtprl.core.stats import bh_reject, holm_reject, multiplicity

    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    # Holm: sorted 0.005 <= 0.05/5, 0.01 <= 0.05/4, 0.03 > 0.05/3 -> stop
    assert holm_reject(p) == [True, False, False, True, False]
    # BH: sorted p_(i) <= i/5 * 0.05: 0.005<=.01, 0.01<=.02, 0.03<=.03, 0.04<=.04 -> largest i = 4
    assert bh_reject(p) == [True, True, True, True, False]
    m = multiplicity(p)
    assert (m["tests"], m["uncorrected"], m["holm_count"], m["bh_count"]) == (5, 4, 2, 4)


def test_relative_gain_pvalues_are_the_paired_t_over_prompts():
    from mtprl.core.gain import relative_gain_pvalues

    rng = np.random.default_rng(0)
    per = rng.normal(0, 1, (3, 40))
    per[2] = per[1] + 0.0  # lambda 1 and 2 share lambda 0.5's values shifted: see below
    lambdas = [0.0, 0.5, 1.0]
    per[2] = per[0] + 0.3
    ps = relative_gain_pvalues(per, lambdas)
    assert ps[0] == pytest.approx(scipy_stats.ttest_rel(per[1], per[0]).pvalue)
    assert ps[1] == 0.0  # a constant nonzero difference on every prompt
    assert relative_gain_pvalues(np.zeros((2, 5)), [0.0, 1.0]) == [1.0]


def test_mean_interval_is_students_t_over_runs():
    from mtprl.core.stats import mean_interval

    values = [1.4, 1.9, 1.6]
    m, low, high = mean_interval(values)
    half = scipy_stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert (m, low, high) == pytest.approx((1.6333333, 1.6333333 - half, 1.6333333 + half))
    assert math.isinf(mean_interval([1.0])[1])
