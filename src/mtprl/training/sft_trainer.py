"""`MTPSFTTrainer`: the warm start. TRL's SFTTrainer whose loss is main CE + mtp_coef * mean_k CE_k from one trunk
forward (MTP pretraining, as in DeepSeek-V3); with `mtp_only` the main model is frozen and the heads learn, on the
model's own samples, `mtp_only_loss`: the policy's own distribution (distill, KL(p_main || q_k), the default), one
minus the speculative acceptance (tv) or the sampled tokens (ce)."""

from __future__ import annotations

from trl import SFTTrainer

from ..io.callbacks import MetricsJsonlCallback
from ..model.checkpoints import MTPCheckpointMixin, attach_or_load_heads
from .config import MTPSFTConfig
from ..model.logprobs import add_mtp_forward
from ..core.objectives import HEAD_LOSS_DIVERGENCE, head_only_loss, masked_mean, mtp_ce_loss
from .runs import ConsistentLogOnResume


class MTPSFTTrainer(ConsistentLogOnResume, MTPCheckpointMixin, SFTTrainer):
    """SFTTrainer whose loss is main CE + mtp_coef * mean_k CE_k, from one trunk forward; with `mtp_only` the
    main model is frozen and the loss is mean_k KL(p_main || q_k) (self-distillation of the heads)."""

    def __init__(self, model, args: MTPSFTConfig, **kwargs):
        if args.mtp_only:  # before TRL builds the optimizer: only head parameters are trainable
            attach_or_load_heads(model, args.mtp_num_heads, init=args.mtp_init, source=model.config._name_or_path)
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith("mtp_heads."))
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(MetricsJsonlCallback(args.output_dir))
        unwrapped = self.accelerator.unwrap_model(self.model)
        attach_or_load_heads(unwrapped, args.mtp_num_heads, init=args.mtp_init, source=unwrapped.config._name_or_path)
        add_mtp_forward(unwrapped, temperature=1.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        num_heads = self.accelerator.unwrap_model(model).mtp_heads.num_heads
        keep = input_ids.shape[1] - num_heads - 1  # every token that every head can score
        mtp_only, head_loss = self.args.mtp_only, self.args.mtp_only_loss
        divergence = HEAD_LOSS_DIVERGENCE.get(head_loss) if mtp_only else None
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    mtp_logprobs={"logits_to_keep": keep, "compute_accept": self.args.mtp_log_acceptance,
                                  "compute_divergence": divergence, "mtp_grad": "detach" if mtp_only else "joint"})
        mask = (labels[:, -keep:] != -100) & (attention_mask[:, -keep:] == 1)
        head_mask = mask.unsqueeze(1) & out.mtp_mask  # [B, K, L]: a left-padded short row gives some heads no context
        main_ce = -masked_mean(out.main, mask)
        head_ce = mtp_ce_loss(out.mtp, head_mask)
        mode = "train" if self.model.training else "eval"
        if mtp_only:  # the heads alone, on the model's own samples: the same head-only losses as during RL
            per_head = head_only_loss(head_loss, out.mtp, out.divergence, head_mask)
            loss = per_head.mean()
            if divergence is not None:
                for k in range(num_heads):
                    self._metrics[mode][f"mtp/{head_loss}/{k + 1}"].append(per_head[k].item())
        else:
            loss = main_ce + self.args.mtp_coef * head_ce.mean()
        self._metrics[mode]["main_ce"].append(main_ce.item())
        for k in range(num_heads):
            self._metrics[mode][f"mtp/loss/{k + 1}"].append(head_ce[k].item())
            if out.accept is not None:
                self._metrics[mode][f"mtp/accept/{k + 1}"].append(masked_mean(out.accept[:, k], head_mask[:, k]).item())
        return (loss, out) if return_outputs else loss
