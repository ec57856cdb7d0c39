"""The report's probe section: the paper's Figure 3 measured (dJ(lambda) - dJ(0) per probed step, OCC's lambda
marked) and a table per arm read from the measured points (the best grid point and its bootstrap probability of
being best, OCC's and the exact lambda's share of its gain, the edge flag; the fit as a secondary column), from the
runs' `probes/probe-step*.json`."""

from __future__ import annotations

import glob
import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402

from ..core.gain import best_point_probability, relative_gain_pvalues, share_of_best  # noqa: E402
from ..core.stats import multiplicity, quantile  # noqa: E402


def read_probes(run_dir: str) -> list[dict]:
    """The run's probe files, by step (a term-suffixed file is a control probe of another term)."""
    out = []
    for path in glob.glob(os.path.join(run_dir, "probes", "probe-step*.json")):
        with open(path) as f:
            probe = json.load(f)
        probe["file"] = os.path.basename(path)
        out.append(probe)
    return sorted(out, key=lambda p: (p["step"], p["file"]))


def _own(probes: list[dict]) -> list[dict]:
    """The probes of the run's own term (files without a term suffix)."""
    return [p for p in probes if p["file"] == f"probe-step{p['step']}.json"]


def measured_readout(p: dict) -> dict:
    """A probe's readout from its measured points, recomputed from the file's per-prompt gains (so probe files
    written before the readout existed read the same way): the best grid point, each point's bootstrap probability
    of being best, the edge flag, the shares of the best point's gain at OCC's and the exact lambda."""
    lam, per = [float(x) for x in p["lambdas"]], np.asarray(p["per_prompt"], dtype=np.float64)
    rel = (per - per[lam.index(0.0)]).mean(axis=1)
    best = int(np.argmax(rel))
    prob = best_point_probability(per)
    exact = p.get("exact_lambda")
    return {"grid_best": lam[best], "p_best": prob[best], "p_max": max(prob),
            "edge": best in (0, len(lam) - 1) and lam[best] != 0.0,
            "share": share_of_best(per, lam, p["occ_lambda"]) if p["occ_lambda"] in lam else None,
            "exact_share": share_of_best(per, lam, exact) if exact in lam else None}


def probe_rows(groups: dict) -> list[dict]:
    """One row per probe of every arm's runs (arm label -> runs), read from its measured points."""
    rows = []
    for label, runs in groups.items():
        for run in runs:
            for p in _own(read_probes(run.path)):
                r = measured_readout(p)
                occ = p["occ_lambda"]
                r.update({"arm": label, "seed": run.seed, "step": p["step"], "term": p["term"], "occ_lambda": occ,
                          "ratio": r["grid_best"] / occ if occ else float("nan"),
                          "lambda_hat_star": p["lambda_hat_star"], "interval": p["lambda_hat_star_interval"],
                          "fit_ratio": p["lambda_hat_star"] / occ if occ else float("nan"),
                          "linear": p["fit"]["linear"], "quadratic": p["fit"]["quadratic"], "r2": p["fit"]["r2"],
                          "c_exact": p["c_exact"], "v2_exact": p["v2_exact"], "minutes": p["seconds"] / 60})
                rows.append(r)
    return rows


def _g(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _share(x) -> str:
    return "–" if x is None else f"{_g(x[0])} [{_g(x[1])}, {_g(x[2])}]"


def probe_markdown(rows: list[dict]) -> str:
    lines = ["| arm | seed | step | term | best grid lambda (P best) | OCC's lambda | best / OCC | OCC's share of the "
             "best point's gain [95% CI] | exact lambda's share | fit: lambda_hat* [95% CI], R^2 | exact c | "
             "exact v^2 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        edge = ", edge" if r["edge"] else ""
        lines.append(f"| {r['arm']} | {r['seed']} | {r['step']} | {r['term']} | {_g(r['grid_best'])} "
                     f"({r['p_best']:.2f}{edge}) | {_g(r['occ_lambda'])} | {_g(r['ratio'])} | {_share(r['share'])} | "
                     f"{_share(r['exact_share'])} | {_g(r['lambda_hat_star'])} [{_g(r['interval'][0])}, "
                     f"{_g(r['interval'][1])}], {_g(r['r2'])} | {_g(r['c_exact'])} | {_g(r['v2_exact'])} |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict]) -> str:
    """Per arm, from the measured points: the best grid point against OCC's lambda (median and interquartile
    range), OCC's share of the best point's gain, the largest bootstrap probability any point gets of being best,
    how often the best point is at the grid's edge; the fit's lambda_hat* / OCC beside them as a secondary line."""
    lines = ["| arm | probes | best grid lambda / OCC: median [IQR] | OCC's share of best: median | largest P(best) | "
             "best at the grid edge | fit lambda_hat* / OCC: median (secondary) |", "|---|---|---|---|---|---|---|"]
    arms = dict.fromkeys(r["arm"] for r in rows)
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        ratios = [r["ratio"] for r in rs if not math.isnan(r["ratio"])]
        fits = [r["fit_ratio"] for r in rs if not math.isnan(r["fit_ratio"])]
        shares = [r["share"][0] for r in rs if r["share"] is not None]
        iqr = f"{_g(statistics.median(ratios))} [{_g(quantile(ratios, 0.25))}, {_g(quantile(ratios, 0.75))}]" \
            if ratios else "–"
        lines.append(f"| {arm} | {len(rs)} | {iqr} | {_g(statistics.median(shares)) if shares else '–'} | "
                     f"{max(r['p_max'] for r in rs):.2f} | {sum(r['edge'] for r in rs)}/{len(rs)} | "
                     f"{_g(statistics.median(fits)) if fits else '–'} |")
    return "\n".join(lines)


def plot_measured_figure3(groups: dict, out_dir: str) -> list[str]:
    """One panel per arm (first seed with probes): dJ(lambda) - dJ(0) against lambda, one curve per probed step
    (early light, late dark), paired 95% intervals as error bars, the fitted parabola, OCC's lambda marked."""
    panels = []
    for label, runs in groups.items():
        for run in runs:
            probes = _own(read_probes(run.path))
            if probes:
                panels.append((f"{label} (seed {run.seed})", probes))
                break
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False)
    for ax, (title, probes) in zip(axes[0], panels):
        cmap = plt.get_cmap("viridis")
        for i, p in enumerate(probes):
            color = cmap(0.15 + 0.7 * i / max(len(probes) - 1, 1))
            lam, rel = p["lambdas"], [x * 100 for x in p["dJ_rel"]]
            err = [[(r - lo * 100) for r, lo in zip(rel, p["dJ_rel_low"])],
                   [(hi * 100 - r) for r, hi in zip(rel, p["dJ_rel_high"])]]
            ax.errorbar(lam, rel, yerr=err, fmt="o", ms=3.5, color=color, capsize=2, lw=1,
                        label=f"step {p['step']}")
            xs = [min(lam) + (max(lam) - min(lam)) * k / 100 for k in range(101)]
            a, b = p["fit"]["linear"], p["fit"]["quadratic"]
            ax.plot(xs, [(a * x + b * x * x) * 100 for x in xs], color=color, lw=1, alpha=0.8)
            ax.axvline(p["occ_lambda"], color=color, ls=":", lw=1)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{title}: term {probes[0]['term']}", fontsize=9)
        ax.set_xlabel("lambda (MTP coefficient of one update); dotted: OCC's")
        ax.set_ylabel("dJ(lambda) - dJ(0)  (reward, points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Figure 3 measured: gain of one update vs lambda\n(95% paired intervals, fitted parabola)",
                 fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "figure3_measured.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def readouts_of(probe: dict) -> dict:
    """name -> readout of every update a probe file measured: the run's own, then its counterfactuals."""
    return {"own": probe, **probe.get("counterfactuals", {})}


def multiplicity_readout(probes) -> dict:
    """Every dJ(lambda) - dJ(0) interval the given probe files print (each update's, counterfactuals included),
    as one family: how many, how many exclude 0 uncorrected, and which survive Holm (family-wise) and
    Benjamini-Hochberg (false discovery), at 5% (`stats.multiplicity`, p-values from
    `gain.relative_gain_pvalues`)."""
    names, pvalues = [], []
    for probe in probes:
        for update, readout in readouts_of(probe).items():
            lams = [float(x) for x in readout["lambdas"]]
            ps = relative_gain_pvalues(readout["per_prompt"], lams)
            names += [(probe.get("step"), probe.get("term"), update, lam) for lam in lams if lam != 0.0]
            pvalues += ps
    result = multiplicity(pvalues)
    result["survivors_holm"] = [n for n, keep in zip(names, result["holm"]) if keep]
    result["survivors_bh"] = [n for n, keep in zip(names, result["bh"]) if keep]
    return result


def multiplicity_markdown(result: dict) -> str:
    """One paragraph: the family's size and what survives each correction."""
    def listed(items):
        shown = ", ".join(f"step {s} {t} {u} lambda={lam:g}" for s, t, u, lam in items[:12])
        return shown + (f", ... ({len(items) - 12} more)" if len(items) > 12 else "")

    text = (f"Multiplicity: these probes print {result['tests']} intervals of dJ(lambda) - dJ(0) (every grid lambda "
            f"of every update); {result['uncorrected']} exclude 0 uncorrected (one-sample t over prompts at 5%; "
            f"about {0.05 * result['tests']:.0f} would by chance alone if nothing differed), {result['holm_count']} "
            f"survive Holm's family-wise correction and {result['bh_count']} a Benjamini-Hochberg false-discovery "
            "correction at 5%.")
    if result["survivors_holm"]:
        text += f" Surviving Holm: {listed(result['survivors_holm'])}."
    return text


def probe_section(groups: dict, out_dir: str) -> tuple[list[str], list[str], list[dict]]:
    """(markdown lines, figures, rows) of the probe section; empty when no run has probes."""
    rows = probe_rows(groups)
    if not rows:
        return [], [], []
    figures = plot_measured_figure3(groups, out_dir)
    lines = ["## Why a regime wins, measured (`mtprl probe`)", "",
             "At each probed checkpoint, one rollout batch and the run's own update, repeated from the same state "
             "for every lambda of a grid (0, OCC's lambda and the exact-gradient lambda included); dJ = change of "
             "the expected reward on held-out prompts, by importance sampling over one shared set of samples "
             "(`mtprl.importance_gain`). Read from the measured points: the best grid point, the bootstrap "
             "probability that it is the best (prompts resampled jointly), whether it sits at the grid's edge, and "
             "the share of its gain (over lambda = 0) that OCC's and the exact lambda get, with intervals. The "
             "fitted parabola a lambda + b lambda^2 (the paper's Eq. 7-11) is a summary only: its 1/se^2 weights let "
             "the points near 0 lead, and on one shared sample set the estimate is smooth in lambda whatever the "
             "truth, so its R^2 is no evidence of a parabola.", "",
             summary_markdown(rows), "", probe_markdown(rows), ""]
    probes = [p for runs in groups.values() for run in runs for p in _own(read_probes(run.path))]
    lines += [multiplicity_markdown(multiplicity_readout(probes)), ""]
    return lines, figures, rows
