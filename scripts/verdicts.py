"""Recompute every interval of a comparison report from its committed files, the training run as the unit
(`mtprl.core.stats.compare_arms`), and print them.

A report written since per-question results were kept has `per_question.json` (every run's correct samples per
held-out question): the intervals come from it. An older report kept only each arm's mean and standard deviation of
its runs' accuracies (report.json) and the starting model's per-question evaluation (start/eval.json): the same
Welch interval comes from those (`stats.compare_summaries`, `stats.compare_summary_to_reference`).

    python scripts/verdicts.py reports/demo [reports/sweep_clip ...]
    python scripts/verdicts.py --rewrite reports/sweep_clip   # also rewrite report.md's table and report.json's intervals

`--rewrite` replaces report.md's accuracy section (the table, the note on the method, the noise components) and the
`vs_baseline` / `vs_start` entries of report.json; the rest of the report (figures, step times) is left as it was.
"""

import argparse
import json
import math
import re
from pathlib import Path

from mtprl.io.jsonl import atomic_write_json, atomic_write_text
from mtprl.analysis.report import VERDICT_METHOD, VERDICT_NOTE, few_runs_note, markdown_table, noise_table
from mtprl.core.stats import (compare_arms, compare_summaries, compare_summary_to_reference, compare_to_reference)


def _start(report_dir: Path):
    path = report_dir / "start" / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def from_per_question(report_dir: Path, rows: list[dict], baseline: str):
    """{label: (vs_baseline, vs_start)} from per_question.json."""
    kept = json.loads((report_dir / "per_question.json").read_text())
    by_label = {}
    for run in kept["runs"]:
        by_label.setdefault(run["label"], []).append([c / run["k"] for c in run["correct_per_question"]])
    start = kept.get("start")
    out = {}
    for row in rows:
        arm = by_label.get(row["label"])
        if arm is None:
            out[row["label"]] = (None, None)
            continue
        vs_base = (compare_arms(arm, by_label[baseline])
                   if baseline in by_label and row["label"] != baseline else None)
        vs_start = (compare_to_reference(arm, [c / start["k"] for c in start["correct_per_question"]], start["k"])
                    if start else None)
        out[row["label"]] = (vs_base, vs_start)
    return out


def from_summaries(report_dir: Path, rows: list[dict], baseline: str):
    """{label: (vs_baseline, vs_start)} from report.json's per-arm mean and standard deviation over runs."""
    start = _start(report_dir)
    summary = {r["label"]: (r["avg"][0], r["avg"][1], len(r["seeds"])) for r in rows}
    out = {}
    for row in rows:
        vs_base = (compare_summaries(summary[row["label"]], summary[baseline])
                   if baseline in summary and row["label"] != baseline else None)
        vs_start = None
        if start and "correct_per_question" in start:
            vs_start = compare_summary_to_reference(summary[row["label"]],
                                                    [c / start["k"] for c in start["correct_per_question"]],
                                                    start["k"])
        out[row["label"]] = (vs_base, vs_start)
    return out


def recompute(report_dir: Path):
    report = json.loads((report_dir / "report.json").read_text())
    rows, baseline = report["rows"], report.get("baseline")
    source = "per_question.json" if (report_dir / "per_question.json").is_file() else "report.json (mean, sd, runs)"
    fn = from_per_question if source == "per_question.json" else from_summaries
    return report, rows, baseline, fn(report_dir, rows, baseline), source


def _fmt(c) -> str:
    if c is None:
        return "–"
    if math.isinf(c.low):
        return f"{100 * c.mean:+.1f} (1 run, no interval)"
    return f"{100 * c.mean:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}] {c.verdict}"


def rewrite(report_dir: Path, report: dict, rows: list[dict], baseline: str, results: dict, source: str) -> None:
    start = _start(report_dir)
    table_rows = [dict(r, vs_baseline=results[r["label"]][0], vs_start=results[r["label"]][1]) for r in rows]
    multi = len(rows) > 1
    note = VERDICT_NOTE
    if source != "per_question.json":
        note = VERDICT_METHOD + (" This report was made before per-question results were kept: its intervals were recomputed on "
                 "2026-12-07 from report.json's per-arm mean and standard deviation of the runs' accuracies "
                 "(`python scripts/verdicts.py --rewrite`), the same Welch interval; the question-level part is "
                 "not known for it.")
    section = ("## Accuracy on held-out questions (mean ± std over seeds)\n\n"
               + markdown_table(table_rows, baseline=baseline if multi else None, start=start) + "\n\n" + note + "\n\n"
               + (few_runs_note(rows) + "\n\n" if few_runs_note(rows) else "")
               + (noise_table(table_rows, baseline if multi else None) + "\n\n" if source == "per_question.json"
                  else ""))
    md = (report_dir / "report.md").read_text()
    new_md, count = re.subn(r"## Accuracy on held-out questions.*?(?=## )", lambda _: section, md, count=1,
                            flags=re.S)
    if count != 1:
        raise ValueError(f"{report_dir / 'report.md'}: no accuracy section to rewrite")
    stale = ("(Made before 2026-12-07: this table's intervals against the baseline are the old bootstrap over seeds "
             "and rollouts, too narrow at 2-3 seeds; report.json keeps no per-run values to redo them.)")
    if source != "per_question.json" and "## Rollouts drafted by the heads\n\n" in new_md and stale not in new_md:
        new_md = new_md.replace("## Rollouts drafted by the heads\n\n", "## Rollouts drafted by the heads\n\n" + stale
                                + "\n\n", 1)
    atomic_write_text(str(report_dir / "report.md"), new_md)
    for row in report["rows"]:
        vs_base, vs_start = results[row["label"]]
        row["vs_baseline"] = vs_base.as_dict() if vs_base is not None else None
        row["vs_start"] = vs_start.as_dict() if vs_start is not None else None
    report["verdict_source"] = source
    atomic_write_json(str(report_dir / "report.json"), report, default=float)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report_dirs", nargs="+", type=Path)
    parser.add_argument("--rewrite", action="store_true", help="Rewrite report.md's accuracy section and "
                        "report.json's intervals with the recomputed ones.")
    args = parser.parse_args(argv)
    for report_dir in args.report_dirs:
        report, rows, baseline, results, source = recompute(report_dir)
        print(f"\n## {report_dir} (from {source}; baseline {baseline})\n")
        print("| arm | runs | avg (%) | vs baseline (points, 95%) | vs start (points, 95%) |")
        print("|---|---|---|---|---|")
        for row in rows:
            vs_base, vs_start = results[row["label"]]
            print(f"| {row['label']} | {len(row['seeds'])} | {100 * row['avg'][0]:.1f} ± {100 * row['avg'][1]:.1f} | "
                  f"{'(baseline)' if row['label'] == baseline else _fmt(vs_base)} | {_fmt(vs_start)} |")
        if args.rewrite:
            rewrite(report_dir, report, rows, baseline, results, source)
            print(f"\nrewrote {report_dir / 'report.md'} and report.json")


if __name__ == "__main__":
    main()
