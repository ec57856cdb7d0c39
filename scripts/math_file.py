"""Write a small math dataset file in a real format, for runs on a machine without a hub.

    python scripts/math_file.py --format gsm8k --out runs/data/arith_gsm8k.jsonl [--size 600]

Questions are reasoning-gym `basic_arithmetic` problems written as word questions; the answer column follows
the chosen format (gsm8k: `answer` = "... #### N"; math500: `problem` + `answer`; math: `problem` + `solution`
with \\boxed{N}; dapo: chat `prompt` + `reward_model.ground_truth`). mtprl reads it with `--dataset_name FILE`.
"""

import argparse
import json
import os

import reasoning_gym


def row(fmt, question, answer):
    if fmt == "gsm8k":
        return {"question": question, "answer": f"Compute it step by step.\n#### {answer}"}
    if fmt == "math500":
        return {"problem": question, "answer": answer}
    if fmt == "math":
        return {"problem": question, "solution": f"Step by step, the value is $\\boxed{{{answer}}}$."}
    return {"data_source": "arith", "prompt": [{"role": "user", "content": question}],
            "reward_model": {"ground_truth": answer, "style": "rule"}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=("gsm8k", "math500", "math", "dapo"), default="gsm8k")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = reasoning_gym.create_dataset("basic_arithmetic", size=args.size, seed=args.seed, min_terms=2, max_terms=3,
                                        min_digits=1, max_digits=2, operators=("+", "-"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for entry in data:
            question = entry["question"].split("\n")[0].strip()
            f.write(json.dumps(row(args.format, question, str(entry["answer"]))) + "\n")
    print(f"wrote {args.size} {args.format} rows to {args.out}")


if __name__ == "__main__":
    main()
