"""Where TRL's GRPOTrainer machinery meets the heads: the policy here also carries `mtp_heads.*` parameters (the
reference model gets a copy), and the heads' loss goes through TRL's own loss code."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch


def give_reference_the_heads(policy, ref_model) -> None:
    """The reference model is the policy before training: give it a frozen copy of the policy's starting heads.

    TRL builds the reference from the checkpoint, without `mtp_heads.*`, while everything in TRL that walks both
    models' parameters together assumes the same names in the same order: `sync_ref_model`'s mixing
    (`zip(..., strict=True)`), and a user's `ref_model.get_parameter(name)` for each of the policy's names. With
    the copy, TRL's own SyncRefModelCallback mixes the heads too. The copy never runs: the reference's forward is
    the model's own (main-head log-probs for the KL term); it costs one decoder layer per depth of memory."""
    if ref_model is None or hasattr(ref_model, "mtp_heads"):
        return
    like = next(ref_model.parameters())
    ref_model.mtp_heads = copy.deepcopy(policy.mtp_heads).to(device=like.device, dtype=like.dtype)
    ref_model.mtp_heads.requires_grad_(False)


# The loss types TRL 1.16's GRPOTrainer computes (its `_compute_loss`); TRL itself only fails on an unknown one
# mid-training. The heads' loss goes through TRL's code for every type objectives.policy_loss does not implement,
# so a new TRL loss type is one entry here.
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")

# TRL's extras that belong to the main head alone: off while a head's loss goes through TRL's `_compute_loss`.
_MAIN_HEAD_ONLY = {"beta": 0.0, "_entropy_bonus_enabled": False, "aux_loss_enabled": False,
                   "off_policy_mask_threshold": None, "top_entropy_quantile": 1.0}


def trl_grpo_class(cls: type) -> type:
    """TRL's own GRPOTrainer: the class in `cls`'s MRO that TRL's module defines. Never the name `trl.GRPOTrainer`
    looked up at call time: a harness that runs TRL's tests against MTPGRPOTrainer rebinds that name (to a
    subclass of ours, or to ours), and calling it from inside our `_compute_loss` would recurse into our own."""
    for base in cls.__mro__:
        if base.__name__ == "GRPOTrainer" and base.__module__ == "trl.trainer.grpo_trainer":
            return base
    raise TypeError(f"{cls.__name__} does not derive from trl.trainer.grpo_trainer.GRPOTrainer")


def trl_head_loss(trainer, inputs, logps, old_logps, advantages, mask):
    """A head's policy loss computed by TRL's own `GRPOTrainer._compute_loss` (the base in the trainer's MRO,
    `trl_grpo_class`), the head's log-probs standing in for the main head's: every loss type TRL offers (cispo,
    sapo, luspo, vespo, ...) with TRL's exact scaling, so a new TRL loss type needs nothing here. What belongs to
    the main head alone (the KL to the reference model, the entropy bonus, the router aux loss, the off-policy
    mask, the entropy mask) is off, and the metrics TRL logs on the way are discarded (they describe the main
    head)."""
    head_inputs = {k: v for k, v in inputs.items() if k != "tool_mask"}
    head_inputs.update(completion_mask=mask, old_per_token_logps=old_logps, advantages=advantages)
    with serving_logprobs(trainer, logps, torch.zeros_like(logps), None), _main_head_extras_off(trainer), \
            _metrics_discarded(trainer):
        return trl_grpo_class(type(trainer))._compute_loss(trainer, trainer.model, head_inputs)


@contextmanager
def serving_logprobs(trainer, logps, entropies, aux_loss):
    """While open, TRL's `_get_per_token_logps_and_entropies` on `trainer` returns these values for exactly one
    call (TRL's `_compute_loss` makes one) instead of running a forward: TRL's loss on log-probs we computed.
    A second call, or none, is an error (TRL then computes its loss on something else than our forward)."""
    served = []

    def serve(*args, **kwargs):
        if served:
            raise RuntimeError("TRL's _compute_loss asked for the policy log-probs twice; mtprl serves the one "
                               "forward it ran (trl==1.16 makes one call)")
        served.append(True)
        return logps, entropies, aux_loss

    trainer._get_per_token_logps_and_entropies = serve
    try:
        yield
    finally:
        trainer.__dict__.pop("_get_per_token_logps_and_entropies", None)  # the class's method again
    if not served:
        raise RuntimeError(
            "TRL's _compute_loss did not ask for the policy log-probs through `_get_per_token_logps_and_entropies` "
            "as trl==1.16 does, so its loss was not computed on the forward that gave the heads' log-probs; "
            "without them the run would silently train as plain GRPO.")


@contextmanager
def _main_head_extras_off(trainer):
    saved = {name: getattr(trainer, name) for name in _MAIN_HEAD_ONLY if hasattr(trainer, name)}
    try:
        for name in saved:
            setattr(trainer, name, _MAIN_HEAD_ONLY[name])
        yield
    finally:
        for name, value in saved.items():
            setattr(trainer, name, value)


@contextmanager
def _metrics_discarded(trainer):
    metrics = {mode: {k: list(v) for k, v in values.items()} for mode, values in trainer._metrics.items()}
    try:
        yield
    finally:
        for mode, values in metrics.items():
            trainer._metrics[mode].clear()
            trainer._metrics[mode].update(values)
