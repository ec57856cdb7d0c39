"""The gain probe: the paper's per-step gain dJ(lambda) measured on a run's own state, update and batch.

The paper's argument is one curve (Eq. 7-11, App. C): after one update with the MTP term at coefficient lambda,
the RL objective changes by about `eta lambda c - (L eta^2 / 2) lambda^2 v^2` relative to lambda = 0, a downward
parabola whose peak `lambda* ~ c / v^2` OCC tracks (Eq. 13). The probe measures that curve:

    state     a checkpoint of a run: model, heads, optimizer and scheduler state (`load_probe_trainer`)
    batch     one rollout batch drawn as the run draws it (TRL's dataloader and `_generate_and_score_completions`),
              split into the `steps_per_generation` micro-batches TRL trains on (`MTPGRPOTrainer.draw_rollout`)
    update    for every lambda of the grid, from the *same* state: the run's own update on those micro-batches
              (`MTPGRPOTrainer.update_on`: TRL's `training_step`, `num_iterations` times, an optimizer step, clipped,
              then the scheduler, every `gradient_accumulation_steps`) with the probed term at that fixed lambda
              (`regimes.Regime.fixed_form`: OCC's term is the policy loss on the heads, so OCC is probed as
              `policy`); update -> measure -> restore is one helper, `after_update`
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

import json
import os
import statistics
import time
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
from .regimes import REGIMES, fixed_form_of
from .tasks import TaskReward, prompt_text

# The probed term per run regime, read off the one regime table (`Regime.fixed_form`: occ -> policy).
TERM_OF_REGIME = {name: fixed_form_of(name) for name in REGIMES if name != "none"}
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
def after_update(trainer, micro_batches: list[dict], measure, *, regime: str, coef: float | None = None,
                 fidelity: bool = False):
    """`measure()` after one rollout's update (`MTPGRPOTrainer.update_on` with `regime` at `coef`) from the
    trainer's current state, which is restored afterwards whatever happens. Returns (what measure returned, the
    update's metrics)."""
    base = trainer.update_state()
    try:
        result = trainer.update_on(micro_batches, regime=regime, coef=coef, fidelity=fidelity)
        return measure(), result.metrics
    finally:
        trainer.restore_update_state(base)


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
@dataclass
class ProbeSetup:
    """What every update of one probe shares: the trainer at the probed state, the rollout's micro-batches, the
    held-out samples of theta and how to sample more, the probed term."""

    trainer: object
    batches: list
    held: HeldOut
    sample: dict  # sample_held_out's settings
    term: str  # the MTP_TERMS entry probed at fixed lambdas

    def logps_after(self, regime: str, coef: float | None = None, fidelity: bool = False):
        """(held-out sequence log-probs under theta'(coef), the update's metrics)."""
        model, temperature = self.trainer.model, self.trainer.args.temperature
        return after_update(self.trainer, self.batches, lambda: sequence_logps(model, self.held, temperature),
                            regime=regime, coef=coef, fidelity=fidelity)


def probe_state(trainer, tokenizer, held_out_data, options: ProbeOptions, *, step: int, log=phase) -> dict:
    """Measure dJ(lambda) at the trainer's current state (see the module docstring); returns probe.json's dict."""
    args = trainer.args
    start = time.perf_counter()
    sample = dict(samples=options.samples, temperature=args.temperature, max_new_tokens=args.max_completion_length,
                  batch_size=options.batch_size)
    held = sample_held_out(trainer.model, tokenizer, held_out_data, seed=options.seed, **sample)
    log(f"probe step {step}: {len(held.rewards)} held-out samples, J(theta) = {held.rewards.mean():.4f}")
    setup = ProbeSetup(trainer, trainer.draw_rollout(step, options.seed), held, sample,
                       options.term or fixed_form_of(args.mtp_regime, args.occ_variant))
    # OCC's lambda at this state: an update under the run's OCC settings (regime occ with its variant)
    occ_logps, occ_metrics = setup.logps_after("occ")
    occ_lambda = _mean_over_heads(occ_metrics, LAMBDA_KEYS) or 0.0
    # lambda = 0 with the exact and estimated c, v^2 of the probed term on every micro-batch
    zero_logps, zero_metrics = setup.logps_after(setup.term, 0.0, fidelity=True)
    geometry = _gradient_geometry(zero_metrics, args)
    reference = max(abs(geometry["exact_lambda"]), abs(occ_lambda), abs(args.mtp_coef), 1e-6)
    grid = sorted(set(lambda_grid(options.lambdas, reference)) | {0.0, occ_lambda, geometry["exact_lambda"]})
    new_logps = {0.0: zero_logps}
    for lam in grid:
        if lam not in new_logps:
            new_logps[lam] = setup.logps_after(setup.term, lam)[0]
            log(f"probe step {step}: lambda {lam:+.4g} done")
    per_prompt = np.stack([per_prompt_gains(new_logps[lam], held.logps, held.rewards, held.prompt_ids)
                           for lam in grid])
    gains = [bootstrap_mean(row) for row in per_prompt]
    relative = [bootstrap_mean(row - per_prompt[grid.index(0.0)]) for row in per_prompt]  # paired: same samples
    curve, best_low, best_high = gain_curve_with_interval(grid, per_prompt)
    direct = [_direct_check(setup, tokenizer, held_out_data, options.seed + 1, lam, gains[grid.index(lam)])
              for lam in _direct_lambdas(grid, options.direct, occ_lambda)]
    occ_gain = per_prompt_gains(occ_logps, held.logps, held.rewards, held.prompt_ids)
    best_gain = curve.gain_at(curve.best_lambda)
    return {
        "step": step, "term": setup.term, "regime": args.mtp_regime, "lambdas": grid,
        "dJ": [g[0] for g in gains], "dJ_low": [g[1] for g in gains], "dJ_high": [g[2] for g in gains],
        # dJ(lambda) - dJ(0), the curve the theory draws (paired on the shared samples, so much tighter)
        "dJ_rel": [g[0] for g in relative], "dJ_rel_low": [g[1] for g in relative],
        "dJ_rel_high": [g[2] for g in relative],
        "J_theta": float(held.rewards.mean()),
        "fit": {"linear": curve.linear, "quadratic": curve.quadratic, "r2": curve.r2},
        # the grid's best measured point: robust where the parabola fits badly
        "grid_best_lambda": grid[int(np.argmax([g[0] for g in relative]))],
        "lambda_hat_star": curve.best_lambda, "lambda_hat_star_interval": [best_low, best_high],
        **geometry, "occ_lambda": occ_lambda, "occ_variant": args.occ_variant, "occ_lambda_plus": args.occ_lambda_plus,
        # the run's own OCC update (lambda varying per micro-batch), measured on the same samples
        "occ_update_dJ": list(bootstrap_mean(occ_gain)),
        "occ_share_of_best": (curve.gain_at(occ_lambda) / best_gain) if best_gain > 0 else None,
        "direct": direct, "prompts": options.prompts, "samples": options.samples,
        "per_prompt": per_prompt.tolist(),  # [lambda, prompt] unbiased per-prompt gains: refits and re-bootstraps
        "seconds": time.perf_counter() - start,
    }


def _gradient_geometry(zero_metrics: dict, args) -> dict:
    """The exact c, v^2 (means over the lambda = 0 update's micro-batches), the lambda they give under the run's
    lambda_plus and eps, and every estimator's (lambda source's) c and v^2 (`estimators`)."""
    c_exact = _mean_over_heads(zero_metrics, "mtp/c_exact/") or 0.0
    v2_exact = _mean_over_heads(zero_metrics, "mtp/v2_exact/") or 0.0
    exact_lambda = float(lambda_from_stats(OCCStats(torch.tensor(c_exact), torch.tensor(v2_exact)),
                                           lambda_plus=args.occ_lambda_plus, eps=args.occ_eps))
    sources = {key: float(statistics.fmean(v)) for key, v in zero_metrics.items()
               if key.startswith(("mtp/c_", "mtp/v2_")) and v}
    return {"c_exact": c_exact, "v2_exact": v2_exact, "exact_lambda": exact_lambda, "estimators": sources}


def _direct_check(setup: ProbeSetup, tokenizer, held_out_data, seed: int, lam: float, importance) -> dict:
    """The check: fresh samples from theta'(lambda), paired against fresh samples from theta, beside the importance
    estimate from the shared samples."""
    fresh, _ = after_update(setup.trainer, setup.batches,
                            lambda: sample_held_out(setup.trainer.model, tokenizer, held_out_data, seed=seed,
                                                    **setup.sample),
                            regime=setup.term, coef=lam)
    est, low, high = direct_gain(fresh.rewards, fresh.prompt_ids, setup.held.rewards, setup.held.prompt_ids)
    return {"lambda": lam, "direct": [est, low, high], "importance": list(importance),
            "agree": bool(low <= importance[0] <= high or importance[1] <= est <= importance[2])}


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
    own files are never written). Returns (trainer, tokenizer, held-out dataset)."""
    from .data import TaskArguments, task_splits
    from .models import load_model
    from .trainer import MTPGRPOTrainer

    info_path = os.path.join(run_dir, "run_info.json")
    if not os.path.isfile(info_path):
        raise ValueError(f"{run_dir}: no run_info.json (not a directory `mtprl train` or `compare` wrote)")
    with open(info_path) as f:
        info = json.load(f)
    cfg = torch.load(os.path.join(checkpoint, "training_args.bin"), weights_only=False)
    if (cfg.top_p or 1.0) < 1.0 or (cfg.top_k or 0) > 0:
        raise ValueError(f"{checkpoint}: the run samples with top_p={cfg.top_p}, top_k={cfg.top_k}; the probe's "
                         "importance weights need the untruncated law (top_p 1, top_k 0)")
    cfg.output_dir = os.path.join(run_dir, "probes", "work")
    cfg.report_to, cfg.occ_fidelity_every, cfg.resume_from_checkpoint = [], 1, None
    task_args = TaskArguments(**{k: v for k, v in info.get("task_args", {}).items()
                                 if k in TaskArguments.__dataclass_fields__})
    model, tokenizer = load_model(checkpoint)
    train_ds, eval_ds = task_splits(task_args, tokenizer)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[TaskReward()], args=cfg, train_dataset=train_ds,
                                 processing_class=tokenizer)
    trainer.load_update_state(checkpoint)
    return trainer, tokenizer, eval_ds


def probe_run(run_dir: str, which: str = "all", options: ProbeOptions | None = None) -> list[str]:
    """Probe every checkpoint `which` names; writes `<run_dir>/probes/probe-step<N>[-<term>].json`."""
    options = options or ProbeOptions()
    written = []
    for checkpoint, step in run_checkpoints(run_dir, which):
        phase(f"probe: {checkpoint}")
        trainer, tokenizer, eval_ds = load_probe_trainer(run_dir, checkpoint)
        held_out = eval_ds.select(range(min(options.prompts, len(eval_ds))))
        result = probe_state(trainer, tokenizer, held_out, options, step=step)
        result["checkpoint"] = checkpoint
        suffix = f"-{options.term}" if options.term else ""
        path = os.path.join(run_dir, "probes", f"probe-step{step}{suffix}.json")
        atomic_write_json(path, result)
        phase(f"probe: {path} (lambda_hat* {result['lambda_hat_star']:+.4g}, OCC's lambda "
              f"{result['occ_lambda']:+.4g}, {result['seconds']:.0f} s)")
        written.append(path)
    return written
