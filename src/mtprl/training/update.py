"""One rollout's updates as a public call: `MTPGRPOTrainer.update_on(micro_batches, regime=..., coef=...)`.

What transformers' training loop does with one rollout, and nothing else: TRL's `training_step` on each micro-batch
(forward, TRL's loss plus the MTP term, backward, `finish_backward`), `num_iterations` times over the rollout, and
every `gradient_accumulation_steps` micro-steps the read-only norm hooks, the callbacks around `optimizer.step()`
(which is `optimizer_step.optimizer_step`: clip, step, the MTP term's own moments, metrics), the scheduler step unless
the step was skipped, the gradients zeroed: transformers' `_run_epoch`, mirrored call for call. The MTP term is the run's own,
or the `MTP_TERMS` entry and fixed coefficient given (`ActiveTerm`, swapped for the call and restored on exit).

Around it, the state one update changes (`update_state` / `restore_update_state`: parameters, optimizer and
scheduler state, step counters, OCC's running average), one rollout drawn as the run draws it (`draw_rollout`),
and a checkpoint's optimizer state (`load_update_state`): everything the gain probe needs, so it touches nothing
private.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..core.regimes import MTP_TERMS, Regime, regime_for


@dataclass(frozen=True)
class ActiveTerm:
    """The MTP term the loss adds: a regime table entry (None: plain GRPO), its fixed coefficient (regimes with
    coef == "fixed"; OCC entries take lambda from the calibrator) and how often fidelity steps run (0: never)."""

    regime: Regime | None
    coef: float
    fidelity_every: int = 0


@dataclass
class UpdateResult:
    """What `update_on` did: the metrics its steps logged (name -> values, e.g. `mtp/lambda/k` per micro-batch,
    `grad_norm` per optimizer step) and the number of optimizer steps."""

    metrics: dict[str, list[float]]
    optimizer_steps: int


@dataclass
class UpdateState:
    """Everything one update changes."""

    model: dict
    optimizer: dict
    scheduler: dict
    global_step: int
    micro_step: int
    ema: dict
    mtp_moments: dict | None = None  # mtp_optimizer_state: separate


class UpdateMixin:
    """`update_on` and the state around it, for `MTPGRPOTrainer` (see the module doc)."""

    def term_for(self, regime: str | None = None, coef: float | None = None,
                 fidelity: bool | None = None) -> ActiveTerm:
        """The term `regime` names (an `MTP_TERMS` key such as `policy` or `occ:exact`, or a config regime: `occ`
        takes the run's `occ_variant`; None: the run's own), at `coef` (None: the run's `mtp_coef`), with fidelity
        on every micro-batch (True), never (False) or as the run has it (None)."""
        base = self.term
        if regime is None:
            entry = base.regime
        elif regime in MTP_TERMS:
            entry = MTP_TERMS[regime]
        elif regime == "occ":
            entry = regime_for("occ", self.args.occ_variant)
        else:
            raise ValueError(f"regime must be one of {', '.join(['occ', *MTP_TERMS])}, got {regime!r}")
        if entry is not None and self.calibrator is None:
            raise ValueError(f"this run trains without MTP heads (mtp_regime=none): no {regime!r} term to update with")
        every = base.fidelity_every if fidelity is None else (1 if fidelity else 0)
        return ActiveTerm(entry, float(self.args.mtp_coef if coef is None else coef), every)

    @contextmanager
    def using_term(self, term: ActiveTerm):
        """The loss adds `term` while open, and the optimizer step treats the gradients as that term needs (its
        MTP gradient kept apart or by parameter group: `_init_geometry` reads the one `self.term`); exception-safe."""
        saved = (self.term, self.mtp_gradient_apart, self.mtp_moments)
        try:
            self.term = term
            self._init_geometry()
            yield
        finally:
            self.term, self.mtp_gradient_apart, self.mtp_moments = saved

    @contextmanager
    def _inputs_as_given(self):
        """TRL's `training_step` on a micro-batch we hand it (TRL's `_prepare_inputs` would draw a new rollout)."""
        self._prepare_inputs = lambda inputs: inputs
        try:
            yield
        finally:
            del self._prepare_inputs

    def update_on(self, micro_batches: list[dict], *, regime: str | None = None, coef: float | None = None,
                  fidelity: bool | None = None) -> UpdateResult:
        """One rollout's updates on `micro_batches` (TRL's split of one rollout, `draw_rollout`) with the run's
        optimizer, scheduler, clip and accumulation, the MTP term `term_for(regime, coef, fidelity)`. Changes the
        trainer's state as training would (`update_state` saves it first if you want it back)."""
        args, model = self.args, self.model
        self.current_gradient_accumulation_steps = args.gradient_accumulation_steps
        self._metrics["train"].clear()
        done = steps = 0
        model.train()
        with self.using_term(self.term_for(regime, coef, fidelity)), self._inputs_as_given():
            for _ in range(self.num_iterations):
                for micro in micro_batches:
                    self.training_step(model, micro, None)
                    done += 1
                    if done % args.gradient_accumulation_steps == 0:  # transformers' `_run_epoch`, call for
                        # call (tests/test_update.py runs both with a recording callback and compares)
                        norm = self._clip_grad_norm(model) if args.max_grad_norm > 0 else None
                        norm = self._get_grad_norm(model, grad_norm=norm)
                        self._metrics["train"]["grad_norm"].append(float(norm))
                        self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
                        self.optimizer.step()  # `optimizer_step.optimizer_step`: clip, step, moments, metrics
                        self.control = self.callback_handler.on_optimizer_step(args, self.state, self.control)
                        if not self.accelerator.optimizer_step_was_skipped:
                            self.lr_scheduler.step()
                        model.zero_grad()
                        self.state.global_step += 1
                        steps += 1
        metrics = {k: list(v) for k, v in self._metrics["train"].items()}
        self._metrics["train"].clear()
        return UpdateResult(metrics, steps)

    @contextmanager
    def using_update_settings(self, *, max_grad_norm: float | None = None, mtp_grad_clip: str | None = None,
                              mtp_optimizer_state: str | None = None, sgd_lr: float | None = None,
                              occ_first_update: str | None = None):
        """`update_on` under other update settings while open (the gain probe's counterfactuals), restored on exit:
        another clip budget (0: no clip), the separate clip or separate moments, plain SGD at `sgd_lr` (no
        momentum, constant rate) in place of the run's optimizer and scheduler, or OCC's first-update rule."""
        args = self.args
        saved = (args.max_grad_norm, args.mtp_grad_clip, args.mtp_optimizer_state, args.occ_first_update,
                 self.optimizer, self.lr_scheduler, self.mtp_gradient_apart, self.mtp_moments)
        try:
            if max_grad_norm is not None:
                args.max_grad_norm = max_grad_norm
            args.mtp_grad_clip = mtp_grad_clip or args.mtp_grad_clip
            args.mtp_optimizer_state = mtp_optimizer_state or args.mtp_optimizer_state
            args.occ_first_update = occ_first_update or args.occ_first_update
            self._init_geometry()
            if sgd_lr is not None:
                params = [p for p in self.model.parameters() if p.requires_grad]
                self.optimizer = self.wrap_optimizer(torch.optim.SGD(params, lr=sgd_lr))
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
            yield
        finally:
            (args.max_grad_norm, args.mtp_grad_clip, args.mtp_optimizer_state, args.occ_first_update,
             self.optimizer, self.lr_scheduler, self.mtp_gradient_apart, self.mtp_moments) = saved

    # ------------------------------------------------------------------------------------------ the state around it
    def update_state(self) -> UpdateState:
        """A copy of everything `update_on` changes."""
        return UpdateState({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                           copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.lr_scheduler.state_dict()),
                           self.state.global_step, self._step,
                           {} if self.calibrator is None else dict(self.calibrator.ema),
                           None if self.mtp_moments is None else self.mtp_moments.state_dict())

    def restore_update_state(self, state: UpdateState) -> None:
        """Back to `state` exactly (parameters, optimizer, scheduler, counters, OCC's running average)."""
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
        self.lr_scheduler.load_state_dict(copy.deepcopy(state.scheduler))
        self.state.global_step, self._step = state.global_step, state.micro_step
        if self.calibrator is not None:
            self.calibrator.ema = dict(state.ema)
        if self.mtp_moments is not None:
            self.mtp_moments.load_state_dict(state.mtp_moments)
        if self.mtp_gradient_apart is not None:
            self.mtp_gradient_apart.clear()
        self.model.zero_grad(set_to_none=True)

    def draw_rollout(self, after_step: int, seed: int) -> list[dict]:
        """One rollout batch as the run draws it after `after_step` optimizer steps: TRL's train dataloader (its
        repeat sampler, skipped ahead by the rollouts already drawn), TRL's generation and scoring, shuffled and
        split into the `steps_per_generation` micro-batches TRL trains on."""
        from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

        args = self.args
        steps_per_rollout = max(1, args.steps_per_generation * self.num_iterations // args.gradient_accumulation_steps)
        loader = self.get_train_dataloader()
        batches = iter(loader)
        batch = None
        for _ in range(after_step // steps_per_rollout % max(len(loader), 1) + 1):
            batch = next(batches)
        torch.manual_seed(seed)
        self.model.train()
        rollout = self._generate_and_score_completions(batch)
        self._metrics["train"].clear()
        return split_tensor_dict(shuffle_sequence_dict(rollout), args.steps_per_generation)

    def load_update_state(self, checkpoint: str) -> None:
        """The optimizer, scheduler and step counter of a checkpoint directory (what `train(resume_from_checkpoint)`
        restores before its first step)."""
        self.create_optimizer_and_scheduler(num_training_steps=self.args.max_steps)
        self._load_optimizer_and_scheduler(checkpoint)
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            self.state.global_step = int(json.load(f)["global_step"])
