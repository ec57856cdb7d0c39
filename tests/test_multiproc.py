"""Two processes through real `accelerate launch` (gloo, CPU): DDP runs of OCC where both ranks must use the same
lambda on every micro-batch and end with the same parameters, and a checkpoint written under DDP that resumes
under DDP (bit-identical to the uninterrupted run) and under one process. `make test-multiproc`; CI runs it as
its own step. (FSDP: accelerate turns an FSDP config into plain multi-CPU DDP when training on the CPU, so FSDP
is left to GPUs; see the README's "Scaling out".)"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.multiproc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "multiproc", "occ_run.py")
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def _launch(out, *extra, processes=2):
    if processes == 1:
        cmd = [sys.executable, SCRIPT]
    else:
        cmd = [ACCELERATE, "launch", "--config_file", os.path.join(ROOT, "configs", "accelerate", "ddp.yaml"),
               "--num_processes", str(processes), SCRIPT]
    result = subprocess.run(cmd + ["--output_dir", str(out), *extra], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    setups = [json.load(open(os.path.join(out, f"setup_rank{r}.json"))) for r in range(processes)]
    assert all(s["num_processes"] == processes for s in setups)
    if processes > 1:
        assert all(s["wrapped"] == "DistributedDataParallel" for s in setups)
    return [[json.loads(line) for line in open(os.path.join(out, f"rank{r}.jsonl"))] for r in range(processes)]


def _params(out, rank):
    return torch.load(os.path.join(out, f"params_rank{rank}.pt"))


@pytest.mark.parametrize("variant", ["paper", "exact", "last_layers"])
def test_ddp_ranks_use_one_lambda_per_micro_batch_and_stay_identical(tmp_path, variant):
    ranks = _launch(tmp_path, "--variant", variant)
    assert [r["step"] for r in ranks[0]] == [1, 2, 3, 4] == [r["step"] for r in ranks[1]]
    for row0, row1 in zip(*ranks):
        for k in (1, 2):
            lam0, lam1 = row0[f"mtp/lambda/{k}"], row1[f"mtp/lambda/{k}"]
            assert math.isfinite(lam0) and lam0 == lam1, (variant, row0["step"], k, lam0, lam1)
    assert any(r["mtp/lambda/1"] != 0.0 for r in ranks[0])  # OCC did set lambda (0 only on a rollout's first step)
    p0, p1 = _params(tmp_path, 0), _params(tmp_path, 1)
    assert set(p0) == set(p1) and any(k.startswith("mtp_heads.") for k in p0)
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name


@pytest.mark.parametrize("variant", ["paper", "exact"])
def test_ddp_ranks_stay_identical_with_the_separate_clip_and_separate_moments(tmp_path, variant):
    # Tight budgets (max_grad_norm 0.05, mtp_max_grad_norm 1e-3) make both clips bind; the separate moments must be the same on both ranks
    # (they see the all-reduced MTP gradient) and be saved with the checkpoint.
    ranks = _launch(tmp_path, "--variant", variant, "--mtp_grad_clip", "separate", "--mtp_optimizer_state", "separate")
    for row0, row1 in zip(*ranks):
        for key in ("mtp/lambda/1", "grad_norm/rl", "grad_norm/mtp", "clip_factor/rl", "clip_factor/mtp"):
            assert key in row0 and row0[key] == row1[key], (variant, row0["step"], key)
    assert any(r["clip_factor/rl"] < 1.0 for r in ranks[0]) and any(r["clip_factor/mtp"] < 1.0 for r in ranks[0])
    p0, p1 = _params(tmp_path, 0), _params(tmp_path, 1)
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    moments = [torch.load(os.path.join(tmp_path, "checkpoint-4", f), weights_only=False)
               for f in os.listdir(os.path.join(tmp_path, "checkpoint-4")) if f.startswith("mtp_moments")]
    assert moments, os.listdir(os.path.join(tmp_path, "checkpoint-4"))


def test_a_ddp_checkpoint_resumes_under_ddp_and_under_one_process(tmp_path):
    full = _launch(tmp_path / "full")  # 4 steps, checkpoints at 2 and 4
    checkpoint = str(tmp_path / "full" / "checkpoint-2")
    assert os.path.isfile(os.path.join(checkpoint, "mtp_heads.safetensors"))

    resumed = _launch(tmp_path / "ddp", "--resume_from", checkpoint)
    assert [r["step"] for r in resumed[0]] == [3, 4]
    for a, b in zip(full[0][2:], resumed[0]):  # the uninterrupted run's steps 3 and 4, exactly
        assert a["mtp/lambda/1"] == b["mtp/lambda/1"] and a["loss"] == b["loss"]
    for rank in (0, 1):
        want, got = _params(tmp_path / "full", rank), _params(tmp_path / "ddp", rank)
        for name in want:
            assert torch.equal(want[name], got[name]), (rank, name)

    single = _launch(tmp_path / "one", "--resume_from", checkpoint, processes=1)
    assert [r["step"] for r in single[0]] == [3, 4]  # continued from step 2, not from scratch
    assert all(math.isfinite(r["mtp/lambda/1"]) for r in single[0])
    assert any(r["mtp/lambda/1"] != 0.0 for r in single[0])


FSDP_SCRIPT = os.path.join(ROOT, "tests", "multiproc", "fsdp_stats.py")


def test_gradient_statistics_of_fsdp2_shards_equal_the_unsharded_ones_and_local_sums_do_not(tmp_path):
    # Two gloo processes shard the model with torch's fully_shard (DTensor gradients, uneven shards) and read c, v2,
    # Adam-weighted c and the clip norms off the shards; rank 0 also computes them unsharded from the same batch.
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", FSDP_SCRIPT,
                             "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.load(open(os.path.join(tmp_path, f"stats_rank{r}.json"))) for r in (0, 1)]
    assert ranks[0]["sharded_types"] == ["DTensor"]
    assert ranks[0]["sharded_local_sizes"] != ranks[1]["sharded_local_sizes"]  # uneven shards
    reference = ranks[0]["unsharded"]
    assert reference["c"] != 0 and reference["v2"] > 0
    for rank in ranks:
        for key, value in reference.items():
            assert rank["sharded"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, rank["sharded"][key], value)
    # the deliberately broken variant (each rank's own shard, no all-reduce) misses on every statistic
    for rank in ranks:
        for key, value in reference.items():
            assert rank["local_only"][key] != pytest.approx(value, rel=1e-2), key
