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

from .jsonl import read_jsonl  # noqa: E402
from .regimes import REGIME_LABELS, REGIMES  # noqa: E402


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


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class Run:
    """One finished (or partial) training run, read from its directory."""

    def __init__(self, path: str):
        self.path = path
        info_file = os.path.join(path, "run_info.json")
        metrics_file = os.path.join(path, "metrics.jsonl")
        self.rows = [row for _, row in read_jsonl(metrics_file, "metrics file")]
        info = {}
        if os.path.isfile(info_file):
            with open(info_file) as f:
                info = json.load(f)
        self.regime = info.get("mtp_regime", os.path.basename(path).split("-")[0])
        self.seed = info.get("seed", 0)
        self.label = info.get("label", self.regime)
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
    groups = defaultdict(list)
    for run in runs:
        groups[run.label].append(run)
    order = {r: i for i, r in enumerate(REGIMES)}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[1][0].regime, 99), kv[0])))


def benchmark_names(runs) -> list[str]:
    """The `eval_datasets` benchmarks any run was evaluated on, in first-seen order."""
    names = []
    for run in runs:
        for name in (run.eval or {}).get("benchmarks", {}):
            if name not in names:
                names.append(name)
    return names


def table_rows(runs) -> list[dict]:
    """One row per regime: mean/std over seeds of avg@k and pass@k (from eval.json), avg@k on every
    `eval_datasets` benchmark and their average (the paper's Table 1 columns), final training reward (mean of
    the last 5 logged rewards), median step time."""
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
        rows.append(row)
    return rows


def _fmt(ms, best=False, scale=100.0):
    mean, std = ms
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.1f} ± {std * scale:.1f}"
    return f"**{text}**" if best else text


def markdown_table(rows) -> str:
    k = next((r["k"] for r in rows if r["k"]), "k")

    def shown(ms):  # what the table prints; equal printed values are equally best
        return round(ms[0] * 100, 1)

    bench_keys = [key for key in (rows[0] if rows else {}) if key.startswith("bench:")]
    keys = ("avg", "pass", *bench_keys, "reward")
    best = {key: max((shown(r[key]) for r in rows if not math.isnan(r[key][0])), default=None) for key in keys}
    headers = [f"avg@{k} (%)", f"pass@{k} (%)", *(f"{key[6:]} avg@{k} (%)" for key in bench_keys),
               "final train reward (x100)"]
    lines = ["| regime | seeds | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
    for r in rows:
        cells = [_fmt(r[key], not math.isnan(r[key][0]) and shown(r[key]) == best[key]) for key in keys]
        lines.append(f"| {REGIME_LABELS.get(r['label'], r['label'])} | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_time_table(rows) -> str:
    base = next((r["step_time"] for r in rows if r["regime"] == "detach"), float("nan"))
    lines = ["| regime | median step time (s) | / detach |", "|---|---|---|"]
    for r in rows:
        ratio = r["step_time"] / base if base and not math.isnan(base) else float("nan")
        lines.append(f"| {REGIME_LABELS.get(r['label'], r['label'])} | {r['step_time']:.3f} | "
                     f"{'–' if math.isnan(ratio) else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


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


def fidelity_points(runs):
    """(c_hat, c_exact, v2_hat, v2_exact) at every logged step where the exact values were computed."""
    pts = []
    for run in runs:
        for row in run.rows:
            for head in run.heads():
                keys = [f"mtp/{k}/{head}" for k in ("c_hat", "c_exact", "v2_hat", "v2_exact")]
                if all(k in row for k in keys):
                    pts.append(tuple(float(row[k]) for k in keys))
    return pts


def _plot_fidelity(runs, out_dir):
    pts = fidelity_points(runs)
    if len(pts) < 2:
        return [], {}
    c_hat, c_exact, v2_hat, v2_exact = map(list, zip(*pts))
    r_c, r_v = pearson_r(c_hat, c_exact), pearson_r(v2_hat, v2_exact)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, y, r, name in ((axes[0], c_exact, c_hat, r_c, "c"), (axes[1], v2_exact, v2_hat, r_v, "v2")):
        ax.scatter(x, y, s=12, alpha=0.7)
        ax.set_xlabel(f"exact {name} (full-model gradients)")
        ax.set_ylabel(f"proxy {name}_hat (log-prob changes)")
        ax.set_title(f"{name}: Pearson r = {r:.3f} (n={len(x)})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, "proxy_vs_exact.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path], {"r_c": r_c, "r_v2": r_v, "n": len(pts)}


def build_report(run_dirs, out_dir, title="mtprl comparison", command=None) -> str:
    """Write `<out_dir>/report.md` and its PNG figures; returns the report path."""
    os.makedirs(out_dir, exist_ok=True)
    runs, skipped = load_runs(run_dirs)
    rows = table_rows(runs)
    figures = []
    for key, name, ylabel in (("reward", "reward.png", "mean reward (smoothed)"),
                              ("mtp/accept/1", "acceptance.png", "expected acceptance, head 1")):
        path = os.path.join(out_dir, name)
        if _plot_per_label(runs, key, path, f"{ylabel} per regime", ylabel):
            figures.append(path)
    figures += _plot_occ(runs, out_dir)
    fid_figs, fidelity = _plot_fidelity(runs, out_dir)
    figures += fid_figs

    lines = [f"# {title}", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    lines += ["## Accuracy on held-out questions (mean ± std over seeds)", "", markdown_table(rows), ""]
    lines += ["## Step time", "", step_time_table(rows), ""]
    if fidelity:
        lines += ["## Proxy fidelity", "",
                  f"Pearson r between the log-prob proxies and the exact gradient statistics over {fidelity['n']} "
                  f"points: c: {fidelity['r_c']:.3f}, v2: {fidelity['r_v2']:.3f}.", ""]
    lines += ["## Figures", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in figures] + [""]
    if skipped:
        lines += ["## Skipped runs", ""] + [f"- {s}" for s in skipped] + [""]
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"rows": rows, "fidelity": fidelity, "skipped": skipped, "figures": figures}, f, indent=2,
                  default=float)
    return report
