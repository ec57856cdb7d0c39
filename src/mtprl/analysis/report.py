"""The comparison report: the paper's Table 1 for your runs, the figures behind its claims, and step times.

A run directory is what `mtprl train` writes: `metrics.jsonl`, `eval.json` and `run_info.json` (regime and
seed). `build_report(run_dirs, out_dir)` reads them and writes `report.md` and PNG figures; a run whose files
are missing or corrupt is named and skipped, never fatal.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import warnings
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io.jsonl import atomic_write_json, atomic_write_text, read_jsonl  # noqa: E402
from .probe_report import probe_section  # noqa: E402
from ..core.regimes import REGIME_LABELS  # noqa: E402
from ..core.stats import compare_arms, compare_to_reference, mean_std, pearson_r, quantile, spearman_r  # noqa: E402


class Run:
    """One finished (or partial) training run, read from its directory."""

    def __init__(self, path: str):
        self.path = path
        info_file = os.path.join(path, "run_info.json")
        metrics_file = os.path.join(path, "metrics.jsonl")
        self.rows = [row for _, row in read_jsonl(metrics_file, "metrics file", tolerate_torn_tail=True)]
        info = {}
        if os.path.isfile(info_file):
            with open(info_file) as f:
                info = json.load(f)
        self.regime = info.get("mtp_regime", os.path.basename(path).split("-")[0])
        self.seed = info.get("seed", 0)
        self.label = info.get("label", self.regime)
        self.info = info
        eval_file = os.path.join(path, "eval.json")
        self.eval = None
        if os.path.isfile(eval_file):
            with open(eval_file) as f:
                self.eval = json.load(f)

    def series(self, key):
        pts = [(r["step"], r[key]) for r in self.rows if key in r and isinstance(r[key], (int, float))]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    def final_reward(self, last: int = 5) -> float:
        _, rewards = self.series("reward")
        return statistics.fmean(rewards[-last:]) if rewards else float("nan")

    def median_step_time(self) -> float:
        _, times = self.series("step_time")
        return statistics.median(times) if times else float("nan")

    def mean_step_time(self) -> float:
        """TRL's step_time (each logged value its mean over a logging window) averaged over every logged window:
        the steps that generate a rollout (every `steps_per_generation`-th) included, so with windows of equal size
        the whole RL step. The median is a typical window, which leaves the rollouts out where they fall in fewer
        than half the windows."""
        _, times = self.series("step_time")
        return statistics.fmean(times) if times else float("nan")

    def heads(self) -> list[str]:
        return sorted({k.rsplit("/", 1)[1] for r in self.rows for k in r if k.startswith("mtp/lambda/")}, key=int)


def load_runs(run_dirs) -> tuple[list[Run], list[str]]:
    """Runs that could be read, and one line per run that could not (named, with why)."""
    runs, skipped = [], []
    for path in run_dirs:
        try:
            runs.append(Run(path))
        except (OSError, ValueError) as e:
            skipped.append(f"{path}: {e}")
            warnings.warn(f"report: skipping {path}: {e}")
    return runs, skipped


def _by_label(runs):
    """Runs grouped by arm label, arms in the order they first appear (compare passes them in arm order)."""
    groups = defaultdict(list)
    for run in runs:
        groups[run.label].append(run)
    return dict(groups)


def accuracy_matrix(runs, seeds=None):
    """Per-run, per-question accuracy [runs, Q] (correct samples / k, from eval.json) for `seeds` (default: every
    seed with an eval), and the questions digest they share. Raises if runs were evaluated on other questions."""
    by_seed = {r.seed: r.eval for r in runs if r.eval and "correct_per_question" in r.eval}
    seeds = sorted(by_seed) if seeds is None else seeds
    digests = {by_seed[s].get("questions_digest") for s in seeds}
    if len(digests) > 1:
        raise ValueError(f"runs of one arm were evaluated on different questions: {sorted(map(str, digests))}")
    return [[c / by_seed[s]["k"] for c in by_seed[s]["correct_per_question"]] for s in seeds], digests.pop()


def arm_difference(arm_runs, base_runs=None, start=None):
    """arm - baseline with the training run as the unit (`stats.compare_arms`: Welch's t on the run means, every
    run of each arm, no pairing by seed), or arm - the starting model (`stats.compare_to_reference`: its one
    evaluation, with that evaluation's sampling noise); None when an arm has no per-question evaluation or the
    arms were evaluated on other questions."""
    if not any(r.eval and "correct_per_question" in r.eval for r in arm_runs):
        return None
    arm, digest = accuracy_matrix(arm_runs)
    if start is not None:
        if "correct_per_question" not in start or digest != start.get("questions_digest"):
            return None
        return compare_to_reference(arm, [c / start["k"] for c in start["correct_per_question"]], start["k"])
    if not any(r.eval and "correct_per_question" in r.eval for r in base_runs):
        return None
    base, base_digest = accuracy_matrix(base_runs)
    return compare_arms(arm, base) if digest == base_digest else None


def per_question_results(runs, start=None) -> dict:
    """Every run's per-question evaluation (correct samples out of k per held-out question) and the starting
    model's: the small file beside a report from which anyone can recompute any interval
    (`scripts/verdicts.py REPORT_DIR`)."""
    out = {"runs": [{"label": r.label, "seed": r.seed, "k": r.eval["k"],
                     "questions_digest": r.eval.get("questions_digest"),
                     "correct_per_question": r.eval["correct_per_question"]}
                    for r in runs if r.eval and "correct_per_question" in r.eval]}
    if start and "correct_per_question" in start:
        out["start"] = {"k": start["k"], "questions_digest": start.get("questions_digest"),
                        "correct_per_question": start["correct_per_question"]}
    return out


def benchmark_names(runs) -> list[str]:
    """The `eval_datasets` benchmarks any run was evaluated on, in first-seen order."""
    names = []
    for run in runs:
        for name in (run.eval or {}).get("benchmarks", {}):
            if name not in names:
                names.append(name)
    return names


def table_rows(runs, baseline=None, start=None) -> list[dict]:
    """One row per arm: mean/std over seeds of avg@k and pass@k (from eval.json), avg@k on every
    `eval_datasets` benchmark and their average (the paper's Table 1 columns), final training reward (mean of
    the last 5 logged rewards), median step time; and the 95% interval of avg@k against the `baseline` arm and
    against the `start` model's evaluation, the training run as the unit (`arm_difference`)."""
    rows = []
    names = benchmark_names(runs)
    for label, group in _by_label(runs).items():
        evals = [r.eval for r in group if r.eval]
        k = evals[0]["k"] if evals else None
        row = {"label": label, "regime": group[0].regime, "seeds": sorted(r.seed for r in group), "k": k}
        row["avg"] = mean_std([e[f"avg@{e['k']}"] for e in evals])
        row["pass"] = mean_std([e[f"pass@{e['k']}"] for e in evals])
        for name in names:
            row[f"bench:{name}"] = mean_std([e["benchmarks"][name][f"avg@{e['k']}"] for e in evals
                                             if name in e.get("benchmarks", {})])
        if names:
            row["bench:average"] = mean_std([e["benchmarks_average"][f"avg@{e['k']}"] for e in evals
                                             if "benchmarks_average" in e])
        row["reward"] = mean_std([r.final_reward() for r in group])
        row["step_time"] = statistics.median([r.median_step_time() for r in group])
        row["whole_step_time"] = statistics.fmean([r.mean_step_time() for r in group])
        groups = _by_label(runs)
        row["vs_baseline"] = (arm_difference(group, groups[baseline]) if baseline in groups and label != baseline
                              else None)
        row["vs_start"] = arm_difference(group, start=start) if start else None
        rows.append(row)
    return rows


def _fmt(ms, best=False, scale=100.0, seeds=2):
    mean, std = ms
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.1f} (1 seed)" if seeds == 1 else f"{mean * scale:.1f} ± {std * scale:.1f}"
    return f"**{text}**" if best else text


# The differences a report names when it says how many runs a verdict would need (accuracy units).
POWER_EFFECTS = (0.03,)


def _interval(diff, scale=100.0, digits=1, power_effects=()) -> str:
    """An ArmComparison in words: the difference, its interval and verdict; where no difference is detected and
    `power_effects` are given, the runs per arm each effect would need at this comparison's run-to-run spread
    (`aa_calibration.runs_needed`, 80% power)."""
    if diff is None:
        return "–"
    f = f"{{:+.{digits}f}}".format
    runs = min(diff.runs) if diff.runs[1] > 1 else diff.runs[0]  # a reference model has one evaluation
    if math.isinf(diff.low):  # the run-to-run variation, the larger part of the noise, is not measured
        return f"{f(scale * diff.mean)} (1 run, no interval)"
    text = f"{f(scale * diff.mean)} [{f(scale * diff.low)}, {f(scale * diff.high)}] {diff.verdict}"
    if diff.verdict == "no detectable difference" and power_effects:
        text += f" at {runs} runs" + "".join(f"; {scale * e:g} points would need {_runs_needed(e, diff)} per arm"
                                             for e in power_effects)
    return text


def _runs_needed(effect, diff) -> str:
    from .aa_calibration import RUNS_LIMIT, runs_needed

    sds = [sd for sd in diff.run_sd if sd > 0 and not math.isnan(sd)]
    if not sds:
        return "?"
    need = runs_needed(effect, math.sqrt(statistics.fmean(sd ** 2 for sd in sds)))
    return f">{RUNS_LIMIT}" if need is None else str(need)


def markdown_table(rows, baseline=None, start=None) -> str:
    k = next((r["k"] for r in rows if r["k"]), (start or {}).get("k", "k"))

    def shown(ms):  # what the table prints; equal printed values are equally best
        return round(ms[0] * 100, 1)

    bench_keys = [key for key in (rows[0] if rows else {}) if key.startswith("bench:")]
    keys = ("avg", "pass", *bench_keys, "reward")
    best = {key: max((shown(r[key]) for r in rows if not math.isnan(r[key][0])), default=None) for key in keys}
    headers = [f"avg@{k} (%)", f"pass@{k} (%)", *(f"{key[6:]} avg@{k} (%)" for key in bench_keys),
               "final train reward (x100)"]
    compare = []
    if start is not None:
        headers.append(f"avg@{k} - start, 95% CI (points)")
        compare.append("vs_start")
    if baseline is not None:
        headers.append(f"avg@{k} - {REGIME_LABELS.get(baseline, baseline)}, 95% CI (points)")
        compare.append("vs_baseline")
    lines = ["| arm | seeds | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
    if start is not None:
        cells = [f"{100 * start[f'avg@{k}']:.1f}", f"{100 * start[f'pass@{k}']:.1f}"]
        cells += ["–"] * (len(headers) - 2)
        lines.append("| starting model | – | " + " | ".join(cells) + " |")
    for r in rows:
        cells = [_fmt(r[key], not math.isnan(r[key][0]) and shown(r[key]) == best[key], seeds=len(r["seeds"]))
                 for key in keys]
        cells += ["(baseline)" if key == "vs_baseline" and r["label"] == baseline else
                  _interval(r[key], power_effects=POWER_EFFECTS if key == "vs_baseline" else ())
                  for key in compare]
        lines.append(f"| {REGIME_LABELS.get(r['label'], r['label'])} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


VERDICT_METHOD = (
    "Intervals: 95%, the training run as the unit (`mtprl.core.stats.compare_arms`: Welch's t on each run's mean over the "
    "held-out questions and their samples; against the starting model, its one evaluation's sampling noise added); "
    "\"better\" / \"worse\" only when the interval excludes 0, otherwise \"no detectable difference\", with the runs "
    "per arm that a 3-point difference would need at 80% power at the spread these runs show. Calibrated on A/A "
    "runs: reports/calibration.")
VERDICT_NOTE = (VERDICT_METHOD + " Every run's per-question results: per_question.json (`python scripts/verdicts.py "
                "REPORT_DIR` recomputes every interval).")
FEW_RUNS_NOTE = (
    "**Few runs.** With 2 runs in an arm its interval rests on 1-2 degrees of freedom and on a spread measured from "
    "two numbers: these runs support no verdict between arms unless a difference is very large. The runs a given "
    "difference needs, from 16 runs of one configuration: reports/calibration/calibration.md.")


def few_runs_note(rows) -> str:
    """FEW_RUNS_NOTE when any arm of the table has fewer than 3 runs, else ''."""
    return FEW_RUNS_NOTE if any(1 < len(r["seeds"]) < 3 for r in rows) else ""


def noise_table(rows, baseline) -> str:
    """The two noise components behind each interval against the baseline: the run-to-run spread (what the
    interval uses) and the question-level part (what resampling the questions alone would give)."""
    if baseline is None or not any(r.get("vs_baseline") for r in rows):
        return ""
    name = REGIME_LABELS.get(baseline, baseline)
    lines = [f"| arm vs {name} | runs | sd of run means, arm / baseline (points) | standard error: runs "
             "(points) | question-level part (points) | Welch df |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = r.get("vs_baseline")
        if d is None:
            continue
        sd = " / ".join("–" if math.isnan(v) else f"{100 * v:.1f}" for v in d.run_sd)
        df = "–" if math.isnan(d.df) else f"{d.df:.1f}"
        se = "–" if math.isinf(d.se) else f"{100 * d.se:.2f}"
        lines.append(f"| {REGIME_LABELS.get(r['label'], r['label'])} | {d.runs[0]} / {d.runs[1]} | {sd} | {se} | "
                     f"{100 * d.question_se:.2f} | {df} |")
    return "\n".join(lines)


def step_time_table(rows, baseline=None) -> str:
    base_row = next((r for r in rows if r["label"] == baseline), None) or next(
        (r for r in rows if r["regime"] == "detach"), None)
    base = base_row["step_time"] if base_row else float("nan")
    name = REGIME_LABELS.get(base_row["label"], base_row["label"]) if base_row else "detach"
    whole_base = base_row.get("whole_step_time", float("nan")) if base_row else float("nan")

    def ratio(value, of):
        return "–" if not of or math.isnan(of) or math.isnan(value) else f"{value / of:.2f}x"

    lines = ["| arm | median step time (s) | / " + name + " | mean step time, rollouts included (s) | / " + name + " |",
             "|---|---|---|---|---|"]
    for r in rows:
        whole = r.get("whole_step_time", float("nan"))
        lines.append(f"| {REGIME_LABELS.get(r['label'], r['label'])} | {r['step_time']:.3f} | "
                     f"{ratio(r['step_time'], base)} | {whole:.3f} | {ratio(whole, whole_base)} |")
    return "\n".join(lines)


def _early_late(values, share=0.25):
    """Means of the first and the last `share` of a series (at least one value each)."""
    n = max(1, int(len(values) * share))
    return statistics.fmean(values[:n]), statistics.fmean(values[-n:])


def late_acceptance_difference(arm_runs, base_runs, depth: int = 1, share: float = 0.25, key: str | None = None):
    """arm - baseline of the last-quarter draft-`depth` acceptance rate (or of any per-rollout series `key`, e.g.
    `rollout/spec_accept_length`): each run reduced to the mean over its last `share` of rollouts, then
    `stats.compare_arms` on those run means (the training run as the unit). None when an arm has no such series."""
    key = key or f"rollout/spec_accept_rate/{depth}"

    def late_means(runs):
        means = []
        for run in runs:
            values = run.series(key)[1]
            if values:
                means.append(_early_late(values, share)[1])
        return means

    arm, base = late_means(arm_runs), late_means(base_runs)
    return compare_arms(arm, base) if arm and base else None


def rollout_rows(runs, baseline=None) -> list[dict]:
    """Per arm, for runs whose rollouts the heads drafted (`mtp_draft_tokens`): tokens per verify forward and
    tokens/s early and late in training (first and last quarter of the rollouts, mean over seeds), the
    per-depth acceptance rate over the first and the last quarter, and (given a `baseline` arm label) the
    intervals against the baseline of the last-quarter accept length and of every depth's last-quarter acceptance
    (`late_acceptance_difference`)."""
    rows = []
    groups = _by_label(runs)
    for label, group in groups.items():
        series = [(run.series("rollout/spec_accept_length")[1], run.series("rollout/tokens_per_s")[1], run)
                  for run in group]
        series = [s for s in series if s[0]]
        if not series:
            continue
        accept = [_early_late(a) for a, _, _ in series]
        speed = [_early_late(t) for _, t, _ in series]
        row = {"label": label, "seeds": len(series),
               "draft_tokens": statistics.fmean(statistics.fmean(r.series("rollout/draft_tokens")[1])
                                                for _, _, r in series),
               "accept_early": statistics.fmean(a[0] for a in accept),
               "accept_late": statistics.fmean(a[1] for a in accept),
               "tps_early": statistics.fmean(t[0] for t in speed), "tps_late": statistics.fmean(t[1] for t in speed)}
        depth = 1
        while True:
            rates = [run.series(f"rollout/spec_accept_rate/{depth}")[1] for _, _, run in series]
            rates = [r for r in rates if r]
            if not rates:
                break
            row[f"rate_early/{depth}"] = statistics.fmean(_early_late(r)[0] for r in rates)
            row[f"rate_late/{depth}"] = statistics.fmean(_early_late(r)[1] for r in rates)
            if baseline in groups and label != baseline:
                row[f"accept{depth}_vs_baseline"] = late_acceptance_difference(group, groups[baseline], depth)
            depth += 1
        if baseline in groups and label != baseline:
            row["length_vs_baseline"] = late_acceptance_difference(group, groups[baseline],
                                                                   key="rollout/spec_accept_length")
        rows.append(row)
    return rows


def rollout_markdown(rows, baseline=None) -> str:
    depths = sorted({int(k.split("/")[1]) for r in rows for k in r if k.startswith("rate_late/")})
    paired = baseline is not None and any("length_vs_baseline" in r for r in rows)
    base_name = REGIME_LABELS.get(baseline, baseline)
    head = ["arm", "seeds", "drafts per verify (mean)", "accept length, first quarter", "accept length, last quarter",
            "tokens/s, first quarter", "tokens/s, last quarter",
            *(f"accept rate depth {d}, first -> last quarter" for d in depths)]
    if paired:
        head += [f"accept length, last quarter, vs {base_name} (tokens, 95%)",
                 *(f"depth {d}, last quarter, vs {base_name} (points, 95%)" for d in depths)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [REGIME_LABELS.get(r["label"], r["label"]), str(r["seeds"]), f"{r['draft_tokens']:.2f}",
                 f"{r['accept_early']:.3f}", f"{r['accept_late']:.3f}", f"{r['tps_early']:.0f}", f"{r['tps_late']:.0f}",
                 *(f"{r[f'rate_early/{d}']:.3f} -> {r[f'rate_late/{d}']:.3f}" if f"rate_late/{d}" in r else "–"
                   for d in depths)]
        if paired and r["label"] == baseline:
            cells += ["(baseline)"] * (1 + len(depths))
        elif paired:
            cells += [_interval(r.get("length_vs_baseline"), scale=1.0, digits=3),
                      *(_interval(r.get(f"accept{d}_vs_baseline")) for d in depths)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_rollouts(runs, out_dir) -> list[str]:
    """Accept length and tokens/s of the drafted rollouts over training, one colour per arm (seeds drawn thin)."""
    if not any(run.series("rollout/spec_accept_length")[0] for run in runs):
        return []
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for ax, key, ylabel in ((axes[0], "rollout/spec_accept_rate/1", "draft 1 accepted (fraction)"),
                            (axes[1], "rollout/spec_accept_length", "tokens per verify forward (accept length)"),
                            (axes[2], "rollout/tokens_per_s", "rollout completion tokens / s")):
        for color, (label, group) in enumerate(_by_label(runs).items()):
            for i, run in enumerate(group):
                xs, ys = run.series(key)
                if xs:
                    ax.plot(xs, _smooth(ys, 5), color=f"C{color}", alpha=0.9, lw=1.5,
                            label=REGIME_LABELS.get(label, label) if i == 0 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_title("Do the heads stay good drafters while RL moves the policy?", fontsize=10)
    axes[1].set_title("Tokens per verify forward (short completions cap it)", fontsize=10)
    axes[2].set_title("Rollout throughput (drafted, lossless; machine load shows)", fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "rollouts.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _smooth(ys, window=5):
    out = []
    for i in range(len(ys)):
        part = ys[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def _plot_per_label(runs, key, path, title, ylabel, smooth=5):
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for color, (label, group) in enumerate(_by_label(runs).items()):
        for i, run in enumerate(group):
            xs, ys = run.series(key)
            if xs:
                ax.plot(xs, _smooth(ys, smooth), color=f"C{color}", alpha=0.9,
                        label=REGIME_LABELS.get(label, label) if i == 0 else None)
                drawn = True
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def _plot_occ(runs, out_dir):
    """lambda_t per head, and c_hat / v2_hat over steps, for the OCC runs."""
    occ = [r for r in runs if r.regime == "occ"]
    if not occ:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in occ:
        for head in run.heads():
            for ax, key in zip(axes, ("mtp/lambda", "mtp/c_hat", "mtp/v2_hat")):
                xs, ys = run.series(f"{key}/{head}")
                ax.plot(xs, _smooth(ys, 3), label=f"seed {run.seed}, head {head}", alpha=0.85)
    for ax, title in zip(axes, ("lambda_t (OCC)", "alignment proxy c_hat", "variance proxy v2_hat")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.axhline(0, color="k", lw=0.5)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "occ_lambda_c_v2.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


# Estimators of c and v2 logged beside the exact ones on `occ_fidelity_every` steps (metric mtp/c_<key>/k).
LAMBDA_SOURCE_LABELS = {"hat": "paper proxy (c_hat, v2_hat)", "ema": "running average of the proxy (ema)",
                    "hidden": "gradients at the trunk output (hidden)", "last_layers": "last layers (last_layers)"}


def fidelity_pairs(runs, source="hat"):
    """(c_est, c_exact, v2_est, v2_exact) at every logged step where both were computed, for one lambda source."""
    pts = []
    for run in runs:
        for row in run.rows:
            for head in run.heads():
                keys = [f"mtp/{k}/{head}" for k in (f"c_{source}", "c_exact", f"v2_{source}", "v2_exact")]
                if all(k in row for k in keys):
                    pts.append(tuple(float(row[k]) for k in keys))
    return pts


def fidelity_table(runs) -> list[dict]:
    """Per lambda source: Pearson and Spearman r against the exact c and v2, the fraction of steps where the sign of c
    agrees, and lambda_est / lambda_exact (= (c_est / v2_est) / (c / v2); lambda_plus cancels): median and IQR."""
    rows = []
    for source, label in LAMBDA_SOURCE_LABELS.items():
        pts = fidelity_pairs(runs, source)
        if not pts:
            continue
        c_e, c_x, v_e, v_x = map(list, zip(*pts))
        ratios = [(ce / ve) / (cx / vx) for ce, cx, ve, vx in pts if ve > 0 and vx > 0 and cx != 0]
        rows.append({"source": source, "label": label, "n": len(pts),
                     "pearson_c": pearson_r(c_e, c_x), "spearman_c": spearman_r(c_e, c_x),
                     "pearson_v2": pearson_r(v_e, v_x), "spearman_v2": spearman_r(v_e, v_x),
                     "sign_agreement": sum((a > 0) == (b > 0) for a, b in zip(c_e, c_x)) / len(pts),
                     "lambda_ratio_median": quantile(ratios, 0.5), "lambda_ratio_q25": quantile(ratios, 0.25),
                     "lambda_ratio_q75": quantile(ratios, 0.75)})
    return rows


def fidelity_markdown(rows) -> str:
    lines = ["| lambda source | n | r(c) Pearson | r(c) Spearman | r(v2) Pearson | r(v2) Spearman | sign of c agrees "
             "| lambda / exact lambda: median [IQR] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n']} | {r['pearson_c']:.3f} | {r['spearman_c']:.3f} | "
                     f"{r['pearson_v2']:.3f} | {r['spearman_v2']:.3f} | {100 * r['sign_agreement']:.0f}% | "
                     f"{r['lambda_ratio_median']:.3g} [{r['lambda_ratio_q25']:.3g}, {r['lambda_ratio_q75']:.3g}] |")
    return "\n".join(lines)


def _plot_fidelity(runs, out_dir):
    """One column per lambda source: its c against the exact c (top) and its v2 against the exact v2 (bottom)."""
    table = fidelity_table(runs)
    if not table or max(r["n"] for r in table) < 2:
        return []
    fig, axes = plt.subplots(2, len(table), figsize=(4.2 * len(table), 7.5), squeeze=False)
    for col, row in enumerate(table):
        c_e, c_x, v_e, v_x = map(list, zip(*fidelity_pairs(runs, row["source"])))
        top, bottom = axes[0][col], axes[1][col]
        top.scatter(c_x, c_e, s=12, alpha=0.7, color=f"C{col}")
        top.axhline(0, color="k", lw=0.5)
        top.axvline(0, color="k", lw=0.5)
        top.set_title(f"{row['source']}: c, r = {row['pearson_c']:.2f} (n={row['n']})", fontsize=10)
        top.set_xlabel("exact c = <g_RL, g_MTP> (main model)")
        bottom.scatter(v_x, v_e, s=12, alpha=0.7, color=f"C{col}")
        if min(v_x) > 0 and min(v_e) > 0:
            bottom.set_xscale("log")
            bottom.set_yscale("log")
        bottom.set_title(f"{row['source']}: v2, r = {row['pearson_v2']:.2f}", fontsize=10)
        bottom.set_xlabel("exact v2 = ||g_MTP||^2")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
        top.set_ylabel("estimate")
        bottom.set_ylabel("estimate")
    fig.suptitle("Estimators of c and v2 against the exact statistics (same micro-batches)")
    fig.tight_layout()
    path = os.path.join(out_dir, "estimators_vs_exact.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _head_loss_kind(run) -> str:
    return {"detach": "CE loss", "ce": "CE loss", "distill": "distill KL"}.get(run.regime, "policy loss")


def _plot_dynamics(runs, out_dir):
    """The paper's Figure 2: (a) |c| of the full model for CE loss vs policy loss, and the proxy |c_hat|;
    (b) v2 and the proxy v2_hat; (c) the first-order term c * lambda against the second-order penalty
    v2 * lambda^2 / (2 lambda_plus) (Eq. 10 with lambda_plus standing in for (1 - L eta) / (L eta))."""
    runs = [r for r in runs if any("mtp/c_exact/1" in row for row in r.rows)]
    if not runs:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    twins = [axes[0].twinx(), axes[1].twinx()]  # the proxies live on another scale: their own axis, dotted
    for i, run in enumerate(runs):
        kind, color = _head_loss_kind(run), f"C{i}"
        name = f"{REGIME_LABELS.get(run.label, run.label)} s{run.seed}"
        xs, c = run.series("mtp/c_exact/1")
        axes[0].plot(xs, _smooth([abs(v) for v in c], 3), color=color, label=f"|c| full model, {kind} ({name})")
        xs, v2 = run.series("mtp/v2_exact/1")
        axes[1].plot(xs, _smooth(v2, 3), color=color, label=f"v2 full model, {kind} ({name})")
        if kind == "policy loss":
            hx, hc = run.series("mtp/c_hat/1")
            twins[0].plot(hx, _smooth([abs(v) for v in hc], 3), color=color, ls=":", label=f"|c_hat| proxy ({name})")
            hx, hv = run.series("mtp/v2_hat/1")
            twins[1].plot(hx, _smooth(hv, 3), color=color, ls=":", label=f"v2_hat proxy ({name})")
            lam = dict(zip(*run.series("mtp/lambda/1")))
            lam_plus = float(run.info.get("occ_lambda_plus", 1.0))
            steps = [s for s in xs if s in lam]
            cs, vs = dict(zip(*run.series("mtp/c_exact/1"))), dict(zip(xs, v2))
            axes[2].plot(steps, _smooth([cs[s] * lam[s] for s in steps], 3), color=color,
                         label=f"first order c*lambda ({name})")
            axes[2].plot(steps, _smooth([vs[s] * lam[s] ** 2 / (2 * lam_plus) for s in steps], 3), color=color,
                         ls="--", label=f"second order v2*lambda^2/(2 lambda+) ({name})")
    for ax, title in zip(axes, ("(a) alignment |c| (solid, left) and proxy |c_hat| (dotted, right)",
                                "(b) variance v2 (solid, left) and proxy v2_hat (dotted, right)",
                                "(c) first-order gain vs second-order penalty")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax, twin in zip(axes[:2], twins):
        lines = ax.get_lines() + twin.get_lines()
        if lines:
            ax.legend(lines, [line.get_label() for line in lines], fontsize=7)
    if axes[2].has_data():
        axes[2].legend(fontsize=7)
    axes[2].axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    path = os.path.join(out_dir, "figure2_dynamics.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def accuracy_curve(run, start=None):
    """(steps, avg@k) of one run: the starting model at step 0, every periodic `eval/avg@k` row, the final
    eval.json at the run's last step."""
    k = (run.eval or start or {}).get("k")
    points = {}
    if start is not None and k is not None and f"avg@{k}" in start:
        points[0] = start[f"avg@{k}"]
    if k is not None:
        points.update(zip(*run.series(f"eval/avg@{k}")))
        if run.eval:
            last = max([r["step"] for r in run.rows if "step" in r] + [int(run.info.get("max_steps", 0))])
            points[last] = run.eval[f"avg@{k}"]
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _save_over_steps(fig, ax, title, ylabel, path):
    """Finish a one-panel plot over optimizer steps and write it; returns [path]."""
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _plot_accuracy(runs, out_dir, start=None):
    """The paper's Figure 1: held-out avg@k over training, per arm (thin: seeds, thick: their mean)."""
    curves = {label: [accuracy_curve(r, start) for r in group] for label, group in _by_label(runs).items()}
    if not any(len(xs) > 1 for group in curves.values() for xs, _ in group):
        return []
    k = next((r.eval["k"] for r in runs if r.eval), "k")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for color, (label, group) in enumerate(curves.items()):
        for xs, ys in group:
            ax.plot(xs, [100 * y for y in ys], color=f"C{color}", alpha=0.3, lw=1)
        common = sorted(set.intersection(*(set(xs) for xs, _ in group))) if group else []
        if common:
            mean = [100 * statistics.fmean(dict(zip(xs, ys))[s] for xs, ys in group) for s in common]
            ax.plot(common, mean, color=f"C{color}", lw=2.2, marker="o", ms=3,
                    label=f"{REGIME_LABELS.get(label, label)} (mean of {len(group)})")
    return _save_over_steps(fig, ax, f"held-out avg@{k} over training (Figure 1)", f"avg@{k} (%)",
                            os.path.join(out_dir, "accuracy_over_steps.png"))


def _plot_abs_lambda(runs, out_dir):
    """The paper's Figure 4: |lambda_t| of head 1 over training for the OCC arms."""
    occ = [r for r in runs if r.regime == "occ"]
    if not occ:
        return []
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    labels, styles = list(_by_label(occ)), ("-", "--", ":", "-.")
    for run in occ:
        xs, ys = run.series("mtp/lambda/1")
        color = f"C{labels.index(run.label)}"
        nth = [r for r in occ if r.label == run.label].index(run)
        ax.plot(xs, _smooth([abs(y) for y in ys], 9), color=color, alpha=0.85, ls=styles[nth % len(styles)],
                label=f"{REGIME_LABELS.get(run.label, run.label)} s{run.seed}")
    return _save_over_steps(fig, ax, "|lambda_t| of head 1 over training (Figure 4; moving average of 9 logs)",
                            "|lambda_t|", os.path.join(out_dir, "abs_lambda.png"))


def _read_start(start):
    if start and os.path.isfile(start):
        with open(start) as f:
            return json.load(f)
    return None


def build_report(run_dirs, out_dir, title="mtprl comparison", command=None, baseline=None, start=None) -> str:
    """Write `<out_dir>/report.md` and its PNG figures; returns the report path. `baseline`: the label of the arm
    the others are compared with (default: the first detach arm, else the first arm); `start`: the starting
    model's eval.json (step 0 of the accuracy curves, and each arm's gain over it)."""
    os.makedirs(out_dir, exist_ok=True)
    runs, skipped = load_runs(run_dirs)
    groups = _by_label(runs)
    if baseline is None and groups:
        baseline = next((label for label, g in groups.items() if g[0].regime == "detach"), next(iter(groups)))
    start_eval = _read_start(start)
    rows = table_rows(runs, baseline=baseline, start=start_eval)
    figures = _plot_accuracy(runs, out_dir, start_eval)
    for key, name, ylabel in (("reward", "reward.png", "mean training reward (smoothed)"),
                              ("mtp/accept/1", "acceptance.png", "expected acceptance, head 1")):
        path = os.path.join(out_dir, name)
        if _plot_per_label(runs, key, path, f"{ylabel} per arm", ylabel):
            figures.append(path)
    figures += _plot_abs_lambda(runs, out_dir)
    figures += _plot_occ(runs, out_dir)
    fidelity = fidelity_table(runs)
    figures += _plot_fidelity(runs, out_dir)
    figures += _plot_dynamics(runs, out_dir)
    figures += _plot_rollouts(runs, out_dir)
    rollouts = rollout_rows(runs, baseline if len(groups) > 1 else None)
    probe_lines, probe_figures, probes = probe_section(groups, out_dir)
    figures += probe_figures

    lines = [f"# {title}", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    if rows and all(r["avg"][0] == 0.0 for r in rows):
        zero = ("every arm scores 0 on the held-out questions: nothing learned to answer in the format the verifier "
                "accepts, or the reward / answer extraction is broken (check rewards/failures and a few samples); "
                "the comparison says nothing about the regimes")
        warnings.warn(zero)
        lines += [f"**Warning:** {zero}.", ""]
    lines += ["## Accuracy on held-out questions (mean ± std over seeds)", "",
              markdown_table(rows, baseline=baseline if len(groups) > 1 else None, start=start_eval), "",
              VERDICT_NOTE, ""]
    for part in (few_runs_note(rows), noise_table(rows, baseline if len(groups) > 1 else None)):
        lines += [part, ""] if part else []
    lines += ["## Step time", "", step_time_table(rows, baseline), ""]
    if rollouts:
        lines += ["## Rollouts drafted by the heads", "",
                  "Each arm's own heads draft its rollouts (`mtp_draft_tokens`, lossless speculative sampling): the "
                  "accept length is the tokens committed per trunk forward (1 = the heads never help), early and "
                  "late in training, and the acceptance per draft depth in the first and last quarter; the columns "
                  "against the baseline are 95% intervals of the last-quarter accept length and of each depth's "
                  "acceptance, each run's last-quarter mean the unit (Welch's t, `stats.compare_arms`). See "
                  "rollouts.png.", "",
                  rollout_markdown(rollouts, baseline if len(groups) > 1 else None), ""]
    if fidelity:
        lines += ["## Estimators against the exact statistics", "",
                  "Every lambda source's c and v2 beside the exact ones (gradients over the main model) on the same "
                  "micro-batches (`occ_fidelity_every`), all runs and heads pooled.", "",
                  fidelity_markdown(fidelity), ""]
    lines += probe_lines
    lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures] + [""]
    if skipped:
        lines += ["## Skipped runs", ""] + [f"- {s}" for s in skipped] + [""]
    report = os.path.join(out_dir, "report.md")
    atomic_write_text(report, "\n".join(lines))
    atomic_write_json(os.path.join(out_dir, "per_question.json"), per_question_results(runs, start_eval))
    for row in rows:
        for key in ("vs_baseline", "vs_start"):
            if row[key] is not None:
                row[key] = row[key].as_dict()
    for row in rollouts:
        for key in [k for k in row if k.endswith("_vs_baseline")]:
            if row[key] is not None:
                row[key] = row[key].as_dict()
    atomic_write_json(os.path.join(out_dir, "report.json"),
                      {"rows": rows, "baseline": baseline, "fidelity": fidelity, "skipped": skipped,
                       "rollouts": rollouts, "probes": probes, "figures": figures}, default=float)
    return report
