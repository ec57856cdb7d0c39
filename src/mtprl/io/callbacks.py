"""What a run shows and records as it goes: progress lines (`phase`), `<output_dir>/metrics.jsonl` (every log row,
with the whole run's mean loss), and the periodic held-out evaluation (`eval_steps`)."""

from __future__ import annotations

import os
import time

from transformers import TrainerCallback

from .faults import kill_point
from .jsonl import append_jsonl, read_jsonl


def phase(message: str) -> None:
    """One progress line: `[mtprl HH:MM:SS] message`."""
    print(f"[mtprl {time.strftime('%H:%M:%S')}] {message}", flush=True)


def whole_run_mean_loss(path: str, fallback: float) -> float:
    """Mean training loss over every optimizer step of the run, from the per-step `loss` rows of its
    metrics.jsonl (each row a mean over the steps since the previous one, weighted by their number): what the
    Trainer's `train_loss` is for an uninterrupted run, and stays after a resume (the Trainer's own then averages
    the resumed steps only)."""
    if not os.path.isfile(path):
        return fallback
    total, steps, previous = 0.0, 0, 0
    for _, row in read_jsonl(path, "metrics file", tolerate_torn_tail=True):
        if "loss" in row and "step" in row and row["step"] > previous:
            total += row["loss"] * (row["step"] - previous)
            steps += row["step"] - previous
            previous = row["step"]
    return total / steps if steps else fallback


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log dict (TRL's keys plus ours) to `<output_dir>/metrics.jsonl`, one JSON object a line."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "metrics.jsonl")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "train_loss" in row:  # the Trainer's covers only the steps of this process; the log covers the run
            row["train_loss"] = whole_run_mean_loss(self.path, row["train_loss"])
        append_jsonl(self.path, row)

    def on_step_end(self, args, state, control, **kwargs):
        kill_point("train_step")  # fault injection (mtprl.io.faults); a no-op without MTPRL_KILL_AT


class PeriodicEvalCallback(TrainerCallback):
    """Every `every` optimizer steps (not the last: the final `eval.json` is that point), evaluate and append one
    row `{"step": N, "eval/avg@k": ...}` to metrics.jsonl. Runs before the checkpoint of the same step is
    saved, so a resumed run (metrics truncated to its checkpoint) has every earlier row exactly once."""

    def __init__(self, every: int, run_eval, output_dir: str):
        self.every, self.run_eval, self.output_dir = every, run_eval, output_dir

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every == 0 and step < state.max_steps and state.is_world_process_zero:
            row = self.run_eval(model)
            kill_point("periodic_eval")
            phase(f"eval at step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in row.items()))
            append_jsonl(os.path.join(self.output_dir, "metrics.jsonl"), {"step": step, **row})
        return control
