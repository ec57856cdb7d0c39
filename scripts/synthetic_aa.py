"""The verdict methods on synthetic A/A experiments where the answer is known (no difference): each training run
shifts every question's success probability by u ~ N(0, sigma_run), each of 200 questions is answered k = 8 times
(binomial), and each experiment draws fresh runs (tests/test_verdicts.py's model and seeds). Prints the share of
experiments each method calls "better" or "worse" at n = 2, 3, 5 runs per arm.

    python scripts/synthetic_aa.py [--sigma_run 0.03]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_verdicts import aa_rate  # noqa: E402

from mtprl.analysis.aa_calibration import METHODS  # noqa: E402
from mtprl.core.stats import question_seed_bootstrap  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma_run", type=float, default=0.03)
    args = parser.parse_args()
    methods = {"Welch's t on run means (published)": (METHODS["welch_run_means"], 400),
               "old: bootstrap over seeds and questions": (
                   lambda a, b: question_seed_bootstrap(a, b, resamples=400).verdict, 150),
               "bootstrap over questions only": (METHODS["question_bootstrap"], 200)}
    print(f"sigma_run = {args.sigma_run}: share of A/A experiments called better / worse")
    print("| method | experiments | n = 2 | n = 3 | n = 5 |\n|---|---|---|---|---|")
    for name, (method, experiments) in methods.items():
        rates = [aa_rate(method, n, args.sigma_run, experiments=experiments) for n in (2, 3, 5)]
        print(f"| {name} | {experiments} | " + " | ".join(f"{100 * r:.1f}%" for r in rates) + " |")


if __name__ == "__main__":
    main()
