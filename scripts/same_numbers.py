"""Same numbers before and after a refactor: a 30-step run per lambda source and per update-geometry setting.

    python scripts/same_numbers.py record runs/same-before     # on the old code
    python scripts/same_numbers.py record runs/same-after      # on the new code
    python scripts/same_numbers.py compare runs/same-before runs/same-after

Each case trains the `tiny` preset (random init, no warm start needed) for 30 steps on the demo's setup (DAPO,
4 optimizer steps per rollout, 2 heads) with `logging_steps: 1`; `compare` reads both metrics.jsonl files and
says, per case, whether every logged value is identical (timings excluded), else the first key that differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

BASE = ["--config", "configs/tiny.yaml", "--model_name_or_path", "tiny", "--eval_before", "false", "--max_steps", "30", "--logging_steps", "1",
        "--eval_steps", "0", "--eval_after", "false", "--save_strategy", "no", "--train_size", "512",
        "--eval_size", "16", "--learning_rate", "1e-4"]

# case -> the flags that make it (every lambda source, every fixed-coefficient term, every geometry setting)
CASES = {
    "detach": ["--mtp_regime", "detach"],
    "ce": ["--mtp_regime", "ce"],
    "policy": ["--mtp_regime", "policy"],
    "occ-paper": ["--mtp_regime", "occ", "--occ_variant", "paper"],
    "occ-ema": ["--mtp_regime", "occ", "--occ_variant", "ema"],
    "occ-hidden": ["--mtp_regime", "occ", "--occ_variant", "hidden"],
    "occ-exact": ["--mtp_regime", "occ", "--occ_variant", "exact"],
    "occ-last_layers": ["--mtp_regime", "occ", "--occ_variant", "last_layers"],
    "occ-fidelity": ["--mtp_regime", "occ", "--occ_fidelity_every", "5"],
    "ce-sep-clip": ["--mtp_regime", "ce", "--mtp_coef", "1.0", "--mtp_grad_clip", "separate"],
    "ce-sep-moments": ["--mtp_regime", "ce", "--mtp_coef", "1.0", "--mtp_optimizer_state", "separate"],
    "detach-sep-clip": ["--mtp_regime", "detach", "--mtp_grad_clip", "separate"],
    "occ-sep-clip": ["--mtp_regime", "occ", "--mtp_grad_clip", "separate"],
    "ce-no-clip": ["--mtp_regime", "ce", "--max_grad_norm", "0"],
    "none": ["--mtp_regime", "none"],
}
TIMING = ("time", "runtime", "per_second", "step_time", "elapsed", "wall")


def record(out_dir: str, only: list[str]) -> None:
    for case, flags in CASES.items():
        if only and case not in only:
            continue
        run_dir = os.path.join(out_dir, case)
        if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            print(f"{case}: kept", flush=True)
            continue
        cmd = [sys.executable, "-m", "mtprl.cli", "train", *BASE, *flags, "--output_dir", run_dir]
        print(f"{case}: {' '.join(flags)}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _rows(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def compare(before: str, after: str) -> int:
    bad = 0
    for case in CASES:
        a, b = (os.path.join(d, case, "metrics.jsonl") for d in (before, after))
        if not (os.path.isfile(a) and os.path.isfile(b)):
            print(f"{case}: missing ({'before' if not os.path.isfile(a) else 'after'})")
            bad += 1
            continue
        ra, rb = _rows(a), _rows(b)
        diff = next(((i, k) for i, (x, y) in enumerate(zip(ra, rb)) for k in sorted(set(x) | set(y))
                     if x.get(k) != y.get(k)), None)
        values = sum(len(r) for r in ra)
        if len(ra) != len(rb) or diff:
            i, k = diff if diff else (min(len(ra), len(rb)), "(row count)")
            print(f"{case}: DIFFERS at row {i} key {k}: {ra[i].get(k) if i < len(ra) else None} vs "
                  f"{rb[i].get(k) if i < len(rb) else None}")
            bad += 1
        else:
            print(f"{case}: identical ({len(ra)} rows, {values} values)")
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "compare":
        sys.exit(1 if compare(sys.argv[2], sys.argv[3]) else 0)
    else:
        sys.exit(__doc__)
