"""What the benchmark scripts share: the progress line and the loop over setups (each skipped, with a line, when
its model or data is absent). Scripts run from any directory; this file sits beside them on sys.path."""

from __future__ import annotations

import sys
import time


def progress(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_setups(names: str, setups: dict, args, run_setup, *extra) -> list[dict]:
    """rows of `run_setup(name, setup, args, *extra)` for every comma-separated setup name."""
    rows = []
    for name in names.split(","):
        if name not in setups:
            sys.exit(f"unknown setup {name!r} (choose from {', '.join(setups)})")
        setup = setups[name](args)
        if setup is None:
            progress(f"{name}: model or data absent, skipped (see the docstring)")
            continue
        rows += run_setup(name, setup, args, *extra)
    return rows


def add_model_arguments(parser) -> None:
    """The model / drafter / output flags the setup-based benchmarks share (cycle.py, rl_step.py)."""
    parser.add_argument("--smollm2_model", default="runs/smollm2-heads")
    parser.add_argument("--math_file", default="runs/data/arith_gsm8k.jsonl")
    parser.add_argument("--drafter_steps", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="the drafter at its smallest (rollout.py --smoke): seconds")
    parser.add_argument("--json", default=None)
