"""Where TRL's GRPOTrainer machinery assumes the policy is only the main model: the policy here also carries
`mtp_heads.*` parameters, which the reference model (built from the checkpoint by TRL) does not have."""

from __future__ import annotations

import torch
from trl.trainer.callbacks import SyncRefModelCallback


class _MainModelParameters:
    """What TRL's sync reads of the policy (`.parameters()`), without the MTP heads."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return (p for n, p in self.model.named_parameters() if not n.startswith("mtp_heads."))


class MainModelRefSync(SyncRefModelCallback):
    """TRL's `sync_ref_model` (TR-DPO style mixing every `ref_model_sync_steps`) over the main model's parameters:
    the reference model has no heads, so TRL's own callback fails on `zip(..., strict=True)`."""

    def on_step_end(self, args, state, control, **kwargs):
        model = kwargs["model"]
        if self.ref_model is not None and state.global_step % args.ref_model_sync_steps == 0:
            if self.accelerator:
                model = self.accelerator.unwrap_model(model)
            self.sync_target_model(_MainModelParameters(model), self.ref_model, args.ref_model_mixup_alpha)


def replace_ref_model_sync(trainer) -> None:
    """Swap TRL's SyncRefModelCallback (added when `sync_ref_model=True`) for `MainModelRefSync`."""
    for callback in list(trainer.callback_handler.callbacks):
        if type(callback) is SyncRefModelCallback:
            trainer.callback_handler.remove_callback(callback)
            trainer.add_callback(MainModelRefSync(ref_model=callback.ref_model, accelerator=callback.accelerator))


# The loss types TRL 1.16's GRPOTrainer computes (its `_compute_loss`); TRL itself only fails on an unknown one
# mid-training. The heads' loss goes through TRL's code for every type objectives.policy_loss does not implement,
# so a new TRL loss type is one entry here.
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")

# TRL's extras that belong to the main head alone: off while a head's loss goes through TRL's `_compute_loss`.
_MAIN_HEAD_ONLY = {"beta": 0.0, "_entropy_bonus_enabled": False, "aux_loss_enabled": False,
                   "off_policy_mask_threshold": None, "top_entropy_quantile": 1.0}


def trl_head_loss(trainer, logps, old_logps, advantages, mask, inputs):
    """A head's policy loss computed by TRL's own `GRPOTrainer._compute_loss`, the head's log-probs standing in
    for the main head's: every loss type TRL offers (cispo, sapo, luspo, vespo, ...) with TRL's exact scaling,
    so a new TRL loss type needs nothing here. What belongs to the main head alone (the KL to the reference
    model, the entropy bonus, the router aux loss, the off-policy mask, the entropy mask) is off, and the metrics
    TRL logs on the way are discarded (they describe the main head)."""
    from trl import GRPOTrainer

    head_inputs = {k: v for k, v in inputs.items() if k != "tool_mask"}
    head_inputs.update(completion_mask=mask, old_per_token_logps=old_logps, advantages=advantages)
    saved = {name: getattr(trainer, name) for name in _MAIN_HEAD_ONLY if hasattr(trainer, name)}
    metrics = {mode: {k: list(v) for k, v in values.items()} for mode, values in trainer._metrics.items()}
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    try:
        for name in saved:
            setattr(trainer, name, _MAIN_HEAD_ONLY[name])
        return GRPOTrainer._compute_loss(trainer, trainer.model, head_inputs)
    finally:
        del trainer._get_per_token_logps_and_entropies  # the class's method again
        for name, value in saved.items():
            setattr(trainer, name, value)
        for mode, values in metrics.items():
            trainer._metrics[mode].clear()
            trainer._metrics[mode].update(values)
