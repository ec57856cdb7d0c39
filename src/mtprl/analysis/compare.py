"""`mtprl compare` once its arguments are parsed: every arm (a regime plus overrides, `mtprl.analysis.arms`) x seed
trained from one starting model (`run_comparison`), each run resumable under `runs.prepare_run`'s rule; the starting
model evaluated once, step 0 of every accuracy curve (`evaluate_start`); the arm the others are compared with
(`baseline_arm`); then the report (`mtprl.analysis.report`)."""

from __future__ import annotations

import json
import os

from ..data.task_setup import load_for_task, task_splits
from ..io.callbacks import phase
from ..model.lora import peft_config_of
from ..training.experiment import draft_policy, evaluate_task, finish_run, run_training
from ..training.runs import prepare_run, start_fingerprint


def baseline_arm(arms, label: str = ""):
    """The arm labelled `label` (an error naming the arms when none is); without a label the first detach arm, else
    the first arm."""
    if label:
        for arm in arms:
            if arm.label == label:
                return arm
        raise ValueError(f"--baseline {label!r} is not one of the arms ({', '.join(a.label for a in arms)})")
    return next((a for a in arms if a.regime == "detach"), arms[0])


def evaluate_start(task_args, cfg, report_dir) -> None:
    """The starting model, evaluated once: every arm and seed starts from it and is evaluated on the same
    questions with the same sampling seed, so one evaluation is step 0 of every accuracy curve. Evaluated again
    when the starting model changed since (its fingerprint is stored beside the result)."""
    from ..data.evaluation import write_eval

    path = os.path.join(report_dir, "start", "eval.json")
    fingerprint = start_fingerprint(task_args.model_name_or_path)
    if os.path.isfile(path):
        with open(path) as f:
            if json.load(f).get("start_model") == fingerprint:
                return
        phase(f"{path} was made from another starting model (or an older copy of it): evaluating it again")
    model, tokenizer = load_for_task(task_args, cfg.mtp_num_heads, cfg.mtp_init, seed=0,
                                     trust_remote_code=cfg.trust_remote_code)
    _, eval_ds = task_splits(task_args, tokenizer)
    result = evaluate_task(model, tokenizer, eval_ds, task_args, path, "starting model",
                           draft_policy(cfg, model))
    write_eval({**result, "start_model": fingerprint}, path)


def run_comparison(arms, seeds, report_dir, task_args, cfg, parse, *, baseline: str = "", lora_args=None,
                   command: str = "mtprl compare") -> str:
    """Every arm x seed into `<report_dir>/runs/<arm>-s<seed>` (a finished run kept, a cut one resumed or
    evaluated), then `<report_dir>/report.md`; returns the report's path. `task_args` and `cfg`: the command's own
    settings (the starting model's evaluation); `parse(extra)`: the command line parsed again with `extra`
    arguments appended (an arm's overrides, a run's seed and directory), as `(task_args, cfg)`; `lora_args`: each run's
    LoRA of the trunk (`mtprl.model.lora.LoraArguments`)."""
    from .report import build_report

    baseline = baseline_arm(arms, baseline)
    for arm in arms:  # every arm's overrides parse (and validate) before anything runs
        parse(arm.cli_args())
    evaluate_start(task_args, cfg, report_dir)
    run_dirs = []
    for arm in arms:
        for seed in seeds:
            run_dir = os.path.join(report_dir, "runs", f"{arm.slug}-s{seed}")
            run_dirs.append(run_dir)
            extra = arm.cli_args() + ["--seed", str(seed), "--output_dir", run_dir, "--eval_before", "false"]
            run_task_args, run_cfg = parse(extra)
            state = prepare_run(run_dir, run_cfg.max_steps, "compare", run_task_args.model_name_or_path)
            if state.kind == "finished":
                continue
            if state.kind == "evaluate":
                finish_run(run_dir, state.checkpoint, run_task_args)
                continue
            if state.kind == "resume":
                run_task_args, run_cfg = parse(extra + ["--resume_from_checkpoint", state.checkpoint])
            phase(f"compare: running arm {arm.label} seed {seed}")
            run_training(run_task_args, run_cfg, label=arm.label,
                         peft_config=peft_config_of(lora_args) if lora_args is not None else None)
    report = build_report(run_dirs, report_dir, command=command, baseline=baseline.label,
                          start=os.path.join(report_dir, "start", "eval.json"))
    phase(f"compare: report written to {report}")
    return report
