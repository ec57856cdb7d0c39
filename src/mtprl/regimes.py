"""The MTP regimes: what the heads learn during RL and with which coefficient; one table entry each.

This file is the project's one vocabulary of regimes (`REGIMES`, `REGIME_LABELS`, `OCC_VARIANTS`): the config,
the command line, the report and the benchmark import it from here.

A regime is a `Regime` entry: how the heads see the trunk (`mtp_grad`), which rollout-time log-probs head k's
importance ratio and OCC's `delta_mtp` are taken against (`ratio_against`), which OCC estimator its proxies use,
and a `term` function that returns head k's loss and coefficient for one micro-batch. The trainer's
`MTPGRPOTrainer._loss_with_mtp_term` is the one caller: it builds a `HeadBatch` per head, computes and all-reduces the
proxies, logs the metrics and adds `coef * loss` to TRL's loss. Adding a regime = one function + one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

# Display labels, in the order the report lists the regimes.
REGIME_LABELS = {"none": "GRPO (no MTP)", "detach": "Detach", "ce": "CE loss", "policy": "Policy loss",
                 "occ": "OCC", "distill": "Distill"}
REGIMES = tuple(REGIME_LABELS)
# `reference` is the released code's variant (SPEC name), not RL's reference model. After `exact`, the
# estimators beyond the paper (occ.py): `hidden`, `last_layers`, `ema`.
OCC_VARIANTS = ("paper", "reference", "exact", "hidden", "last_layers", "ema")
# Where a regime's lambda comes from (`Regime.lambda_from`): the paper's log-prob proxies (`hat`) or one of the
# estimators of the true c and v2. Metric keys: mtp/c_<name>/k, except hat -> mtp/c_hat/k, exact -> c_exact.
GRADIENT_SOURCES = ("hidden", "last_layers", "exact")  # need gradients (a backward) of both losses
LAMBDA_SOURCES = ("hat", "ema", *GRADIENT_SOURCES)


class HeadTerm(NamedTuple):
    """What a regime adds for head k: `coef * loss` (or `loss` alone when the coefficient sits inside it)."""

    loss: torch.Tensor  # head k's loss as the regime defines it; logged as mtp/loss/k
    # its coefficient (mtp_coef or OCC's lambda); logged as mtp/lambda/k. None: lambda from the true gradients,
    # applied after the backward (occ exact: the loss is backpropagated on its own, see trainer._after_backward)
    # or by the split backward (occ last_layers, see mtprl.split_backward)
    coef: torch.Tensor | None
    coef_in_loss: bool = False  # True: `coef` already scales the loss from inside (released code: advantages)


@dataclass
class HeadBatch:
    """Head k on one micro-batch: its log-probs and the operations a regime may call. Built by the trainer,
    which binds the operations to TRL's loss scaling and to the proxies it computed for this head."""

    depth: int  # k, 1-based
    num_heads: int  # K
    logq: torch.Tensor  # [B, L] head k's log-probs of the completion tokens
    old_logq: torch.Tensor  # [B, L] rollout-time log-probs the ratio is taken against (`ratio_against`)
    advantages: torch.Tensor  # [B] or [B, L]
    mask: torch.Tensor  # [B, L] completion tokens that count
    mtp_coef: float  # the fixed coefficient of detach / ce / policy / distill
    distill: torch.Tensor | None  # [B, L] KL(p_main || q_k) per token (regimes with needs_distill), else None
    policy_loss: Callable[..., torch.Tensor]  # (logq, old_logq, advantages) -> clipped surrogate, TRL-scaled
    token_mean: Callable[[torch.Tensor], torch.Tensor]  # per-token loss [B, L] -> masked mean, TRL-scaled
    proxy_lambda: Callable[..., torch.Tensor]  # (lambda_plus_scale=1.0) -> OCC lambda from the proxies
    # head loss -> OCC lambda from the regime's `lambda_from` source (None: deferred until after the backward)
    estimated_lambda: Callable[[torch.Tensor], torch.Tensor | None]

    def fixed(self) -> torch.Tensor:
        return torch.tensor(float(self.mtp_coef))


# ---------------------------------------------------------------------------------------------- regime terms

def ce_on_samples(h: HeadBatch) -> HeadTerm:
    """detach / ce: cross-entropy of the sampled tokens (teacher = the policy's own samples), fixed coef."""
    return HeadTerm(h.token_mean(-h.logq), h.fixed())


def distill_from_policy(h: HeadBatch) -> HeadTerm:
    """distill: KL(p_main || q_k), the head learns the policy's own next-token distribution, fixed coef."""
    return HeadTerm(h.token_mean(h.distill), h.fixed())


def policy_loss_fixed(h: HeadBatch) -> HeadTerm:
    """policy: the main head's clipped surrogate on head k's log-probs, fixed coef."""
    return HeadTerm(h.policy_loss(h.logq, h.old_logq, h.advantages), h.fixed())


def occ_scaled(h: HeadBatch) -> HeadTerm:
    """occ (paper, Eq. 13, and the estimators beyond it): lambda -- from the log-prob proxies, or from an
    estimate of the true c and v2 -- scales head k's policy loss."""
    loss = h.policy_loss(h.logq, h.old_logq, h.advantages)
    return HeadTerm(loss, h.estimated_lambda(loss))


def occ_released_code(h: HeadBatch) -> HeadTerm:
    """occ (reference = the released code): lambda multiplies head k's advantages, lambda_plus shared by K."""
    lam = h.proxy_lambda(lambda_plus_scale=1.0 / h.num_heads)
    return HeadTerm(h.policy_loss(h.logq, h.old_logq, h.advantages * lam), lam, coef_in_loss=True)


@dataclass(frozen=True)
class Regime:
    term: Callable[[HeadBatch], HeadTerm]
    mtp_grad: str = "joint"  # "detach": trunk states, embeddings and lm_head enter the heads detached
    ratio_against: str = "head"  # "head": the head's own rollout-time log-probs | "main": the main head's
    estimator: str = "batch"  # OCC proxy estimator (occ.ESTIMATORS); logged for every regime
    lambda_from: str = "hat"  # LAMBDA_SOURCES: what `estimated_lambda` computes
    needs_distill: bool = False  # the forward also computes KL(p_main || q_k) (tiled full distributions)


MTP_TERMS = {
    "detach": Regime(ce_on_samples, mtp_grad="detach"),
    "ce": Regime(ce_on_samples),
    "policy": Regime(policy_loss_fixed),
    "occ:paper": Regime(occ_scaled),
    "occ:reference": Regime(occ_released_code, ratio_against="main", estimator="token"),
    **{f"occ:{source}": Regime(occ_scaled, lambda_from=source)
       for source in ("exact", "hidden", "last_layers", "ema")},
    "distill": Regime(distill_from_policy, mtp_grad="detach", needs_distill=True),
}


def regime_for(mtp_regime: str, occ_variant: str = "paper") -> Regime | None:
    """The table entry for a config's regime (None for `none`: plain GRPO, heads unused)."""
    if mtp_regime == "none":
        return None
    return MTP_TERMS[f"occ:{occ_variant}" if mtp_regime == "occ" else mtp_regime]
