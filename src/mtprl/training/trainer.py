"""`MTPGRPOTrainer`: TRL's GRPOTrainer with jointly trained MTP heads and OCC.

What changes against stock GRPOTrainer, and nothing else:
- one trunk forward per micro-batch gives main *and* MTP log-probs (`_get_per_token_logps_and_entropies`);
- at rollout time the old MTP log-probs come out of the very forward that gave TRL its old main log-probs
  (`_generate_and_score_completions`) and travel in the batch (`old_mtp_logps`) through TRL's shuffle and split;
- `_compute_loss` adds the MTP term of the chosen regime to TRL's own loss, untouched (`mtp_step.mtp_step`);
- rollouts can be drafted by the live heads (`_generate_single_turn`, `mtprl.generation.rollout`);
- checkpoints keep the heads in their own files (`mtprl.model.checkpoints.MTPCheckpointMixin`);
- every log line also goes to `<output_dir>/metrics.jsonl` (`mtprl.io.callbacks`).

A micro-batch from rollout to loss, by the calls that carry it: `_generate_and_score_completions` (TRL's rollout;
the heads' old log-probs from the same forward) -> `_compute_loss`: `_mtp_forward` (one trunk forward: main and head
log-probs, returned) -> TRL's own `_compute_loss` on that forward's main log-probs (`trl_compat.serving_logprobs`)
-> `mtp_step.mtp_step` (head data -> proxies -> each head's loss and coefficient -> the summed loss, as a
`StepResult`) -> the loss TRL backpropagates; the trainer logs the result's metrics and, after the backward, runs
its `after_backward` (occ exact: `training_step` -> `finish_backward`).

At rollout TRL computes the old main log-probs inside its own method and hands back only those: the MTP forward
run there is recorded (`RolloutForwards`) and the one whose main log-probs TRL kept as `old_per_token_logps` is
taken (found by identity, so a reference-model forward through the same PEFT model cannot be mistaken for it).
A missing forward is an error, never a silent fall-back to plain GRPO.

`update_on` (`mtprl.training.update.UpdateMixin`) runs one rollout's updates with the run's optimizer, scheduler, clip and
accumulation, for a given MTP term and coefficient: the gain probe's update.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from contextlib import nullcontext

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import get_config_model_id

from ..core.calibration import CalibrationSettings, LambdaCalibrator, adam_preconditioner
from ..io.callbacks import MetricsJsonlCallback
from ..model.checkpoints import MTPCheckpointMixin, attach_or_load_heads
from ..model.lora import heads_back_on, heads_off_for_peft
from .config import MTPGRPOConfig
from ..model.logprobs import LogProbs, add_mtp_forward, head_logprobs
from ..model.mtp import decoder_of, freeze_heads, last_layer_params
from .mtp_step import StepSettings, mtp_step
from ..core.objectives import LOSS_TYPES
from ..core.regimes import LossScaling, regime_for
from ..generation.rollout import draft_vocab_of, drafted_generate, make_draft_policy
from .runs import ConsistentLogOnResume
from ..generation.speculative import logits_warpers
from ..generation.vllm_engine import DRAFT_LAYOUT, make_vllm_generation, spec_counters, spec_metrics
from ..core.split_backward import TrunkCut
from .rewards import safe_reward
from .trl_compat import give_reference_the_heads, serving_logprobs, trl_head_loss
from .update import ActiveTerm, UpdateMixin
from .optimizer_step import OptimizerStepMixin


def _sequences(inputs):
    """(input_ids, attention_mask) of prompt + completion, as TRL's loss forward builds them."""
    return (torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1))


class RolloutForwards:
    """The MTP forwards run inside TRL's rollout call, so the caller can take the one TRL kept (see module doc)."""

    def __init__(self):
        self.forwards: list[LogProbs] = []

    def whose_main_is(self, main: torch.Tensor) -> LogProbs | None:
        """The forward whose main log-probs are this very tensor (identity, not equal values)."""
        return next((lp for lp in self.forwards if lp.main is main), None)


# The inputs of TRL's loss forward that text-only MTP heads cannot take (TRL passes them when present).
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def sharded_gradient_refusal(args, regime, *, fsdp: bool) -> str | None:
    """Under FSDP every `.grad` is a local shard (a DTensor). The statistics themselves are shard-correct
    (`shard_stats.global_dot`: local-shard sums all-reduced over the shard group; tests/multiproc/fsdp_stats.py),
    so what reads `.grad` alone runs: the separate clip where the heads see the trunk detached (by parameter group)
    and the log-prob lambda sources. The settings that take gradients with `torch.autograd.grad` over the sharded
    parameters (the exact and last-layers lambdas, the fidelity table, the kept-apart MTP gradient of the separate
    clip and moments on a joint regime) go through FSDP2's all-gather backward, whose reduction across ranks that
    hold different batches is untested here: they are refused with what to use instead."""
    if not fsdp:
        return None
    reads = []
    if regime is not None and regime.lambda_source in ("exact", "last_layers"):
        reads.append(f"occ_variant={args.occ_variant}")
    if args.occ_fidelity_every > 0:
        reads.append("occ_fidelity_every > 0")
    detached = regime is not None and regime.mtp_grad == "detach"
    if args.mtp_grad_clip == "separate" and not detached:
        reads.append("mtp_grad_clip=separate")
    if args.mtp_optimizer_state == "separate":
        reads.append("mtp_optimizer_state=separate")
    if not reads:
        return None
    return (f"{', '.join(reads)}: under FSDP these settings take the MTP gradient with torch.autograd.grad over the "
            "sharded parameters (an extra backward through FSDP2's all-gather), which mtprl has not verified across "
            "ranks with different batches (the lambda could be silently wrong on every rank); use occ_variant "
            "paper, ema or hidden (log-probability proxies, all-reduced), occ_fidelity_every 0, the shared moments "
            "and the shared clip (or the separate clip with a detached regime), or DDP")


class MTPGRPOTrainer(UpdateMixin, OptimizerStepMixin, ConsistentLogOnResume, MTPCheckpointMixin, GRPOTrainer):
    """GRPOTrainer whose model carries MTP heads trained under `args.mtp_regime` (see MTPGRPOConfig)."""

    def __init__(self, model, reward_funcs=None, args: MTPGRPOConfig | None = None, **kwargs):
        if args is None:  # TRL's default output directory
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MTPGRPOConfig(f"{name.split('/')[-1]}-GRPO")
        elif not isinstance(args, MTPGRPOConfig):
            if not isinstance(args, GRPOConfig):
                raise TypeError(f"args must be a GRPOConfig or MTPGRPOConfig, got {type(args).__name__}")
            args = MTPGRPOConfig.from_grpo_config(args)
        # A reward function that raises scores 0 for the samples it fails on (sync or async), unless it fails on
        # every sample of a batch or reward_failure=raise (`scoring.FailurePolicy`). None: no reward functions
        # (environment-owned rewards), as TRL allows; TRL checks the source.
        if reward_funcs is not None:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs = [safe_reward(f, args.reward_failure) if callable(f) and not isinstance(f, torch.nn.Module)
                            else f
                            for f in funcs]
        heads = heads_off_for_peft(model, kwargs.get("peft_config"))  # LoRA must neither match nor freeze them
        # use_vllm with heads: TRL would build its engine from model.name_or_path and sync every parameter name
        # (the heads' too) with a call the CPU backend refuses; mtprl builds its own below (`vllm_engine`)
        own_vllm = args.use_vllm and args.vllm_mode == "colocate"
        args.use_vllm = args.use_vllm and not own_vllm
        try:
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        finally:
            args.use_vllm = args.use_vllm or own_vllm
            if getattr(self, "args", None) is not None:  # transformers keeps its own copy of the arguments
                self.args.use_vllm = args.use_vllm
        heads_back_on(self.accelerator.unwrap_model(self.model), heads)
        if args.mtp_regime == "frozen":  # the heads draft, never train (frozen before TRL builds the optimizer)
            unwrapped = self.accelerator.unwrap_model(self.model)
            freeze_heads(attach_or_load_heads(unwrapped, args.mtp_num_heads, args.mtp_init,
                                              unwrapped.config._name_or_path, layout=self._head_layout()))
        self.add_callback(MetricsJsonlCallback(args.output_dir))
        # The one source of the active regime: the MTP term the loss adds and the optimizer step treats (regime None:
        # plain GRPO). The run's own; `update_on` swaps it for another (`using_term`).
        self.term = ActiveTerm(regime_for(args.mtp_regime, args.occ_variant), args.mtp_coef, args.occ_fidelity_every)
        self._rollout_forwards: RolloutForwards | None = None  # open while TRL's rollout runs
        self._after_backward: list = []  # the last MTP steps' `StepResult.after_backward`, run by finish_backward
        self._draft_policy = (make_draft_policy(args.mtp_draft_policy, args.mtp_draft_tokens,
                                                args.mtp_draft_vocab_size, self.accelerator.unwrap_model(self.model))
                              if args.mtp_draft_tokens and not own_vllm else None)  # on vLLM, vLLM drafts
        # the latest training step's mtp/accept/k per depth, handed to the draft policy at the next rollout
        self._latest_acceptance: list[float | None] = [None] * args.mtp_num_heads
        # mtp/accept/k under the rollouts' own law (temperature, top-k, top-p), the one the drafts are verified in
        self._accept_truncation = logits_warpers(1.0, args.top_k, args.top_p)
        self.head_loss = self._resolve_head_loss()  # mtp_head_loss with `auto` decided
        self.calibrator: LambdaCalibrator | None = None if self.term.regime is None else self._attach_heads()
        self._init_geometry()  # the instrumented optimizer step, the separate clip and moments (update_geometry)
        self._warn_about_settings()
        if own_vllm:  # TRL's colocate generation on mtprl's engine: target and drafter synced every step
            self.use_vllm, self._last_loaded_step = True, -1
            self.vllm_generation = make_vllm_generation(self, args.mtp_draft_tokens,
                                                        os.path.join(args.output_dir, "vllm-model"))

    def _attach_heads(self) -> LambdaCalibrator:
        """Heads on the policy (loaded or fresh), the MTP forward, the reference model's copy; the calibrator."""
        args, unwrapped = self.args, self.accelerator.unwrap_model(self.model)
        attach_or_load_heads(unwrapped, args.mtp_num_heads, init=args.mtp_init, source=unwrapped.config._name_or_path,
                             layout=self._head_layout())
        add_mtp_forward(unwrapped, self.temperature)
        give_reference_the_heads(unwrapped, None if self.ref_model is None
                                 else self.accelerator.unwrap_model(self.ref_model))
        needs_last = self.term.regime.lambda_source == "last_layers" or args.occ_fidelity_every > 0
        return LambdaCalibrator(
            CalibrationSettings.from_config(args),
            main_params=[p for n, p in unwrapped.named_parameters()
                         if p.requires_grad and not n.startswith("mtp_heads.")],
            head_params=[p for p in unwrapped.mtp_heads.parameters() if p.requires_grad],
            last_params=last_layer_params(unwrapped, args.occ_last_layers) if needs_last else [],
            reduce=self.accelerator.reduce,  # (tensor, reduction) across data-parallel ranks
            num_processes=self.accelerator.num_processes)

    def _head_layout(self) -> str | None:
        """The native layout fresh heads are built in: `mtp_native_layout`, else MiMo's where the heads draft inside
        vLLM (what its `mtp` drafter computes), else mtprl's own (None)."""
        args = self.args
        if args.mtp_native_layout:
            return args.mtp_native_layout
        return DRAFT_LAYOUT if args.use_vllm and args.vllm_mode == "colocate" and args.mtp_draft_tokens else None

    def _occ_is_blind(self) -> bool:
        """OCC under settings where every rollout feeds exactly one optimizer step: delta_RL = 0, lambda = 0."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.mtp_regime == "occ" and self.args.gradient_accumulation_steps % generate_every == 0

    def _resolve_head_loss(self) -> str:
        if self.args.mtp_head_loss != "auto":
            return self.args.mtp_head_loss
        return "ce" if self._occ_is_blind() else "none"

    def _warn_about_settings(self) -> None:
        args = self.args
        refusal = sharded_gradient_refusal(args, self.term.regime, fsdp=self.is_fsdp_enabled)
        if refusal:
            raise ValueError(refusal)
        if args.use_liger_kernel and hasattr(self, "compute_liger_loss") and self.args.mtp_num_heads:
            # TRL versions with a fused Liger GRPO loss return it from compute_loss without calling _compute_loss,
            # so the MTP term and the heads' loss would be skipped. TRL 1.16 has none: use_liger_kernel there only
            # swaps the trunk's layer kernels (transformers' apply_liger_kernel) and the loss stays _compute_loss.
            raise ValueError("use_liger_kernel: this TRL computes the GRPO loss in Liger's fused kernel "
                             "(compute_liger_loss) without calling _compute_loss, so the MTP term would silently not "
                             "train; set use_liger_kernel: false (or mtp_num_heads: 0 for plain GRPO)")
        if self.is_deepspeed_enabled and "separate" in (args.mtp_grad_clip, args.mtp_optimizer_state):
            raise ValueError("mtp_grad_clip / mtp_optimizer_state = separate act between the backward and the "
                             "optimizer step, which DeepSpeed runs inside its backward; use DDP or FSDP, or shared")
        regime = self.term.regime
        if regime is not None and regime.lambda_source == "exact" and (
                args.fp16 or self.is_deepspeed_enabled):
            raise ValueError("occ_variant=exact adds lambda * g_MTP to the parameters' .grad after the backward; "
                             "that needs unscaled, unpartitioned gradients: not with fp16 loss scaling or DeepSpeed "
                             "(use bf16, DDP or FSDP, or occ_variant=last_layers / hidden)")
        if self._occ_is_blind() and args.mtp_head_loss == "auto":
            warnings.warn(
                f"OCC cannot see any policy change: with gradient_accumulation_steps={args.gradient_accumulation_steps}"
                f", steps_per_generation={args.steps_per_generation} and num_iterations={self.num_iterations} every "
                "rollout is used for exactly one optimizer step, so logp - logp_old = 0 and lambda = 0 throughout. "
                f"mtp_head_loss=auto chose ce: the heads learn the sampled tokens (head-only, weight "
                f"mtp_head_coef={args.mtp_head_coef}) and nothing reaches the trunk, as under detach. For OCC itself "
                "set steps_per_generation > gradient_accumulation_steps or num_iterations > 1; mtp_head_loss=none "
                "keeps OCC alone (the heads then never learn).", stacklevel=3)

    def _log_metrics(self, mode: str, metrics: dict) -> None:
        """Values (or lists of values) into TRL's per-mode metrics, averaged at the next log."""
        for name, value in metrics.items():
            self._metrics[mode][name].extend(value if isinstance(value, list) else [value])

    def _log_rollout(self, mode: str, out) -> None:
        self._log_metrics(mode, out.metrics())

    # ------------------------------------------------------------------------------------------ rollout
    def _generate_single_turn(self, *args, **kwargs):
        """TRL's generation, with the live heads drafting (`mtp_draft_tokens`): the heads trained a moment ago, in
        mtprl's sampler or inside vLLM (`use_vllm`; its acceptance counters logged as `rollout/spec_*`)."""
        if self.use_vllm and self.args.mtp_draft_tokens and self.calibrator is not None:
            llm = self.vllm_generation.llm
            before, start = spec_counters(llm), time.perf_counter()
            out = super()._generate_single_turn(*args, **kwargs)
            metrics = spec_metrics(before, spec_counters(llm), self.args.mtp_draft_tokens)
            metrics["rollout/tokens_per_s"] = sum(len(c) for c in out[0]) / max(time.perf_counter() - start, 1e-9)
            self._log_metrics("train" if self.model.training else "eval", metrics)
            return out
        if self._draft_policy is None:
            return super()._generate_single_turn(*args, **kwargs)
        self._draft_policy.observe_acceptance(self._latest_acceptance[: self.args.mtp_draft_tokens])
        self._latest_acceptance = [None] * self.args.mtp_num_heads  # each training batch's acceptance seen once
        mode = "train" if self.model.training else "eval"
        with drafted_generate(self.accelerator.unwrap_model(self.model), self._draft_policy,
                              functools.partial(self._log_rollout, mode)):
            return super()._generate_single_turn(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ forward
    def _mtp_forward(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
                     compute_aux_loss=False) -> LogProbs:
        """One trunk forward through the model's own forward (so DDP/FSDP wrappers stay in the loop): main and head
        log-probs, and what the active term needs (acceptance, divergence, trunk states)."""
        regime, grad = self.term.regime, torch.is_grad_enabled()
        request = {"logits_to_keep": logits_to_keep, "compute_entropy": compute_entropy,
                   "compute_aux_loss": compute_aux_loss,
                   "mtp_grad": regime.mtp_grad, "compute_divergence": regime.divergence,
                   "compute_accept": self.args.mtp_log_acceptance and grad,
                   "accept_truncation": self._accept_truncation,
                   "accept_draft_vocab": draft_vocab_of(self._draft_policy),
                   "return_hidden": grad and (regime.lambda_source == "hidden" or self.head_loss != "none"
                                              or self.term.fidelity_every > 0)}
        batch_size = batch_size or input_ids.size(0)
        chunks = []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                chunks.append(model(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                    mtp_logprobs=request))
        logprobs = LogProbs(**{name: None if getattr(chunks[0], name) is None else
                               torch.cat([getattr(c, name) for c in chunks], dim=0)
                               for name in ("main", "mtp", "entropy", "accept", "divergence", "mtp_mask")})
        if len(chunks) == 1:  # the very states the losses were computed from (a concatenation would be a copy)
            logprobs.hidden = chunks[0].hidden
        logprobs.aux_loss = torch.stack([c.aux_loss for c in chunks]).mean() if compute_aux_loss else None  # as TRL
        return logprobs

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        """TRL's calls outside the loss (the rollout's old log-probs): through the heads for the policy, so the
        rollout keeps the heads' old log-probs of the same forward (`RolloutForwards`)."""
        unwrapped = self.accelerator.unwrap_model(model)
        # plain GRPO, or the reference model (its copy of the heads never runs: main-head log-probs only)
        if self.calibrator is None or unwrapped is not self.accelerator.unwrap_model(self.model):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        if any(v is not None for v in kwargs.values()):
            raise NotImplementedError(f"MTP heads support text-only models (got {', '.join(kwargs)})")
        logprobs = self._mtp_forward(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                     compute_entropy, compute_aux_loss)
        if self._rollout_forwards is not None:
            self._rollout_forwards.forwards.append(logprobs)
        return logprobs.main, logprobs.entropy, logprobs.aux_loss

    def _generate_and_score_completions(self, inputs):
        outer, self._rollout_forwards = self._rollout_forwards, RolloutForwards()
        try:
            output = super()._generate_and_score_completions(inputs)
            forwards = self._rollout_forwards
        finally:
            self._rollout_forwards = outer
        old_main = output.get("old_per_token_logps")
        if self.calibrator is not None and old_main is not None:
            rollout = forwards.whose_main_is(old_main)
            if rollout is None:
                raise RuntimeError(
                    f"mtp_regime={self.args.mtp_regime!r}: TRL's old_per_token_logps did not come from a forward "
                    "through the MTP heads, so the heads have no rollout-time log-probs for their ratio and for OCC")
            output["old_mtp_logps"] = rollout.mtp  # same forward as TRL's old main log-probs
        return output

    # ------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        if self.term.regime is None:
            return super()._compute_loss(model, inputs)
        given = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
        if given:
            raise NotImplementedError(f"MTP heads support text-only models (got {', '.join(given)})")
        input_ids, attention_mask = _sequences(inputs)
        with self._trunk_cut() as cut:
            logprobs = self._mtp_forward(model, input_ids, attention_mask, inputs["completion_ids"].size(1),
                                         compute_entropy=True, compute_aux_loss=self.aux_loss_enabled)
        with serving_logprobs(self, logprobs.main, logprobs.entropy, logprobs.aux_loss):
            rl_loss = super()._compute_loss(model, inputs)  # TRL's own loss, on that forward's main log-probs
        settings = self._step_settings()
        preconditioner = (adam_preconditioner(self.optimizer, self.calibrator.main_params)
                          if settings.fidelity and settings.training and self.optimizer is not None else None)
        result = mtp_step(rl_loss, logprobs, inputs, settings, self.loss_scaling(inputs), self.calibrator,
                          rerun_heads=functools.partial(self._rerun_heads, logprobs, inputs), cut=cut,
                          preconditioner=preconditioner)
        if self.model.training:  # OCC's lambda per position within the rollout (the first sees no change yet)
            position = self._rollout_position()
            result.metrics.update({f"mtp/lambda_pos{position}/{k[len('mtp/lambda/'):]}": v
                                   for k, v in list(result.metrics.items()) if k.startswith("mtp/lambda/")})
        self._log_metrics("train" if self.model.training else "eval", result.metrics)
        if self.model.training:  # what the draft policy sees at the next rollout
            self._latest_acceptance = [new if new is not None else old
                                       for new, old in zip(result.acceptance, self._latest_acceptance)]
        if result.after_backward is not None:
            self._after_backward.append(result.after_backward)
        if result.mtp_gradient is not None:  # kept off .grad until the optimizer step (update_geometry)
            self.mtp_gradient_apart.add(*result.mtp_gradient)
        return result.loss

    def _step_settings(self) -> StepSettings:
        term = self.term
        apart = self.mtp_gradient_apart
        training = self.model.training and torch.is_grad_enabled()
        # transformers sets current_gradient_accumulation_steps inside its training loop only: evaluating before the
        # first step (eval_on_start, trainer.evaluate()) has none, and TRL itself uses 1 outside training
        return StepSettings(term.regime, term.coef, self.head_loss, self.args.mtp_head_coef,
                            self.current_gradient_accumulation_steps if training else 1,
                            training=training,
                            fidelity=self._fidelity_step(), keep_apart=apart is not None,
                            unit_gradient=apart is not None and apart.with_unit,
                            first_update=self.args.occ_first_update if self._rollout_position() == 0 else None)

    def _rollout_position(self) -> int:
        """This micro-batch's index among the updates of its rollout (TRL draws a rollout every
        steps_per_generation x num_iterations micro-steps)."""
        return self._step % (self.args.steps_per_generation * self.num_iterations)

    def loss_scaling(self, inputs) -> LossScaling:
        """TRL's loss settings and gradient-accumulation scaling for this micro-batch, as numbers (the heads'
        policy loss is then what TRL's `_compute_loss` computes for those log-probs); the loss types
        `objectives.policy_loss` does not implement go through TRL's own code (`trl_compat.trl_head_loss`)."""
        args, train = self.args, self.model.training
        normalizer = None
        if args.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                normalizer = normalizer * self.current_gradient_accumulation_steps / args.steps_per_generation
        return LossScaling(args.loss_type, args.importance_sampling_level, self.epsilon_low, self.epsilon_high,
                           args.delta, args.max_completion_length, normalizer,
                           self.current_gradient_accumulation_steps if train else 1,
                           None if args.loss_type in LOSS_TYPES else functools.partial(trl_head_loss, self, inputs))

    def _rerun_heads(self, logprobs, inputs, mtp_grad, compute_divergence):
        """The heads re-run on this forward's trunk states (`mtp_grad`: joint or detach)."""
        input_ids, attention_mask = _sequences(inputs)
        with self.accelerator.autocast():
            return head_logprobs(self.accelerator.unwrap_model(self.model), logprobs.hidden, input_ids,
                                 attention_mask, inputs["completion_ids"].size(1), self.temperature, mtp_grad,
                                 compute_divergence=compute_divergence)

    def _trunk_cut(self):
        """occ last_layers on a training micro-batch: cut the graph at the input of the last `occ_last_layers`
        layers for the loss forward (`split_backward.TrunkCut`). Uncut, and lambda then by the gradient path
        (`mtp_step.COMBINE["last_layers"]`), where the whole trunk's gradient is needed: fidelity steps (the other
        lambda sources) and an MTP gradient kept apart (the probe's counterfactual settings only: a run refuses
        last_layers with the separate clip or moments, `MTPGRPOConfig`)."""
        regime = self.term.regime
        if (regime is None or regime.lambda_source != "last_layers" or not self.model.training
                or not torch.is_grad_enabled() or self._fidelity_step() or self.mtp_gradient_apart is not None):
            return nullcontext()
        decoder = decoder_of(self.accelerator.unwrap_model(self.model))
        return TrunkCut(decoder.layers[-self.args.occ_last_layers])

    def _fidelity_step(self) -> bool:
        every = self.term.fidelity_every
        return every > 0 and self.model.training and self.state.global_step % every == 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.finish_backward()
        return loss

    def finish_backward(self) -> None:
        """Run what the MTP steps since the last backward returned to run after it (occ exact: lambda from TRL's
        gradient, lambda * g_MTP added to .grad) and log its metrics. `training_step` calls it; call it yourself
        after `compute_loss(...).backward()` outside TRL's loop."""
        pending, self._after_backward = self._after_backward, []
        for after_backward in pending:
            self._log_metrics("train", after_backward(into=self.mtp_gradient_apart))
