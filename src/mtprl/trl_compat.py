"""Where TRL's GRPOTrainer machinery assumes the policy is only the main model: the policy here also carries
`mtp_heads.*` parameters, which the reference model (built from the checkpoint by TRL) does not have."""

from __future__ import annotations

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
