"""The optimizer step in one function: the step's gradients and its rule in, the parameters stepped, its metrics out.

    optimizer_step(gradients, rule, optimizer, moments, clip_summed):
        before = the parameters                               (update_norm)
        clip: separate -> the policy's gradient to max_grad_norm, the MTP term's to mtp_max_grad_norm, then summed
              shared   -> the sum by one factor (TRL's clip; where the two are apart, of their sum's norm)
        optimizer.step()                                      (the run's AdamW, or SGD in the probe)
        moments.step(the MTP term's trunk gradient, lambda)   (mtp_optimizer_state: separate)
        return grad_norm/rl, grad_norm/mtp, clip_factor[/rl, /mtp], update_norm

The trainer's optimizer is the run's own wrapped in `StepOptimizer`, whose `step()` is this function: transformers'
training loop and `MTPGRPOTrainer.update_on` (the gain probe) both call `optimizer.step()` and so take the same path.
The two hooks transformers calls before the step (`_clip_grad_norm`, `_get_grad_norm`) only read the total norm
(`total_norm`, TRL's logged `grad_norm`); none changes `.grad`.

Where the two gradients are apart: with detached heads (detach, distill) by parameter group (trunk `.grad`: the
policy's; heads: the MTP term's); under a joint regime with the separate clip or moments in an `MTPGradient` kept
off `.grad` (update_geometry.py). Elsewhere `.grad` holds their sum and only the shared clip applies.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.shard_stats import global_norm
from .update_geometry import MOMENTS_FILE, MTPGradient, MTPMoments, clip_apart, clip_factor, split_norms


@dataclass(frozen=True)
class StepGradients:
    """Where the step's gradient is: `.grad` of `params`, split as `trunk` / `heads`, and the MTP term's part kept
    apart (`apart`, None where it is on `.grad`); `by_group`: the heads see the trunk detached, so trunk `.grad` is
    the policy's and heads `.grad` the MTP term's."""

    params: list  # every parameter the optimizer steps (what TRL's clip and update_norm run over)
    trunk: list
    heads: list
    apart: MTPGradient | None = None
    by_group: bool = False

    @property
    def kept_apart(self) -> MTPGradient | None:
        return self.apart if self.apart is not None and not self.apart.empty else None


@dataclass(frozen=True)
class StepRule:
    """How the step treats the two gradients (MTPGRPOConfig's fields)."""

    max_grad_norm: float = 1.0  # the policy's budget (shared: the sum's); 0: no clip
    mtp_max_grad_norm: float | None = None  # the MTP term's budget under the separate clip (None: max_grad_norm)
    clip: str = "shared"  # mtp_grad_clip: shared | separate
    measure_update: bool = True  # log update_norm (one copy of the parameters)


def _clips_apart(gradients: StepGradients, rule: StepRule) -> bool:
    """The two gradients are clipped (and summed) by `clip_apart`: kept apart, or by group under the separate clip."""
    return gradients.kept_apart is not None or (gradients.by_group and rule.clip == "separate")


def total_norm(gradients: StepGradients, rule: StepRule) -> float:
    """The step's total gradient norm before any clip (TRL's `grad_norm`), read-only: the number `optimizer_step`'s
    clip goes by. Where `.grad` holds the sum: torch's own norm over it (the one `clip_grad_norm_` clips by); by
    group under the separate clip: the two groups' norms combined; kept apart: the norm of their sum."""
    apart = gradients.kept_apart
    if apart is None and gradients.by_group and rule.clip == "separate":
        norms = split_norms(gradients.trunk, gradients.heads, None, True)
        return math.hypot(norms["grad_norm/rl"], norms["grad_norm/mtp"])
    if apart is not None:
        return float(global_norm([g if a is None else (a if g is None else g + a.to(g.dtype))
                                  for g, a in zip([p.grad for p in gradients.trunk + gradients.heads], apart.total)]))
    grads = [p.grad for p in gradients.params if p.grad is not None]
    if any(hasattr(g, "full_tensor") for g in grads):  # FSDP2 shards: the shard-correct norm
        return float(global_norm(grads))
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def optimizer_step(gradients: StepGradients, rule: StepRule, optimizer, moments: MTPMoments | None = None,
                   clip_summed: Callable[[float], object] | None = None) -> dict[str, float]:
    """Clip, step, the MTP term's own moments, and the step's metrics (see the module doc). `clip_summed(max_norm)`
    clips `.grad` in place as TRL does (accelerate's `clip_grad_norm_`, right under DDP / FSDP); None: torch's."""
    before = [p.detach().clone() for p in gradients.params] if rule.measure_update else None
    apart = gradients.kept_apart
    max_norm = rule.max_grad_norm or 0.0
    if _clips_apart(gradients, rule):
        mtp_max = max_norm if rule.mtp_max_grad_norm is None else rule.mtp_max_grad_norm
        _, metrics = clip_apart(gradients.trunk, gradients.heads, apart, clip_mode=rule.clip, max_norm=max_norm,
                                mtp_max_norm=mtp_max, separate_state=moments is not None)
    else:  # `.grad` holds the sum: TRL's clip, the split measured read-only where the groups split it
        metrics = split_norms(gradients.trunk, gradients.heads, None, gradients.by_group)
        if max_norm > 0:
            clip = clip_summed or (lambda m: torch.nn.utils.clip_grad_norm_(gradients.params, m))
            metrics["clip_factor"] = clip_factor(float(clip(max_norm)), max_norm)
    optimizer.step()
    if moments is not None and apart is not None and apart.unit:
        moments.step(apart.unit, apart.mean_coef(), optimizer.param_groups[0]["lr"])
    if gradients.apart is not None:
        gradients.apart.clear()
    if before is not None:
        metrics["update_norm"] = float(global_norm(p.detach() - b for p, b in zip(gradients.params, before)))
    return metrics


class StepOptimizer(torch.optim.Optimizer):
    """The run's optimizer, whose `step()` is `optimizer_step` (the way accelerate's `AcceleratedOptimizer` wraps one:
    state, parameter groups and state dicts are the wrapped optimizer's, so checkpoints are unchanged).
    `take_step()` -> the step's metrics is the trainer's: it gathers `StepGradients` and the rule and logs."""

    def __init__(self, optimizer: torch.optim.Optimizer, take_step: Callable[[torch.optim.Optimizer], None]):
        self.optimizer = optimizer
        self._take_step = take_step  # deliberately no super().__init__: nothing of its own to hold

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def state_dict(self):
        return self.optimizer.state_dict()

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("the MTP optimizer step takes no closure (gradients come from the trainer's backward)")
        self._take_step(self.optimizer)

    def __repr__(self):
        return f"StepOptimizer({self.optimizer!r})"


def _wraps(optimizer, cls) -> bool:
    """`optimizer` is, or wraps (accelerate's `AcceleratedOptimizer`, ...), a `cls`."""
    while optimizer is not None:
        if isinstance(optimizer, cls):
            return True
        optimizer = getattr(optimizer, "optimizer", None)
    return False


class OptimizerStepMixin:
    """For `MTPGRPOTrainer`: the run's optimizer wrapped so that its step is `optimizer_step.optimizer_step` (the
    separate clip, the MTP term's own moments, the step's metrics), the two read-only norm hooks transformers calls
    before the step, and the moments saved and loaded with the optimizer. What the step needs comes from the active
    term (`self.term`, the one source of the regime) and the config; `_init_geometry` rebuilds it when either
    changes (`using_term`, `using_update_settings`)."""

    def _init_geometry(self) -> None:
        """The MTP gradient's buffer and the MTP term's moments that the active term and the settings need."""
        args, regime = self.args, self.term.regime
        joint = self.calibrator is not None and regime is not None and regime.mtp_grad == "joint"
        self.mtp_gradient_apart: MTPGradient | None = None  # the MTP term's gradient kept off .grad
        if joint and "separate" in (args.mtp_grad_clip, args.mtp_optimizer_state):
            self.mtp_gradient_apart = MTPGradient(self.calibrator.main_params + self.calibrator.head_params,
                                                  with_unit=args.mtp_optimizer_state == "separate")
        moments = getattr(self, "mtp_moments", None)
        if not (joint and args.mtp_optimizer_state == "separate"):
            moments = None
        elif moments is None:
            moments = MTPMoments(self.calibrator.main_params, (args.adam_beta1, args.adam_beta2), args.adam_epsilon)
        self.mtp_moments: MTPMoments | None = moments

    def _step_gradients(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.calibrator is None:
            return StepGradients(params, params, [])
        return StepGradients(params, self.calibrator.main_params, self.calibrator.head_params,
                             self.mtp_gradient_apart, by_group=self.term.regime.mtp_grad == "detach")

    def _step_rule(self):
        args = self.args
        return StepRule(args.max_grad_norm, args.mtp_max_grad_norm, args.mtp_grad_clip, args.mtp_log_update_norm)

    def _take_optimizer_step(self, optimizer) -> None:
        """`StepOptimizer.step()`: the one optimizer step, its metrics logged."""
        gradients = self._step_gradients()
        if self.accelerator.scaler is None:  # accelerate's clip: right under DDP / FSDP
            clip = functools.partial(self.accelerator.clip_grad_norm_, gradients.params)
        else:  # fp16: the hook below unscaled already (accelerate's clip would unscale a second time)
            clip = functools.partial(torch.nn.utils.clip_grad_norm_, gradients.params)
        self._log_metrics("train", optimizer_step(gradients, self._step_rule(), optimizer, self.mtp_moments, clip))

    def wrap_optimizer(self, optimizer):
        """`optimizer` with `optimizer_step` as its step (DeepSpeed steps inside its engine: left as it is)."""
        if optimizer is None or self.is_deepspeed_enabled or _wraps(optimizer, StepOptimizer):
            return optimizer
        return StepOptimizer(optimizer, self._take_optimizer_step)

    def create_optimizer(self, model=None):
        self.optimizer = self.wrap_optimizer(super().create_optimizer(model))
        return self.optimizer

    def _clip_grad_norm(self, model):
        """Read-only: the step's total norm (the clip itself runs in `optimizer_step`)."""
        if self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        if self.accelerator.scaler is not None:  # fp16: the norm of the true gradients, as transformers' clip
            self.accelerator.unscale_gradients()
        return total_norm(self._step_gradients(), self._step_rule())

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and not self.is_deepspeed_enabled:  # no clip configured: the norm is still logged
            grad_norm = self._clip_grad_norm(model)
        return super()._get_grad_norm(model, grad_norm)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.mtp_moments is not None and self.args.should_save:
            torch.save(self.mtp_moments.state_dict(), os.path.join(output_dir, MOMENTS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.mtp_moments is None:
            return
        path = os.path.join(checkpoint, MOMENTS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{checkpoint}: mtp_optimizer_state=separate but the checkpoint has no "
                                    f"{MOMENTS_FILE} (it was written with mtp_optimizer_state=shared)")
        self.mtp_moments.load_state_dict(torch.load(path, weights_only=False))
