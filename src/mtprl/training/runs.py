"""Where a run stands on disk, and what a command does with it: one rule for `mtprl train` and `mtprl compare`.

A run directory holds checkpoint-N/ folders while it trains, the final model once it is trained, and `eval.json`
once it is evaluated. `run_state` reads which of four states it is in (fresh / resume / evaluate / finished);
`prepare_run` applies the rule: a fresh run starts from nothing (a log left by a run killed before its first
checkpoint goes), a resumed one is handed to the trainer, which cuts `metrics.jsonl` back to the checkpoint's step
(`ConsistentLogOnResume`: each step logged once, CLI or Python API), an evaluate or finished one is handed back to
the caller. Also here: checkpoint completeness and the starting
model's fingerprint (so a run kept from an earlier compare is known to share the current warm start).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..io.callbacks import phase
from ..model.checkpoints import is_complete_checkpoint
from ..io.jsonl import atomic_write_json, truncate_log_to_step


@dataclass
class RunState:
    """Where one run stands on disk, and so what train / compare do with it."""

    kind: str  # "finished" (eval.json written) | "evaluate" (trained, not evaluated) | "resume" | "fresh"
    checkpoint: str | None = None  # resume from / evaluate this checkpoint (None: the model is in the run dir)
    step: int = 0  # the checkpoint's step


def checkpoint_problem(path) -> str | None:
    """Why a checkpoint directory cannot be resumed from (None: it can). The Trainer writes trainer_state.json
    after the model, the heads, the optimizer and the RNG state, so a kill during a save leaves it missing."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json (killed during the save?)"
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return "trainer_state.json is cut short (killed while writing it?)"
    if not is_complete_checkpoint(path):
        return "model or MTP head weights missing"
    return None


def latest_checkpoint(run_dir):
    """(path, step) of the last complete checkpoint-N in `run_dir` ((None, 0) if none); incomplete ones are
    skipped, saying which and why."""
    if not os.path.isdir(run_dir):
        return None, 0
    steps = sorted((int(d.split("-")[1]) for d in os.listdir(run_dir)
                    if d.startswith("checkpoint-") and d.split("-")[1].isdigit()), reverse=True)
    for step in steps:
        path = os.path.join(run_dir, f"checkpoint-{step}")
        problem = checkpoint_problem(path)
        if problem is None:
            return path, step
        phase(f"resume: skipping {path}: {problem}")
    return None, 0


def resume_point(run_dir, resume_from_checkpoint):
    """(checkpoint dir, step) a `--resume_from_checkpoint` (a path, or true for the latest) resumes from."""
    if not resume_from_checkpoint or str(resume_from_checkpoint).lower() == "false":
        return None
    if str(resume_from_checkpoint).lower() == "true":
        checkpoint, step = latest_checkpoint(run_dir)
        return (checkpoint, step) if checkpoint else None
    state = os.path.join(resume_from_checkpoint, "trainer_state.json")
    if not os.path.isfile(state):
        return None  # the Trainer reports a bad checkpoint itself
    with open(state) as f:
        return resume_from_checkpoint, int(json.load(f).get("global_step", 0))


def truncate_metrics(run_dir, step):
    """Drop metric rows logged after `step` (a resumed run logs them again) and a torn last line."""
    dropped = truncate_log_to_step(os.path.join(run_dir, "metrics.jsonl"), step)
    if dropped:
        phase(f"resume: {run_dir}/metrics.jsonl cut back to step {step} ({dropped} later rows dropped)")


def trained_steps(run_dir: str) -> int | None:
    """The optimizer steps the run's final model was trained for (`run_info.json`; None: not recorded)."""
    info = os.path.join(run_dir, "run_info.json")
    if not os.path.isfile(info):
        return None
    with open(info) as f:
        return json.load(f).get("trained_steps")


def record_trained_steps(run_dir: str, steps: int) -> None:
    """Written beside the final model: what `run_state` calls finished is trained to the max_steps asked for."""
    info = os.path.join(run_dir, "run_info.json")
    record = {}
    if os.path.isfile(info):
        with open(info) as f:
            record = json.load(f)
    atomic_write_json(info, {**record, "trained_steps": int(steps)})


def run_state(run_dir: str, max_steps: int) -> RunState:
    """finished: evaluated after training to `max_steps` (or more); a run evaluated after fewer steps trains on
    from its last checkpoint (TRL's behaviour for a larger max_steps)."""
    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        done = trained_steps(run_dir)
        if done is None or done >= max_steps:
            return RunState("finished")
        checkpoint, step = latest_checkpoint(run_dir)
        if checkpoint is None or step < done:
            raise ValueError(f"{run_dir} was trained for {done} steps and max_steps is now {max_steps}, but it has "
                             f"no checkpoint of step {done} to train on from (save_strategy 'no'?); use another "
                             "output_dir, or train it again from the start")
        return RunState("resume", checkpoint, step)
    if is_complete_checkpoint(run_dir):  # killed during the final evaluation
        return RunState("evaluate")
    checkpoint, step = latest_checkpoint(run_dir)
    if checkpoint and step >= max_steps:  # killed between the last checkpoint and the final save
        return RunState("evaluate", checkpoint, step)
    if checkpoint:
        return RunState("resume", checkpoint, step)
    return RunState("fresh")


def prepare_run(run_dir: str, max_steps: int, who: str, model_name_or_path: str | None = None) -> RunState:
    """The run-state rule, applied: says what happens, makes the directory ready for it and returns the state.
    resume: an earlier final evaluation is kept aside (the trainer cuts the log back when it resumes); fresh: a log
    without a checkpoint goes (the run starts again from nothing). `model_name_or_path`: a kept run must have started from this model."""
    state = run_state(run_dir, max_steps)
    if state.kind != "fresh" and model_name_or_path is not None:
        check_same_start(run_dir, model_name_or_path)
    if state.kind == "finished":
        phase(f"{who}: {run_dir} is finished (eval.json written); not running it again")
    elif state.kind == "evaluate":
        phase(f"{who}: {run_dir} finished training; evaluating it")
    elif state.kind == "resume":  # the trainer cuts metrics.jsonl back itself (`ConsistentLogOnResume`)
        phase(f"{who}: resuming {run_dir} from {state.checkpoint} (to step {max_steps})")
        keep_earlier_evaluation(run_dir, state.step)
    elif os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):  # killed before its first checkpoint
        os.remove(os.path.join(run_dir, "metrics.jsonl"))
    return state


def keep_earlier_evaluation(run_dir: str, step: int) -> None:
    """A run continued past an evaluated end keeps that evaluation as eval-step<N>.json (nothing is lost)."""
    path = os.path.join(run_dir, "eval.json")
    if os.path.isfile(path):
        kept = os.path.join(run_dir, f"eval-step{step}.json")
        os.replace(path, kept)
        phase(f"resume: the evaluation at step {step} is kept as {kept}")


class ConsistentLogOnResume:
    """Trainer mixin: `train(resume_from_checkpoint=...)` (a path, or True for the latest) first cuts
    `<output_dir>/metrics.jsonl` back to the checkpoint's step, so each step is logged once whichever way the run
    is resumed (CLI or Python API)."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        point = resume_point(self.args.output_dir, resume_from_checkpoint)
        if point is not None and self.args.should_save:
            truncate_metrics(self.args.output_dir, point[1])
        return super().train(resume_from_checkpoint, *args, **kwargs)


def start_fingerprint(model_name_or_path: str) -> dict:
    """What identifies the starting model: its name, and for a local directory the size and modification time
    of each file in it (a re-run warm start rewrites them), so a stale step-0 evaluation is noticed."""
    files = {}
    if os.path.isdir(model_name_or_path):
        for name in sorted(os.listdir(model_name_or_path)):
            full = os.path.join(model_name_or_path, name)
            if os.path.isfile(full) and name.endswith((".safetensors", ".json", ".bin")):
                stat = os.stat(full)
                files[name] = [stat.st_size, stat.st_mtime_ns]
    return {"model_name_or_path": model_name_or_path, "files": files}


def check_same_start(run_dir: str, model_name_or_path: str) -> None:
    """A run kept from an earlier compare must have started from the same model as the runs made now."""
    info = os.path.join(run_dir, "run_info.json")
    if not os.path.isfile(info):
        return
    with open(info) as f:
        recorded = json.load(f).get("start_model")
    if recorded is not None and recorded != start_fingerprint(model_name_or_path):
        raise ValueError(f"{run_dir} was trained from another starting model than {model_name_or_path!r} is now "
                         "(a new warm start?); remove that run directory, or choose another --report_dir, to run it "
                         "again")
