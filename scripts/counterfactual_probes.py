"""Which of the clip, Adam's moments and the gradient itself shapes dJ(lambda): the probes run with
`--counterfactuals no_clip,separate_clip,separate_state,sgd` read side by side, from their measured points.

For every probe file: per update (the run's own and each counterfactual) the measured dJ(lambda) - dJ(0) at every
grid lambda with its 95% interval (points of held-out reward), the best grid point and its bootstrap probability
of being best, and the update's norm at the largest lambda over its norm at 0. Writes a markdown table and one
figure (a panel per probe, a line per update, intervals as bars).

    python scripts/counterfactual_probes.py DIR_OR_FILES... --markdown OUT.md --figure OUT.png
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mtprl.analysis.probe_report import multiplicity_markdown, multiplicity_readout  # noqa: E402

NAMES = {"own": "the run's update (shared clip, AdamW)", "no_clip": "AdamW, no clip",
         "separate_clip": "AdamW, separate clip", "separate_state": "separate Adam moments, shared clip",
         "sgd": "SGD, shared clip (step at 0 matched)", "sgd_no_clip": "SGD, no clip (step at 0 matched)"}


def probe_files(paths) -> list[str]:
    out = []
    for path in paths:
        out += sorted(glob.glob(os.path.join(path, "**", "probe-*.json"), recursive=True)) if os.path.isdir(path) \
            else [path]
    return [f for f in out if json.load(open(f)).get("counterfactuals")]


def curves(probe: dict) -> dict:
    """update name -> its readout (the run's own curve at the top level of probe.json)."""
    return {"own": probe, **probe["counterfactuals"]}


def summary(readout: dict) -> dict:
    lams = readout["lambdas"]
    best = lams.index(readout["grid_best_lambda"])
    norms = readout.get("update_norm")
    top = max(range(len(lams)), key=lambda i: lams[i])
    zero = lams.index(0.0)
    return {"best": lams[best], "p_best": readout["best_lambda_probability"][best], "edge": readout["best_at_edge"],
            "rel": [(lam, 100 * m, 100 * lo, 100 * hi) for lam, m, lo, hi in
                    zip(lams, readout["dJ_rel"], readout["dJ_rel_low"], readout["dJ_rel_high"])],
            "norm_ratio": norms[top] / norms[zero] if norms and norms[zero] else float("nan")}


def label(path: str, probe: dict) -> str:
    folder = os.path.dirname(path)  # <run>/probes/probe.json as the probe writes it, or <run name>/probe.json
    run = os.path.basename(os.path.dirname(folder) if os.path.basename(folder) == "probes" else folder)
    return f"{run} step {probe['step']} ({probe['term']} term)"


def markdown(files) -> str:
    lines = []
    for path in files:
        probe = json.load(open(path))
        lines += [f"### {label(path, probe)}", "",
                  f"`{os.path.relpath(path)}`: {probe['prompts']} prompts x {probe['samples']} samples; OCC's lambda "
                  f"{probe.get('occ_lambda', float('nan')):.3g}, exact lambda {probe.get('exact_lambda', float('nan')):.3g}",
                  ""]
        table = None
        for name, readout in curves(probe).items():
            s = summary(readout)
            if table is None:
                head = ["update", "best grid lambda (P best)"] + [f"dJ({lam:g}) - dJ(0)" for lam, *_ in s["rel"]] + \
                       ["||delta(max)|| / ||delta(0)||"]
                table = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
            cells = [NAMES.get(name, name), f"{s['best']:g} ({s['p_best']:.2f}{', edge' if s['edge'] else ''})"]
            cells += [f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]" for _, m, lo, hi in s["rel"]]
            cells.append(f"{s['norm_ratio']:.2f}")
            table.append("| " + " | ".join(cells) + " |")
        lines += table + [""]
    return "\n".join(lines)


ADAM_FAMILY = ("own", "no_clip", "separate_clip", "separate_state")  # AdamW's step; SGD's intervals are far wider


def figure(files, out: str) -> None:
    """Two rows per probe set: the AdamW updates (the run's own and its clip / moment variants), then the SGD ones
    with the run's own curve repeated for scale (their intervals are several times wider)."""
    n = len(files)
    fig, axes = plt.subplots(2, n, figsize=(3.9 * n, 7.2), squeeze=False)
    for col, path in enumerate(files):
        probe = json.load(open(path))
        for row, keep in enumerate((ADAM_FAMILY, ("own", "sgd", "sgd_no_clip"))):
            ax = axes[row][col]
            for i, (name, readout) in enumerate(curves(probe).items()):
                if name not in keep:
                    continue
                s = summary(readout)
                xs = [lam for lam, *_ in s["rel"]]
                ms = [m for _, m, _, _ in s["rel"]]
                err = [[m - lo for _, m, lo, _ in s["rel"]], [hi - m for _, m, _, hi in s["rel"]]]
                ax.errorbar(xs, ms, yerr=err, marker="o", ms=3, lw=1.3, capsize=2, color=f"C{i}",
                            label=NAMES.get(name, name), alpha=0.9)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("symlog", linthresh=0.03)
            lams = probe["lambdas"]
            ax.set_xlim(min(lams) * 1.3 if min(lams) < 0 else -0.005, max(lams) * 1.3)
            ax.set_title(label(path, probe), fontsize=9)
            ax.set_xlabel("lambda (symlog)")
            if col == 0:
                ax.set_ylabel(("AdamW updates" if row == 0 else "SGD updates") + "\ndJ(lambda) - dJ(0), points")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=6.5)
    fig.suptitle("One update from the same state and batch (95% intervals): which normaliser shapes the curve?",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--figure", default=None)
    args = parser.parse_args()
    files = probe_files(args.paths)
    text = markdown(files)
    text += "\n" + multiplicity_markdown(multiplicity_readout([json.load(open(f)) for f in files])) + "\n"
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.figure and files:
        figure(files, args.figure)
    print(text)


if __name__ == "__main__":
    main()
