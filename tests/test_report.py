"""The report: statistics against numpy, the table against the runs' own files, bad runs skipped by name."""

import json
import math
import os

import numpy as np
import pytest

from mtprl.analysis.report import (build_report, fidelity_table, load_runs, mean_std, pearson_r, quantile, spearman_r,
                          table_rows)


def test_pearson_r_and_mean_std_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.6 * x + rng.normal(size=40)
    assert pearson_r(list(x), list(y)) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert math.isnan(pearson_r([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])) and math.isnan(pearson_r([1.0], [2.0]))
    vals = [0.31, 0.42, 0.27]
    mean, std = mean_std(vals)
    assert mean == pytest.approx(np.mean(vals)) and std == pytest.approx(np.std(vals, ddof=1))
    assert mean_std([0.5]) == (0.5, 0.0)


def _fake_run(root, regime, seed, rewards, avg, passk, lam=None, exact=None):
    """A run directory in the format `mtprl train` writes (metrics.jsonl, eval.json, run_info.json)."""
    path = os.path.join(root, f"{regime}-s{seed}")
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, r in enumerate(rewards, start=1):
            row = {"step": step, "reward": r, "step_time": 0.1 * (2 if regime == "occ" else 1) + 0.001 * step,
                   "mtp/lambda/1": 0.1 if lam is None else lam[step - 1], "mtp/c_hat/1": 0.01 * step,
                   "mtp/v2_hat/1": 0.02 * step, "mtp/accept/1": 0.8}
            if exact:
                row["mtp/c_exact/1"], row["mtp/v2_exact/1"] = exact[step - 1]
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(path, "eval.json"), "w") as f:
        json.dump({"avg@4": avg, "pass@4": passk, "k": 4}, f)
    with open(os.path.join(path, "run_info.json"), "w") as f:
        json.dump({"mtp_regime": regime, "seed": seed, "label": regime}, f)
    return path


def test_table_matches_the_runs_files(tmp_path):
    dirs = [
        _fake_run(tmp_path, "detach", 0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 0.30, 0.60),
        _fake_run(tmp_path, "detach", 1, [0.2, 0.2, 0.2, 0.2, 0.2, 0.2], 0.40, 0.70),
        _fake_run(tmp_path, "occ", 0, [0.5] * 6, 0.50, 0.80, exact=[(0.02 * s, 0.05 * s) for s in range(1, 7)]),
    ]
    rows = {r["label"]: r for r in table_rows(load_runs(dirs)[0])}
    assert rows["detach"]["avg"] == pytest.approx((np.mean([0.3, 0.4]), np.std([0.3, 0.4], ddof=1)))
    assert rows["detach"]["pass"][0] == pytest.approx(0.65)
    # final reward = mean of the last 5 logged rewards, then mean over seeds
    assert rows["detach"]["reward"][0] == pytest.approx(np.mean([np.mean([0.2, 0.3, 0.4, 0.5, 0.6]), 0.2]))
    assert rows["occ"]["step_time"] == pytest.approx(np.median([0.2 + 0.001 * s for s in range(1, 7)]))
    report = build_report(dirs, str(tmp_path / "report"))
    text = open(report).read()
    assert "**50.0 (1 seed)**" in text  # OCC's avg@4 is the best: bold; one seed has no std to show
    assert "35.0 ± 7.1" in text  # detach: mean ± sample std over the two seeds, in percent
    ratio = np.median([0.2 + 0.001 * s for s in range(1, 7)]) / np.median([0.1 + 0.001 * s for s in range(1, 7)])
    assert f"{ratio:.2f}x" in text
    for png in ("reward.png", "acceptance.png", "occ_lambda_c_v2.png", "estimators_vs_exact.png",
                "figure2_dynamics.png"):
        assert os.path.getsize(tmp_path / "report" / png) > 1000
    # only the OCC run logged the exact statistics: its c_hat (0.01 step) against its c_exact (0.02 step)
    c_hat, c_exact = [0.01 * s for s in range(1, 7)], [0.02 * s for s in range(1, 7)]
    row = next(line for line in text.splitlines() if line.startswith("| paper proxy"))
    assert f"| {np.corrcoef(c_hat, c_exact)[0, 1]:.3f} |" in row


def test_report_skips_corrupt_or_missing_metrics_and_names_the_file(tmp_path):
    good = _fake_run(tmp_path, "detach", 0, [0.1] * 3, 0.3, 0.6)
    corrupt = _fake_run(tmp_path, "ce", 0, [0.1] * 3, 0.2, 0.5)
    with open(os.path.join(corrupt, "metrics.jsonl"), "a") as f:
        f.write("{truncated\n")
    missing = _fake_run(tmp_path, "policy", 0, [0.1] * 3, 0.2, 0.5)
    os.remove(os.path.join(missing, "metrics.jsonl"))
    with pytest.warns(UserWarning, match="skipping"):
        report = build_report([good, corrupt, missing], str(tmp_path / "report"))
    text = open(report).read()
    assert os.path.join(corrupt, "metrics.jsonl") + ", row 4" in text
    assert os.path.join(missing, "metrics.jsonl") + "' does not exist" in text
    assert "| Detach |" in text and "| CE loss |" not in text


def test_table_shows_each_eval_datasets_benchmark_and_their_average(tmp_path):
    """eval.json's `benchmarks` (from `eval_datasets`) become the Table 1 columns: mean ± std over seeds."""
    per_seed = {0: {"gsm8k": 0.20, "math500": 0.10}, 1: {"gsm8k": 0.30, "math500": 0.30}}
    dirs = []
    for seed, scores in per_seed.items():
        path = _fake_run(tmp_path, "detach", seed, [0.1] * 3, 0.3, 0.6)
        with open(os.path.join(path, "eval.json")) as f:
            ev = json.load(f)
        ev["benchmarks"] = {name: {"avg@4": v, "pass@4": 1.0, "num_questions": 10} for name, v in scores.items()}
        ev["benchmarks_average"] = {"avg@4": float(np.mean(list(scores.values()))), "pass@4": 1.0}
        with open(os.path.join(path, "eval.json"), "w") as f:
            json.dump(ev, f)
        dirs.append(path)
    row = table_rows(load_runs(dirs)[0])[0]
    assert row["bench:gsm8k"] == pytest.approx((0.25, np.std([0.2, 0.3], ddof=1)))
    assert row["bench:average"][0] == pytest.approx(np.mean([0.15, 0.30]))
    text = open(build_report(dirs, str(tmp_path / "report"))).read()
    header = next(line for line in text.splitlines() if line.startswith("| arm"))
    assert "gsm8k avg@4 (%)" in header and "math500 avg@4 (%)" in header and "average avg@4 (%)" in header
    assert f"{100 * np.mean([0.15, 0.30]):.1f} ± {100 * np.std([0.15, 0.30], ddof=1):.1f}" in text


def test_rank_statistics_match_numpy():
    rng = np.random.default_rng(1)
    x = list(rng.normal(size=30))
    y = [v ** 3 + 0.1 * e for v, e in zip(x, rng.normal(size=30))]
    ranks = lambda v: np.argsort(np.argsort(v)) + 1.0  # noqa: E731 (no ties here)
    assert spearman_r(x, y) == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], rel=1e-12)
    assert spearman_r([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties averaged, not broken
    for q in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert quantile(x, q) == pytest.approx(np.quantile(x, q), rel=1e-12)


def test_fidelity_table_per_estimator(tmp_path):
    """Sign agreement and lambda ratios from crafted logs, against numpy on the same numbers."""
    exact = [(0.5, 2.0), (-0.2, 1.0), (0.1, 4.0), (0.3, 0.5)]
    hidden = [(1.0, 3.0), (0.4, 2.0), (0.3, 9.0), (0.5, 1.0)]  # one sign disagrees (step 2)
    path = _fake_run(tmp_path, "ce", 0, [0.1] * 4, 0.3, 0.6, exact=exact)
    rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for row, (c, v) in zip(rows, hidden):
            row["mtp/c_hidden/1"], row["mtp/v2_hidden/1"] = c, v
            f.write(json.dumps(row) + "\n")
    table = {r["source"]: r for r in fidelity_table(load_runs([path])[0])}
    assert set(table) == {"hat", "hidden"}
    h = table["hidden"]
    assert h["n"] == 4 and h["sign_agreement"] == pytest.approx(0.75)
    ratios = [(ce / ve) / (cx / vx) for (ce, ve), (cx, vx) in zip(hidden, exact)]
    assert h["lambda_ratio_median"] == pytest.approx(np.median(ratios))
    assert h["lambda_ratio_q25"] == pytest.approx(np.quantile(ratios, 0.25))
    assert h["pearson_v2"] == pytest.approx(np.corrcoef([v for _, v in hidden], [v for _, v in exact])[0, 1])


def test_report_command_takes_baseline_and_start(tmp_path):
    """`mtprl report --baseline --start`: intervals against the named arm (Welch's t on the run means, by hand) and
    the starting model, from per-question results in the runs' eval.json; per_question.json keeps them all."""
    from scipy import stats as scipy_stats

    from mtprl.cli import main

    per_question = {("detach", 0): [2, 0, 4, 1], ("detach", 1): [1, 1, 3, 1], ("ce", 0): [4, 2, 4, 2],
                    ("ce", 1): [3, 2, 4, 3]}
    dirs = []
    for (regime, seed), correct in per_question.items():
        path = _fake_run(tmp_path, regime, seed, [0.1] * 3, sum(correct) / 16, 0.5)
        ev = {"avg@4": sum(correct) / 16, "pass@4": 1.0, "k": 4, "correct_per_question": correct,
              "questions_digest": "q"}
        json.dump(ev, open(os.path.join(path, "eval.json"), "w"))
        dirs.append(path)
    start = tmp_path / "start.json"
    json.dump({"avg@4": 0.25, "pass@4": 0.5, "k": 4, "correct_per_question": [1, 1, 1, 1], "questions_digest": "q"},
              open(start, "w"))
    assert main(["report", *dirs, "--report_dir", str(tmp_path / "r"), "--baseline", "ce", "--start", str(start)]) == 0
    rows = {r["label"]: r for r in json.load(open(tmp_path / "r" / "report.json"))["rows"]}
    acc = lambda regime: [[c / 4 for c in per_question[(regime, s)]] for s in (0, 1)]  # noqa: E731
    a, b = np.mean(acc("detach"), axis=1), np.mean(acc("ce"), axis=1)  # run means
    se2 = a.var(ddof=1) / 2 + b.var(ddof=1) / 2
    df = se2 ** 2 / ((a.var(ddof=1) / 2) ** 2 + (b.var(ddof=1) / 2) ** 2)  # Welch-Satterthwaite, n - 1 = 1
    low = a.mean() - b.mean() - scipy_stats.t.ppf(0.975, df) * np.sqrt(se2)
    assert rows["detach"]["vs_baseline"]["low"] == pytest.approx(low)
    assert rows["detach"]["vs_baseline"]["mean"] == pytest.approx(np.mean(acc("detach")) - np.mean(acc("ce")))
    assert rows["detach"]["vs_baseline"]["runs"] == [2, 2]
    assert rows["ce"]["vs_baseline"] is None
    assert rows["ce"]["vs_start"]["mean"] == pytest.approx(np.mean(acc("ce")) - 0.25)
    kept = json.load(open(tmp_path / "r" / "per_question.json"))
    assert {(r["label"], r["seed"]): r["correct_per_question"] for r in kept["runs"]} == per_question
    assert kept["start"]["correct_per_question"] == [1, 1, 1, 1]


def test_rollout_table_and_figure_from_drafted_runs(tmp_path):
    """Accept length and tokens/s early and late in training, per arm, against the runs' own rows."""
    from mtprl.analysis.report import rollout_rows

    dirs = [_fake_run(tmp_path, "detach", s, [0.1] * 8, 0.3, 0.6) for s in (0, 1)]
    dirs.append(_fake_run(tmp_path, "occ", 0, [0.1] * 8, 0.3, 0.6))
    accept = {"detach-s0": [1.8, 1.8, 1.7, 1.7, 1.6, 1.6, 1.5, 1.5], "detach-s1": [2.0] * 8,
              "occ-s0": [1.8, 1.7, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1]}
    for path in dirs:
        name = os.path.basename(path)
        with open(os.path.join(path, "metrics.jsonl"), "a") as f:
            for step, a in enumerate(accept[name], start=1):
                f.write(json.dumps({"step": step, "rollout/spec_accept_length": a, "rollout/tokens_per_s": 100 * a,
                                    "rollout/draft_tokens": 2.0, "rollout/spec_accept_rate/1": a - 1.0,
                                    "rollout/spec_accept_rate/2": (a - 1.0) / 2}) + "\n")
    rows = {r["label"]: r for r in rollout_rows(load_runs(dirs)[0])}
    # first / last quarter of 8 rollouts = 2 values each; then the mean over seeds
    assert rows["detach"]["accept_early"] == pytest.approx(np.mean([1.8, 2.0]))
    assert rows["detach"]["accept_late"] == pytest.approx(np.mean([1.5, 2.0]))
    assert rows["occ"]["accept_late"] == pytest.approx(1.15) and rows["occ"]["tps_early"] == pytest.approx(175.0)
    assert rows["occ"]["rate_late/2"] == pytest.approx(0.075) and rows["detach"]["seeds"] == 2
    report = build_report(dirs, str(tmp_path / "report"))
    text = open(report).read()
    assert "## Rollouts drafted by the heads" in text and "| OCC | 1 | 2.00 | 1.750 | 1.150 | 175 | 115 | 0.750 -> 0.150 | 0.375 -> 0.075 |" in text
    assert os.path.getsize(tmp_path / "report" / "rollouts.png") > 10_000


def test_one_seed_says_so_and_no_difference_says_what_it_would_need():
    from mtprl.analysis.aa_calibration import runs_needed
    from mtprl.analysis.report import _fmt, _interval
    from mtprl.core.stats import compare_arms

    assert _fmt((0.25, 0.0), seeds=1) == "25.0 (1 seed)" and _fmt((0.25, 0.01), seeds=2) == "25.0 ± 1.0"
    one = compare_arms([[1.0, 0.0, 1.0]], [[0.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    assert _interval(one) == "+16.7 (1 run, no interval)"  # 2/3 - (1/3 + 2/3) / 2
    arm, base = [0.30, 0.34, 0.31], [0.32, 0.29, 0.33]
    two = compare_arms(arm, base)
    sd = np.sqrt((np.var(arm, ddof=1) + np.var(base, ddof=1)) / 2)
    text = _interval(two, power_effects=(0.03,))
    assert text.endswith(f"no detectable difference at 3 runs; 3 points would need {runs_needed(0.03, sd)} per arm"), text


def test_a_comparison_whose_every_arm_scores_zero_warns(tmp_path):
    dirs = [_fake_run(tmp_path, "detach", 0, [0.0] * 6, 0.0, 0.0), _fake_run(tmp_path, "occ", 0, [0.0] * 6, 0.0, 0.0)]
    with pytest.warns(UserWarning, match="every arm scores 0"):
        report = build_report(dirs, str(tmp_path / "report"))
    assert "**Warning:** every arm scores 0" in open(report).read()


def _probe_file(run, step, a, b, occ_lambda, lambdas=(-1.0, 0.0, 0.5, 1.0, 2.0)):
    """A probe.json whose measured curve is exactly a lambda + b lambda^2 (what `mtprl probe` writes)."""
    rel = [a * x + b * x * x for x in lambdas]
    best = -a / (2 * b)
    base = [0.1 * ((7 * j) % 5 - 2) for j in range(12)]  # prompts differ, and the same prompt moves with lambda
    probe = {"step": step, "term": "policy", "lambdas": list(lambdas), "dJ_rel": rel,
             "per_prompt": [[b0 + r for b0 in base] for r in rel],
             "dJ_rel_low": [r - 0.01 for r in rel], "dJ_rel_high": [r + 0.01 for r in rel],
             "fit": {"linear": a, "quadratic": b, "r2": 1.0}, "lambda_hat_star": best,
             "lambda_hat_star_interval": [best - 0.1, best + 0.1], "occ_lambda": occ_lambda,
             "occ_share_of_best": (a * occ_lambda + b * occ_lambda ** 2) / (a * best + b * best ** 2),
             "c_exact": 2.0, "v2_exact": 5.0, "seconds": 120.0}
    os.makedirs(os.path.join(run, "probes"), exist_ok=True)
    with open(os.path.join(run, "probes", f"probe-step{step}.json"), "w") as f:
        json.dump(probe, f)


def test_probe_section_reports_lambda_hat_star_against_occs_lambda(tmp_path):
    from mtprl.analysis.probe_report import probe_rows

    run = _fake_run(tmp_path, "occ", 0, [0.5] * 6, 0.5, 0.8)
    _probe_file(run, 20, 0.02, -0.01, 0.5)  # peak at 1.0: OCC at half of it
    _probe_file(run, 60, 0.01, -0.01, 1.0)  # peak at 0.5: OCC at twice it
    rows = probe_rows({"occ": load_runs([run])[0]})
    assert [r["step"] for r in rows] == [20, 60]
    assert [r["grid_best"] for r in rows] == [1.0, 0.5]  # the best measured grid point
    assert [r["ratio"] for r in rows] == pytest.approx([2.0, 0.5])  # best grid point / OCC's lambda
    assert [r["p_best"] for r in rows] == [1.0, 1.0]  # the order holds on every prompt: one best point
    assert rows[0]["share"] == pytest.approx([0.75, 0.75, 0.75])  # measured G(0.5) / G(1.0), exact on every prompt
    assert rows[1]["share"] == pytest.approx([0.0, 0.0, 0.0])  # OCC at twice the best point gains nothing
    assert not any(r["edge"] for r in rows)
    report = build_report([run], str(tmp_path / "report"))
    text = open(report).read()
    assert "Why a regime wins, measured" in text
    # median best/OCC [IQR]; median share of (0.75, 0); largest P(best); edges; the fit's ratio (2, 0.5), secondary
    assert "| occ | 2 | 1.25 [0.875, 1.62] | 0.375 | 1.00 | 0/2 | 1.25 |" in text
    assert os.path.isfile(tmp_path / "report" / "figure3_measured.png")
    assert "probes" in json.load(open(tmp_path / "report" / "report.json"))


def test_late_acceptance_interval_takes_each_runs_last_quarter_as_the_unit(tmp_path):
    """The last-quarter draft-1 acceptance of an arm against detach: each run's mean over its last quarter of
    rollouts, then Welch's t on those run means (stats.compare_arms on the hand-built values); in the table."""
    from mtprl.analysis.report import late_acceptance_difference, rollout_rows
    from mtprl.core.stats import compare_arms

    dirs = [_fake_run(tmp_path, regime, s, [0.1] * 8, 0.3, 0.6) for regime in ("detach", "occ") for s in (0, 1)]
    rate = {("detach", 0): [0.5] * 8, ("detach", 1): [0.6] * 8,
            ("occ", 0): [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.3, 0.2], ("occ", 1): [0.6] * 6 + [0.4, 0.45]}
    for path in dirs:
        regime, seed = os.path.basename(path).split("-s")
        with open(os.path.join(path, "metrics.jsonl"), "a") as f:
            for step, a in enumerate(rate[(regime, int(seed))], start=1):
                f.write(json.dumps({"step": step, "rollout/spec_accept_length": 1 + a, "rollout/tokens_per_s": 10.0,
                                    "rollout/draft_tokens": 1.0, "rollout/spec_accept_rate/1": a}) + "\n")
    runs = load_runs(dirs)[0]
    detach = [r for r in runs if r.label == "detach"]
    occ = [r for r in runs if r.label == "occ"]
    diff = late_acceptance_difference(occ, detach)
    expected = compare_arms([0.25, 0.425], [0.5, 0.6])  # the mean of steps 7, 8 of each run
    assert (diff.mean, diff.low, diff.high) == pytest.approx((expected.mean, expected.low, expected.high))
    # -21 points, and still no verdict: two runs per arm whose late means spread by 12 and 7 points
    assert diff.mean == pytest.approx((-0.2 - 0.3 - 0.2 - 0.15) / 4) and diff.verdict == "no detectable difference"
    rows = {r["label"]: r for r in rollout_rows(runs, "detach")}
    assert "accept1_vs_baseline" not in rows["detach"] and rows["occ"]["accept1_vs_baseline"].mean == diff.mean
    text = open(build_report(dirs, str(tmp_path / "report"))).read()
    from mtprl.analysis.report import _interval

    assert "depth 1, last quarter, vs Detach (points, 95%)" in text and "(baseline)" in text
    assert f"| {_interval(diff)} |" in text
    # the accept length pairs the same way, in tokens: 1 + rate, so the same differences
    length = rows["occ"]["length_vs_baseline"]
    assert (length.mean, length.low, length.high) == pytest.approx((diff.mean, diff.low, diff.high))
    assert f"| {_interval(length, scale=1.0, digits=3)} |" in text and "(tokens, 95%)" in text


def test_step_time_table_gives_the_update_alone_and_the_whole_step_with_its_rollouts(tmp_path):
    """Logged every step, the median of TRL's step_time is the update alone (3 of every 4 steps do not generate); its
    mean includes the rollout steps: both per arm against hand computations, with ratios to the baseline."""
    from mtprl.analysis.report import step_time_table

    times = {"detach": [1.0, 1.0, 1.0, 5.0] * 2, "occ": [1.2, 1.2, 1.2, 9.2] * 2}
    dirs = []
    for regime, ts in times.items():
        path = _fake_run(tmp_path, regime, 0, [0.1] * 8, 0.3, 0.6)
        rows = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]
        with open(os.path.join(path, "metrics.jsonl"), "w") as f:
            for row, t in zip(rows, ts):
                f.write(json.dumps({**row, "step_time": t}) + "\n")
        dirs.append(path)
    rows = {r["label"]: r for r in table_rows(load_runs(dirs)[0])}
    assert rows["occ"]["step_time"] == pytest.approx(1.2) and rows["occ"]["whole_step_time"] == pytest.approx(3.2)
    assert rows["detach"]["whole_step_time"] == pytest.approx(2.0)
    text = step_time_table(list(rows.values()), "detach")
    assert "| OCC | 1.200 | 1.20x | 3.200 | 1.60x |" in text and "rollouts included" in text
