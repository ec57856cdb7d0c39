"""Crash consistency of a run's record: torn log lines, resume cut-backs, incomplete checkpoints, atomic results."""

import json
import os

import pytest

from mtprl.training.runs import latest_checkpoint, resume_point, truncate_metrics
from mtprl.io.jsonl import append_jsonl, atomic_write_json, read_jsonl
from mtprl.analysis.report import Run


def _log(path, rows, torn=None):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if torn:
            f.write(torn)  # a write cut by a kill: no newline, not valid JSON


def test_torn_last_line_is_dropped_with_one_warning_everywhere_the_log_is_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _log(path, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}], torn='{"step": 3, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl: the last line is incomplete"):
        rows = [r for _, r in read_jsonl(str(path), tolerate_torn_tail=True)]
    assert [r["step"] for r in rows] == [1, 2]
    with pytest.raises(ValueError, match="row 3: not valid JSON"):  # task files stay strict
        list(read_jsonl(str(path)))
    # the report reads the run instead of dropping it
    with pytest.warns(UserWarning):
        run = Run(str(tmp_path))
    assert run.series("loss") == ([1, 2], [0.5, 0.4])
    # a resumed run appends after cutting the torn line: the log stays valid JSON Lines
    with pytest.warns(UserWarning):
        append_jsonl(str(path), {"step": 3, "loss": 0.3})
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3]


def test_resume_cuts_the_log_back_to_the_checkpoint_step(tmp_path):
    run = tmp_path / "run"
    os.makedirs(run)
    _log(run / "metrics.jsonl", [{"step": s, "loss": 1.0 / s} for s in range(1, 26)], torn='{"step": 26')
    with pytest.warns(UserWarning):
        truncate_metrics(str(run), 20)
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == list(range(1, 21))


def _checkpoint(run, step, *, state=True, heads=True, torn_state=False):
    path = run / f"checkpoint-{step}"
    os.makedirs(path)
    (path / "model.safetensors").write_bytes(b"x")
    (path / "config.json").write_text("{}")
    if heads:
        (path / "mtp_heads.safetensors").write_bytes(b"x")
    if state:
        (path / "trainer_state.json").write_text('{"global_step": ' if torn_state else
                                                 json.dumps({"global_step": step}))
    return str(path)


def test_incomplete_checkpoints_are_skipped_for_the_last_complete_one(tmp_path, capsys):
    run = tmp_path / "run"
    os.makedirs(run)
    _checkpoint(run, 10)
    _checkpoint(run, 20)
    _checkpoint(run, 30, state=False)  # killed before trainer_state.json
    _checkpoint(run, 40, torn_state=True)  # killed while writing it
    _checkpoint(run, 50, heads=False)
    path, step = latest_checkpoint(str(run))
    assert (os.path.basename(path), step) == ("checkpoint-20", 20)
    out = capsys.readouterr().out
    for n, why in ((30, "no trainer_state.json"), (40, "cut short"), (50, "weights missing")):
        assert f"checkpoint-{n}: " in out and why in out
    assert resume_point(str(run), "true") == (path, 20)
    assert resume_point(str(run), os.path.join(str(run), "checkpoint-10"))[1] == 10


def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = tmp_path / "eval.json"
    atomic_write_json(str(path), {"avg@8": 0.25})
    atomic_write_json(str(path), {"avg@8": 0.5})
    assert json.load(open(path)) == {"avg@8": 0.5}
    assert os.listdir(tmp_path) == ["eval.json"]  # no temporary file left behind


def test_train_loss_in_the_log_is_the_whole_runs_mean(tmp_path):
    """The Trainer's train_loss averages the steps of its own process; after a resume that is not the run's. The
    log's is the step-weighted mean of the logged losses, the same for a resumed and an uninterrupted run."""
    from mtprl.io.callbacks import whole_run_mean_loss

    path = tmp_path / "metrics.jsonl"
    _log(path, [{"step": 2, "loss": 1.0}, {"step": 3, "eval/avg@2": 0.5}, {"step": 4, "loss": 0.5},
                {"step": 5, "loss": 0.2}])
    assert whole_run_mean_loss(str(path), 9.9) == pytest.approx((1.0 * 2 + 0.5 * 2 + 0.2 * 1) / 5)
    assert whole_run_mean_loss(str(tmp_path / "none.jsonl"), 9.9) == 9.9
