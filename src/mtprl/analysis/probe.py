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
              by importance sampling (`mtprl.core.gain.importance_gain`), and at a few lambdas directly from fresh
              samples of theta'(lambda) as a check
    lambdas   the grid always holds 0, OCC's lambda at that state (the mean of `mtp/lambda/k` over the rollout's
              micro-batches in an update under the run's OCC settings) and the exact-gradient lambda
              `lambda_plus * c / v^2` (c, v^2 from the gradients over the main model, `occ_fidelity_every`
              machinery, on the lambda = 0 update's micro-batches)

`probe.json` per state holds the lambdas, dJ with intervals, the parabola fit (`mtprl.core.gain.fit_gain_curve`) and its
argmax with a bootstrap interval, the exact and estimated c and v^2, OCC's lambda and the gain it gets as a share of
the best. Controls: under `detach` the term never reaches the trunk (flat curve); dJ(0) is the same update whichever
term is probed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..io.callbacks import phase
from ..model.eval_mode import evaluating
from ..data.evaluation import completion_mask, score_completions
from ..core.gain import (best_point_probability, bootstrap_mean, direct_gain, gain_curve_with_interval, importance_ess,
                   per_prompt_gains, share_of_best)
from ..io.jsonl import atomic_write_json
from ..model.logprobs import main_logprobs
from ..core.occ import OCCStats, lambda_from_stats
from ..core.regimes import REGIMES, TERMLESS, fixed_form_of
from ..data.prompts import prompt_text
from ..data.scoring import TaskReward

# The probed term per run regime, read off the one regime table (`Regime.fixed_form`: occ -> policy).
TERM_OF_REGIME = {name: fixed_form_of(name) for name in REGIMES if name not in TERMLESS}
LAMBDA_KEYS = "mtp/lambda/"


@dataclass
class ProbeOptions:
    """What one probe measures (`mtprl probe` fields of the same names)."""

    term: str = ""  # detach | ce | policy | distill; "" = the run's regime's term (occ -> policy)
    lambdas: str = "auto"  # comma-separated; auto = log-spaced around a reference lambda, dense where the clip binds
    prompts: int = 64  # held-out prompts N
    samples: int = 16  # samples per prompt M
    direct: int = 2  # lambdas also measured directly with fresh samples (0 = none)
    seed: int = 0
    batch_size: int = 64  # rows per forward when scoring and sampling
    extend: int = 2  # times the grid is doubled outward when the best measured point is at its edge
    # counterfactual updates from the same state and batch, comma-separated: no_clip, separate_clip,
    # separate_state, sgd (plain SGD whose step norm at lambda = 0 matches the run's own step); each gets its curve
    counterfactuals: str = ""


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


def lambda_grid(spec: str, reference: float, clip_lambda: float | None = None) -> list[float]:
    """`auto`: 0, -reference, and log-spaced positives from reference / 8 to 8 x reference (the largest of |exact
    lambda|, |OCC's lambda| and mtp_coef), three more between clip_lambda / 4 and clip_lambda (= max_grad_norm /
    ||g_MTP||, where the shared clip starts to bind) so the curve is measured densely where the clip sets in;
    else the comma-separated values."""
    if spec.strip() == "auto":
        grid = {0.0, -reference, *np.geomspace(reference / 8, reference * 8, 7).tolist()}
        if clip_lambda is not None and math.isfinite(clip_lambda) and clip_lambda > 0:
            grid |= set(np.geomspace(clip_lambda / 4, clip_lambda, 3).tolist())
        return sorted(grid)
    try:
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"lambdas must be 'auto' or comma-separated numbers, got {spec!r}") from e


# `sgd` keeps the run's clip; `sgd_no_clip` takes both normalisers away, so what shapes its curve is the gradient
COUNTERFACTUALS = {"no_clip": {"max_grad_norm": 0.0}, "separate_clip": {"mtp_grad_clip": "separate"},
                   "separate_state": {"mtp_optimizer_state": "separate"}, "sgd": {},
                   "sgd_no_clip": {"max_grad_norm": 0.0}}


def counterfactual_list(spec: str) -> list[str]:
    names = [x.strip() for x in spec.split(",") if x.strip()]
    unknown = [n for n in names if n not in COUNTERFACTUALS]
    if unknown:
        raise ValueError(f"counterfactuals: unknown {', '.join(unknown)} (choose from {', '.join(COUNTERFACTUALS)})")
    return names


# ------------------------------------------------------------------------------------------------- one state
@dataclass
class ProbeSetup:
    """What every update of one probe shares: the trainer at the probed state, the rollout's micro-batches, the
    held-out samples of theta and how to sample more, the probed term, the parameters theta themselves."""

    trainer: object
    batches: list
    held: HeldOut
    sample: dict  # sample_held_out's settings
    term: str  # the MTP_TERMS entry probed at fixed lambdas
    theta: list = field(default_factory=list)  # trainable parameters at the probed state

    def measure(self, regime: str, coef: float | None = None, fidelity: bool = False) -> dict:
        """One update from the state: {logps: held-out sequence log-probs under theta', metrics: the update's,
        delta: theta' - theta flattened}."""
        trainer = self.trainer
        params = [p for p in trainer.model.parameters() if p.requires_grad]

        def after():
            delta = torch.cat([(p.detach() - t).flatten().double() for p, t in zip(params, self.theta)])
            return sequence_logps(trainer.model, self.held, trainer.args.temperature), delta

        (logps, delta), metrics = after_update(trainer, self.batches, after, regime=regime, coef=coef,
                                               fidelity=fidelity)
        return {"logps": logps, "metrics": metrics, "delta": delta}


def probe_state(trainer, tokenizer, held_out_data, options: ProbeOptions, *, step: int, log=phase) -> dict:
    """Measure dJ(lambda) at the trainer's current state (see the module docstring); returns probe.json's dict."""
    args = trainer.args
    start = time.perf_counter()
    sample = dict(samples=options.samples, temperature=args.temperature, max_new_tokens=args.max_completion_length,
                  batch_size=options.batch_size)
    held = sample_held_out(trainer.model, tokenizer, held_out_data, seed=options.seed, **sample)
    log(f"probe step {step}: {len(held.rewards)} held-out samples, J(theta) = {held.rewards.mean():.4f}")
    setup = ProbeSetup(trainer, trainer.draw_rollout(step, options.seed), held, sample,
                       options.term or fixed_form_of(args.mtp_regime, args.occ_variant),
                       [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad])
    # OCC's lambda at this state: an update under the run's OCC settings (regime occ with its variant)
    occ = setup.measure("occ")
    occ_lambda = _mean_over_heads(occ["metrics"], LAMBDA_KEYS) or 0.0
    # lambda = 0 with the exact and estimated c, v^2 of the probed term on every micro-batch
    zero = setup.measure(setup.term, 0.0, fidelity=True)
    geometry = _gradient_geometry(zero["metrics"], args)
    reference = max(abs(geometry["exact_lambda"]), abs(occ_lambda), abs(args.mtp_coef), 1e-6)
    clip_lambda = (args.max_grad_norm / math.sqrt(geometry["v2_exact"])
                   if args.max_grad_norm > 0 and geometry["v2_exact"] > 0 else None)
    grid = sorted(set(lambda_grid(options.lambdas, reference, clip_lambda)) | {0.0, occ_lambda,
                                                                                geometry["exact_lambda"]})
    points = _measure_grid(setup, grid, {0.0: zero}, options.extend, step, log)
    grid = sorted(points)
    curve = _readout(setup, grid, points, targets={"occ": occ_lambda, "exact": geometry["exact_lambda"]})
    direct = [_direct_check(setup, tokenizer, held_out_data, options.seed + 1, lam, curve["dJ_points"][i])
              for i, lam in enumerate(grid) if lam in _direct_lambdas(grid, options.direct, occ_lambda)]
    curve.pop("dJ_points")
    occ_gain = per_prompt_gains(occ["logps"], held.logps, held.rewards, held.prompt_ids)
    # the first update of the rollout with the lambda carried from the last one (occ_first_update: carry; the
    # calibrator holds the OCC update's last lambda, a stand-in for the previous rollout's) against lambda = 0 there
    with trainer.using_update_settings(occ_first_update="carry"):
        carry = setup.measure("occ")
    carry_gain = per_prompt_gains(carry["logps"], held.logps, held.rewards, held.prompt_ids)
    counterfactuals = {name: _counterfactual(setup, name, grid, points[0.0], step, log)
                       for name in counterfactual_list(options.counterfactuals)}
    prompt_rewards = [held.rewards[held.prompt_ids == i] for i in np.unique(held.prompt_ids)]
    result = {
        "step": step, "term": setup.term, "regime": args.mtp_regime, **curve,
        "J_theta": float(held.rewards.mean()), "clip_lambda": clip_lambda, "max_grad_norm": args.max_grad_norm,
        **geometry, "occ_lambda": occ_lambda, "occ_variant": args.occ_variant, "occ_lambda_plus": args.occ_lambda_plus,
        # OCC's own lambda on each micro-batch of the rollout, in order (the first sees no change since the rollout)
        "occ_lambdas_per_micro_batch": {k[len(LAMBDA_KEYS):]: v for k, v in occ["metrics"].items()
                                        if k.startswith(LAMBDA_KEYS)},
        # the run's own OCC update (lambda varying per micro-batch), measured on the same samples
        "occ_update_dJ": list(bootstrap_mean(occ_gain)),
        "occ_carry_update_dJ": list(bootstrap_mean(carry_gain)),
        "occ_carry_minus_zero_dJ": list(bootstrap_mean(carry_gain - occ_gain)),  # paired on the shared samples
        "occ_carry_lambdas_per_micro_batch": {k[len(LAMBDA_KEYS):]: v for k, v in carry["metrics"].items()
                                              if k.startswith(LAMBDA_KEYS)},
        "direct": direct, "counterfactuals": counterfactuals,
        # what was used: the prompts actually probed and how many have any reward variance among their samples
        "prompts": len(prompt_rewards), "prompts_with_reward_variance": int(sum(r.std() > 0 for r in prompt_rewards)),
        "prompts_requested": options.prompts, "samples": options.samples,
        "seconds": time.perf_counter() - start,
    }
    result["nearest_to_best"] = nearest_to_best(result)
    return result


def _measure_grid(setup: ProbeSetup, grid: list[float], points: dict, extend: int, step: int, log) -> dict:
    """Every grid point measured (`ProbeSetup.measure`), then the grid doubled outward while the best measured
    point sits at its edge (at most `extend` times)."""
    for lam in grid:
        if lam not in points:
            points[lam] = setup.measure(setup.term, lam)
            log(f"probe step {step}: lambda {lam:+.4g} done")
    for _ in range(extend):
        lams = sorted(points)
        gains = [float(np.mean(_gains(setup, points[lam]))) for lam in lams]
        best = int(np.argmax(gains))
        if 0 < best < len(lams) - 1 or lams[best] == 0.0:
            break
        lam = 2.0 * lams[best]
        points[lam] = setup.measure(setup.term, lam)
        log(f"probe step {step}: best point at the grid's edge, lambda {lam:+.4g} added")
    return points


def _gains(setup: ProbeSetup, point: dict) -> np.ndarray:
    held = setup.held
    return per_prompt_gains(point["logps"], held.logps, held.rewards, held.prompt_ids)


def _update_summary(points: dict, grid: list[float]) -> dict:
    """Per lambda: ||delta theta||, its cosine with delta theta(0), the mean clip factor(s) and gradient norms."""
    zero = points[0.0]["delta"]
    out = {"update_norm": [float(points[lam]["delta"].norm()) for lam in grid],
           "update_cosine": [float(torch.nn.functional.cosine_similarity(points[lam]["delta"], zero, dim=0))
                             for lam in grid]}
    for key in ("grad_norm", "grad_norm/rl", "grad_norm/mtp", "clip_factor", "clip_factor/rl", "clip_factor/mtp"):
        values = [points[lam]["metrics"].get(key) for lam in grid]
        if any(values):
            out[key] = [float(statistics.fmean(v)) if v else None for v in values]
    return out


def _readout(setup: ProbeSetup, grid: list[float], points: dict, targets: dict | None = None) -> dict:
    """probe.json's curve: dJ and dJ - dJ(0) per lambda with intervals, the measured best grid point and the
    bootstrap probability of each point being best, an edge flag, the importance weights' ESS and largest weight,
    the update's norm, cosine and clip; the parabola fit as a secondary summary; the shares of the best point's
    gain at the `targets` lambdas (OCC's, the exact one)."""
    held = setup.held
    per_prompt = np.stack([_gains(setup, points[lam]) for lam in grid])
    gains = [bootstrap_mean(row) for row in per_prompt]
    rel_rows = per_prompt - per_prompt[grid.index(0.0)]
    relative = [bootstrap_mean(row) for row in rel_rows]  # paired: the same samples
    best = int(np.argmax([g[0] for g in relative]))
    ess = [importance_ess(points[lam]["logps"], held.logps) for lam in grid]
    curve, fit_low, fit_high = gain_curve_with_interval(grid, per_prompt)
    n = len(held.rewards)
    out = {
        "lambdas": grid, "dJ": [g[0] for g in gains], "dJ_low": [g[1] for g in gains],
        "dJ_high": [g[2] for g in gains], "dJ_points": gains,
        # dJ(lambda) - dJ(0), the curve the theory draws (paired on the shared samples, so much tighter)
        "dJ_rel": [g[0] for g in relative], "dJ_rel_low": [g[1] for g in relative],
        "dJ_rel_high": [g[2] for g in relative],
        "grid_best_lambda": grid[best], "best_lambda_probability": best_point_probability(per_prompt),
        "best_at_edge": best in (0, len(grid) - 1) and grid[best] != 0.0,
        "ess": [e[0] for e in ess], "max_weight": [e[1] for e in ess],
        "low_ess_lambdas": [lam for lam, e in zip(grid, ess) if e[0] < 0.1 * n],
        **_update_summary(points, grid),
        # secondary: the parabola fit (1/se^2 weights let the points near 0 lead; on shared samples a smooth
        # curve is what the estimator gives whatever the truth, so R^2 is no evidence of a parabola)
        "fit": {"linear": curve.linear, "quadratic": curve.quadratic, "r2": curve.r2},
        "lambda_hat_star": curve.best_lambda, "lambda_hat_star_interval": [fit_low, fit_high],
        "per_prompt": per_prompt.tolist(),  # [lambda, prompt] unbiased per-prompt gains: refits and re-bootstraps
    }
    for name, lam in (targets or {}).items():
        out[f"{name}_share_of_best"] = share_of_best(per_prompt, grid, lam)
    return out


def _counterfactual(setup: ProbeSetup, name: str, grid: list[float], run_zero: dict, step: int, log) -> dict:
    """The curve under another update from the same state and batch (`COUNTERFACTUALS`); the SGD updates' learning
    rate makes their lambda = 0 step as long as the run's own (||delta theta(0)||)."""
    settings = dict(COUNTERFACTUALS[name])
    trainer = setup.trainer
    if name.startswith("sgd"):
        with trainer.using_update_settings(sgd_lr=1.0, **settings):
            unit = float(setup.measure(setup.term, 0.0)["delta"].norm())
        settings["sgd_lr"] = float(run_zero["delta"].norm()) / unit if unit > 0 else 0.0
    with trainer.using_update_settings(**settings):
        points = {lam: setup.measure(setup.term, lam) for lam in grid}
    log(f"probe step {step}: counterfactual {name} done")
    out = _readout(setup, grid, points)
    return {"settings": settings, **{k: v for k, v in out.items() if k != "dJ_points"}}


def _gradient_geometry(zero_metrics: dict, args) -> dict:
    """The exact c, v^2 (means over the lambda = 0 update's micro-batches), the lambda they give under the run's
    lambda_plus and eps, and every estimator's (lambda source's) c and v^2 (`estimators`)."""
    c_exact = _mean_over_heads(zero_metrics, "mtp/c_exact/") or 0.0
    v2_exact = _mean_over_heads(zero_metrics, "mtp/v2_exact/") or 0.0
    exact_lambda = float(lambda_from_stats(OCCStats(torch.tensor(c_exact), torch.tensor(v2_exact)),
                                           lambda_plus=args.occ_lambda_plus, eps=args.occ_eps))
    sources = {key: float(statistics.fmean(v)) for key, v in zero_metrics.items()
               if key.startswith(("mtp/c_", "mtp/v2_")) and v}
    out = {"c_exact": c_exact, "v2_exact": v2_exact, "exact_lambda": exact_lambda, "estimators": sources}
    # Adam's geometry (c_P / v2_P) and the cross-fitted c (over v2_exact) give two more lambdas
    c_adam, v2_adam = _mean_over_heads(zero_metrics, "mtp/c_adam/"), _mean_over_heads(zero_metrics, "mtp/v2_adam/")
    c_cross = _mean_over_heads(zero_metrics, "mtp/c_cross/")
    out["adam_lambda"] = args.occ_lambda_plus * c_adam / v2_adam if c_adam is not None and v2_adam else None
    out["cross_lambda"] = args.occ_lambda_plus * c_cross / v2_exact if c_cross is not None and v2_exact else None
    return out


def nearest_to_best(result: dict) -> list[list]:
    """[name, lambda, |lambda - best measured grid lambda|] for OCC's, the exact, Adam-geometry and cross-fitted
    lambdas, nearest first (the measured best is the grid's: a lambda between two grid points ties with both)."""
    best = result["grid_best_lambda"]
    found = [[name, result[f"{name}_lambda"]] for name in ("occ", "exact", "adam", "cross")
             if result.get(f"{name}_lambda") is not None]
    return sorted(([n, lam, abs(lam - best)] for n, lam in found), key=lambda r: r[2])


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
    from ..training.runs import checkpoint_problem

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
    from ..data.task_setup import TaskArguments, task_splits
    from ..model.loading import load_model
    from ..training.trainer import MTPGRPOTrainer

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
    """Probe every checkpoint `which` names; writes `<run_dir>/probes/probe-step<N>[-<term>].json` and says how many
    intervals each state printed and which survive a multiplicity correction."""
    from .probe_report import multiplicity_markdown, multiplicity_readout

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
        best = result["lambdas"].index(result["grid_best_lambda"])
        phase(f"probe: {path} (best measured lambda {result['grid_best_lambda']:+.4g}, P(best) "
              f"{result['best_lambda_probability'][best]:.2f}{', at the grid edge' if result['best_at_edge'] else ''}"
              f"; OCC's lambda {result['occ_lambda']:+.4g}, {result['seconds']:.0f} s)")
        phase(f"probe: {multiplicity_markdown(multiplicity_readout([result]))}")
        written.append(path)
    return written
