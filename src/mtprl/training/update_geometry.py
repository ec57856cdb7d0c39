"""What the MTP term does to the policy's step: the clip, Adam's moments, measured and optionally kept apart.

Two normalisers sit between the summed gradient and the parameters, and the paper's parabola has neither:
- the clip (`max_grad_norm`): TRL clips the sum g_RL + g_MTP, so a large MTP gradient shrinks the policy's part
  of the step (`clip_factor`), and at TRL's default 1.0 the clip binds already at lambda = 0;
- AdamW's second moment: per coordinate `v` is dominated by the larger of the two gradients, so the policy's
  per-coordinate step shrinks the same way.

`mtp_grad_clip: separate` clips the policy's gradient alone to `max_grad_norm` and the MTP term's whole
contribution (heads and what reaches the trunk) alone to `mtp_max_grad_norm`, then adds them.
`mtp_optimizer_state: separate` gives the MTP term's gradient at coefficient 1 its own Adam moments on the trunk
(`MTPMoments`), so the trunk's step is the policy's Adam step plus lambda times the MTP term's own Adam step.
Both need the two gradients apart until the optimizer step: where the heads see the trunk detached (detach,
distill) they are apart by parameter group (trunk: policy, heads: MTP term); elsewhere the MTP part's gradient is
taken by `torch.autograd.grad` in the step (one extra backward) and kept in an `MTPGradient` instead of `.grad`.

The step itself, clip to metrics, is one function: `optimizer_step.optimizer_step`. Per optimizer step the metrics are `grad_norm` (TRL's, the total before the clip), `grad_norm/rl`,
`grad_norm/mtp` (where the two are apart), `clip_factor` (`clip_factor/rl`, `clip_factor/mtp` under `separate`)
and `update_norm` (||delta theta|| of the step, every trainable parameter).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from ..core.shard_stats import global_norm  # shard-correct: the same norm on one process, DDP and FSDP2

GRAD_CLIP_MODES = ("shared", "separate")
OPTIMIZER_STATE_MODES = ("shared", "separate")


def clip_factor(norm: float, max_norm: float | None) -> float:
    """What `torch.nn.utils.clip_grad_norm_` multiplies the gradient by: min(1, max_norm / (norm + 1e-6));
    1 without a clip (max_norm None or <= 0)."""
    if max_norm is None or max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (float(norm) + 1e-6))


@dataclass
class MTPGradient:
    """The MTP term's gradient over `params`, accumulated over the micro-batches of one optimizer step apart from
    `.grad` (which then holds the policy's alone). `total`: what the term adds (lambda_k g_k summed, plus the
    head-only term); `unit` and `coefs` (separate optimizer state only): the term's gradient at coefficient 1 on
    the trunk and the coefficients it was used with."""

    params: list
    with_unit: bool = False  # keep `unit` and `coefs` (mtp_optimizer_state: separate)
    total: list = field(default_factory=list)
    unit: list = field(default_factory=list)
    coefs: list = field(default_factory=list)

    def add(self, grads, unit=None, coef: float | None = None) -> None:
        self.total = _accumulate(self.total, grads, self.params)
        if self.with_unit and unit is not None:
            self.unit = _accumulate(self.unit, unit, self.params[:len(unit)])
            self.coefs.append(float(coef))

    @property
    def empty(self) -> bool:
        return not self.total

    def mean_coef(self) -> float:
        return sum(self.coefs) / len(self.coefs) if self.coefs else 0.0

    def clear(self) -> None:
        self.total, self.unit, self.coefs = [], [], []


def _accumulate(into: list, grads, params) -> list:
    if not into:
        into = [torch.zeros_like(p) for p in params]
    for buf, g in zip(into, grads):
        if g is not None:
            buf.add_(g.to(buf.dtype))
    return into


class MTPMoments:
    """The MTP term's own Adam moments on the trunk (`mtp_optimizer_state: separate`): for the coefficient-1
    gradient u of each optimizer step, m <- b1 m + (1 - b1) u, v <- b2 v + (1 - b2) u^2, and the trunk moves by
    -lr * lambda * m_hat / (sqrt(v_hat) + eps) beside the policy's own AdamW step (no second weight decay).
    lambda = the mean coefficient over the step's micro-batches (with K heads, the heads' mean). At lambda = 0 the
    moments still see u, and the trunk's step is the policy's alone."""

    def __init__(self, params, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.betas, self.eps = list(params), betas, eps
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, unit: list, coef: float, lr: float) -> None:
        b1, b2 = self.betas
        self.step_count += 1
        bias1, bias2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        for p, u, m, v in zip(self.params, unit, self.exp_avg, self.exp_avg_sq):
            m.mul_(b1).add_(u, alpha=1 - b1)
            v.mul_(b2).addcmul_(u, u, value=1 - b2)
            if coef != 0.0:
                denom = (v / bias2).sqrt_().add_(self.eps)
                p.addcdiv_(m, denom, value=-lr * coef / bias1)

    def state_dict(self) -> dict:
        return {"step": self.step_count, "exp_avg": [t.clone() for t in self.exp_avg],
                "exp_avg_sq": [t.clone() for t in self.exp_avg_sq], "betas": self.betas, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        if len(state["exp_avg"]) != len(self.params):
            raise ValueError(f"mtp_optimizer_state: the saved moments hold {len(state['exp_avg'])} tensors, the "
                             f"trunk has {len(self.params)} trainable parameters")
        self.step_count = int(state["step"])
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)


def split_norms(trunk: list, heads: list, apart: "MTPGradient | None", split_by_group: bool) -> dict:
    """grad_norm/rl and grad_norm/mtp of this step where the two gradients are apart (read-only): by parameter
    group under detached heads, or `.grad` against the kept-apart MTP gradient; {} where they are summed."""
    if apart is not None and not apart.empty:
        rl, mtp = [p.grad for p in trunk + heads], apart.total
    elif split_by_group:
        rl, mtp = [p.grad for p in trunk], [p.grad for p in heads]
    else:
        return {}
    return {"grad_norm/rl": float(global_norm(rl)), "grad_norm/mtp": float(global_norm(mtp))}


def clip_apart(trunk: list, heads: list, apart: "MTPGradient | None", *, clip_mode: str, max_norm: float | None,
               mtp_max_norm: float | None, separate_state: bool) -> tuple[float, dict]:
    """The step's gradient from the two parts: `clip_mode` separate clips the policy's gradient alone to
    `max_norm` and the MTP term's alone to `mtp_max_norm` (None or 0: no clip); shared clips both by the factor
    of their sum's norm (TRL's clip). Then their sum goes on `.grad`, except the trunk's MTP share under
    `separate_state` (it stays in `apart.unit`, clipped alike, for `MTPMoments`). Returns (the total norm before
    the clip, TRL's `grad_norm`; the step's metrics)."""
    params = trunk + heads
    metrics = split_norms(trunk, heads, apart, apart is None)
    rl_norm, mtp_norm = metrics["grad_norm/rl"], metrics["grad_norm/mtp"]
    if apart is None:  # detached heads: trunk .grad = policy, heads .grad = MTP term
        total_norm = math.hypot(rl_norm, mtp_norm)
    else:
        total_norm = float(global_norm(_sum([p.grad for p in params], apart.total)))
    if clip_mode == "separate":
        f_rl, f_mtp = clip_factor(rl_norm, max_norm), clip_factor(mtp_norm, mtp_max_norm)
        metrics.update({"clip_factor/rl": f_rl, "clip_factor/mtp": f_mtp})
    else:
        f_rl = f_mtp = clip_factor(total_norm, max_norm)
        metrics["clip_factor"] = f_rl
    if apart is None:
        _scale([p.grad for p in trunk], f_rl)
        _scale([p.grad for p in heads], f_mtp)
        return total_norm, metrics
    _scale([p.grad for p in params], f_rl)
    for i, (p, g) in enumerate(zip(params, apart.total)):
        if separate_state and i < len(trunk):
            continue  # the trunk's MTP share is stepped by MTPMoments
        if p.grad is None:
            p.grad = (f_mtp * g).to(p.dtype)
        else:
            p.grad.add_(g.to(p.grad.dtype), alpha=f_mtp)
    _scale(apart.unit, f_mtp)
    return total_norm, metrics


def _scale(grads, factor: float) -> None:
    if factor != 1.0:
        for g in grads:
            if g is not None:
                g.mul_(factor)


def _sum(a, b):
    return [x if y is None else (y if x is None else x + y.to(x.dtype)) for x, y in zip(a, b)]


# ---------------------------------------------------------------------------------------------- the trainer side
MOMENTS_FILE = "mtp_moments.pt"
