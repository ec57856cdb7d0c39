"""A/A calibration of the verdict method, from a comparison of one configuration at many seeds
(configs/calibration_aa.yaml: the demo's Detach arm at 16 seeds).

Reads <report_dir>/per_question.json, then: the seed-to-seed spread of the run means and its two parts (the training
run's own, the evaluation's sampling); the false-positive rate of the published verdict (Welch's t on run means,
`mtprl.core.stats.compare_arms`) on random A/A splits into two groups of n = 2, 3, 5, beside the old interval's
(seeds and questions resampled) and a question-only bootstrap's on the same splits; the power table (runs per arm
to detect 2, 3 and 5 points at 80% power). Writes calibration.json, calibration.md and calibration.png there.

    python scripts/calibrate_verdicts.py reports/calibration [--splits 1000]
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mtprl.analysis.aa_calibration import METHODS, false_positive_rate, power_table, variance_components  # noqa: E402
from mtprl.io.jsonl import atomic_write_json, atomic_write_text  # noqa: E402

SIZES = (2, 3, 5)
METHOD_LABELS = {"welch_run_means": "Welch's t on run means (compare_arms, published)",
                 "question_seed_bootstrap": "old: bootstrap over seeds and questions",
                 "question_bootstrap": "broken: bootstrap over questions only"}


def load_runs(report_dir: Path):
    kept = json.loads((report_dir / "per_question.json").read_text())
    runs = sorted(kept["runs"], key=lambda r: r["seed"])
    labels = {r["label"] for r in runs}
    if len(labels) != 1:
        raise ValueError(f"{report_dir}/per_question.json: an A/A calibration needs runs of one arm, got {labels}")
    k = runs[0]["k"]
    return np.array([[c / k for c in r["correct_per_question"]] for r in runs]), [r["seed"] for r in runs], k


def calibrate(report_dir: Path, splits: int) -> dict:
    runs, seeds, k = load_runs(report_dir)
    means = runs.mean(axis=1)
    rates = {name: {n: false_positive_rate(runs, n, splits=splits, method=fn).as_dict() for n in SIZES}
             for name, fn in METHODS.items()}
    return {"runs": len(runs), "seeds": seeds, "k": k, "questions": runs.shape[1],
            "run_means": means.tolist(), "mean": float(means.mean()),
            "components": variance_components(runs, k), "splits": splits, "false_positive_rates": rates,
            "power": power_table(means)}


def markdown(result: dict, command: str) -> str:
    c, p = result["components"], result["power"]
    lines = ["# A/A calibration of the verdict method", "", f"Made by `{command}` from per_question.json "
             f"({result['runs']} runs of one configuration, seeds {result['seeds'][0]}-{result['seeds'][-1]}, "
             f"{result['questions']} held-out questions x {result['k']} samples).", "",
             "## The runs", "",
             f"Mean avg@{result['k']} over runs {100 * result['mean']:.1f}%; run means from "
             f"{100 * min(result['run_means']):.1f}% to {100 * max(result['run_means']):.1f}%.", "",
             "| standard deviation of the run means (points) | its evaluation part: k samples of Q questions | "
             "its training-run part |", "|---|---|---|",
             f"| {100 * c['run_mean_sd']:.2f} | {100 * c['evaluation_sd']:.2f} | {100 * c['training_run_sd']:.2f} |",
             "", "## False-positive rate on A/A splits", "",
             f"{result['splits']} random splits of the runs into two disjoint groups of n per size (numpy "
             "default_rng(0)); every \"better\" / \"worse\" is a false positive. The binomial interval (Clopper-"
             "Pearson, 95%) is over the splits, which reuse the same runs: it is narrower than the rate's real "
             "uncertainty (tests/test_verdicts.py checks the method on independent synthetic experiments).", "",
             "| method | " + " | ".join(f"n = {n} per arm" for n in SIZES) + " |", "|---" * (len(SIZES) + 1) + "|"]
    for name, by_n in result["false_positive_rates"].items():
        cells = [f"{100 * r['rate']:.1f}% [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"
                 for r in (by_n[n] if n in by_n else by_n[str(n)] for n in SIZES)]
        lines.append(f"| {METHOD_LABELS[name]} | " + " | ".join(cells) + " |")
    lines += ["", "## Power: runs per arm to detect a difference", "",
              f"Welch's t at 95%, 80% power, simulated on normal run means with the measured spread "
              f"({100 * p['sd']:.2f} points) and with the upper end of its 95% interval ({100 * p['sd_upper']:.2f}, "
              f"from {p['runs']} runs).", "",
              "| difference (points) | runs per arm | runs per arm at the spread's upper bound |", "|---|---|---|"]
    for row in p["rows"]:
        lines.append(f"| {100 * row['effect']:g} | {row['runs_needed']} | {row['runs_needed_at_sd_upper']} |")
    lines += ["", "![calibration.png](calibration.png)", ""]
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    means = 100 * np.array(result["run_means"])
    axes[0].scatter(result["seeds"], means, color="C0")
    axes[0].axhline(means.mean(), color="k", lw=0.8)
    axes[0].set_xlabel("seed")
    axes[0].set_ylabel(f"held-out avg@{result['k']} (%)")
    axes[0].set_title(f"{result['runs']} runs of one configuration (sd {np.std(means, ddof=1):.2f} points)")
    axes[0].grid(alpha=0.3)
    width = 0.27
    for i, (name, by_n) in enumerate(result["false_positive_rates"].items()):
        rates = [by_n[n] if n in by_n else by_n[str(n)] for n in SIZES]
        xs = np.arange(len(SIZES)) + (i - 1) * width
        ys = [100 * r["rate"] for r in rates]
        err = [[y - 100 * r["low"] for y, r in zip(ys, rates)], [100 * r["high"] - y for y, r in zip(ys, rates)]]
        axes[1].bar(xs, ys, width, yerr=err, capsize=3, color=f"C{i}", label=METHOD_LABELS[name])
    axes[1].axhline(5, color="k", ls="--", lw=0.8, label="5% (the level)")
    axes[1].set_xticks(range(len(SIZES)), [f"n = {n}" for n in SIZES])
    axes[1].set_ylabel("A/A splits called better / worse (%)")
    axes[1].set_title("False-positive rate on A/A splits")
    axes[1].legend(fontsize=7)
    axes[1].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--splits", type=int, default=1000)
    args = parser.parse_args(argv)
    result = calibrate(args.report_dir, args.splits)
    command = f"python scripts/calibrate_verdicts.py {args.report_dir} --splits {args.splits}"
    atomic_write_json(str(args.report_dir / "calibration.json"), result)
    figure(result, args.report_dir / "calibration.png")
    text = markdown(result, command)
    atomic_write_text(str(args.report_dir / "calibration.md"), text)
    print(text)


if __name__ == "__main__":
    main()
