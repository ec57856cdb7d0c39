"""RL and MTP losses as small pure functions over tensors (verl `core_algos` style).

`policy_loss` is the clipped surrogate exactly as TRL 1.16's `GRPOTrainer._compute_loss` computes it for the
loss types below, *before* TRL's division by the gradient-accumulation steps (the trainer applies that).
The MTP policy loss is this same function with the same settings, fed the head's log-probabilities (the
paper: MTP should use "the same objective formulation" as the main model).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over positions where mask is non-zero; 0 for an empty mask. Masked-out values never leak,
    even if they are NaN or inf."""
    mask = mask.bool()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def log_importance_weights(logps, old_logps, mask, level: str = "token") -> torch.Tensor:
    """log(pi/pi_old): per token ([B, L]) or, for GSPO's sequence level, the masked mean per sequence ([B, 1])."""
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    mask = mask.to(log_ratio.dtype)
    return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def policy_loss(logps, old_logps, advantages, mask, *, loss_type: str = "dapo",
                importance_sampling_level: str = "token", epsilon_low: float = 0.2, epsilon_high: float = 0.28,
                normalizer=None, max_completion_length: int | None = None, delta: float | None = None
                ) -> torch.Tensor:
    """Clipped policy-gradient surrogate `-min(r A, clip(r, 1-eps_low, 1+eps_high) A)` aggregated per loss type.

    logps, old_logps, mask: [B, L]; advantages: [B] or [B, L].
    - grpo: mean over sequences of the per-sequence masked token mean
    - bnpo: masked token mean over the batch
    - dr_grpo: masked sum / (B * max_completion_length), `max_completion_length` defaulting to L
    - dapo: masked sum / `normalizer` (TRL's token count over the accumulation window), defaulting to this
      batch's masked-token count
    `delta`: TRL's optional two-sided clip of the unclipped ratio (`ratio <= delta`).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    _check_same_shape(logps=logps, old_logps=old_logps, mask=mask)
    if logps.dim() != 2:
        raise ValueError(f"logps must be [batch, completion_len], got shape {tuple(logps.shape)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != logps.shape[0]:
            raise ValueError(f"advantages has {advantages.shape[0]} rows, logps has {logps.shape[0]}")
        advantages = advantages.unsqueeze(1)
    elif tuple(advantages.shape) != tuple(logps.shape):
        raise ValueError(f"advantages must be [B] or [B, L] = {tuple(logps.shape)}, got {tuple(advantages.shape)}")

    coef_1 = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)

    mask = mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask  # [B, 1] sequence-level losses broadcast over the tokens, as in TRL
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = logps.shape[1] if max_completion_length is None else max_completion_length
        return masked.sum() / (logps.shape[0] * length)
    count = mask.sum().clamp(min=1.0) if normalizer is None else normalizer
    return masked.sum() / count


def mtp_ce_loss(mtp_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the sampled completion tokens over masked positions.

    mtp_logps [B, L] -> scalar; [B, K, L] (all heads) -> [K], one loss per head, with a mask [B, L] shared by the
    heads or [B, K, L], one per head.
    """
    if mtp_logps.dim() == 3:
        if mask.dim() == 3:
            _check_same_shape(mtp_logps=mtp_logps, mask=mask)
            return torch.stack([-masked_mean(mtp_logps[:, k], mask[:, k]) for k in range(mtp_logps.shape[1])])
        _check_same_shape(mtp_logps=mtp_logps[:, 0], mask=mask)
        return torch.stack([-masked_mean(mtp_logps[:, k], mask) for k in range(mtp_logps.shape[1])])
    _check_same_shape(mtp_logps=mtp_logps, mask=mask)
    return -masked_mean(mtp_logps, mask)


# Head-only terms (`mtp_head_loss`): computed on heads that see the trunk, embeddings and LM head detached, so their
# gradient stops at the heads' inputs and trains the heads' own parameters only, whatever lambda does.
HEAD_LOSSES = ("none", "ce", "distill", "tv")
# The per-token divergence each head-only term needs from the forward (`compute_divergence`); ce needs none.
HEAD_LOSS_DIVERGENCE = {"distill": "kl", "tv": "tv"}


def head_only_loss(kind: str, mtp_logps: torch.Tensor, divergence: torch.Tensor | None, mask: torch.Tensor):
    """Per-head loss [K] of a head-only term: `ce` = mean NLL of the sampled tokens (mtp_ce_loss), `distill` =
    mean KL(p_main || q_k), `tv` = mean 1 - sum_v min(p_main, q_k) (one minus the expected speculative
    acceptance: the heads trained for drafting, Bebop); `divergence` holds the per-token divergence the forward
    computed (`compute_divergence=HEAD_LOSS_DIVERGENCE[kind]`); `mask` [B, K, L] (per head) or [B, L]."""
    if kind == "ce":
        return mtp_ce_loss(mtp_logps, mask)
    if kind in HEAD_LOSS_DIVERGENCE:
        if divergence is None:
            raise ValueError(f"head_only_loss({kind!r}) needs the per-token divergence "
                             f"(compute_divergence={HEAD_LOSS_DIVERGENCE[kind]!r})")
        return mtp_ce_loss(-divergence, mask)  # the mean of -(-D) = mean D, per head
    raise ValueError(f"mtp_head_loss must be one of {', '.join(HEAD_LOSSES[1:])} here, got {kind!r}")
