"""The gain probe: the paper's per-step gain dJ(lambda) measured on a run's own state, update and batch.

The paper's argument is one curve (Eq. 7-11, App. C): after one update with the MTP term at coefficient lambda,
the RL objective changes by about `eta lambda c - (L eta^2 / 2) lambda^2 v^2` relative to lambda = 0, a downward
parabola whose peak `lambda* ~ c / v^2` OCC tracks (Eq. 13). The probe measures that curve:

    state     a checkpoint of a run: model, heads, optimizer and scheduler state (`load_probe_trainer`)
    batch     one rollout batch drawn as the run draws it (TRL's dataloader and `_generate_and_score_completions`),
              split into the `steps_per_generation` micro-batches TRL trains on (`draw_rollout`)
    update    for every lambda of the grid, from the *same* state: TRL's own `training_step` on those micro-batches,
              `num_iterations` times, an optimizer step (clipped, then the scheduler) every
              `gradient_accumulation_steps` (`apply_update`), with the probed term at that fixed lambda
              (`probed_term`: OCC's term is the policy loss on the heads, so OCC is probed as `policy`)
    J         expected reward under the rollouts' sampling law on held-out prompts: M samples per prompt from
              pi_theta, drawn once (`sample_held_out`); dJ(lambda) from the sequence log-probs under theta'(lambda)
              by importance sampling (`mtprl.gain.importance_gain`), and at a few lambdas directly from fresh
              samples of theta'(lambda) as a check
    lambdas   the grid always holds 0, OCC's lambda at that state (the mean of `mtp/lambda/k` over the rollout's
              micro-batches in an update under the run's OCC settings) and the exact-gradient lambda
              `lambda_plus * c / v^2` (c, v^2 from the gradients over the main model, `occ_fidelity_every`
              machinery, on the lambda = 0 update's micro-batches)

`probe.json` per state holds the lambdas, dJ with intervals, the parabola fit (`mtprl.gain.fit_gain_curve`) and its
argmax with a bootstrap interval, the exact and estimated c and v^2, OCC's lambda and the gain it gets as a share of
the best. Controls: under `detach` the term never reaches the trunk (flat curve); dJ(0) is the same update whichever
term is probed.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .callbacks import phase
from .eval_mode import evaluating
from .evaluation import completion_mask, score_completions
from .gain import bootstrap_mean, direct_gain, gain_curve_with_interval, per_prompt_gains
from .jsonl import atomic_write_json
from .logprobs import main_logprobs
from .occ import OCCStats, lambda_from_stats
from .regimes import MTP_TERMS, regime_for
from .tasks import TaskReward, prompt_text

# The probed term per run regime: OCC's term is the head policy loss with lambda in front.
TERM_OF_REGIME = {"detach": "detach", "ce": "ce", "policy": "policy", "occ": "policy", "distill": "distill"}
LAMBDA_KEYS = "mtp/lambda/"


@dataclass
class ProbeOptions:
    """What one probe measures (`mtprl probe` fields of the same names)."""

    term: str = ""  # detach | ce | policy | distill; "" = the run's regime's term (occ -> policy)
    lambdas: str = "auto"  # comma-separated; auto = {-1, 0, 0.5, 1, 2, 4} x a reference lambda (see `lambda_grid`)
    prompts: int = 64  # held-out prompts N
    samples: int = 16  # samples per prompt M
    direct: int = 2  # lambdas also measured directly with fresh samples (0 = none)
    seed: int = 0
    batch_size: int = 64  # rows per forward when scoring and sampling


# ------------------------------------------------------------------------------------------------- J: samples
@dataclass
class HeldOut:
    """M samples per held-out prompt from one policy, with their rewards and sequence log-probs under it."""

    prompt_ids: np.ndarray  # [n] which prompt each sample answers
    sequences: list  # per batch: [rows, T] prompt (left-padded) + completion
    masks: list  # per batch: [rows, T] 1 on the prompt's tokens and the completion up to and including EOS
    prompt_widths: list  # per batch: the padded prompt width
    rewards: np.ndarray  # [n]
    logps: torch.Tensor = field(default=None)  # [n] sum of completion log-probs under the policy that sampled


@torch.no_grad()
def sequence_logps(model, held: HeldOut, temperature: float) -> torch.Tensor:
    """[n] log pi(y | x) of every sample under `model` at `temperature` (the rollouts' untruncated law)."""
    out = []
    with evaluating(model):
        for seqs, mask, width in zip(held.sequences, held.masks, held.prompt_widths):
            keep = seqs.shape[1] - width
            main = main_logprobs(model, seqs, mask, keep, temperature)  # 0 on masked tokens; the heads do not run
            out.append(main.double().sum(dim=1))
    return torch.cat(out)


@torch.no_grad()
def sample_held_out(model, tokenizer, dataset, *, samples: int, temperature: float, max_new_tokens: int,
                    seed: int, batch_size: int = 64, reward: TaskReward | None = None) -> HeldOut:
    """`samples` completions per row of `dataset` (columns prompt, answer[, task, metadata]) from `model` under
    plain sampling at `temperature` (top-k 0, top-p 1: the law TRL's rollouts use by default), scored by the task's
    reward, with their sequence log-probs."""
    reward = reward or TaskReward()
    device = next(model.parameters()).device
    per_call = max(1, batch_size // samples)
    ids, seqs, masks, widths, rewards = [], [], [], [], []
    with evaluating(model, seed):
        for start in range(0, len(dataset), per_call):
            rows = dataset[start:start + per_call]
            enc = tokenizer([prompt_text(tokenizer, p) for p in rows["prompt"]], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False).to(device)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            prompt_mask = enc["attention_mask"].repeat_interleave(samples, dim=0)
            seqs.append(out)
            masks.append(completion_mask(out, prompt_mask, tokenizer.eos_token_id))
            widths.append(enc["input_ids"].shape[1])
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, scores in enumerate(score_completions(reward, rows, texts, samples)):
                ids += [start + i] * len(scores)
                rewards += scores
    held = HeldOut(np.asarray(ids), seqs, masks, widths, np.asarray(rewards, dtype=np.float64))
    held.logps = sequence_logps(model, held, temperature)
    return held


# ------------------------------------------------------------------------------------------------- the update
@dataclass
class TrainerState:
    """Everything one update changes: parameters, optimizer and scheduler state, step counters, OCC's running
    average."""

    model: dict
    optimizer: dict
    scheduler: dict
    global_step: int
    micro_step: int
    ema: dict


def snapshot(trainer) -> TrainerState:
    return TrainerState({k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                        copy.deepcopy(trainer.optimizer.state_dict()), copy.deepcopy(trainer.lr_scheduler.state_dict()),
                        trainer.state.global_step, trainer._step, dict(trainer.calibrator.ema))


def restore(trainer, state: TrainerState) -> None:
    trainer.model.load_state_dict(state.model)
    trainer.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
    trainer.lr_scheduler.load_state_dict(copy.deepcopy(state.scheduler))
    trainer.state.global_step, trainer._step = state.global_step, state.micro_step
    trainer.calibrator.ema = dict(state.ema)
    trainer.model.zero_grad(set_to_none=True)


def draw_rollout(trainer, after_step: int, seed: int) -> list[dict]:
    """One rollout batch as the run draws it after `after_step` optimizer steps: TRL's train dataloader (its
    repeat sampler, skipped ahead by the rollouts already drawn), TRL's generation and scoring, shuffled and split
    into the `steps_per_generation` micro-batches TRL trains on."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    args = trainer.args
    steps_per_rollout = max(1, args.steps_per_generation * trainer.num_iterations // args.gradient_accumulation_steps)
    loader = trainer.get_train_dataloader()
    batches = iter(loader)
    batch = None
    for _ in range(after_step // steps_per_rollout % max(len(loader), 1) + 1):
        batch = next(batches)
    torch.manual_seed(seed)
    trainer.model.train()
    rollout = trainer._generate_and_score_completions(batch)
    trainer._metrics["train"].clear()
    return split_tensor_dict(shuffle_sequence_dict(rollout), args.steps_per_generation)


@contextmanager
def probed_term(trainer, regime, coef: float, fidelity: bool = False):
    """The trainer's MTP term for one update: the regime table entry `regime` (a `regimes.Regime`) with `coef` as
    its fixed coefficient (OCC entries take lambda from the calibrator instead), with the exact and estimated c,
    v^2 logged on every micro-batch when `fidelity`. Plain attribute swaps, undone on exit."""
    saved = (trainer.regime, trainer.args.mtp_coef, trainer.args.occ_fidelity_every)
    trainer.regime, trainer.args.mtp_coef = regime, float(coef)
    trainer.args.occ_fidelity_every = 1 if fidelity else 0
    try:
        yield
    finally:
        trainer.regime, trainer.args.mtp_coef, trainer.args.occ_fidelity_every = saved


@contextmanager
def _inputs_as_given(trainer):
    """TRL's `training_step` on a micro-batch we hand it (TRL's `_prepare_inputs` would draw a new rollout)."""
    trainer._prepare_inputs = lambda inputs: inputs
    try:
        yield
    finally:
        del trainer._prepare_inputs


def apply_update(trainer, micro_batches: list[dict]) -> dict[str, list[float]]:
    """The run's update for one rollout, as transformers' training loop runs it: TRL's `training_step` on each
    micro-batch, `num_iterations` times over the rollout, and every `gradient_accumulation_steps` micro-steps the
    gradient clipped to `max_grad_norm`, the optimizer step, the scheduler step, the gradients zeroed. Returns the
    metrics the steps logged (e.g. `mtp/lambda/k` per micro-batch)."""
    args, model = trainer.args, trainer.model
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    trainer._metrics["train"].clear()
    done = 0
    with _inputs_as_given(trainer):
        for _ in range(trainer.num_iterations):
            for micro in micro_batches:
                trainer.training_step(model, micro, None)
                done += 1
                if done % args.gradient_accumulation_steps == 0:
                    if args.max_grad_norm is not None and args.max_grad_norm > 0:
                        trainer.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    trainer.optimizer.step()
                    trainer.lr_scheduler.step()
                    model.zero_grad(set_to_none=True)
                    trainer.state.global_step += 1
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    trainer._metrics["train"].clear()
    return metrics


def _mean_over_heads(metrics: dict, prefix: str) -> float | None:
    values = [v for key, vals in metrics.items() if key.startswith(prefix) for v in vals]
    return float(statistics.fmean(values)) if values else None


def lambda_grid(spec: str, reference: float) -> list[float]:
    """`auto`: {-1, 0, 0.5, 1, 2, 4} x reference (the largest of |exact lambda|, |OCC's lambda| and mtp_coef), so
    that the grid spans the parabola's peak on both sides; else the comma-separated values."""
    if spec.strip() == "auto":
        return [m * reference for m in (-1.0, 0.0, 0.5, 1.0, 2.0, 4.0)]
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"lambdas must be 'auto' or comma-separated numbers, got {spec!r}") from e


# ------------------------------------------------------------------------------------------------- one state
def probe_state(trainer, tokenizer, held_out_data, options: ProbeOptions, *, step: int, occ_settings: dict,
                log=phase) -> dict:
    """Measure dJ(lambda) at the trainer's current state (see the module docstring); returns probe.json's dict."""
    args, model = trainer.args, trainer.model
    temperature = args.temperature
    term = options.term or TERM_OF_REGIME.get(trainer.args.mtp_regime, "policy")
    start = time.perf_counter()
    base = snapshot(trainer)
    sample = dict(samples=options.samples, temperature=temperature, max_new_tokens=args.max_completion_length,
                  batch_size=options.batch_size)
    held = sample_held_out(model, tokenizer, held_out_data, seed=options.seed, **sample)
    log(f"probe step {step}: {len(held.rewards)} held-out samples, J(theta) = {held.rewards.mean():.4f}")
    batches = draw_rollout(trainer, step, options.seed)

    # OCC's lambda at this state: an update under the run's OCC settings (regime occ with its variant)
    with probed_term(trainer, regime_for("occ", occ_settings["occ_variant"]), occ_settings["mtp_coef"]):
        occ_metrics = apply_update(trainer, batches)
    occ_lambda = _mean_over_heads(occ_metrics, LAMBDA_KEYS) or 0.0
    occ_logps = sequence_logps(model, held, temperature)
    restore(trainer, base)

    # lambda = 0 with the exact and estimated c, v^2 of the probed term on every micro-batch
    with probed_term(trainer, MTP_TERMS[term], 0.0, fidelity=True):
        zero_metrics = apply_update(trainer, batches)
    zero_logps = sequence_logps(model, held, temperature)
    restore(trainer, base)
    stats = {key: float(statistics.fmean(v)) for key, v in zero_metrics.items()
             if key.startswith(("mtp/c_", "mtp/v2_")) and v}
    c_exact = _mean_over_heads(zero_metrics, "mtp/c_exact/") or 0.0
    v2_exact = _mean_over_heads(zero_metrics, "mtp/v2_exact/") or 0.0
    exact_lambda = float(lambda_from_stats(OCCStats(torch.tensor(c_exact), torch.tensor(v2_exact)),
                                           lambda_plus=occ_settings["occ_lambda_plus"], eps=occ_settings["occ_eps"]))
    reference = max(abs(exact_lambda), abs(occ_lambda), abs(occ_settings["mtp_coef"]), 1e-6)
    grid = sorted(set(lambda_grid(options.lambdas, reference)) | {0.0, occ_lambda, exact_lambda})

    new_logps = {0.0: zero_logps}
    for lam in grid:
        if lam in new_logps:
            continue
        with probed_term(trainer, MTP_TERMS[term], lam):
            apply_update(trainer, batches)
        new_logps[lam] = sequence_logps(model, held, temperature)
        restore(trainer, base)
        log(f"probe step {step}: lambda {lam:+.4g} done")
    per_prompt = np.stack([per_prompt_gains(new_logps[lam], held.logps, held.rewards, held.prompt_ids)
                           for lam in grid])
    gains = [bootstrap_mean(row) for row in per_prompt]
    zero = grid.index(0.0)
    relative = [bootstrap_mean(row - per_prompt[zero]) for row in per_prompt]  # paired: the same samples
    curve, best_low, best_high = gain_curve_with_interval(grid, per_prompt)

    # the check: fresh samples from theta'(lambda) at a few lambdas, paired against fresh samples from theta
    direct = []
    for lam in _direct_lambdas(grid, options.direct, occ_lambda):
        with probed_term(trainer, MTP_TERMS[term], lam):
            apply_update(trainer, batches)
        fresh = sample_held_out(model, tokenizer, held_out_data, seed=options.seed + 1, **sample)
        restore(trainer, base)
        est, low, high = direct_gain(fresh.rewards, fresh.prompt_ids, held.rewards, held.prompt_ids)
        i = grid.index(lam)
        direct.append({"lambda": lam, "direct": [est, low, high], "importance": list(gains[i]),
                       "agree": bool(low <= gains[i][0] <= high or gains[i][1] <= est <= gains[i][2])})
    occ_gain = per_prompt_gains(occ_logps, held.logps, held.rewards, held.prompt_ids)
    best_gain = curve.gain_at(curve.best_lambda)
    return {
        "step": step, "term": term, "regime": trainer.args.mtp_regime, "lambdas": grid,
        "dJ": [g[0] for g in gains], "dJ_low": [g[1] for g in gains], "dJ_high": [g[2] for g in gains],
        # dJ(lambda) - dJ(0), the curve the theory draws (paired on the shared samples, so much tighter)
        "dJ_rel": [g[0] for g in relative], "dJ_rel_low": [g[1] for g in relative],
        "dJ_rel_high": [g[2] for g in relative],
        "J_theta": float(held.rewards.mean()),
        "fit": {"linear": curve.linear, "quadratic": curve.quadratic, "r2": curve.r2},
        # the grid's best measured point: robust where the parabola fits badly (R^2 low, e.g. Adam's saturating
        # step at large lambda)
        "grid_best_lambda": grid[int(np.argmax([g[0] for g in relative]))],
        "lambda_hat_star": curve.best_lambda, "lambda_hat_star_interval": [best_low, best_high],
        "c_exact": c_exact, "v2_exact": v2_exact, "exact_lambda": exact_lambda, "estimators": stats,
        "occ_lambda": occ_lambda, "occ_variant": occ_settings["occ_variant"],
        "occ_lambda_plus": occ_settings["occ_lambda_plus"],
        # the run's own OCC update (lambda varying per micro-batch), measured on the same samples
        "occ_update_dJ": list(bootstrap_mean(occ_gain)),
        "occ_share_of_best": (curve.gain_at(occ_lambda) / best_gain) if best_gain > 0 else None,
        "direct": direct, "prompts": options.prompts, "samples": options.samples,
        "per_prompt": per_prompt.tolist(),  # [lambda, prompt] unbiased per-prompt gains: refits and re-bootstraps
        "seconds": time.perf_counter() - start,
    }


def _direct_lambdas(grid: list[float], count: int, occ_lambda: float) -> list[float]:
    """0, OCC's lambda and the largest lambda, up to `count` of them (distinct, in that order)."""
    picks = []
    for lam in (0.0, max(grid), occ_lambda):
        if lam in grid and lam not in picks:
            picks.append(lam)
    return picks[:count]


# ------------------------------------------------------------------------------------------------- from a run
def run_checkpoints(run_dir: str, which: str) -> list[tuple[str, int]]:
    """(path, step) of the checkpoints `which` names: all | last | comma-separated steps."""
    from .runs import checkpoint_problem

    found = sorted((int(d.split("-")[1]), os.path.join(run_dir, d)) for d in os.listdir(run_dir)
                   if d.startswith("checkpoint-") and d.split("-")[1].isdigit())
    found = [(p, s) for s, p in found if checkpoint_problem(p) is None]
    if not found:
        raise ValueError(f"{run_dir}: no complete checkpoint-N to probe (save_strategy: steps, save_steps: N)")
    if which == "all":
        return found
    if which == "last":
        return found[-1:]
    wanted = {int(x) for x in which.split(",") if x.strip()}
    picked = [(p, s) for p, s in found if s in wanted]
    missing = wanted - {s for _, s in picked}
    if missing:
        raise ValueError(f"{run_dir}: no complete checkpoint for step(s) {sorted(missing)} (have "
                         f"{[s for _, s in found]})")
    return picked


def load_probe_trainer(run_dir: str, checkpoint: str):
    """An `MTPGRPOTrainer` at a checkpoint of a run: the run's config (the checkpoint's training_args.bin), its
    model and heads, its optimizer and scheduler state; the output directory is the run's `probes/work` (the run's
    own files are never written). Returns (trainer, tokenizer, held-out dataset, occ settings)."""
    from .cli import TaskArguments, _splits
    from .models import load_model
    from .trainer import MTPGRPOTrainer

    info_path = os.path.join(run_dir, "run_info.json")
    if not os.path.isfile(info_path):
        raise ValueError(f"{run_dir}: no run_info.json (not a directory `mtprl train` or `compare` wrote)")
    with open(info_path) as f:
        info = json.load(f)
    cfg = torch.load(os.path.join(checkpoint, "training_args.bin"), weights_only=False)
    occ = {"occ_variant": cfg.occ_variant, "occ_lambda_plus": cfg.occ_lambda_plus, "occ_eps": cfg.occ_eps,
           "mtp_coef": cfg.mtp_coef}
    if (cfg.top_p or 1.0) < 1.0 or (cfg.top_k or 0) > 0:
        raise ValueError(f"{checkpoint}: the run samples with top_p={cfg.top_p}, top_k={cfg.top_k}; the probe's "
                         "importance weights need the untruncated law (top_p 1, top_k 0)")
    cfg.output_dir = os.path.join(run_dir, "probes", "work")
    cfg.report_to, cfg.occ_fidelity_every, cfg.resume_from_checkpoint = [], 1, None
    task_args = TaskArguments(**{k: v for k, v in info.get("task_args", {}).items()
                                 if k in TaskArguments.__dataclass_fields__})
    model, tokenizer = load_model(checkpoint)
    train_ds, eval_ds = _splits(task_args, tokenizer)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[TaskReward()], args=cfg, train_dataset=train_ds,
                                 processing_class=tokenizer)
    trainer.create_optimizer_and_scheduler(num_training_steps=cfg.max_steps)
    trainer._load_optimizer_and_scheduler(checkpoint)
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        trainer.state.global_step = int(json.load(f)["global_step"])
    return trainer, tokenizer, eval_ds, occ


def probe_run(run_dir: str, which: str = "all", options: ProbeOptions | None = None) -> list[str]:
    """Probe every checkpoint `which` names; writes `<run_dir>/probes/probe-step<N>[-<term>].json`."""
    options = options or ProbeOptions()
    written = []
    for checkpoint, step in run_checkpoints(run_dir, which):
        phase(f"probe: {checkpoint}")
        trainer, tokenizer, eval_ds, occ = load_probe_trainer(run_dir, checkpoint)
        held_out = eval_ds.select(range(min(options.prompts, len(eval_ds))))
        result = probe_state(trainer, tokenizer, held_out, options, step=step, occ_settings=occ)
        result["checkpoint"] = checkpoint
        suffix = f"-{options.term}" if options.term else ""
        path = os.path.join(run_dir, "probes", f"probe-step{step}{suffix}.json")
        atomic_write_json(path, result)
        phase(f"probe: {path} (lambda_hat* {result['lambda_hat_star']:+.4g}, OCC's lambda "
              f"{result['occ_lambda']:+.4g}, {result['seconds']:.0f} s)")
        written.append(path)
    return written
