"""Kill it anywhere, resume, same result. A tiny-preset `mtprl train` and a two-arm `mtprl compare` are killed with
SIGKILL at named points (`MTPRL_KILL_AT`, mtprl.io.faults: in training, in a checkpoint save, in a periodic evaluation,
in the final evaluation, in a log write) and at seeded random times, then resumed by re-running the same command;
each is compared with an uninterrupted run: identical final parameters (heads included), identical eval.json,
metrics.jsonl with the same rows for the same steps (timing fields aside) and no step twice, the same report table.

`make test-faults` (CI runs it as its own step)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.faults

TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "rollout/tokens_per_s")

TRAIN_CONFIG = """model_name_or_path: tiny
task: reasoning_gym:chain_sum
task_config: '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'
train_size: 64
eval_size: 8
eval_k: 2
eval_max_new_tokens: 4
eval_before: false
mtp_num_heads: 2
mtp_regime: occ
per_device_train_batch_size: 8
num_generations: 4
steps_per_generation: 2
max_completion_length: 4
learning_rate: 1.0e-3
lr_scheduler_type: constant
beta: 0.0
max_steps: 8
save_strategy: steps
save_steps: 2
eval_steps: 3
logging_steps: 1
report_to: none
use_cpu: true
bf16: false
seed: 0
dataloader_num_workers: 0
"""


def _run(args, cwd, kill_at=None, kill_after=None):
    """Run `python -m mtprl.cli ARGS`; return its exit code (-9 when killed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MTPRL_KILL_AT", None)
    if kill_at:
        env["MTPRL_KILL_AT"] = kill_at
    with open(os.path.join(cwd, "log.txt"), "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mtprl.cli", *args], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        if kill_after is not None:
            try:
                return proc.wait(timeout=kill_after)  # finished before the kill
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=900)


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f if line.strip()]


def _same_record(run, ref):
    """Final parameters, eval.json and metrics rows of two run directories."""
    for name in ("model.safetensors", "mtp_heads.safetensors"):
        a, b = load_file(os.path.join(run, name)), load_file(os.path.join(ref, name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{run}: {name} {key} differs"
    with open(os.path.join(run, "eval.json")) as f, open(os.path.join(ref, "eval.json")) as g:
        assert json.load(f) == json.load(g), f"{run}: eval.json differs"
    rows, ref_rows = _rows(os.path.join(run, "metrics.jsonl")), _rows(os.path.join(ref, "metrics.jsonl"))
    keys = [(r["step"], tuple(sorted(r))) for r in rows]
    assert len(keys) == len(set(keys)), f"{run}: a step logged twice"
    assert rows == ref_rows, f"{run}: metrics.jsonl differs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with open(root / "train.yaml", "w") as f:
        f.write(TRAIN_CONFIG)
    return root


def _train_args(out):
    return ["train", "--config", "train.yaml", "--output_dir", out, "--resume_from_checkpoint", "true"]


@pytest.fixture(scope="module")
def train_reference(workdir):
    start = time.time()
    assert _run(_train_args("ref"), workdir) == 0
    return os.path.join(workdir, "ref"), time.time() - start


@pytest.mark.parametrize("kill_at", ["train_step:3", "checkpoint_save:2", "periodic_eval:1", "final_eval:1",
                                     "log_write:5", "random:0", "random:1"])
def test_train_killed_and_resumed_equals_uninterrupted(workdir, train_reference, kill_at):
    ref, seconds = train_reference
    out = f"run-{kill_at.replace(':', '-')}"
    if kill_at.startswith("random"):
        delay = random.Random(int(kill_at.split(":")[1])).uniform(0.3, 0.95) * seconds
        _run(_train_args(out), workdir, kill_after=delay)
    else:
        assert _run(_train_args(out), workdir, kill_at=kill_at) == -signal.SIGKILL
    assert _run(_train_args(out), workdir) == 0  # the same command again
    _same_record(os.path.join(workdir, out), ref)


COMPARE = ["compare", "--config", "train.yaml", "--arms", "detach,occ", "--seeds", "0"]


def _report_table(report_dir):
    with open(os.path.join(report_dir, "report.md")) as f:
        text = f.read()
    return text[text.index("## Accuracy"): text.index("## Step time")]


@pytest.fixture(scope="module")
def compare_reference(workdir):
    start = time.time()
    assert _run([*COMPARE, "--report_dir", "cmp-ref"], workdir) == 0
    return os.path.join(workdir, "cmp-ref"), time.time() - start


@pytest.mark.parametrize("kill_at", ["checkpoint_save:5", "final_eval:2", "random:2", "random:3"])
def test_compare_killed_and_resumed_equals_uninterrupted(workdir, compare_reference, kill_at):
    ref, seconds = compare_reference
    report_dir = f"cmp-{kill_at.replace(':', '-')}"
    args = [*COMPARE, "--report_dir", report_dir]
    if kill_at.startswith("random"):
        delay = random.Random(int(kill_at.split(":")[1])).uniform(0.3, 0.95) * seconds
        _run(args, workdir, kill_after=delay)
    else:
        assert _run(args, workdir, kill_at=kill_at) == -signal.SIGKILL
    assert _run(args, workdir) == 0
    for arm in ("detach-s0", "occ-s0"):
        _same_record(os.path.join(workdir, report_dir, "runs", arm), os.path.join(ref, "runs", arm))
    assert _report_table(os.path.join(workdir, report_dir)) == _report_table(ref)
