"""The committed probe files re-read from their measured points (`probe_report.measured_readout`): the best grid
point and its bootstrap probability of being best, the edge flag, OCC's and the exact lambda's share of the best
point's gain with intervals, and the fit's lambda_hat* beside them (secondary), plus the prompts actually probed.

    python scripts/reread_probes.py [files or directories ...] [--markdown PATH]

Default: every probe file under reports/sweep/probes and reports/smollm2-probe."""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from mtprl.analysis.probe_report import measured_readout, multiplicity_markdown, multiplicity_readout  # noqa: E402

DEFAULT = ["reports/sweep/probes", "reports/smollm2-probe"]


def probe_files(paths) -> list[str]:
    out = []
    for path in paths:
        out += sorted(glob.glob(os.path.join(path, "**", "probe-*.json"), recursive=True)) if os.path.isdir(path) \
            else [path]
    return out


def _g(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def _share(x) -> str:
    return "–" if x is None else f"{x[0]:.2f} [{x[1]:.2f}, {x[2]:.2f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", default=DEFAULT)
    parser.add_argument("--markdown", default=None, help="also write the table there")
    args = parser.parse_args(argv)
    lines = ["| probe | term | prompts used (recorded) | best grid lambda | P(best) | edge | OCC's lambda | best / OCC | "
             "OCC's share of best [95% CI] | exact lambda | exact's share | fit lambda_hat*, R^2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios, policy_p = [], []
    for path in probe_files(args.paths):
        with open(path) as f:
            p = json.load(f)
        r = measured_readout(p)
        used = np.asarray(p["per_prompt"]).shape[1]
        ratio = r["grid_best"] / p["occ_lambda"] if p["occ_lambda"] else None
        if ratio is not None and p["term"] != "detach" and "sweep" in path:
            ratios.append(ratio)
        if p["term"] == "policy":
            policy_p.append(r["p_max"])
        name = os.path.relpath(path).replace("reports/", "")
        lines.append(f"| {name} | {p['term']} | {used} ({p['prompts']}) | {_g(r['grid_best'])} | {r['p_best']:.2f} | "
                     f"{'yes' if r['edge'] else ''} | {_g(p['occ_lambda'])} | {_g(ratio)} | {_share(r['share'])} | "
                     f"{_g(p.get('exact_lambda'))} | {_share(r['exact_share'])} | {_g(p['lambda_hat_star'])}, "
                     f"{_g(p['fit']['r2'])} |")
    text = "\n".join(lines)
    probes = []
    for path in probe_files(args.paths):
        with open(path) as f:
            probes.append(json.load(f))
    text += "\n\n" + multiplicity_markdown(multiplicity_readout(probes))
    if ratios:
        q = np.percentile(ratios, [25, 75])
        text += (f"\n\nSweep probes of the joint terms: best grid lambda / OCC's lambda median {statistics.median(ratios):.2f}"
                 f" (IQR {q[0]:.2f}-{q[1]:.2f}, {len(ratios)} probes); largest P(best) in any policy-term probe "
                 f"{max(policy_p):.2f}.")
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
