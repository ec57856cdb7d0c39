"""The `mtprl` command line. YAML configs parsed with TRL's TrlParser; any field can be overridden on the
command line (`mtprl train --config configs/tiny.yaml --mtp_regime ce --max_steps 10`).

Commands (each a `cmd_*` function below):
  sft      `MTPSFTTrainer`: warm start, main CE + MTP CE on every head (MTP pretraining), then evaluate
  train    `MTPGRPOTrainer` (GRPO/DAPO/GSPO via TRL) with the heads under `--mtp_regime`; `run_training`
  eval     avg@k / pass@k with the paper's sampling (`mtprl.evaluation`)
  compare  every regime x seed from one starting model, resumable (`run_state`), then the report
  report   the report (`mtprl.report`) from existing run directories, no training

The package, module by module:
  mtp          the MTP heads (transformers' MtpLayer per depth) and `attach_mtp_heads`
  logprobs     `forward_logprobs`: main + MTP log-probs (entropy, expected acceptance) from one trunk forward
  checkpoints  checkpoint files, `save_pretrained` / `load_pretrained`, `attach_or_load_heads`, trainer mixin
  models       the `tiny` preset (character tokenizer, Qwen2) and `load_model` for any HF causal LM
  objectives   `policy_loss` (TRL's clipped surrogate) and `mtp_ce_loss`, pure functions
  occ          the OCC formula: proxies, lambda, exact lambda from true gradients
  regimes      the regime vocabulary and table: one function per regime returns its term and coefficient
  trainer      `MTPGRPOConfig` / `MTPGRPOTrainer`, `MTPSFTConfig` / `MTPSFTTrainer`
  tasks        tasks (reasoning-gym, jsonl), answer extraction, rewards that never crash a run
  evaluation   avg@k / pass@k
  report       the comparison report (table, figures) from run directories
  jsonl        reading and appending JSON Lines files
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field

from trl import TrlParser

USAGE = """usage: mtprl <command> [--config FILE.yaml] [--field value ...]

commands:
  sft      warm start: main CE + MTP CE on every head (MTP pretraining), then evaluate
  train    RL (GRPO/DAPO/GSPO via TRL) with MTP heads under --mtp_regime none|detach|ce|policy|occ
  eval     avg@k and pass@k (temperature 1.0, top-p 0.7) of --model_name_or_path, JSON out
  compare  --regimes detach,ce,policy,occ --seeds 0,1 --report_dir DIR [train fields]: every regime x seed from
           the same warm start (resumable), then DIR/report.md with the table and figures
  report   RUN_DIR... [--report_dir DIR]: rebuild the report from existing runs, no training

`mtprl <command> --help` lists every field."""


@dataclass
class TaskArguments:
    """What to train on and how to evaluate; shared by every command."""

    model_name_or_path: str = field(default="tiny", metadata={
        "help": "'tiny' (the project's preset, fresh weights), an mtprl checkpoint, or any local HF causal LM."})
    task: str = field(default="reasoning_gym:chain_sum", metadata={
        "help": "reasoning_gym:<name> or jsonl:<path with question/answer rows>."})
    task_config: str = field(default='{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}',
                             metadata={"help": "JSON object of reasoning-gym task options."})
    train_size: int = field(default=4000, metadata={"help": "Training questions."})
    eval_size: int = field(default=200, metadata={"help": "Held-out questions (never in the training split)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the question pool and of the split."})
    eval_k: int = field(default=4, metadata={"help": "Samples per question for avg@k / pass@k."})
    eval_max_new_tokens: int = field(default=8, metadata={"help": "Generation budget at evaluation."})
    eval_before: bool = field(default=False, metadata={"help": "train: evaluate the starting model too."})
    eval_after: bool = field(default=True, metadata={"help": "sft/train: evaluate the final model."})
    eval_output: str | None = field(default=None, metadata={"help": "eval: where to write the JSON "
                                                                     "(default <model>/eval.json)."})
    overwrite: bool = field(default=False, metadata={"help": "sft: train again even if output_dir holds a model."})

    def task_options(self) -> dict:
        if isinstance(self.task_config, dict):
            return self.task_config
        try:
            options = json.loads(self.task_config or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"task_config must be a JSON object, got {self.task_config!r} ({e.msg})") from e
        if not isinstance(options, dict):
            raise ValueError(f"task_config must be a JSON object, got {self.task_config!r}")
        return options


def phase(message: str) -> None:
    print(f"[mtprl {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _splits(task_args: TaskArguments):
    from .tasks import load_task_splits

    phase(f"loading task {task_args.task} ({task_args.train_size} train / {task_args.eval_size} eval questions)")
    return load_task_splits(task_args.task, task_args.train_size, task_args.eval_size, task_args.task_seed,
                            **task_args.task_options())


def _evaluate(model, tokenizer, eval_ds, task_args, path, label):
    from .evaluation import evaluate, write_eval

    phase(f"evaluating {label}: {len(eval_ds)} questions x {task_args.eval_k} samples")
    result = evaluate(model, tokenizer, eval_ds, k=task_args.eval_k, max_new_tokens=task_args.eval_max_new_tokens)
    write_eval(result, path)
    k = task_args.eval_k
    accept = " ".join(f"{key}={v:.3f}" for key, v in result.items() if key.startswith("mtp/accept"))
    phase(f"{label}: avg@{k}={result[f'avg@{k}']:.3f} pass@{k}={result[f'pass@{k}']:.3f} {accept} -> {path}")
    return result


def cmd_sft(argv) -> dict | None:
    from .checkpoints import is_complete_checkpoint
    from .models import load_model
    from .trainer import MTPSFTConfig, MTPSFTTrainer

    task_args, cfg = TrlParser((TaskArguments, MTPSFTConfig)).parse_args_and_config(argv)
    if is_complete_checkpoint(cfg.output_dir) and not task_args.overwrite:
        phase(f"sft: {cfg.output_dir} already holds a model; skipping (pass --overwrite true to train again)")
        return None
    train_ds, eval_ds = _splits(task_args)
    train_ds = train_ds.map(lambda r: {"completion": r["answer"]}).select_columns(["prompt", "completion"])
    model, tokenizer = load_model(task_args.model_name_or_path, cfg.mtp_num_heads, cfg.mtp_init, seed=cfg.seed)
    phase(f"sft: {cfg.max_steps} steps, {cfg.mtp_num_heads} MTP head(s), output {cfg.output_dir}")
    trainer = MTPSFTTrainer(model=model, args=cfg, train_dataset=train_ds, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    trainer.save_model(cfg.output_dir)
    if task_args.eval_after:
        return _evaluate(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval.json"), "sft model")
    return None


def run_training(task_args: TaskArguments, cfg) -> dict | None:
    """One RL run: load the model (with heads), train under `cfg.mtp_regime`, save, evaluate."""
    from .models import load_model
    from .tasks import TaskReward
    from .trainer import MTPGRPOTrainer

    train_ds, eval_ds = _splits(task_args)
    model, tokenizer = load_model(task_args.model_name_or_path, cfg.mtp_num_heads, cfg.mtp_init, seed=cfg.seed)
    if task_args.eval_before:
        _evaluate(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval_before.json"),
                  "starting model")
    phase(f"train: regime={cfg.mtp_regime} variant={cfg.occ_variant} loss={cfg.loss_type} "
          f"steps={cfg.max_steps} output={cfg.output_dir}")
    trainer = MTPGRPOTrainer(model=model, reward_funcs=[TaskReward()], args=cfg, train_dataset=train_ds,
                             processing_class=tokenizer)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "run_info.json"), "w") as f:
        json.dump({"mtp_regime": cfg.mtp_regime, "occ_variant": cfg.occ_variant, "seed": cfg.seed,
                   "label": cfg.mtp_regime, "model": task_args.model_name_or_path, "task": task_args.task,
                   "max_steps": cfg.max_steps, "loss_type": cfg.loss_type}, f, indent=2)
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    trainer.save_model(cfg.output_dir)
    phase(f"train: done, metrics in {os.path.join(cfg.output_dir, 'metrics.jsonl')}")
    if task_args.eval_after:
        return _evaluate(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval.json"),
                         "trained model")
    return None


def cmd_train(argv) -> dict | None:
    from .trainer import MTPGRPOConfig

    task_args, cfg = TrlParser((TaskArguments, MTPGRPOConfig)).parse_args_and_config(argv)
    return run_training(task_args, cfg)


def cmd_eval(argv) -> dict:
    from .models import load_model

    (task_args,) = TrlParser((TaskArguments,)).parse_args_and_config(argv)
    _, eval_ds = _splits(task_args)
    model, tokenizer = load_model(task_args.model_name_or_path)
    default = os.path.join(task_args.model_name_or_path, "eval.json") if os.path.isdir(
        task_args.model_name_or_path) else "eval.json"
    return _evaluate(model, tokenizer, eval_ds, task_args, task_args.eval_output or default,
                     task_args.model_name_or_path)


def _latest_checkpoint(run_dir):
    steps = [int(d.split("-")[1]) for d in os.listdir(run_dir) if d.startswith("checkpoint-") and
             os.path.isfile(os.path.join(run_dir, d, "trainer_state.json"))] if os.path.isdir(run_dir) else []
    return (os.path.join(run_dir, f"checkpoint-{max(steps)}"), max(steps)) if steps else (None, 0)


def _truncate_metrics(run_dir, step):
    """Drop metric rows logged after `step` (a resumed run logs them again)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(kept)


@dataclass
class RunState:
    """Where one compare run stands on disk, and so what compare does with it."""

    kind: str  # "finished" (eval.json written) | "evaluate" (trained, not evaluated) | "resume" | "fresh"
    checkpoint: str | None = None  # resume from / evaluate this checkpoint (None: the model is in the run dir)
    step: int = 0  # the checkpoint's step


def run_state(run_dir: str, max_steps: int) -> RunState:
    from .checkpoints import is_complete_checkpoint

    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        return RunState("finished")
    if is_complete_checkpoint(run_dir):  # killed during the final evaluation
        return RunState("evaluate")
    checkpoint, step = _latest_checkpoint(run_dir)
    if checkpoint and step >= max_steps:  # killed between the last checkpoint and the final save
        return RunState("evaluate", checkpoint, step)
    if checkpoint:
        return RunState("resume", checkpoint, step)
    return RunState("fresh")


def _finish_run(run_dir, checkpoint, task_args):
    from .checkpoints import save_pretrained
    from .models import load_model

    if checkpoint:  # the last checkpoint is the final model
        model, tokenizer = load_model(checkpoint)
        save_pretrained(model, run_dir, tokenizer=tokenizer)
    model, tokenizer = load_model(run_dir)
    _, eval_ds = _splits(task_args)
    _evaluate(model, tokenizer, eval_ds, task_args, os.path.join(run_dir, "eval.json"), run_dir)


@dataclass
class CompareArguments:
    """`mtprl compare`: which regimes and seeds, and where the runs and the report go."""

    regimes: str = field(default="detach,ce,policy,occ", metadata={
        "help": "Comma-separated regimes, each trained once per seed from the same starting model."})
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds, e.g. 0,1,2."})
    report_dir: str = field(default="reports/compare", metadata={
        "help": "Runs go to <report_dir>/runs/<regime>-s<seed>; the report to <report_dir>/report.md."})

    def regime_list(self) -> list[str]:
        from .regimes import REGIMES

        regimes = [r.strip() for r in self.regimes.split(",") if r.strip()]
        for regime in regimes:
            if regime not in REGIMES:
                raise ValueError(f"--regimes: unknown regime {regime!r} (choose from {', '.join(REGIMES)})")
        return regimes

    def seed_list(self) -> list[int]:
        try:
            return [int(s) for s in str(self.seeds).split(",") if s.strip()]
        except ValueError as e:
            raise ValueError(f"--seeds must be comma-separated integers, got {self.seeds!r}") from e


def cmd_compare(argv) -> str:
    from .report import build_report
    from .trainer import MTPGRPOConfig

    parser = TrlParser((CompareArguments, TaskArguments, MTPGRPOConfig))
    compare_args, _, _ = parser.parse_args_and_config(list(argv))
    regimes, seeds = compare_args.regime_list(), compare_args.seed_list()
    run_dirs = []
    for regime in regimes:
        for seed in seeds:
            run_dir = os.path.join(compare_args.report_dir, "runs", f"{regime}-s{seed}")
            run_dirs.append(run_dir)
            extra = ["--mtp_regime", regime, "--seed", str(seed), "--output_dir", run_dir, "--eval_before", "false"]
            _, task_args, cfg = parser.parse_args_and_config(list(argv) + extra)
            state = run_state(run_dir, cfg.max_steps)
            if state.kind == "finished":
                phase(f"compare: {run_dir} is finished; not running it again")
                continue
            if state.kind == "evaluate":
                phase(f"compare: {run_dir} finished training; evaluating it")
                _finish_run(run_dir, state.checkpoint, task_args)
                continue
            if state.kind == "resume":
                phase(f"compare: resuming {run_dir} from {state.checkpoint}")
                _truncate_metrics(run_dir, state.step)
                _, task_args, cfg = parser.parse_args_and_config(
                    list(argv) + extra + ["--resume_from_checkpoint", state.checkpoint])
            elif os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
                os.remove(os.path.join(run_dir, "metrics.jsonl"))  # an interrupted run without a checkpoint
            phase(f"compare: running {regime} seed {seed}")
            run_training(task_args, cfg)
    report = build_report(run_dirs, compare_args.report_dir, command="mtprl compare " + " ".join(argv))
    phase(f"compare: report written to {report}")
    return report


@dataclass
class ReportArguments:
    report_dir: str | None = field(default=None, metadata={
        "help": "Where report.md and the figures go (default: the parent of the first run directory)."})


def cmd_report(argv) -> str:
    from .report import build_report

    report_args, run_dirs = TrlParser((ReportArguments,)).parse_args_and_config(list(argv),
                                                                                  return_remaining_strings=True)
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    report = build_report(run_dirs, report_args.report_dir or os.path.dirname(os.path.abspath(run_dirs[0])))
    phase(f"report written to {report}")
    return report


COMMANDS = {"sft": cmd_sft, "train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "report": cmd_report}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mtprl: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](rest)
    except (ValueError, OSError) as e:
        print(f"mtprl {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
