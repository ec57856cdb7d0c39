"""Every script under benchmarks/ run as a subprocess at its smallest size (seconds each, CPU, no network, no
SmolLM2), so that a refactor cannot break `make bench` or `benchmarks/gpu.sh` unseen: exit status 0 and the JSON
rows and keys each script promises (its docstring, docs/results-benchmarks.md, README). Structure and finiteness
only, never timings. `benchmarks/gpu.sh --device cpu --dry-run` runs the GPU script's every step but what needs
the lent machine."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TIMEOUT = 600  # a hang fails the test instead of the suite

# `make test-bench` (CI's own step): every script run at its smallest size, about two and a half minutes.
pytestmark = pytest.mark.bench


def _env(**extra):
    # offline, CPU, one thread per process: the models are tiny and the suite shares a few cores
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _run(cmd, cwd, env=None):
    return subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT)


def _tail(proc, n=4000):
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-n:]}\n--- stderr ---\n{proc.stderr[-n:]}"


def _bench(script, args, tmp_path):
    """Run benchmarks/<script> with `args` and `--json`, from an empty directory (none of the repository's runs/);
    the parsed JSON."""
    out = tmp_path / f"{Path(script).stem}.json"
    proc = _run([sys.executable, str(BENCH / script), *args, "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, _tail(proc)
    assert out.is_file(), f"{script} wrote no JSON\n{_tail(proc)}"
    return json.loads(out.read_text())


def _finite(value, positive=False):
    return isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 if positive else True)


def _default_arms():
    """step_time.py's DEFAULT_ARMS, read from its source (importing it would import the trainer here)."""
    tree = ast.parse((BENCH / "step_time.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_ARMS" for t in node.targets):
            return ast.literal_eval(node.value).split(",")
    raise AssertionError("benchmarks/step_time.py has no DEFAULT_ARMS")


def _check_step_table(table, regimes, whole):
    assert list(table["regimes"]) == regimes
    assert table["device"] == "cpu" and table["baseline"] == "detach"
    for key in ("params", "model", "heads", "batch", "completion", "layers", "repeats"):
        assert key in table, key
    for name, row in table["regimes"].items():
        assert set(row) == {"train_step_ms", "whole_step_ms", "saved_mb", "stashed_grad_mb", "extra_state_mb",
                            "peak_gpu_mb"}, name
        assert _finite(row["train_step_ms"], positive=True), (name, row)
        assert _finite(row["saved_mb"], positive=True), (name, row)
        assert _finite(row["stashed_grad_mb"]) and row["stashed_grad_mb"] >= 0, (name, row)
        assert row["peak_gpu_mb"] is None, (name, row)  # CPU
        assert (_finite(row["whole_step_ms"], positive=True) if whole else row["whole_step_ms"] is None), (name, row)


def test_step_time_smoke(tmp_path):
    """`make bench` at its smallest: every default regime, a 2-layer width-32 tiny preset, one repeat and one whole
    step (the trainer.train path)."""
    table = _bench("step_time.py", ["--hidden", "32", "--layers", "2", "--batch", "4", "--completion", "4",
                                    "--repeats", "1", "--whole_steps", "1"], tmp_path)
    _check_step_table(table, _default_arms(), whole=True)
    assert table["layers"] == 2 and table["batch"] == 4
    assert all(row["extra_state_mb"] == 0 for row in table["regimes"].values())


def test_step_time_geometry_arms_smoke(tmp_path):
    """The remedies' arms run and report their extra state: the separate moments hold one pair of trunk moments, the
    clip holds none. (The separate clip's kept-apart MTP gradient is not yet in the stash column: it is reported
    only by occ_variant exact's stash.)"""
    arms = ["detach", "detach-separate_clip", "ce-separate_clip", "ce-separate_state"]
    table = _bench("step_time.py", ["--hidden", "32", "--layers", "2", "--batch", "4", "--completion", "4",
                                    "--repeats", "1", "--whole_steps", "0", "--regimes", ",".join(arms)], tmp_path)
    _check_step_table(table, arms, whole=False)
    rows = table["regimes"]
    assert rows["detach-separate_clip"]["stashed_grad_mb"] == 0
    assert rows["ce-separate_state"]["extra_state_mb"] > 0 and rows["ce-separate_clip"]["extra_state_mb"] == 0


def _rollout_methods(heads, vocab):
    drafts = [d for d in (0, 1, 2) if d <= heads]
    trims = [f"drafts={d}/trim" for d in drafts[1:]] if vocab else []
    return ["generate", *[f"drafts={d}" for d in drafts], *trims, "adaptive"]


def _check_rollout_rows(rows, expected):
    """`expected`: {(setup, batch): [methods]} in the script's order."""
    got = {}
    for row in rows:
        got.setdefault((row["setup"], row["batch"]), []).append(row["method"])
    assert got == expected
    for row in rows:
        assert _finite(row["tokens_per_s"], positive=True) and _finite(row["ratio"], positive=True), row
        assert _finite(row["median_seconds"], positive=True), row
        if row["method"] == "generate":
            assert row["ratio"] == 1.0
            assert "accept_length" not in row
            continue
        for key in ("accept_length", "cycle_cost", "ideal", "draft_tokens", "prefill_share"):
            assert _finite(row[key]), (key, row)
        assert row["accept_length"] >= 1.0, row
        if row["method"] not in ("drafts=0", "adaptive"):
            assert _finite(row["predicted_accept_length"]) and _finite(row["walk_accept_length"]), row


def test_rollout_smoke(tmp_path):
    """rollout.py --smoke: the small drafter (2 heads) and the untrained tiny preset (1 head), trimmed arms included;
    one row per (setup, batch, method)."""
    table = _bench("rollout.py", ["--smoke", "--setups", "drafter,tiny", "--tiny_model", "tiny", "--batches", "2",
                                  "--repeats", "1", "--vocab", "8", "--calibration", "4"], tmp_path)
    _check_rollout_rows(table["rows"], {("drafter", 2): _rollout_methods(2, True),
                                        ("tiny", 2): _rollout_methods(1, True)})
    assert table["device"] == "cpu" and table["repeats"] == 1


def test_cycle_smoke(tmp_path):
    """cycle.py --smoke on the small drafter: one row per (batch, drafts, full/trimmed vocabulary), each with its
    floor and breakdown."""
    table = _bench("cycle.py", ["--smoke", "--setups", "drafter", "--batches", "1", "--drafts", "1,2", "--repeats",
                                "1", "--vocab", "8", "--calibration", "4"], tmp_path)
    rows = table["rows"]
    assert [(r["setup"], r["batch"], r["drafts"], r["vocab"]) for r in rows] == [
        ("drafter", 1, 1, "full"), ("drafter", 1, 1, "trimmed"), ("drafter", 1, 2, "full"),
        ("drafter", 1, 2, "trimmed")]
    for row in rows:
        for key in ("cycle_ms", "floor_ms", "overhead", "verify_alone_ms", "head_step_alone_ms",
                    "plain_step_alone_ms"):
            assert _finite(row[key], positive=True), (key, row)
        parts = row["breakdown_ms"]
        assert {"trunk", "head layers", "bookkeeping"} <= set(parts), parts
        assert all(_finite(v) and v >= 0 for v in parts.values()), parts


def test_rl_step_smoke(tmp_path):
    """rl_step.py --smoke on the small drafter: 3 optimizer steps (one timed after the warm-up rollout) per arm, one
    round; one row per arm."""
    table = _bench("rl_step.py", ["--smoke", "--setups", "drafter", "--steps", "3", "--rounds", "1", "--vocab", "8"],
                   tmp_path)
    rows = {r["arm"]: r for r in table["rows"]}
    assert list(rows) == ["off", "2 drafts", "trimmed", "adaptive"]
    assert all(r["setup"] == "drafter" for r in rows.values())
    for arm, row in rows.items():
        assert _finite(row["seconds_per_step"], positive=True) and _finite(row["ratio"], positive=True), row
        assert 0.0 <= row["rollout_share"] <= 1.0, row
        assert row["accept_length"] is None or (_finite(row["accept_length"]) and row["accept_length"] >= 1.0), row
    assert rows["off"]["ratio"] == 1.0 and rows["off"]["accept_length"] is None
    assert rows["2 drafts"]["accept_length"] is not None  # the heads drafted and their acceptance was logged


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vllm is installed: vllm_check.py would run for real (benchmarks/gpu.sh runs it on a GPU)")
def test_vllm_check_without_vllm(tmp_path):
    """Without vllm, vllm_check.py (whose whole point is vLLM rollouts) exits at once with a line naming vllm."""
    out = tmp_path / "vllm.json"
    proc = _run([sys.executable, str(BENCH / "vllm_check.py"), "--json", str(out)], cwd=tmp_path)
    assert proc.returncode == 2, _tail(proc)
    assert "vllm is not installed" in proc.stderr, _tail(proc)
    assert "Traceback" not in proc.stderr, _tail(proc)
    assert not out.exists()


def test_gpu_sh_rejects_unknown_flags(tmp_path):
    proc = _run(["bash", str(BENCH / "gpu.sh"), "--bogus"], cwd=tmp_path, env=_env(OUT=str(tmp_path / "out")))
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr, _tail(proc)
    proc = _run(["bash", str(BENCH / "gpu.sh"), "--device", "tpu"], cwd=tmp_path, env=_env(OUT=str(tmp_path / "out")))
    assert proc.returncode == 2 and "choose cpu or gpu" in proc.stderr, _tail(proc)


def test_gpu_sh_cpu_dry_run(tmp_path):
    """`bash benchmarks/gpu.sh --device cpu --dry-run`: the versions check, (a) rollout.py and (b) step_time.py --bf16
    at their smallest sizes on the CPU, (c) vLLM where installed; nvidia-smi and the wheel install skipped with a
    line each."""
    out = tmp_path / "out"
    proc = _run(["bash", str(BENCH / "gpu.sh"), "--device", "cpu", "--dry-run"], cwd=tmp_path,
                env=_env(OUT=str(out), PY=sys.executable))
    assert proc.returncode == 0, _tail(proc)
    log = proc.stdout
    assert "skipped (--device cpu): nvidia-smi" in log and "skipped (--device cpu): installing .whl" in log, log
    assert "== dry run: every benchmark at its smallest size" in log
    assert "cuda False" in (out / "versions.txt").read_text()
    assert not (out / "gpu.txt").exists()

    rollout = json.loads((out / "rollout.json").read_text())
    tiny_heads = 1 if not (ROOT / "runs" / "tiny-sft").is_dir() else None  # the untrained preset: one fresh head
    rows = rollout["rows"]
    if tiny_heads is None:  # runs/tiny-sft exists here: its own head count
        tiny_heads = max((int(r["method"].split("=")[1]) for r in rows
                          if r["setup"] == "tiny" and r["method"].startswith("drafts=")), default=0)
    _check_rollout_rows(rows, {("drafter", 1): _rollout_methods(2, False),
                               ("tiny", 1): _rollout_methods(tiny_heads, False)})

    step = json.loads((out / "bench_bf16.json").read_text())
    _check_step_table(step, ["none", "detach", "ce", "policy", "occ", "occ-exact", "occ-last_layers"], whole=False)
    assert step["heads"] == 1

    if importlib.util.find_spec("vllm") is None:
        assert "== (c) skipped: vllm is not installed" in log
