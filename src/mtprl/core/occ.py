"""Optimal Coefficient Calibration (OCC), arXiv 2605.28184 §3.4.

The MTP term changes the per-step RL improvement bound by (Eq. 10)

    Delta_MTP(lambda) = eta (1 - L eta) c lambda - (L eta^2 / 2) v^2 lambda^2,
    c = <g_RL, g_MTP>,  v^2 = ||g_MTP||^2,

a downward parabola in lambda whose peak is lambda* = (1 - L eta)/(L eta) * c / v^2 (Eq. 11). The smoothness
prefactor is unknown and constant, so it becomes `lambda_plus`; c and v^2 come from log-probability changes
since the rollout policy, delta = logp_current - logp_old, instead of full-model gradients (Eq. 12-13):

    lambda_t = lambda_plus * c_hat / (v2_hat + eps),  c_hat = <delta_RL, delta_MTP>,  v2_hat = ||delta_MTP||^2

Sign convention: gradients of *losses* are used throughout; c = <grad L_RL, grad L_MTP> equals the paper's
<grad J, grad J_MTP> because both signs flip.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .shard_stats import global_dot, global_sq_norm

# How the proxies are reduced over a micro-batch (the *reduction*): batch = the paper's sums (Eq. 13), token = the
# released code's per-token ratio, averaged. Only the public `occ_coefficient(..., estimator=)` keeps the SPEC's
# keyword for it; everywhere else "estimator" means an estimator of c and v2 (a lambda source).
PROXY_REDUCTIONS = ("batch", "token")


class OCCStats(NamedTuple):
    """Per-micro-batch sums behind lambda. Sums (not means) so data-parallel ranks can all-reduce them and
    every rank arrives at one lambda."""

    c_hat: torch.Tensor  # batch: sum m d_rl d_mtp      token: sum m d_rl d_mtp / (d_mtp^2 + eps)
    v2_hat: torch.Tensor  # batch: sum m d_mtp^2        token: number of masked tokens


def _check(delta_rl, delta_mtp, mask) -> torch.Tensor:
    shapes = {"delta_rl": tuple(delta_rl.shape), "delta_mtp": tuple(delta_mtp.shape), "mask": tuple(mask.shape)}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"occ_coefficient needs delta_rl, delta_mtp and mask of one shape [B, L], got {shapes}")
    return mask.bool()


def occ_statistics(delta_rl, delta_mtp, mask, *, reduction: str = "batch", eps: float = 1e-8,
                   clip: bool = False) -> OCCStats:
    """The sums behind `occ_coefficient` (see `OCCStats`). Masked positions are dropped, not multiplied by 0,
    so a NaN or inf there cannot reach lambda."""
    if reduction not in PROXY_REDUCTIONS:
        raise ValueError(f"estimator (the proxies' reduction) must be one of {PROXY_REDUCTIONS}, got {reduction!r}")
    mask = _check(delta_rl, delta_mtp, mask)
    d_rl, d_mtp = delta_rl.float(), delta_mtp.float()
    zero = torch.zeros_like(d_rl)
    if reduction == "batch":
        return OCCStats(torch.where(mask, d_rl * d_mtp, zero).sum(), torch.where(mask, d_mtp * d_mtp, zero).sum())
    # Reference code: a per-token ratio, averaged; clip acts on each token's ratio.
    ratio = d_rl * d_mtp / (d_mtp * d_mtp + eps)
    if clip:
        ratio = ratio.clamp(min=0.0)
    return OCCStats(torch.where(mask, ratio, zero).sum(), mask.sum().to(ratio.dtype))


def lambda_from_stats(stats: OCCStats, *, reduction: str = "batch", lambda_plus: float = 1.0, eps: float = 1e-8,
                      clip: bool = False) -> torch.Tensor:
    """Eq. 13 from (possibly all-reduced) sums. clip=True is OCC-Clip (App. E): c_hat -> max(c_hat, 0)."""
    if reduction == "batch":
        c_hat = stats.c_hat.clamp(min=0.0) if clip else stats.c_hat
        return lambda_plus * c_hat / (stats.v2_hat + eps)
    return lambda_plus * stats.c_hat / stats.v2_hat.clamp(min=1.0)


def occ_coefficient(delta_rl, delta_mtp, mask, *, estimator: str = "batch", lambda_plus: float = 1.0,
                    eps: float = 1e-8, clip: bool = False) -> torch.Tensor:
    """OCC's lambda (0-dim tensor, no gradient) from log-prob changes [B, L] of the main and MTP heads.

    batch (paper Eq. 13): lambda_plus * sum(m d_rl d_mtp) / (sum(m d_mtp^2) + eps)
    token (released code): lambda_plus * masked_mean(d_rl d_mtp / (d_mtp^2 + eps))
    All-zero deltas (the first mini-batch after a rollout) give exactly 0.
    """
    with torch.no_grad():
        stats = occ_statistics(delta_rl, delta_mtp, mask, reduction=estimator, eps=eps, clip=clip)
        return lambda_from_stats(stats, reduction=estimator, lambda_plus=lambda_plus, eps=eps, clip=clip)


# ------------------------------------------------------------------------- estimators of the true c and v2
# The paper's proxies above use log-prob changes. The estimators below use gradients: of the two losses with
# respect to some tensors X (all main-model parameters = exact; the last n decoder layers; the trunk's output
# hidden states), c = <dL_RL/dX, dL_MTP/dX> and v2 = ||dL_MTP/dX||^2 -- or a running average of the proxies.
# Each is a lambda source (`regimes.LAMBDA_SOURCES`); `calibration.LambdaCalibrator` applies them during training.


def loss_gradients(loss, inputs) -> list[torch.Tensor]:
    """d loss / d x for every tensor in `inputs` (zeros where `loss` does not depend on x). The graph is retained
    so the caller can still backward through it; autograd only runs the part of the graph between `loss` and
    `inputs` (for the trunk's output states: the LM head and the MTP heads, never the trunk)."""
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def gradient_statistics(g_rl, g_mtp) -> OCCStats:
    """c = <g_RL, g_MTP>, v2 = ||g_MTP||^2 from two lists of gradients over the same tensors (float64 sums,
    returned as float32; shard-correct under FSDP2: `shard_stats.global_dot`)."""
    if len(g_rl) != len(g_mtp):
        raise ValueError(f"gradient_statistics needs one g_RL per g_MTP, got {len(g_rl)} and {len(g_mtp)}")
    device = g_mtp[0].device if g_mtp else None
    c, v2 = global_dot(g_rl, g_mtp), global_sq_norm(g_mtp)
    return OCCStats(c.float().to(device), v2.float().to(device))


def hidden_state_statistics(rl_loss, mtp_loss, hidden) -> OCCStats:
    """`hidden` estimator: c and v2 from the gradients of the two losses with respect to the trunk's output
    hidden states [B, T, H] that both the LM head and the MTP heads read. Backward through the LM head and
    the MTP heads only; the trunk is never traversed."""
    return gradient_statistics(loss_gradients(rl_loss, [hidden]), loss_gradients(mtp_loss, [hidden]))


def parameter_statistics(rl_loss, mtp_loss, params) -> OCCStats:
    """c and v2 over `params`: all main-model parameters = the exact statistics of Eq. 10; the last n decoder
    layers and the final norm = the `last_layers` estimator (backward through those layers only)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("parameter_statistics needs at least one parameter that requires grad")
    return gradient_statistics(loss_gradients(rl_loss, params), loss_gradients(mtp_loss, params))


def ema_statistics(previous: OCCStats | None, current: OCCStats, beta: float) -> OCCStats:
    """`ema` estimator: exponential moving average of the proxies' sums, c <- beta c + (1 - beta) c_new (the
    same for v2). Lambda = lambda_plus c / v2 needs no bias correction (it cancels in the ratio). One
    micro-batch's proxies are noisy and exactly 0 on the first mini-batch after a rollout; the average keeps
    the recent history instead."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"ema beta must be in [0, 1), got {beta!r}")
    if previous is None:
        return OCCStats(current.c_hat.detach(), current.v2_hat.detach())
    return OCCStats(beta * previous.c_hat + (1 - beta) * current.c_hat.detach(),
                    beta * previous.v2_hat + (1 - beta) * current.v2_hat.detach())


def exact_occ_coefficient(rl_loss, mtp_loss, params, *, lambda_plus: float = 1.0, eps: float = 1e-8,
                          clip: bool = False):
    """Lambda from the true gradient statistics over `params` (the main model's, not MTP-only ones):
    c = <grad rl_loss, grad mtp_loss>, v2 = ||grad mtp_loss||^2. Two extra backward passes (the paper's
    5.6x "full model" cost); the graph is retained so the caller can still backward the total loss. The trainer's
    `occ_variant=exact` gets the same value with one extra backward (`MTPGRPOTrainer.finish_backward`).
    Returns (lambda, c, v2) as detached 0-dim tensors."""
    with torch.enable_grad():
        stats = parameter_statistics(rl_loss, mtp_loss, params)
    c, v2 = stats.c_hat.detach(), stats.v2_hat.detach()
    return lambda_from_stats(OCCStats(c, v2), lambda_plus=lambda_plus, eps=eps, clip=clip), c, v2
