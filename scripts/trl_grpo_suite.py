"""Run TRL's own GRPO tests (tests/test_grpo_trainer.py of a TRL checkout) with `trl.GRPOTrainer` / `GRPOConfig`
replaced by `MTPGRPOTrainer` / `MTPGRPOConfig`, offline, once per mode, and compare the outcomes with stock TRL.

    python scripts/trl_grpo_suite.py --trl_src ~/trl                       # a TRL work tree
    python scripts/trl_grpo_suite.py --trl_git /path/to/trl.git --rev v1.9.0   # or a git directory and a revision
        [--modes stock,none,occ,occ_trl_defaults,occ_head_loss] [--out reports/trl-grpo] [-k EXPR]

Modes (scripts/trl_suite/trl_suite_plugin.py): stock = TRL's classes; none = mtp_regime none; occ = OCC with
every rollout batch used for two updates (num_iterations 2 where the test leaves TRL's default 1); occ_trl_defaults
= OCC with the tests' own settings; occ_head_loss = the same plus mtp_head_loss ce.

Offline: tiny random stand-ins for the `trl-internal-testing` models (scripts/trl_suite/standins.py, SmolLM2's
tokenizer from `make smollm2`) in a private hub cache, the zen datasets built by TRL's own generator script. Left
out: the VLM class (image datasets), the slow class (GPU), remote code (a model class on the Hub). Writes
<out>/<mode>.xml (JUnit; pytest's output in <work>/<mode>.log), <out>/summary.json and <out>/summary.md (counts per mode, and each test that passes with
stock TRL but not in a mode, with the first line of its error).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent / "trl_suite"
sys.path.insert(0, str(HERE))
from trl_suite_plugin import MODES  # noqa: E402

TEST_FILE = "tests/test_grpo_trainer.py"
LEFT_OUT = "not TestGRPOTrainerVLM and not TestGRPOTrainerSlow and not test_trust_remote_code"
IMPORT = "from trl import GRPOConfig, GRPOTrainer"


def extract(args, work: Path) -> Path:
    """TRL's tests/ and scripts/ into work/trl (a copy: the test file's import is rewritten)."""
    dest = work / "trl"
    source = json.dumps({"trl_src": args.trl_src, "trl_git": args.trl_git, "rev": args.rev})
    if (work / "trl.source").exists() and (work / "trl.source").read_text() == source:
        return dest  # already extracted (a run of another mode may be using it)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if args.trl_src:
        for sub in ("tests", "scripts"):
            shutil.copytree(Path(args.trl_src) / sub, dest / sub)
    else:
        blob = subprocess.run(["git", "--git-dir", args.trl_git, "archive", args.rev, "tests", "scripts"],
                              check=True, capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(blob)).extractall(dest)
    test = dest / TEST_FILE
    text = test.read_text()
    if text.count(IMPORT) != 1:
        sys.exit(f"{test}: expected exactly one line `{IMPORT}` to redirect")
    test.write_text(text.replace(IMPORT, "from trl_suite_plugin import GRPOConfig, GRPOTrainer"))
    # TRL's pytest settings (markers) without the rest of its pyproject
    (dest / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow\n    low_priority\n    invariant\n")
    (work / "trl.source").write_text(source)
    return dest


def build(args, work: Path, trl_dir: Path) -> dict:
    from standins import build_models, build_zen

    hub, zen = work / "hub", work / "zen"
    stamp = work / "standins.json"
    if not stamp.exists():
        t0 = time.time()
        models = build_models(hub, args.tokenizer)
        configs = build_zen(trl_dir, zen)
        stamp.write_text(json.dumps({"models": models, "zen_configs": configs}, indent=1))
        print(f"stand-ins: {len(models)} models, zen configs {configs} ({time.time() - t0:.0f} s)", flush=True)
    return {"HF_HUB_CACHE": str(hub), "MTPRL_TRL_SUITE_ZEN": str(zen)}


def start_mode(mode: str, trl_dir: Path, out: Path, env_extra: dict, k: str | None, threads: int, logs: Path,
               tests: list[str] | None = None, rerun: bool = False):
    """pytest for one mode (all tests, or the `tests` named), in the background: (process, log, start time)."""
    xml = out / (f"{mode}.rerun.xml" if rerun else f"{mode}.xml")
    if xml.exists():
        xml.unlink()
    env = dict(os.environ, **env_extra, MTPRL_TRL_SUITE_MODE=mode, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))
    select = LEFT_OUT if not k else f"({LEFT_OUT}) and ({k})"
    targets = [f"{TEST_FILE}::{t}" for t in tests] if tests else [TEST_FILE]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-p", "trl_suite_plugin",
           "-m", "not slow", "-k", select, f"--junitxml={xml}", "-o", "junit_family=xunit2", "--tb=line"]
    fh = open(logs / (f"{mode}.rerun.log" if rerun else f"{mode}.log"), "w")
    return subprocess.Popen(cmd, cwd=trl_dir, env=env, stdout=fh, stderr=subprocess.STDOUT), fh, time.time()


def finish_mode(mode: str, out: Path, proc, fh, t0: float, rerun: bool) -> dict:
    proc.wait()
    fh.close()
    if not rerun:
        (out / f"{mode}.seconds").write_text(str(round(time.time() - t0)))
    run = earlier_run(mode, out)
    print(f"{mode}: {run['counts']} in {time.time() - t0:.0f} s (log {fh.name})", flush=True)
    return run


def earlier_run(mode: str, out: Path) -> dict | None:
    """A mode's results: its full run (<mode>.xml), updated by the tests rerun after it (<mode>.rerun.xml)."""
    if not (out / f"{mode}.xml").exists():
        return None
    results = parse_junit(out / f"{mode}.xml")
    rerun = parse_junit(out / f"{mode}.rerun.xml")
    results.update(rerun)
    counts = {o: sum(1 for r in results.values() if r["outcome"] == o)
              for o in ("passed", "failed", "skipped", "xfailed")}
    seconds = out / f"{mode}.seconds"
    return {"results": results, "counts": counts, "seconds": int(seconds.read_text()) if seconds.exists() else 0,
            "rerun": sorted(rerun)}


def parse_junit(xml: Path) -> dict:
    results = {}
    if not xml.exists():
        return results
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname').split('.')[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "").splitlines()[0][:300]
            elif child.tag == "skipped":
                kind = child.get("type") or ""
                outcome = "xfailed" if "xfail" in kind else "skipped"
                message = (child.get("message") or "")[:200]
        results[name] = {"outcome": outcome, "message": message}
    return results


def run_subset(out: Path, mode: str) -> list[str]:
    path = out / f"{mode}.subset.json"
    return json.loads(path.read_text())["tests"] if path.exists() else []


def subset_source(out: Path, mode: str) -> str:
    return json.loads((out / f"{mode}.subset.json").read_text())["failed_in"]


def summarize(runs: dict, out: Path) -> None:
    stock = runs.get("stock", {}).get("results", {})
    passing = {t for t, r in stock.items() if r["outcome"] == "passed"}
    lines = ["# TRL's GRPO tests with MTPGRPOTrainer", "",
             "| mode | passed | failed | skipped | xfailed | of stock's passing, passed | time (s) |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for mode, run in runs.items():
        res = run["results"]
        subset = (run_subset(out, mode) or None)
        considered = passing if subset is None else passing & set(subset)
        kept = sum(1 for t in considered if res.get(t, {}).get("outcome") == "passed")
        c = run["counts"]
        label = mode if subset is None else f"{mode} (only the {len(subset)} tests {subset_source(out, mode)} failed)"
        if run.get("rerun"):
            label += f" ({len(run['rerun'])} rerun after a fix: {mode}.rerun.xml)"
        lines.append(f"| {label} | {c['passed']} | {c['failed']} | {c['skipped']} | {c['xfailed']} | "
                     f"{kept}/{len(considered)} | {run['seconds']} |")
        lost = {t: res.get(t, {"outcome": "missing", "message": ""}) for t in sorted(considered)
                if res.get(t, {}).get("outcome") != "passed"}
        summary[mode] = {"counts": c, "stock_passing_kept": kept, "stock_passing": len(considered), "lost": lost,
                         "seconds": run["seconds"]}
    for mode, s in summary.items():
        if s["lost"]:
            lines += ["", f"## Passing with stock TRL, not with `{mode}` ({len(s['lost'])})", ""]
            lines += [f"- `{t}`: {r['outcome']}: {r['message']}" for t, r in s["lost"].items()]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4 + len(runs)]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trl_src", help="a TRL work tree (holds tests/ and scripts/)")
    src.add_argument("--trl_git", help="a TRL git directory (with --rev)")
    p.add_argument("--rev", default="HEAD")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", default="reports/trl-grpo")
    p.add_argument("--work", default="runs/trl-grpo", help="the copied tests and the stand-ins (not results)")
    p.add_argument("--tokenizer", default="runs/smollm2-135m-instruct", help="tokenizer of the stand-in models")
    p.add_argument("--only_failed_in", default=None, metavar="MODE",
                   help="run the modes on just the tests that failed in MODE's earlier run (e.g. occ_head_loss on "
                        "occ_trl_defaults' failures)")
    p.add_argument("--rerun", action="append", default=[], metavar="TEST",
                   help="rerun just this test (Class::test[param], repeatable) in each mode after a fix; its outcome "
                        "replaces the full run's (<mode>.rerun.xml)")
    p.add_argument("--jobs", type=int, default=2, help="modes run at the same time")
    p.add_argument("-k", default=None, help="pytest -k expression, to run a subset")
    args = p.parse_args()
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}; expected some of {', '.join(MODES)}")
    if not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        p.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there (run `make smollm2`)")
    out = Path(args.out)
    work = Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trl_dir = extract(args, work)
    out, args.tokenizer = out.resolve(), os.path.abspath(args.tokenizer)
    env = build(args, work, trl_dir)
    # Modes run side by side, `--jobs` at a time, each on cpu_count/jobs threads (the outcomes are independent)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    tests = args.rerun or None
    if args.only_failed_in and not args.rerun:
        earlier = earlier_run(args.only_failed_in, out)
        if earlier is None:
            p.error(f"--only_failed_in {args.only_failed_in}: no {out / (args.only_failed_in + '.xml')} yet")
        tests = sorted(t for t, r in earlier["results"].items() if r["outcome"] == "failed")
        for mode in modes:
            (out / f"{mode}.subset.json").write_text(json.dumps({"failed_in": args.only_failed_in, "tests": tests}))
    elif not args.rerun:
        for mode in modes:
            (out / f"{mode}.subset.json").unlink(missing_ok=True)
            (out / f"{mode}.rerun.xml").unlink(missing_ok=True)
    runs, running, queue = {}, {}, list(modes)
    while queue or running:
        while queue and len(running) < args.jobs:
            mode = queue.pop(0)
            running[mode] = start_mode(mode, trl_dir, out, env, args.k, threads, work, tests, bool(args.rerun))
        time.sleep(2)
        for mode in [m for m, (proc, _, _) in running.items() if proc.poll() is not None]:
            runs[mode] = finish_mode(mode, out, *running.pop(mode), bool(args.rerun))
            shown = {m: runs.get(m) or (earlier_run(m, out) if m not in modes else None) for m in MODES}
            summarize({m: r for m, r in shown.items() if r}, out)


if __name__ == "__main__":
    main()
