"""Running one experiment, what `mtprl sft`, `train` and `eval` (and each run of `compare`) do once their arguments
are parsed: `run_sft` (the warm start, then its evaluation), `run_training` (one RL run: load, train, save,
evaluate; with `eval_steps` also every N steps), `train_or_resume` (the same under `runs.prepare_run`'s rule),
`finish_run` (a trained run whose final evaluation was cut), `evaluate_task` (held-out avg@k / pass@k and every
`eval_datasets` benchmark, written to a JSON file) and `draft_policy` (the heads drafting the samples)."""

from __future__ import annotations

import json
import os

from ..data.sft_data import self_distillation_data, sft_completions
from ..data.task_setup import RUN_TASK_FIELDS, TaskArguments, load_for_task, task_benchmarks, task_splits
from ..io.callbacks import PeriodicEvalCallback, phase
from ..io.faults import kill_point
from ..io.jsonl import atomic_write_json
from ..model.checkpoints import is_complete_checkpoint, load_mtp_weights, save_pretrained
from ..model.mtp import get_mtp_heads
from .config import DraftFields, check_draft_options
from .runs import prepare_run, record_trained_steps, resume_point, start_fingerprint


def draft_policy(fields: DraftFields, model=None):
    """The rollout policy of `mtp_draft_tokens` / `mtp_draft_policy` / `mtp_draft_vocab_size` (None: plain
    generate)."""
    from ..generation.rollout import make_draft_policy

    heads = getattr(model, "mtp_heads", None)
    drafts = fields.mtp_draft_tokens
    check_draft_options(drafts, fields.mtp_draft_policy, heads.num_heads if heads is not None else drafts,
                        fields.mtp_draft_vocab_size)
    return make_draft_policy(fields.mtp_draft_policy, drafts, fields.mtp_draft_vocab_size, model) if drafts else None


def evaluate_task(model, tokenizer, eval_ds, task_args, path, label, draft=None):
    """Held-out avg@k / pass@k, plus every `eval_datasets` benchmark and their average (Table 1's columns).
    `draft`: the heads draft the samples (`draft_policy`)."""
    from ..data.evaluation import evaluate, write_eval

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


def run_sft(task_args: TaskArguments, cfg) -> dict | None:
    """The warm start (`MTPSFTTrainer`): main CE + MTP CE on every head, or with `mtp_only` the heads alone on the
    model's own samples (their acceptance before and after in acceptance.json), then the evaluation. Skipped when
    `output_dir` already holds a model (unless `overwrite`); `resume_from_checkpoint: true` resumes the latest
    complete checkpoint, or starts fresh."""
    from .sft_trainer import MTPSFTTrainer

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
            before = evaluate_task(model, tokenizer, eval_ds, task_args, before_path, "model before the head warm-up",
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
    after = evaluate_task(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval.json"),
                          "sft model", draft)
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
    from ..data.scoring import TaskReward
    from .trainer import MTPGRPOTrainer

    model, tokenizer = load_for_task(task_args, cfg.mtp_num_heads, cfg.mtp_init, seed=cfg.seed,
                                     trust_remote_code=cfg.trust_remote_code)
    if cfg.mtp_heads_from:  # same policy, other heads (an arm's warm-up): loaded in place, the count checked
        load_mtp_weights(get_mtp_heads(model), cfg.mtp_heads_from)
        phase(f"train: MTP heads from {cfg.mtp_heads_from}")
    train_ds, eval_ds = task_splits(task_args, tokenizer)
    draft = draft_policy(cfg, model)
    if task_args.eval_before:
        evaluate_task(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval_before.json"),
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
        return evaluate_task(model, tokenizer, eval_ds, task_args, os.path.join(cfg.output_dir, "eval.json"),
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
    from ..data.evaluation import evaluate

    k = task_args.eval_k
    row = {}
    for name, data in [(None, eval_ds), *task_benchmarks(task_args, tokenizer).items()]:
        result = evaluate(model, tokenizer, data, k=k, max_new_tokens=task_args.eval_max_new_tokens, draft=draft)
        prefix = "eval/" if name is None else f"eval/{name}/"
        row[f"{prefix}avg@{k}"], row[f"{prefix}pass@{k}"] = result[f"avg@{k}"], result[f"pass@{k}"]
    return row


def train_or_resume(task_args: TaskArguments, cfg, peft_config=None) -> dict | None:
    """`run_training`, re-runnable after a kill anywhere under `--resume_from_checkpoint true`: it starts fresh when
    there is no complete checkpoint, resumes from the last complete one, evaluates a trained model whose final
    evaluation was cut, and does nothing for a finished run (`runs.prepare_run`, the rule `compare` applies to
    each of its runs)."""
    if str(cfg.resume_from_checkpoint).lower() == "true":
        state = prepare_run(cfg.output_dir, cfg.max_steps, "train")
        if state.kind == "finished":
            with open(os.path.join(cfg.output_dir, "eval.json")) as f:
                return json.load(f)
        if state.kind == "evaluate":
            finish_run(cfg.output_dir, state.checkpoint, task_args)
            return None
        cfg.resume_from_checkpoint = state.checkpoint  # None: fresh
    return run_training(task_args, cfg, peft_config=peft_config)


def finish_run(run_dir, checkpoint, task_args):
    """A trained run whose final evaluation was cut: the last checkpoint (when given) saved as the final model, then
    the model in `run_dir` evaluated to its eval.json."""
    from ..model.loading import load_model

    if checkpoint:  # the last checkpoint is the final model
        model, tokenizer = load_model(checkpoint)
        save_pretrained(model, run_dir, tokenizer=tokenizer)
    model, tokenizer = load_model(run_dir)
    _, eval_ds = task_splits(task_args, tokenizer)
    evaluate_task(model, tokenizer, eval_ds, task_args, os.path.join(run_dir, "eval.json"), run_dir)
