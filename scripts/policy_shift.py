"""How far RL moved the policy in each run of a comparison: the held-out KL(p_end || p_start) (`mtprl.analysis.policy_shift`)
on the comparison's own held-out questions, beside the accuracy gain its report measured. Writes
<report_dir>/policy_shift.json and prints a markdown table (mean over seeds; the KL's 95% interval is Student's t
over the runs, the training run as the unit, `mtprl.core.stats.mean_interval`).

    python scripts/policy_shift.py reports/frozen-heads [--k 4] [--questions 100]
"""

import argparse
import json
import statistics
from pathlib import Path

from mtprl.data.task_setup import TaskArguments, task_splits
from mtprl.io.jsonl import atomic_write_json
from mtprl.model.loading import load_model
from mtprl.analysis.policy_shift import held_out_kl
from mtprl.core.stats import mean_interval


def run_shift(run: Path, k: int, questions: int, cache: dict) -> dict:
    info = json.loads((run / "run_info.json").read_text())
    start_path = info["model"]
    if start_path not in cache:
        cache[start_path] = load_model(start_path)
    start, tokenizer = cache[start_path]
    task_args = TaskArguments(model_name_or_path=start_path, **info["task_args"])
    _, eval_ds = task_splits(task_args, tokenizer)
    prompts = list(eval_ds["prompt"])[:questions]
    end, _ = load_model(str(run))
    out = held_out_kl(end, start, tokenizer, prompts, k=k, max_new_tokens=task_args.eval_max_new_tokens,
                      seed=info["seed"])
    return {"label": info["label"], "seed": info["seed"], **out}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report_dir", type=Path)
    parser.add_argument("--k", type=int, default=4, help="completions per question")
    parser.add_argument("--questions", type=int, default=100, help="held-out questions (the first N)")
    args = parser.parse_args()
    cache, rows = {}, []
    for run in sorted((args.report_dir / "runs").iterdir()):
        if (run / "run_info.json").is_file() and (run / "model.safetensors").is_file():
            rows.append(run_shift(run, args.k, args.questions, cache))
            print(f"{run.name}: KL {rows[-1]['kl_per_completion']:.4f} nats/completion", flush=True)
    report = json.loads((args.report_dir / "report.json").read_text()) if (args.report_dir / "report.json").is_file() \
        else {"rows": []}
    gain = {r["label"]: r.get("vs_start") for r in report["rows"]}
    table = ["| arm | seeds | held-out KL(end || start), nats per completion [95% over runs] | per token | "
             "avg@k - start (points) |",
             "|---|---|---|---|---|"]
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        kl, low, high = mean_interval([r["kl_per_completion"] for r in mine])
        per_token = statistics.mean(r["kl_per_token"] for r in mine)
        g = gain.get(label)
        g_text = f"{100 * g['mean']:+.1f} [{100 * g['low']:+.1f}, {100 * g['high']:+.1f}]" if g else "–"
        table.append(f"| {label} | {len(mine)} | {kl:.4f} [{low:.4f}, {high:.4f}] | {per_token:.5f} | {g_text} |")
    atomic_write_json(str(args.report_dir / "policy_shift.json"), {"k": args.k, "questions": args.questions,
                                                                    "runs": rows})
    print("\n".join(table))


if __name__ == "__main__":
    main()
