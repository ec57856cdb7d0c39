"""Per arm of a geometry sweep (configs/sweep_clip.yaml), the update's instrumentation read from every run's
metrics.jsonl: medians over all logged steps of all seeds of grad_norm (TRL's pre-clip total), grad_norm/rl,
grad_norm/mtp, the clip factor(s) and ||delta theta||. Prints a markdown table.

    python scripts/sweep_geometry_table.py reports/sweep_clip
"""

import json
import statistics
import sys
from pathlib import Path

KEYS = ["grad_norm", "grad_norm/rl", "grad_norm/mtp", "clip_factor", "clip_factor/rl", "clip_factor/mtp",
        "update_norm"]


def arm_rows(report_dir: Path) -> dict:
    arms = {}
    for run in sorted((report_dir / "runs").iterdir()):
        if not (run / "metrics.jsonl").is_file():
            continue
        label = run.name.rsplit("-s", 1)[0]
        values = arms.setdefault(label, {k: [] for k in KEYS})
        for line in open(run / "metrics.jsonl"):
            row = json.loads(line)
            for k in KEYS:
                if isinstance(row.get(k), (int, float)):
                    values[k].append(row[k])
    return arms


def main():
    report_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/sweep_clip")
    print("| arm | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for label, values in arm_rows(report_dir).items():
        cells = [f"{statistics.median(v):.3g}" if v else "–" for v in (values[k] for k in KEYS)]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
