"""The MTP regimes: what the heads learn during RL and with which coefficient; one table entry each.

This file is the project's one vocabulary of regimes (`REGIMES`, `REGIME_LABELS`, `OCC_VARIANTS`,
`LAMBDA_SOURCES`): the config, the command line, the report and the benchmark import it from here.

A regime is a `Regime` entry (`MTP_TERMS`): how the heads see the trunk (`mtp_grad`), which rollout-time log-probs
head k's importance ratio and OCC's `delta_mtp` are taken against (`ratio_against`), how the proxies are reduced
(`proxy_reduction`), where its coefficient comes from (`mtp_coef`, or OCC's lambda from a `lambda_source`), and a
`loss` function: a pure function of one head's plain data (`HeadData`) and TRL's loss scaling (`LossScaling`) that
returns head k's loss. It never starts a backward; lambda comes from `calibration.LambdaCalibrator`. The one caller
is `mtp_step.mtp_step`: head data (`head_data`) -> lambda (the calibrator) -> the regime's loss -> `coef * loss`
summed into TRL's loss. Adding a regime = one function + one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .objectives import LOSS_TYPES, masked_mean, policy_loss

# Display labels, in the order the report lists the regimes.
REGIME_LABELS = {"none": "GRPO (no MTP)", "detach": "Detach", "ce": "CE loss", "policy": "Policy loss",
                 "occ": "OCC", "distill": "Distill", "frozen": "Frozen heads"}
# Regimes with no MTP term in the loss: `none` (no heads) and `frozen` (heads attached, drafting, never trained)
TERMLESS = ("none", "frozen")
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
    divergence: torch.Tensor | None  # [B, L] KL(p_main || q_k) per token (regimes with divergence "kl"), else None


@dataclass(frozen=True)
class LossScaling:
    """TRL's loss settings and gradient-accumulation scaling for one micro-batch, as numbers (verl's
    `loss_agg_mode`): `policy_loss` and `token_mean` then compute what TRL's `_compute_loss` would for these
    log-probs. Built by `MTPGRPOTrainer.loss_scaling(inputs)`.

    `trl_loss`: the loss types `objectives.policy_loss` does not implement (cispo, sapo, luspo, vespo, any newer
    one) are TRL's own code; the trainer hands in the call (`trl_compat.trl_head_loss` through TRL's class in the
    trainer's MRO). None where the loss type is one of `objectives.LOSS_TYPES`."""

    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    delta: float | None = None  # two-sided clip bound (TRL's `delta`)
    max_completion_length: int | None = None  # dr_grpo's constant denominator
    normalizer: torch.Tensor | None = None  # dapo: the accumulation window's token count per rank, already scaled
    accumulation: int = 1  # TRL divides per-micro-batch means by its gradient-accumulation steps (1: no division)
    trl_loss: Callable[..., torch.Tensor] | None = None

    def policy_loss(self, logps, old_logps, advantages, mask) -> torch.Tensor:
        """The clipped surrogate on these log-probs, scaled exactly as TRL scales its own loss."""
        if self.loss_type not in LOSS_TYPES:
            if self.trl_loss is None:
                raise ValueError(f"loss_type={self.loss_type!r} is computed by TRL's own code: LossScaling needs "
                                 "trl_loss (MTPGRPOTrainer.loss_scaling supplies it)")
            return self.trl_loss(logps, old_logps, advantages, mask)
        loss = policy_loss(logps, old_logps, advantages, mask, loss_type=self.loss_type,
                           importance_sampling_level=self.importance_sampling_level, epsilon_low=self.epsilon_low,
                           epsilon_high=self.epsilon_high, normalizer=self.normalizer,
                           max_completion_length=self.max_completion_length, delta=self.delta)
        return loss if self.loss_type == "dapo" else loss / self.accumulation

    def token_mean(self, per_token_loss, mask) -> torch.Tensor:
        """Masked mean over completion tokens, scaled for gradient accumulation like TRL's per-micro-batch means."""
        return masked_mean(per_token_loss, mask) / self.accumulation


def head_data(main, mtp, old_main, old_mtp, token_mask, advantages, ratio_against="head", mtp_mask=None,
              divergence=None) -> list[HeadData]:
    """One `HeadData` per head from a micro-batch's log-probs [B, L] (main) and [B, K, L] (heads). `old_main` /
    `old_mtp` None: the rollout policy is the current one (TRL's shortcut for one update per rollout)."""
    old_main = main.detach() if old_main is None else old_main
    old_mtp = mtp.detach() if old_mtp is None else old_mtp
    heads = []
    for k in range(mtp.shape[1]):
        # the tokens head k has context for (a prompt of K tokens or fewer leaves the first ones without)
        mask = token_mask if mtp_mask is None else token_mask * mtp_mask[:, k].to(token_mask.dtype)
        heads.append(HeadData(k + 1, mtp[:, k], old_main if ratio_against == "main" else old_mtp[:, k], advantages,
                              mask, None if divergence is None else divergence[:, k]))
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
    return scaling.token_mean(h.divergence, h.mask)


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
    divergence: str | None = None  # "kl": the forward also computes KL(p_main || q_k) per token (tiled)
    # The table entry with this regime's loss at a fixed coefficient (what the gain probe scans lambda over): OCC's
    # term is the head policy loss with lambda in front, so every OCC entry's fixed form is `policy`.
    fixed_form: str = ""  # "" = this entry itself


MTP_TERMS = {
    "detach": Regime(ce_on_samples, mtp_grad="detach"),
    "ce": Regime(ce_on_samples),
    "policy": Regime(head_policy_loss),
    "occ:paper": Regime(head_policy_loss, coef="lambda", fixed_form="policy"),
    "occ:reference": Regime(head_policy_loss, coef="lambda", lambda_in_advantages=True, ratio_against="main",
                            proxy_reduction="token", fixed_form="policy"),
    **{f"occ:{source}": Regime(head_policy_loss, coef="lambda", lambda_source=source, fixed_form="policy")
       for source in ("exact", "hidden", "last_layers", "ema")},
    "distill": Regime(distill_from_policy, mtp_grad="detach", divergence="kl"),
}


def regime_for(mtp_regime: str, occ_variant: str = "paper") -> Regime | None:
    """The table entry for a config's regime (None for `none` and `frozen`: plain GRPO's loss; under `frozen` the
    heads stay attached and draft, with no gradient)."""
    if mtp_regime in TERMLESS:
        return None
    return MTP_TERMS[f"occ:{occ_variant}" if mtp_regime == "occ" else mtp_regime]


def fixed_form_of(mtp_regime: str, occ_variant: str = "paper") -> str:
    """The `MTP_TERMS` name of a config regime's loss at a fixed coefficient (`Regime.fixed_form`): occ -> policy."""
    regime = regime_for(mtp_regime, occ_variant)
    if regime is None:
        raise ValueError(f"mtp_regime={mtp_regime} has no MTP term to scan a coefficient over")
    return regime.fixed_form or mtp_regime
