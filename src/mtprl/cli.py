"""The `mtprl` command line. YAML configs parsed with TRL's TrlParser; any field can be overridden on the
command line (`mtprl train --config configs/tiny.yaml --mtp_regime ce --max_steps 10`). This module parses and
dispatches: the commands' argument dataclasses, the parser, and each command as a short sequence of calls. What a
command runs is elsewhere: the runs in `mtprl.training.experiment`, the comparison in `mtprl.analysis.compare`, the
model and the data from `mtprl.data.task_setup`.

Commands (each a `cmd_*` function below):
  sft      `MTPSFTTrainer`: warm start, main CE + MTP CE on every head (MTP pretraining), then evaluate
           (`experiment.run_sft`)
  train    `MTPGRPOTrainer` (GRPO/DAPO/GSPO via TRL) with the heads under `--mtp_regime`; `experiment.run_training`,
           resumable (`experiment.train_or_resume`)
  eval     avg@k / pass@k with the paper's sampling (`experiment.evaluate_task`, `mtprl.data.evaluation`)
  compare  every arm (a regime plus overrides, `mtprl.analysis.arms`) x seed from one starting model, resumable
           (`runs.prepare_run`), periodic evaluation with `eval_steps`, then the report (`compare.run_comparison`)
  report   the report (`mtprl.analysis.report`) from existing run directories, no training
  export   the model and its heads in the family's own checkpoint layout (`mtprl.model.native`) or mtprl's
  probe    the per-step gain dJ(lambda) at a run's checkpoints (`mtprl.analysis.probe`)

The package map, module by module, is in one place: docs/layout.md."""

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

from .io.callbacks import phase
from .training.config import DraftFields
from .data.task_setup import RUN_TASK_FIELDS, TaskArguments, load_for_task, task_splits
from .model.lora import LoraArguments, peft_config_of
from .analysis.probe import ProbeOptions
from .training.experiment import draft_policy, evaluate_task, run_sft, train_or_resume


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


def cmd_sft(argv) -> dict | None:
    from .training.config import MTPSFTConfig

    task_args, cfg = Parser((TaskArguments, MTPSFTConfig), "sft").parse_args_and_config(argv)
    return run_sft(task_args, cfg)


def cmd_train(argv) -> dict | None:
    """`--resume_from_checkpoint true` makes the command re-runnable after a kill (`experiment.train_or_resume`)."""
    from .training.config import MTPGRPOConfig

    parser = Parser((TaskArguments, MTPGRPOConfig, LoraArguments), "train")
    task_args, cfg, lora_args = parser.parse_args_and_config(argv)
    return train_or_resume(task_args, cfg, peft_config=peft_config_of(lora_args))


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
    return evaluate_task(model, tokenizer, eval_ds, task_args, _eval_path(task_args), task_args.model_name_or_path,
                         draft_policy(eval_args, model))


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


def cmd_compare(argv) -> str:
    from .analysis.compare import run_comparison
    from .training.config import MTPGRPOConfig

    parser = Parser((CompareArguments, TaskArguments, MTPGRPOConfig, LoraArguments), "compare")
    compare_args, task_args, cfg, lora_args = parser.parse_args_and_config(list(argv))
    arms = compare_args.arm_list({f.name for f in fields(MTPGRPOConfig)})

    def parse(extra):  # the command line again with an arm's (and a run's) own arguments after it
        _, run_task_args, run_cfg, _ = parser.parse_args_and_config(list(argv) + extra)
        return run_task_args, run_cfg

    return run_comparison(arms, compare_args.seed_list(), compare_args.report_dir, task_args, cfg, parse,
                          baseline=compare_args.baseline, lora_args=lora_args,
                          command="mtprl compare " + " ".join(argv))


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
