"""The MTP regimes: what the heads learn during RL and with which coefficient; one table entry each.

This file is the project's one vocabulary of regimes (`REGIMES`, `REGIME_LABELS`, `OCC_VARIANTS`,
`LAMBDA_SOURCES`): the config, the command line, the report and the benchmark import it from here.

A regime is a `Regime` entry (`MTP_TERMS`): how the heads see the trunk (`mtp_grad`), which rollout-time log-probs
head k's importance ratio and OCC's `delta_mtp` are taken against (`ratio_against`), how the proxies are reduced
(`proxy_reduction`), where its coefficient comes from (`mtp_coef`, or OCC's lambda from a `lambda_source`), and a
`loss` function: a pure function of one head's plain data (`HeadData`) and TRL's loss scaling (`LossScaling`) that
returns head k's loss. It never starts a backward; lambda comes from `calibration.LambdaCalibrator`. The one caller
is `MTPGRPOTrainer._loss_with_mtp_term`: head data (`head_data`) -> lambda (the calibrator) -> the regime's loss ->
`coef * loss` summed into TRL's loss. Adding a regime = one function + one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

# Display labels, in the order the report lists the regimes.
REGIME_LABELS = {"none": "GRPO (no MTP)", "detach": "Detach", "ce": "CE loss", "policy": "Policy loss",
                 "occ": "OCC", "distill": "Distill"}
REGIMES = tuple(REGIME_LABELS)
# The values of the config field `occ_variant`. `reference` is the released code's variant (SPEC name), not RL's
# reference model; the others name their lambda source (`paper`: the proxies, `hat`).
OCC_VARIANTS = ("paper", "reference", "exact", "hidden", "last_layers", "ema")
# Where OCC's lambda comes from (the *lambda source*): the paper's log-prob proxies (`hat`), their running average
# (`ema`), or an estimate of the true c and v2 from gradients. Metric keys: mtp/c_<source>/k, mtp/v2_<source>/k.
GRADIENT_SOURCES = ("hidden", "last_layers", "exact")  # need gradients (a backward) of both losses
LAMBDA_SOURCES = ("hat", "ema", *GRADIENT_SOURCES)


class HeadData(NamedTuple):
    """Head k on one micro-batch, as plain tensors (built by `head_data`)."""

    depth: int  # k, 1-based
    logq: torch.Tensor  # [B, L] head k's log-probs of the completion tokens
    old_logq: torch.Tensor  # [B, L] rollout-time log-probs the ratio and delta_mtp are taken against
    advantages: torch.Tensor  # [B] or [B, L]
    mask: torch.Tensor  # [B, L] completion tokens that count (and that head k has context for)
    distill: torch.Tensor | None  # [B, L] KL(p_main || q_k) per token (regimes with needs_distill), else None


class LossScaling(NamedTuple):
    """TRL's loss functions for this micro-batch, scaled as TRL scales its own loss for gradient accumulation.
    Plain functions of tensors; they read the trainer's settings and change nothing."""

    policy_loss: Callable[..., torch.Tensor]  # (logps, old_logps, advantages, mask) -> clipped surrogate
    token_mean: Callable[..., torch.Tensor]  # (per_token [B, L], mask) -> masked mean


class HeadTerm(NamedTuple):
    """What a regime adds for head k: `coef * loss` (or `loss` alone when the coefficient sits inside it)."""

    loss: torch.Tensor  # head k's loss as the regime defines it; logged as mtp/loss/k
    coef: "torch.Tensor | Pending"  # mtp_coef or OCC's lambda (mtp/lambda/k), or a `Pending` marker
    coef_in_loss: bool = False  # True: `coef` already scales the loss from inside (released code: advantages)


class Pending(str):
    """A coefficient not known when the loss is built: `AFTER_BACKWARD` (occ exact: set from TRL's gradient after
    its backward, `LambdaCalibrator.after_backward`) or `BY_SPLIT_BACKWARD` (occ last_layers with the graph cut:
    set by `split_backward.split_backward_loss`)."""


AFTER_BACKWARD = Pending("after_backward")
BY_SPLIT_BACKWARD = Pending("by_split_backward")


def head_data(main, mtp, old_main, old_mtp, token_mask, advantages, ratio_against="head", mtp_mask=None,
              distill=None) -> list[HeadData]:
    """One `HeadData` per head from a micro-batch's log-probs [B, L] (main) and [B, K, L] (heads). `old_main` /
    `old_mtp` None: the rollout policy is the current one (TRL's shortcut for one update per rollout)."""
    old_main = main.detach() if old_main is None else old_main
    old_mtp = mtp.detach() if old_mtp is None else old_mtp
    heads = []
    for k in range(mtp.shape[1]):
        # the tokens head k has context for (a prompt of K tokens or fewer leaves the first ones without)
        mask = token_mask if mtp_mask is None else token_mask * mtp_mask[:, k].to(token_mask.dtype)
        heads.append(HeadData(k + 1, mtp[:, k], old_main if ratio_against == "main" else old_mtp[:, k], advantages,
                              mask, None if distill is None else distill[:, k]))
    return heads


def with_scaled_advantages(h: HeadData, lam: torch.Tensor) -> HeadData:
    """The released code puts lambda inside the head's advantages."""
    return h._replace(advantages=h.advantages * lam)


# ---------------------------------------------------------------------------------------------- regime losses

def ce_on_samples(h: HeadData, scaling: LossScaling) -> torch.Tensor:
    """detach / ce: cross-entropy of the sampled tokens (teacher = the policy's own samples)."""
    return scaling.token_mean(-h.logq, h.mask)


def distill_from_policy(h: HeadData, scaling: LossScaling) -> torch.Tensor:
    """distill: KL(p_main || q_k), the head learns the policy's own next-token distribution."""
    return scaling.token_mean(h.distill, h.mask)


def head_policy_loss(h: HeadData, scaling: LossScaling) -> torch.Tensor:
    """policy / occ: the main head's clipped surrogate on head k's log-probs ("same objective formulation")."""
    return scaling.policy_loss(h.logq, h.old_logq, h.advantages, h.mask)


@dataclass(frozen=True)
class Regime:
    loss: Callable[[HeadData, LossScaling], torch.Tensor]
    coef: str = "fixed"  # "fixed": mtp_coef | "lambda": OCC's lambda from `lambda_source`
    lambda_source: str = "hat"  # LAMBDA_SOURCES (coef == "lambda")
    lambda_in_advantages: bool = False  # the released code: lambda scales the head's advantages, lambda_plus / K
    mtp_grad: str = "joint"  # "detach": trunk states, embeddings and lm_head enter the heads detached
    ratio_against: str = "head"  # "head": the head's own rollout-time log-probs | "main": the main head's
    proxy_reduction: str = "batch"  # how the proxies are reduced (occ.PROXY_REDUCTIONS); logged for every regime
    needs_distill: bool = False  # the forward also computes KL(p_main || q_k) (tiled full distributions)


MTP_TERMS = {
    "detach": Regime(ce_on_samples, mtp_grad="detach"),
    "ce": Regime(ce_on_samples),
    "policy": Regime(head_policy_loss),
    "occ:paper": Regime(head_policy_loss, coef="lambda"),
    "occ:reference": Regime(head_policy_loss, coef="lambda", lambda_in_advantages=True, ratio_against="main",
                            proxy_reduction="token"),
    **{f"occ:{source}": Regime(head_policy_loss, coef="lambda", lambda_source=source)
       for source in ("exact", "hidden", "last_layers", "ema")},
    "distill": Regime(distill_from_policy, mtp_grad="detach", needs_distill=True),
}


def regime_for(mtp_regime: str, occ_variant: str = "paper") -> Regime | None:
    """The table entry for a config's regime (None for `none`: plain GRPO, heads unused)."""
    if mtp_regime == "none":
        return None
    return MTP_TERMS[f"occ:{occ_variant}" if mtp_regime == "occ" else mtp_regime]


def weighted_sum(terms: list[HeadTerm], like: torch.Tensor) -> torch.Tensor:
    """sum_k coef_k * loss_k over the terms whose coefficient is known now (`Pending` ones are left out)."""
    total = like.new_zeros(())
    for term in terms:
        if isinstance(term.coef, Pending):
            continue
        total = total + (term.loss if term.coef_in_loss else term.coef.to(term.loss.dtype) * term.loss)
    return total

