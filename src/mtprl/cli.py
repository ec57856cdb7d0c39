"""The `mtprl` command line. YAML configs parsed with TRL's TrlParser; any field can be overridden on the
command line (`mtprl train --config configs/tiny.yaml --mtp_regime ce --max_steps 10`). This module parses and
dispatches: the commands' argument dataclasses, the parser, and each command as a short sequence of calls; the
model and the data come from `mtprl.data.task_setup`, sft's training text from `mtprl.data.sft_data`.

Commands (each a `cmd_*` function below):
  sft      `MTPSFTTrainer`: warm start, main CE + MTP CE on every head (MTP pretraining), then evaluate
  train    `MTPGRPOTrainer` (GRPO/DAPO/GSPO via TRL) with the heads under `--mtp_regime`; `run_training`
  eval     avg@k / pass@k with the paper's sampling (`mtprl.data.evaluation`)
  compare  every arm (a regime plus overrides, `mtprl.analysis.arms`) x seed from one starting model, resumable
           (`runs.prepare_run`), periodic evaluation with `eval_steps`, then the report
  report   the report (`mtprl.analysis.report`) from existing run directories, no training
  probe    the per-step gain dJ(lambda) at a run's checkpoints (`mtprl.analysis.probe`)

The package map, module by module, is in one place: docs/layout.md.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import ClassVar

from trl import TrlParser

from .io.callbacks import PeriodicEvalCallback, phase
from .model.checkpoints import load_mtp_weights
from .training.config import DraftFields, check_draft_options
from .data.task_setup import RUN_TASK_FIELDS, TaskArguments, load_for_task, task_benchmarks, task_splits
from .io.faults import kill_point
from .io.jsonl import atomic_write_json
from .model.lora import LoraArguments, peft_config_of
from .model.mtp import get_mtp_heads
from .analysis.probe import ProbeOptions
from .training.runs import prepare_run, record_trained_steps, resume_point, start_fingerprint
from .data.sft_data import self_distillation_data, sft_completions


def usage() -> str:
    """`mtprl --help`: the commands, with the regimes, lambda sources and export layouts read from the code's own
    tables (`regimes.REGIMES`, `regimes.OCC_VARIANTS`, `native.LAYOUT_BY_NAME`), so the help cannot go stale."""
    from .model.native import LAYOUT_BY_NAME
    from .core.regimes import OCC_VARIANTS, REGIMES

    return f"""usage: mtprl <command> [--config FILE.yaml] [--field value ...]

commands:
  sft      warm start: main CE + MTP CE on every head (MTP pretraining), then evaluate
  train    RL (GRPO/DAPO/GSPO via TRL) with MTP heads under --mtp_regime {'|'.join(REGIMES)}
           (occ's lambda source: --occ_variant {'|'.join(OCC_VARIANTS)})
  eval     avg@k and pass@k (temperature 1.0, top-p 0.7) of --model_name_or_path, JSON out
  compare  --arms detach,ce,policy,occ --seeds 0,1 --report_dir DIR [train fields]: every arm x seed from the
           same warm start (resumable), then DIR/report.md with the table and figures
  report   RUN_DIR... [--report_dir DIR]: rebuild the report from existing runs, no training
  probe    --run_dir R [--checkpoints all|last|N,M] [--term ...]: the per-step gain dJ(lambda) at a run's
           checkpoints (its own update, batch and optimizer state), OCC's lambda on the measured curve
  export   --model_name_or_path DIR --output_dir OUT [--format {'|'.join(EXPORT_FORMATS)}]: the model and its MTP
           heads in the model family's own checkpoint layout ({', '.join(LAYOUT_BY_NAME)}) or mtprl's

`mtprl <command> --help` lists every field, mtprl's own first; docs/configuration.md has them all."""


# `--help` headings: a class's own fields under its heading, fields inherited from TRL / transformers after them
HEADINGS = {"MTPGRPOConfig": "mtprl: heads, regime, OCC, drafting (the fields MTPGRPOConfig adds to TRL's GRPOConfig)",
            "MTPSFTConfig": "mtprl: heads and drafting (the fields MTPSFTConfig adds to TRL's SFTConfig)",
            "TaskArguments": "mtprl: model, task and evaluation (every command)",
            "EvalArguments": "mtprl eval", "CompareArguments": "mtprl compare: arms, seeds, report",
            "ReportArguments": "mtprl report", "ExportArguments": "mtprl export",
            "ProbeArguments": "mtprl probe", "LoraArguments": "LoRA of the trunk (TRL's ModelConfig PEFT flags)"}


def _library_base(dtype):
    """The first TRL / transformers class dtype derives from (GRPOConfig for MTPGRPOConfig), or None."""
    return next((c for c in dtype.__mro__[1:] if c.__module__.split(".")[0] in ("trl", "transformers")), None)


class Parser(TrlParser):
    """TrlParser whose `--help` puts mtprl's own fields first, under their own headings (TRL's and transformers'
    after them), and whose error for an unknown key in a YAML config names the file, the key and the closest
    field."""

    def __init__(self, dataclass_types, command: str | None = None):
        super().__init__(dataclass_types,
                         usage=f"mtprl {command} [--config FILE.yaml] [--field value ...]" if command else None)
        # groups in creation order are (positional, options, then one per heading); the configs' own first
        own_first = [g for g in self._action_groups[2:] if g.title.startswith(("mtprl: heads", "mtprl compare"))]
        library = [g for g in self._action_groups[2:] if not g.title.startswith("mtprl")]
        rest = [g for g in self._action_groups[2:] if g not in own_first and g not in library]
        self._action_groups[2:] = own_first + rest + library

    def _add_dataclass_arguments(self, dtype):
        """HfArgumentParser's, with the fields split into argument groups by where they are defined."""
        from typing import get_type_hints

        hints = get_type_hints(dtype)
        base = _library_base(dtype)
        inherited = {f.name for f in fields(base)} if base is not None else set()
        own = self.add_argument_group(HEADINGS.get(dtype.__name__, dtype.__name__))
        library = None
        if base is not None:
            library = self.add_argument_group(f"{base.__name__} ({base.__module__.split('.')[0]}; see its "
                                              "documentation)")
        extra_help = getattr(dtype, "FIELD_HELP", {})  # help for fields declared without it (ProbeArguments')
        for f in fields(dtype):
            if f.init:
                f.type = hints[f.name]
                if "help" not in f.metadata and f.name in extra_help:
                    f = copy.copy(f)
                    f.metadata = MappingProxyType({**f.metadata, "help": extra_help[f.name]})
                self._parse_dataclass_field(library if f.name in inherited else own, f)

    def parse_args_and_config(self, args=None, **kwargs):
        try:
            return super().parse_args_and_config(args, **kwargs)
        except ValueError as e:
            raise unknown_field_error(e, list(args or []), self.dataclass_types) from None


def unknown_field_error(error: ValueError, argv, types) -> ValueError:
    """TrlParser's "Unknown arguments from config file: ['--x', ...]" as "FILE: unknown field x (did you mean
    y?)"; any other error as it was."""
    import difflib
    import re

    if "Unknown arguments from config file" not in str(error):
        return error
    config = config_path(argv) or "the config file"
    known = [f.name for t in types for f in fields(t)]
    parts = []
    for name in re.findall(r"'--([\w.-]+)'", str(error)):
        close = difflib.get_close_matches(name, known, n=1)
        parts.append(f"unknown field {name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    return ValueError(f"{config}: " + "; ".join(parts or [str(error)]))


@dataclass
class EvalArguments(DraftFields):
    """`mtprl eval` has no training config; `trust_remote_code` is otherwise TRL's (TrainingArguments') field."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a model's own modelling code."})


def draft_policy(fields: DraftFields, model=None):
    """The rollout policy of `mtp_draft_tokens` / `mtp_draft_policy` / `mtp_draft_vocab_size` (None: plain
    generate)."""
    from .generation.rollout import make_draft_policy

    heads = getattr(model, "mtp_heads", None)
    drafts = fields.mtp_draft_tokens
    check_draft_options(drafts, fields.mtp_draft_policy, heads.num_heads if heads is not None else drafts,
                        fields.mtp_draft_vocab_size)
    return make_draft_policy(fields.mtp_draft_policy, drafts, fields.mtp_draft_vocab_size, model) if drafts else None


def _evaluate(model, tokenizer, eval_ds, task_args, path, label, draft=None):
    """Held-out avg@k / pass@k, plus every `eval_datasets` benchmark and their average (Table 1's columns).
    `draft`: the heads draft the samples (`draft_policy`)."""
    from .data.evaluation import evaluate, write_eval

    k = task_args.eval_k
    keys = (f"avg@{k}", f"pass@{k}")
    phase(f"evaluating {label}: {len(eval_ds)} questions x {k} samples")
    result = evaluate(model, tokenizer, eval_ds, k=k, max_new_tokens=task_args.eval_max_new_tokens, draft=draft)
    benchmarks = task_benchmarks(task_args, tokenizer)
    if benchmarks:
        result["benchmarks"] = {}
        for name, data in benchmarks.items():
            phase(f"evaluating {label} on {name}: {len(data)} questions x {k} samples")
            bench = evaluate(model, tokenizer, data, k=k, max_new_tokens=task_args.eval_max_new_tokens, draft=draft)
            result["benchmarks"][name] = {key: bench[key] for key in (*keys, "num_questions", "correct_per_question",
                                                                       "questions_digest")}
        result["benchmarks_average"] = {key: sum(b[key] for b in result["benchmarks"].values()) / len(benchmarks)
                                        for key in keys}
    kill_point("final_eval")
    write_eval(result, path)
    accept = " ".join(f"{key}={v:.3f}" for key, v in result.items()
                      if key.startswith("mtp/accept") or key in ("rollout/spec_accept_length", "rollout/tokens_per_s"))
    bench_line = "".join(f" {name}: avg@{k}={b[keys[0]]:.3f}" for name, b in result.get("benchmarks", {}).items())
    phase(f"{label}: avg@{k}={result[keys[0]]:.3f} pass@{k}={result[keys[1]]:.3f} {accept}{bench_line} -> {path}")
    return result


def cmd_sft(argv) -> dict | None:
    from .model.checkpoints import is_complete_checkpoint
    from .training.config import MTPSFTConfig
    from .training.sft_trainer import MTPSFTTrainer

    task_args, cfg = Parser((TaskArguments, MTPSFTConfig), "sft").parse_args_and_config(argv)
    if is_complete_checkpoint(cfg.output_dir) and not task_args.overwrite:
        phase(f"sft: {cfg.output_dir} already holds a model; skipping (pass --overwrite true to train again)")
        return None
    if str(cfg.resume_from_checkpoint).lower() == "true":  # the latest complete checkpoint-N, or a fresh start
        point = resume_point(cfg.output_dir, "true")
        cfg.resume_from_checkpoint = point[0] if point else None
        phase(f"sft: resuming from {point[0]} (step {point[1]})" if point else "sft: no checkpoint yet, fresh start")
    model, tokenizer = load_for_task(task_args, cfg.mtp_num_heads, cfg.mtp_init, seed=cfg.seed,
                                     trust_remote_code=cfg.trust_remote_code)
    train_ds, eval_ds = task_splits(task_args, tokenizer)
    before = None
    draft = draft_policy(cfg, model)
    if cfg.mtp_only:
        before_path = os.path.join(cfg.output_dir, "eval_before.json")
        if task_args.eval_after and cfg.resume_from_checkpoint and os.path.isfile(before_path):
            with open(before_path) as f:  # a resumed warm-up: the starting model was measured already
                before = json.load(f)
        elif task_args.eval_after:
            before = _evaluate(model, tokenizer, eval_ds, task_args, before_path, "model before the head warm-up",
                               draft)
        train_ds = self_distillation_data(model, tokenizer, train_ds, cfg, draft)
    else:
        train_ds = sft_completions(train_ds, cfg.answer_suffix_fraction, cfg.seed, cfg.answer_format)
    phase(f"sft: {cfg.max_steps} steps, {cfg.mtp_num_heads} MTP head(s), "
          f"{'heads only (main model frozen)' if cfg.mtp_only else 'main + heads'}, output {cfg.output_dir}")
    trainer = MTPSFTTrainer(model=model, args=cfg, train_dataset=train_ds, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    trainer.save_model(cfg.output_dir)
    if not task_args.eval_after:
        return None
    after = _evaluate(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval.json"), "sft model",
                      draft)
    if before is not None:
        record = {key: {"before": before.get(key), "after": after[key]} for key in after
                  if key.startswith("mtp/accept/")}
        atomic_write_json(os.path.join(cfg.output_dir, "acceptance.json"), record)
        phase("sft --mtp_only: acceptance " + ", ".join(
            f"head {key.rsplit('/', 1)[1]} {v['before']:.3f} -> {v['after']:.3f}" for key, v in record.items()))
    return after


def run_training(task_args: TaskArguments, cfg, label: str | None = None, peft_config=None) -> dict | None:
    """One RL run: load the model (with heads), train under `cfg.mtp_regime` (the trunk adapted by LoRA under
    `peft_config`, `mtprl.model.lora`), save, evaluate. With `eval_steps` the held-out set (and every `eval_datasets`
    benchmark) is also evaluated every N steps."""
    from .data.tasks import TaskReward
    from .training.trainer import MTPGRPOTrainer

    model, tokenizer = load_for_task(task_args, cfg.mtp_num_heads, cfg.mtp_init, seed=cfg.seed,
                                     trust_remote_code=cfg.trust_remote_code)
    if cfg.mtp_heads_from:  # same policy, other heads (an arm's warm-up): loaded in place, the count checked
        load_mtp_weights(get_mtp_heads(model), cfg.mtp_heads_from)
        phase(f"train: MTP heads from {cfg.mtp_heads_from}")
    train_ds, eval_ds = task_splits(task_args, tokenizer)
    draft = draft_policy(cfg, model)
    if task_args.eval_before:
        _evaluate(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval_before.json"),
                  "starting model", draft)
    phase(f"train: regime={cfg.mtp_regime} variant={cfg.occ_variant} loss={cfg.loss_type} "
          f"steps={cfg.max_steps} output={cfg.output_dir}")
    trainer = MTPGRPOTrainer(model=model, reward_funcs=[TaskReward()], args=cfg, train_dataset=train_ds,
                             processing_class=tokenizer, peft_config=peft_config)
    model = trainer.accelerator.unwrap_model(trainer.model)  # under LoRA the PeftModel, which carries the heads
    every = _eval_every(cfg)
    if every:
        trainer.add_callback(PeriodicEvalCallback(every, lambda m: _periodic_eval(m, tokenizer, eval_ds, task_args,
                                                                                  draft),
                                                  cfg.output_dir))
    os.makedirs(cfg.output_dir, exist_ok=True)
    atomic_write_json(os.path.join(cfg.output_dir, "run_info.json"), {
        "mtp_regime": cfg.mtp_regime, "occ_variant": cfg.occ_variant, "seed": cfg.seed,
        "label": label or cfg.mtp_regime, "model": task_args.model_name_or_path,
        "task": task_args.dataset_name or task_args.task, "max_steps": cfg.max_steps, "loss_type": cfg.loss_type,
        "mtp_coef": cfg.mtp_coef, "occ_lambda_plus": cfg.occ_lambda_plus, "mtp_draft_tokens": cfg.mtp_draft_tokens,
        "mtp_heads_from": cfg.mtp_heads_from,
        "start_model": start_fingerprint(task_args.model_name_or_path),
        "task_args": {name: getattr(task_args, name) for name in RUN_TASK_FIELDS}})
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)  # the trainer cuts the log back on resume
    trainer.save_model(cfg.output_dir)
    record_trained_steps(cfg.output_dir, trainer.state.global_step)
    phase(f"train: done, metrics in {os.path.join(cfg.output_dir, 'metrics.jsonl')}")
    if task_args.eval_after:
        return _evaluate(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval.json"),
                         "trained model", draft)
    return None


def _eval_every(cfg) -> int:
    """`eval_steps` (TRL's field; a fraction < 1 is a share of max_steps, as in transformers) as a step count;
    0 when unset. mtprl evaluates by sampling itself, so TRL's own `eval_strategy` stays "no"."""
    steps = cfg.eval_steps
    if not steps or cfg.eval_strategy != "no":
        return 0
    return max(1, round(steps * cfg.max_steps)) if steps < 1 else int(steps)


def _periodic_eval(model, tokenizer, eval_ds, task_args, draft=None) -> dict:
    """Held-out avg@k / pass@k and every benchmark's, flattened to metric keys `eval/...`."""
    from .data.evaluation import evaluate

    k = task_args.eval_k
    row = {}
    for name, data in [(None, eval_ds), *task_benchmarks(task_args, tokenizer).items()]:
        result = evaluate(model, tokenizer, data, k=k, max_new_tokens=task_args.eval_max_new_tokens, draft=draft)
        prefix = "eval/" if name is None else f"eval/{name}/"
        row[f"{prefix}avg@{k}"], row[f"{prefix}pass@{k}"] = result[f"avg@{k}"], result[f"pass@{k}"]
    return row


def cmd_train(argv) -> dict | None:
    """`--resume_from_checkpoint true` makes the command re-runnable after a kill, anywhere: it starts fresh when
    there is no complete checkpoint, resumes from the last complete one, evaluates a trained model whose final
    evaluation was cut, and does nothing for a finished run (`runs.prepare_run`, the rule `compare` applies to
    each of its runs)."""
    from .training.config import MTPGRPOConfig

    parser = Parser((TaskArguments, MTPGRPOConfig, LoraArguments), "train")
    task_args, cfg, lora_args = parser.parse_args_and_config(argv)
    if str(cfg.resume_from_checkpoint).lower() == "true":
        state = prepare_run(cfg.output_dir, cfg.max_steps, "train")
        if state.kind == "finished":
            with open(os.path.join(cfg.output_dir, "eval.json")) as f:
                return json.load(f)
        if state.kind == "evaluate":
            _finish_run(cfg.output_dir, state.checkpoint, task_args)
            return None
        cfg.resume_from_checkpoint = state.checkpoint  # None: fresh
    return run_training(task_args, cfg, peft_config=peft_config_of(lora_args))


def config_path(argv) -> str | None:
    """The `--config FILE` (or `--config=FILE`) of a command line."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def explicit_fields(argv) -> set[str]:
    """The fields a command line sets itself: `--name` flags and the keys of its `--config` YAML."""
    import yaml

    names = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    path = config_path(argv)
    if path and os.path.isfile(path):
        with open(path) as f:
            names |= set(yaml.safe_load(f) or {})
    return names


def _run_task_settings(task_args: TaskArguments, argv) -> None:
    """A run directory's recorded task settings for every field the command line does not set."""
    info = os.path.join(task_args.model_name_or_path, "run_info.json")
    if not os.path.isfile(info):
        return
    with open(info) as f:
        recorded = json.load(f).get("task_args") or {}
    explicit = explicit_fields(argv)
    taken = [name for name in RUN_TASK_FIELDS if name in recorded and name not in explicit]
    for name in taken:
        setattr(task_args, name, recorded[name])
    if taken:
        phase(f"eval: the run's own task settings from {info} ({', '.join(taken)}); set a field to override it")


def _eval_path(task_args: TaskArguments) -> str:
    """Where `mtprl eval` writes: `eval_output` if named, else a new file of its own (a run's eval.json, the
    training's final evaluation, is never replaced unless the user names that path)."""
    if task_args.eval_output:
        return task_args.eval_output
    where = task_args.model_name_or_path if os.path.isdir(task_args.model_name_or_path) else "."
    os.makedirs(os.path.join(where, "evals"), exist_ok=True)
    return os.path.join(where, "evals", f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json")


def cmd_eval(argv) -> dict:
    task_args, eval_args = Parser((TaskArguments, EvalArguments), "eval").parse_args_and_config(argv)
    _run_task_settings(task_args, list(argv))
    model, tokenizer = load_for_task(task_args, trust_remote_code=eval_args.trust_remote_code)
    _, eval_ds = task_splits(task_args, tokenizer)
    return _evaluate(model, tokenizer, eval_ds, task_args, _eval_path(task_args), task_args.model_name_or_path,
                     draft_policy(eval_args, model))


def _finish_run(run_dir, checkpoint, task_args):
    from .model.checkpoints import save_pretrained
    from .model.loading import load_model

    if checkpoint:  # the last checkpoint is the final model
        model, tokenizer = load_model(checkpoint)
        save_pretrained(model, run_dir, tokenizer=tokenizer)
    model, tokenizer = load_model(run_dir)
    _, eval_ds = task_splits(task_args, tokenizer)
    _evaluate(model, tokenizer, eval_ds, task_args, os.path.join(run_dir, "eval.json"), run_dir)


@dataclass
class CompareArguments:
    """`mtprl compare`: which arms and seeds, the baseline, and where the runs and the report go."""

    arms: str = field(default="", metadata={
        "help": "Comma-separated arms, each a regime plus overrides: detach,ce,policy@mtp_coef=0.5,"
                "occ@occ_lambda_plus=2.0@occ_clip=true (or an `arms:` list with labels in the YAML, see "
                "mtprl.analysis.arms). Empty: one arm per --regimes entry."})
    regimes: str = field(default="detach,ce,policy,occ", metadata={
        "help": "Comma-separated regimes (used when --arms is empty), each trained once per seed from the same "
                "starting model."})
    baseline: str = field(default="", metadata={
        "help": "Label of the arm the others are compared with (95%% intervals, the training run as the unit); default: the first detach "
                "arm, else the first arm."})
    seeds: str = field(default="0", metadata={"help": "Comma-separated seeds, e.g. 0,1,2."})
    report_dir: str = field(default="reports/compare", metadata={
        "help": "Runs go to <report_dir>/runs/<arm>-s<seed>, the starting model's evaluation to "
                "<report_dir>/start/eval.json, the report to <report_dir>/report.md."})

    def arm_list(self, allowed_fields=()):
        from .analysis.arms import parse_arms

        return parse_arms(self.arms if self.arms else self.regime_list(), allowed_fields)

    def baseline_arm(self, arms):
        if self.baseline:
            for arm in arms:
                if arm.label == self.baseline:
                    return arm
            raise ValueError(f"--baseline {self.baseline!r} is not one of the arms ({', '.join(a.label for a in arms)})")
        return next((a for a in arms if a.regime == "detach"), arms[0])

    def regime_list(self) -> list[str]:
        from .core.regimes import REGIMES

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


def _evaluate_start(task_args, cfg, report_dir) -> None:
    """The starting model, evaluated once: every arm and seed starts from it and is evaluated on the same
    questions with the same sampling seed, so one evaluation is step 0 of every accuracy curve. Evaluated again
    when the starting model changed since (its fingerprint is stored beside the result)."""
    from .data.evaluation import write_eval

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
    result = _evaluate(model, tokenizer, eval_ds, task_args, path, "starting model",
                       draft_policy(cfg, model))
    write_eval({**result, "start_model": fingerprint}, path)


def cmd_compare(argv) -> str:
    from .training.config import MTPGRPOConfig
    from .analysis.report import build_report

    parser = Parser((CompareArguments, TaskArguments, MTPGRPOConfig, LoraArguments), "compare")
    compare_args, task_args0, cfg0, lora_args = parser.parse_args_and_config(list(argv))
    arms = compare_args.arm_list({f.name for f in fields(MTPGRPOConfig)})
    baseline, seeds = compare_args.baseline_arm(arms), compare_args.seed_list()
    for arm in arms:  # every arm's overrides parse (and validate) before anything runs
        parser.parse_args_and_config(list(argv) + arm.cli_args())
    _evaluate_start(task_args0, cfg0, compare_args.report_dir)
    run_dirs = []
    for arm in arms:
        for seed in seeds:
            run_dir = os.path.join(compare_args.report_dir, "runs", f"{arm.slug}-s{seed}")
            run_dirs.append(run_dir)
            extra = arm.cli_args() + ["--seed", str(seed), "--output_dir", run_dir, "--eval_before", "false"]
            _, task_args, cfg, _ = parser.parse_args_and_config(list(argv) + extra)
            state = prepare_run(run_dir, cfg.max_steps, "compare", task_args.model_name_or_path)
            if state.kind == "finished":
                continue
            if state.kind == "evaluate":
                _finish_run(run_dir, state.checkpoint, task_args)
                continue
            if state.kind == "resume":
                _, task_args, cfg, _ = parser.parse_args_and_config(
                    list(argv) + extra + ["--resume_from_checkpoint", state.checkpoint])
            phase(f"compare: running arm {arm.label} seed {seed}")
            run_training(task_args, cfg, label=arm.label, peft_config=peft_config_of(lora_args))
    report = build_report(run_dirs, compare_args.report_dir, command="mtprl compare " + " ".join(argv),
                          baseline=baseline.label, start=os.path.join(compare_args.report_dir, "start", "eval.json"))
    phase(f"compare: report written to {report}")
    return report


@dataclass
class ReportArguments:
    report_dir: str | None = field(default=None, metadata={
        "help": "Where report.md and the figures go (default: the parent of the first run directory)."})
    baseline: str | None = field(default=None, metadata={
        "help": "Label of the arm the others are compared with (default: the first detach arm)."})
    start: str | None = field(default=None, metadata={
        "help": "The starting model's eval.json (compare writes <report_dir>/start/eval.json): step 0 of the "
                "accuracy curves and each arm's gain over it."})


def cmd_report(argv) -> str:
    from .analysis.report import build_report

    report_args, run_dirs = Parser((ReportArguments,), "report RUN_DIR...").parse_args_and_config(list(argv),
                                                                                  return_remaining_strings=True)
    if not run_dirs:
        raise ValueError("report needs at least one run directory")
    report = build_report(run_dirs, report_args.report_dir or os.path.dirname(os.path.abspath(run_dirs[0])),
                          baseline=report_args.baseline, start=report_args.start)
    phase(f"report written to {report}")
    return report


@dataclass
class ExportArguments:
    model_name_or_path: str = field(metadata={
        "help": "An mtprl checkpoint, or a checkpoint with native MTP layers (what `train` / `sft` read)."})
    output_dir: str = field(metadata={"help": "Where the exported checkpoint goes."})
    format: str = field(default="native", metadata={
        "help": "native: the model family's own names and layout (main model + MTP layers, read back by "
                "transformers' and vLLM's loaders); mtprl: main model + mtp_heads.safetensors."})
    dtype: str = field(default="auto", metadata={"help": "auto | bfloat16 | float16 | float32"})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a model's own modelling code."})


EXPORT_FORMATS = ("native", "mtprl")


def cmd_export(argv) -> str:
    from .model.checkpoints import save_pretrained
    from .model.loading import load_model
    from .model.native import export_native

    (args,) = Parser((ExportArguments,), "export").parse_args_and_config(list(argv))
    if args.format not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {args.format!r}")
    if os.path.abspath(args.output_dir) == os.path.abspath(args.model_name_or_path):
        raise ValueError(f"output_dir {args.output_dir!r} is the checkpoint being read; choose another directory")
    phase(f"loading {args.model_name_or_path}")
    model, tokenizer = load_model(args.model_name_or_path, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if args.format == "native":
        layout = export_native(model, args.output_dir, tokenizer)
        phase(f"wrote {args.output_dir}: main model + {model.mtp_heads.num_heads} MTP layer(s) in the {layout} layout")
    else:
        save_pretrained(model, args.output_dir, tokenizer)
        phase(f"wrote {args.output_dir}: main model + mtp_heads.safetensors")
    return args.output_dir


@dataclass
class ProbeArguments(ProbeOptions):
    """`mtprl probe`: the per-step gain dJ(lambda) at checkpoints of a run (`mtprl.analysis.probe`). What the probe measures
    is `probe.ProbeOptions`' fields, declared there once (a field added there is a flag here at once); this class
    adds which run and which of its checkpoints, and the help text of the options (`FIELD_HELP`)."""

    FIELD_HELP: ClassVar[dict[str, str]] = {
        "term": "The MTP term probed at fixed lambda: detach | ce | policy | distill; default: the run's regime's "
                "(occ -> policy, its term).",
        "lambdas": "auto (0, -reference and log-spaced points from reference / 8 to 8 x reference, reference = the "
                   "largest of |exact lambda|, |OCC's lambda|, mtp_coef; three more just below where the clip "
                   "binds, max_grad_norm / ||g_MTP||) or comma-separated values; 0, OCC's lambda and the "
                   "exact-gradient lambda are always added.",
        "extend": "Times the grid is doubled outward while the best measured point is at its edge.",
        "counterfactuals": "Comma-separated: no_clip, separate_clip, separate_state, sgd (the run's clip kept), "
                           "sgd_no_clip: the same curve under each alternative update from the same state and batch "
                           "(docs/guide-geometry.md).",
        "prompts": "Held-out prompts N (the run's eval split).",
        "samples": "Samples per prompt M, drawn once from pi_theta.",
        "direct": "How many lambdas are also measured directly (fresh samples from theta'), as a check.",
        "seed": "Seed of the held-out samples and the rollout batch.",
        "batch_size": "Rows per forward when scoring and sampling."}

    run_dir: str = field(default="", metadata={"help": "A run directory `mtprl train` or `compare` wrote."})
    checkpoints: str = field(default="all", metadata={
        "help": "all | last | comma-separated steps: the checkpoint-N states to probe (save_steps sets them)."})


def cmd_probe(argv) -> list[str]:
    from .analysis.probe import TERM_OF_REGIME, probe_run

    (args,) = Parser((ProbeArguments,), "probe").parse_args_and_config(list(argv))
    if not args.run_dir or not os.path.isdir(args.run_dir):
        raise ValueError(f"run_dir {args.run_dir!r}: no such directory")
    if args.term and args.term not in TERM_OF_REGIME.values():
        raise ValueError(f"term must be one of {', '.join(sorted(set(TERM_OF_REGIME.values())))}, got {args.term!r}")
    for name in ("prompts", "samples"):
        if getattr(args, name) < (2 if name == "samples" else 1):
            raise ValueError(f"{name} must be >= {2 if name == 'samples' else 1} (the baseline leaves one sample "
                             f"out), got {getattr(args, name)}")
    options = ProbeOptions(**{f.name: getattr(args, f.name) for f in fields(ProbeOptions) if f.init})
    return probe_run(args.run_dir, args.checkpoints, options)

COMMANDS = {"sft": cmd_sft, "train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "report": cmd_report,
            "export": cmd_export, "probe": cmd_probe}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mtprl: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](rest)
    except (ValueError, OSError) as e:
        print(f"mtprl {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
