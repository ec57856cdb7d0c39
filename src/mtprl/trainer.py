"""`MTPGRPOTrainer`: TRL's GRPOTrainer with jointly trained MTP heads and OCC.

What changes against stock GRPOTrainer, and nothing else:
- one trunk forward per micro-batch gives main *and* MTP log-probs (`_get_per_token_logps_and_entropies`);
- at rollout time the old MTP log-probs come out of the very forward that gave TRL its old main log-probs
  (`_generate_and_score_completions`) and travel in the batch (`old_mtp_logps`) through TRL's shuffle and split;
- `_compute_loss` adds the MTP term of the chosen regime to TRL's own loss, untouched (`_loss_with_mtp_term`);
- rollouts can be drafted by the live heads (`_generate_single_turn`, `mtprl.rollout`);
- checkpoints keep the heads in their own files (`mtprl.checkpoints.MTPCheckpointMixin`);
- every log line also goes to `<output_dir>/metrics.jsonl` (`mtprl.callbacks`).

A micro-batch from rollout to loss, by the calls that carry it: `_generate_and_score_completions` (TRL's rollout;
the heads' old log-probs from the same forward) -> `_compute_loss` (TRL's loss; the ledger hands over the forward
it ran) -> `_loss_with_mtp_term`: `regimes.head_data` (each head's plain tensors) -> `LambdaCalibrator.proxies`
(c_hat, v2_hat of Eq. 12) -> `_head_terms` (the regime's pure loss, `regimes.MTP_TERMS`; its coefficient from
`LambdaCalibrator.coefficient`, whose formula is `occ.lambda_from_stats`) -> `regimes.weighted_sum` -> the loss TRL
backpropagates. Under `occ_variant=exact` the coefficient is set after TRL's backward (`training_step` ->
`LambdaCalibrator.after_backward`); under `last_layers` the graph is cut below the last layers and one combined
loss is returned (`mtprl.split_backward`).

How a micro-batch's log-probs reach the loss: TRL calls `_get_per_token_logps_and_entropies` from inside its
own methods and only hands back the main log-probs. Each of our two entry points (`_generate_and_score_completions`,
`_compute_loss`) therefore opens a `ForwardLedger` around TRL's call; every MTP forward run inside it is written
there, and after TRL returns the entry point takes the forward it needs: at rollout, the one whose main log-probs
TRL kept as `old_per_token_logps` (found by identity, so a reference-model forward through the same PEFT model
cannot be mistaken for it); in the loss, the one forward TRL ran. A missing forward is an error, never a silent
fall-back to plain GRPO.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager, nullcontext

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import get_config_model_id

from .calibration import CalibrationSettings, LambdaCalibrator, RLGradients
from .callbacks import MetricsJsonlCallback
from .checkpoints import MTPCheckpointMixin, attach_or_load_heads
from .config import MTPGRPOConfig
from .logprobs import LogProbs, add_mtp_forward, head_logprobs
from .mtp import decoder_of, last_layer_params
from .objectives import HEAD_LOSS_DIVERGENCE, LOSS_TYPES, head_only_loss, masked_mean, policy_loss
from .regimes import (AFTER_BACKWARD, BY_SPLIT_BACKWARD, HeadTerm, LossScaling, Pending, head_data,
                      head_policy_loss, regime_for, weighted_sum, with_scaled_advantages)
from .rollout import draft_vocab_of, drafted_generate, make_draft_policy
from .speculative import logits_warpers
from .runs import ConsistentLogOnResume
from .split_backward import TrunkCut, split_backward_loss
from .tasks import safe_reward
from .trl_compat import give_reference_the_heads, trl_head_loss


def _token_mask(inputs) -> torch.Tensor:
    """The completion tokens TRL's loss counts (tool output excluded)."""
    return inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]


def _sequences(inputs):
    """(input_ids, attention_mask) of prompt + completion, as TRL's loss forward builds them."""
    return (torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1))


class ForwardLedger:
    """The MTP forwards run inside one TRL call, so the caller can take the one TRL used (see module doc)."""

    def __init__(self):
        self.forwards: list[LogProbs] = []

    def whose_main_is(self, main: torch.Tensor) -> LogProbs | None:
        """The forward whose main log-probs are this very tensor (identity, not equal values)."""
        return next((lp for lp in self.forwards if lp.main is main), None)

    def only(self, where: str, regime: str) -> LogProbs:
        if len(self.forwards) != 1:
            raise RuntimeError(
                f"mtp_regime={regime!r}: {where} ran {len(self.forwards)} forwards through the model's MTP heads "
                "where exactly one was expected, so the head log-probs for the MTP loss are "
                f"{'missing' if not self.forwards else 'ambiguous'}. TRL's GRPOTrainer no longer computes the "
                "policy log-probs through `_get_per_token_logps_and_entropies` as trl==1.16 does; without them "
                "the run would silently train as plain GRPO.")
        return self.forwards[0]



class MTPGRPOTrainer(ConsistentLogOnResume, MTPCheckpointMixin, GRPOTrainer):
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
        # every sample of a batch or reward_failure=raise (`tasks.FailurePolicy`). None: no reward functions
        # (environment-owned rewards), as TRL allows; TRL checks the source.
        if reward_funcs is not None:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs = [safe_reward(f, args.reward_failure) if callable(f) and not isinstance(f, torch.nn.Module)
                            else f
                            for f in funcs]
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.add_callback(MetricsJsonlCallback(args.output_dir))
        self.regime = regime_for(args.mtp_regime, args.occ_variant)  # None: plain GRPO
        self._ledger: ForwardLedger | None = None  # open while one of TRL's calls runs (`_recording_forwards`)
        self._draft_policy = (make_draft_policy(args.mtp_draft_policy, args.mtp_draft_tokens,
                                                args.mtp_draft_vocab_size, self.accelerator.unwrap_model(self.model))
                              if args.mtp_draft_tokens else None)
        self._acceptance: list[float | None] = [None] * args.mtp_num_heads  # since the last rollout, per depth
        # mtp/accept/k under the rollouts' own law (temperature, top-k, top-p), the one the drafts are verified in
        self._accept_truncation = logits_warpers(1.0, args.top_k, args.top_p)
        self.head_loss = self._resolve_head_loss()  # mtp_head_loss with `auto` decided
        self.calibrator: LambdaCalibrator | None = None if self.regime is None else self._attach_heads()
        self._warn_about_settings()

    def _attach_heads(self) -> LambdaCalibrator:
        """Heads on the policy (loaded or fresh), the MTP forward, the reference model's copy; the calibrator."""
        args, unwrapped = self.args, self.accelerator.unwrap_model(self.model)
        attach_or_load_heads(unwrapped, args.mtp_num_heads, init=args.mtp_init, source=unwrapped.config._name_or_path)
        add_mtp_forward(unwrapped, self.temperature)
        give_reference_the_heads(unwrapped, None if self.ref_model is None
                                 else self.accelerator.unwrap_model(self.ref_model))
        needs_last = self.regime.lambda_source == "last_layers" or args.occ_fidelity_every > 0
        return LambdaCalibrator(
            CalibrationSettings.from_config(args),
            main_params=[p for n, p in unwrapped.named_parameters()
                         if p.requires_grad and not n.startswith("mtp_heads.")],
            head_params=[p for p in unwrapped.mtp_heads.parameters() if p.requires_grad],
            last_params=last_layer_params(unwrapped, args.occ_last_layers) if needs_last else [],
            reduce=self.accelerator.reduce,  # (tensor, reduction) across data-parallel ranks
            num_processes=self.accelerator.num_processes)

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
        if self.regime is not None and self.regime.lambda_source == "exact" and (
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
        """TRL's generation, with the live heads drafting (`mtp_draft_tokens`): the heads trained a moment ago."""
        if self._draft_policy is None:
            return super()._generate_single_turn(*args, **kwargs)
        self._draft_policy.observe_acceptance(self._acceptance[: self.args.mtp_draft_tokens])
        self._acceptance = [None] * self.args.mtp_num_heads  # each training batch's acceptance is observed once
        mode = "train" if self.model.training else "eval"
        with drafted_generate(self.accelerator.unwrap_model(self.model), self._draft_policy,
                              functools.partial(self._log_rollout, mode)):
            return super()._generate_single_turn(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ forward
    @contextmanager
    def _recording_forwards(self):
        """Open a ledger for the MTP forwards run inside one TRL call (see `ForwardLedger`)."""
        outer, self._ledger = self._ledger, ForwardLedger()
        try:
            yield self._ledger
        finally:
            self._ledger = outer

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        unwrapped = self.accelerator.unwrap_model(model)
        # plain GRPO, or the reference model (its copy of the heads never runs: main-head log-probs only)
        if self.regime is None or unwrapped is not self.accelerator.unwrap_model(self.model):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        if any(v is not None for v in kwargs.values()):
            raise NotImplementedError(f"MTP heads support text-only models (got {', '.join(kwargs)})")
        request = {"logits_to_keep": logits_to_keep, "compute_entropy": compute_entropy,
                   "compute_aux_loss": compute_aux_loss,
                   "mtp_grad": self.regime.mtp_grad, "compute_distill": self.regime.needs_distill,
                   "compute_accept": self.args.mtp_log_acceptance and torch.is_grad_enabled(),
                   "accept_truncation": self._accept_truncation,
                   "accept_draft_vocab": draft_vocab_of(self._draft_policy),
                   "return_hidden": torch.is_grad_enabled() and (self.regime.lambda_source == "hidden"
                                                                 or self.head_loss != "none"
                                                                 or self.args.occ_fidelity_every > 0)}
        batch_size = batch_size or input_ids.size(0)
        chunks = []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                chunks.append(model(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                    mtp_logprobs=request))
        logprobs = LogProbs(**{name: None if getattr(chunks[0], name) is None else
                               torch.cat([getattr(c, name) for c in chunks], dim=0)
                               for name in ("main", "mtp", "entropy", "accept", "distill", "mtp_mask")})
        if len(chunks) == 1:  # the very states the losses were computed from (a concatenation would be a copy)
            logprobs.hidden = chunks[0].hidden
        if self._ledger is not None:
            self._ledger.forwards.append(logprobs)
        aux_loss = torch.stack([c.aux_loss for c in chunks]).mean() if compute_aux_loss else None  # as TRL
        return logprobs.main, logprobs.entropy, aux_loss

    def _generate_and_score_completions(self, inputs):
        with self._recording_forwards() as ledger:
            output = super()._generate_and_score_completions(inputs)
        old_main = output.get("old_per_token_logps")
        if self.regime is not None and old_main is not None:
            rollout = ledger.whose_main_is(old_main)
            if rollout is None:
                raise RuntimeError(
                    f"mtp_regime={self.args.mtp_regime!r}: TRL's old_per_token_logps did not come from a forward "
                    "through the MTP heads, so the heads have no rollout-time log-probs for their ratio and for OCC")
            output["old_mtp_logps"] = rollout.mtp  # same forward as TRL's old main log-probs
        return output

    # ------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        with self._recording_forwards() as ledger, self._trunk_cut() as cut:
            rl_loss = super()._compute_loss(model, inputs)  # TRL's own loss, untouched
        if self.regime is None:
            return rl_loss
        logprobs = ledger.only("TRL's _compute_loss", self.args.mtp_regime)
        loss, metrics = self._loss_with_mtp_term(rl_loss, logprobs, inputs, cut)
        mode = "train" if self.model.training else "eval"
        self._log_metrics(mode, metrics)
        self._log_metrics(mode, self.calibrator.pop_metrics())
        return loss

    def _loss_with_mtp_term(self, rl_loss, logprobs: LogProbs, inputs, cut: TrunkCut | None = None):
        """TRL's loss plus the regime's MTP term for this micro-batch (summed over heads), and its metrics.
        `cut`: the graph was cut below the last layers (occ last_layers, see `_trunk_cut`)."""
        regime, calibrator = self.regime, self.calibrator
        training = self.model.training and torch.is_grad_enabled()
        old_main = inputs.get("old_per_token_logps")
        old_main = logprobs.main.detach() if old_main is None else old_main
        heads = head_data(logprobs.main, logprobs.mtp, old_main, inputs.get("old_mtp_logps"), _token_mask(inputs),
                          inputs["advantages"], regime.ratio_against, logprobs.mtp_mask, logprobs.distill)
        # Logged for every regime: the proxies are how the regimes differ.
        stats = calibrator.proxies((logprobs.main - old_main).detach(), heads, regime.proxy_reduction)
        if training:
            calibrator.update_ema(heads, stats)
        grads = RLGradients(rl_loss, logprobs.hidden) if training else None
        terms = self._head_terms(heads, stats, inputs, grads, cut is not None)
        metrics = (self._fidelity_metrics(heads, terms, logprobs, inputs, grads)
                   if training and self._fidelity_step() else {})
        metrics.update(self._term_metrics(heads, stats, terms, logprobs))
        total = weighted_sum(terms, rl_loss)
        if self.head_loss != "none" and training:  # the heads always learn, whatever reaches the trunk
            head_losses = self._head_only_losses(logprobs, inputs)
            total = total + self.args.mtp_head_coef * head_losses.mean() / self.current_gradient_accumulation_steps
            metrics.update({f"mtp/head_loss/{k}": v for k, v in enumerate(head_losses.tolist(), start=1)})
        if any(t.coef is AFTER_BACKWARD for t in terms):  # keep the heads in this backward's graph (DDP's check)
            total = total + sum(p.sum() for p in calibrator.head_params) * 0.0
        split = [(h.depth, t.loss) for h, t in zip(heads, terms) if t.coef is BY_SPLIT_BACKWARD]
        if not split:
            return rl_loss + total, metrics
        loss, lambdas = split_backward_loss(rl_loss + total, [loss for _, loss in split],
                                            calibrator.main_params + calibrator.head_params, cut.pairs,
                                            calibrator.split_lambda_of([depth for depth, _ in split]))
        metrics.update({f"mtp/lambda/{depth}": lam.item() for (depth, _), lam in zip(split, lambdas)})
        return loss, metrics

    def _head_terms(self, heads, stats, inputs, grads: RLGradients | None, cut: bool) -> list[HeadTerm]:
        """Each head's loss (the regime's pure function) and its coefficient (mtp_coef or the calibrator's lambda)."""
        regime, scaling = self.regime, self._loss_scaling(inputs)
        terms = []
        for h, s in zip(heads, stats):
            if regime.lambda_in_advantages:  # the released code: lambda known before the loss, inside it
                lam = self.calibrator.advantage_lambda(regime, s, h.depth, len(heads))
                terms.append(HeadTerm(regime.loss(with_scaled_advantages(h, lam), scaling), lam, coef_in_loss=True))
                continue
            loss = regime.loss(h, scaling)
            terms.append(HeadTerm(loss, self.calibrator.coefficient(regime, h.depth, s, loss, self.args.mtp_coef,
                                                                    grads, cut)))
        return terms

    def _term_metrics(self, heads, stats, terms, logprobs) -> dict:
        """mtp/lambda/k (where known now), the proxies, the head's loss and its expected acceptance."""
        metrics = {}
        for h, s, term in zip(heads, stats, terms):
            depth = h.depth
            if not isinstance(term.coef, Pending):
                metrics[f"mtp/lambda/{depth}"] = float(term.coef)
            metrics[f"mtp/c_hat/{depth}"] = s.c_hat.item()
            metrics[f"mtp/v2_hat/{depth}"] = s.v2_hat.item()
            metrics[f"mtp/loss/{depth}"] = term.loss.item()
            if logprobs.accept is not None:
                sums = self.accelerator.reduce(torch.stack([(logprobs.accept[:, depth - 1] * h.mask).sum(),
                                                            h.mask.sum().float()]), reduction="sum")
                metrics[f"mtp/accept/{depth}"] = (sums[0] / sums[1].clamp(min=1.0)).item()
                if self.model.training:  # what the adaptive draft policy sees at the next rollout
                    self._acceptance[depth - 1] = metrics[f"mtp/accept/{depth}"]
        return metrics

    def _fidelity_metrics(self, heads, terms, logprobs, inputs, grads: RLGradients) -> dict:
        """Every lambda source's c and v2 for each head's loss with coefficient 1 (the released code's lambda sits
        inside its loss: recomputed without it; detached regimes: recomputed on the live trunk, so that c and v2
        are over the main model's parameters as for the joint regimes)."""
        if self.regime.mtp_grad == "detach":
            losses = self._joint_head_losses(logprobs, inputs)
        else:
            scaling = self._loss_scaling(inputs)
            losses = [head_policy_loss(h, scaling) if t.coef_in_loss else t.loss for h, t in zip(heads, terms)]
        with_exact = not any(t.coef is AFTER_BACKWARD for t in terms)  # else exact comes from after_backward
        return self.calibrator.fidelity([h.depth for h in heads], losses, grads, with_exact)

    def _loss_scaling(self, inputs) -> LossScaling:
        return LossScaling(functools.partial(self._policy_loss, inputs=inputs), self._token_mean)

    def _policy_loss(self, logps, old_logps, advantages, mask, inputs):
        """objectives.policy_loss scaled exactly as TRL scales its own loss for gradient accumulation; the loss
        types it does not implement (cispo, sapo, luspo, vespo, any newer one) through TRL's own code path."""
        args, train = self.args, self.model.training
        if args.loss_type not in LOSS_TYPES:
            return trl_head_loss(self, logps, old_logps, advantages, mask, inputs)
        normalizer = None
        if args.loss_type == "dapo":
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                normalizer = normalizer * self.current_gradient_accumulation_steps / args.steps_per_generation
        loss = policy_loss(logps, old_logps, advantages, mask, loss_type=args.loss_type,
                           importance_sampling_level=args.importance_sampling_level, epsilon_low=self.epsilon_low,
                           epsilon_high=self.epsilon_high, normalizer=normalizer,
                           max_completion_length=args.max_completion_length, delta=args.delta)
        if args.loss_type != "dapo" and train:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def _token_mean(self, per_token_loss, mask):
        """Masked mean over completion tokens, scaled for gradient accumulation like TRL's per-micro-batch means."""
        loss = masked_mean(per_token_loss, mask)
        return loss / self.current_gradient_accumulation_steps if self.model.training else loss

    def _head_logprobs(self, logprobs, inputs, mtp_grad, compute_distill):
        """The heads re-run on this forward's trunk states (`mtp_grad`: joint or detach)."""
        input_ids, attention_mask = _sequences(inputs)
        with self.accelerator.autocast():
            return head_logprobs(self.accelerator.unwrap_model(self.model), logprobs.hidden, input_ids,
                                 attention_mask, inputs["completion_ids"].size(1), self.temperature, mtp_grad,
                                 compute_distill=compute_distill)

    def _joint_head_losses(self, logprobs, inputs):
        """For detached regimes (detach, distill) on a fidelity step: their head losses recomputed on the live
        trunk."""
        mtp, _, distill, _ = self._head_logprobs(logprobs, inputs, "joint", self.regime.needs_distill)
        old_main = inputs.get("old_per_token_logps")
        heads = head_data(logprobs.main, mtp, old_main, inputs.get("old_mtp_logps"), _token_mask(inputs),
                          inputs["advantages"], self.regime.ratio_against, logprobs.mtp_mask, distill)
        scaling = self._loss_scaling(inputs)
        return [self.regime.loss(h, scaling) for h in heads]

    def _head_only_losses(self, logprobs, inputs):
        """`mtp_head_loss` per head [K]: the heads re-run on the trunk's states, embeddings and LM head detached
        (their gradient reaches the heads' own parameters only)."""
        kind = self.head_loss
        mtp, _, distill, context = self._head_logprobs(logprobs, inputs, "detach",
                                                       HEAD_LOSS_DIVERGENCE.get(kind, False))
        token_mask = _token_mask(inputs)
        return head_only_loss(kind, mtp, distill, token_mask.unsqueeze(1) * context.to(token_mask.dtype))

    def _trunk_cut(self):
        """occ last_layers on a training micro-batch: cut the graph at the input of the last `occ_last_layers`
        layers for the loss forward (`split_backward.TrunkCut`). Not on fidelity steps: those need gradients
        through the whole trunk for the other lambda sources."""
        if (self.regime is None or self.regime.lambda_source != "last_layers" or not self.model.training
                or not torch.is_grad_enabled() or self._fidelity_step()):
            return nullcontext()
        decoder = decoder_of(self.accelerator.unwrap_model(self.model))
        return TrunkCut(decoder.layers[-self.args.occ_last_layers])

    def _fidelity_step(self) -> bool:
        every = self.args.occ_fidelity_every
        return every > 0 and self.model.training and self.state.global_step % every == 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._after_backward()
        return loss

    def _after_backward(self) -> None:
        """occ exact: lambda from TRL's gradient, and lambda * g_MTP added to .grad (`LambdaCalibrator`)."""
        if self.calibrator is not None:
            self.calibrator.after_backward()
            self._log_metrics("train", self.calibrator.pop_metrics())
