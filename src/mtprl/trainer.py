"""`MTPGRPOTrainer`: TRL's GRPOTrainer with jointly trained MTP heads and OCC.

What changes against stock GRPOTrainer, and nothing else:
- one trunk forward per micro-batch gives main *and* MTP log-probs (`_get_per_token_logps_and_entropies`);
- at rollout time the old MTP log-probs come out of the very forward that gave TRL its old main log-probs
  (`_generate_and_score_completions`) and travel in the batch (`old_mtp_logps`) through TRL's shuffle and split;
- `_compute_loss` adds the MTP term of the chosen regime (`mtprl.regimes`) to TRL's own loss, untouched;
  under `occ_variant=exact` the MTP term is backpropagated on its own (stashed) and added, times lambda, after
  TRL's backward (`training_step` -> `_after_backward`): one extra backward pass, not two; under
  `occ_variant=last_layers` the graph is cut below the last layers and TRL backpropagates one combined loss
  (`mtprl.split_backward`);
- checkpoints keep the heads in their own files (`mtprl.checkpoints.MTPCheckpointMixin`);
- every log line also goes to `<output_dir>/metrics.jsonl`.

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
import math
import os
import types
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, dataclass, field, fields

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.utils import get_config_model_id

from .checkpoints import MTPCheckpointMixin, attach_or_load_heads
from .faults import kill_point
from .jsonl import append_jsonl, read_jsonl
from .logprobs import LogProbs, forward_logprobs, head_logprobs
from .mtp import INIT_CHOICES, decoder_of, last_layer_params
from .objectives import HEAD_LOSSES, LOSS_TYPES, head_only_loss, masked_mean, mtp_ce_loss, policy_loss
from .occ import (OCCStats, ema_statistics, gradient_statistics, lambda_from_stats, loss_gradients,
                  occ_statistics)
from .regimes import GRADIENT_SOURCES, OCC_VARIANTS, REGIMES, HeadBatch, regime_for
from .rollout import DRAFT_POLICIES, drafted_generate, make_draft_policy
from .split_backward import TrunkCut, split_backward_loss
from .tasks import safe_reward
from .trl_compat import TRL_LOSS_TYPES, give_reference_the_heads, trl_head_loss


@dataclass
class MTPGRPOConfig(GRPOConfig):
    """GRPOConfig plus the MTP/OCC fields. Invalid values fail here, naming the field."""

    mtp_num_heads: int = field(default=1, metadata={"help": "Number of MTP depths K (heads are attached if the "
                                                            "model has none)."})
    mtp_regime: str = field(default="occ", metadata={
        "help": "How MTP heads train during RL: none (plain GRPO) | detach (CE, no gradient into the main model) | "
                "ce (CE, joint) | policy (the RL loss on each head, fixed mtp_coef) | occ (policy loss scaled by "
                "OCC's lambda) | distill (KL from the policy's own distribution, no gradient into the main model)."})
    mtp_coef: float = field(default=0.1, metadata={"help": "Fixed MTP coefficient for detach, ce, policy, distill."})
    mtp_init: str = field(default="copy_last_layer", metadata={"help": "Initialisation of freshly attached heads: "
                                                                        "copy_last_layer | random."})
    occ_variant: str = field(default="paper", metadata={
        "help": "paper: batch estimator, head ratio against the head's own old log-probs, lambda scales the head "
                "loss | reference: the released code (token estimator, ratio against the main old log-probs, "
                "lambda scales the head's advantages, lambda_plus / K) | exact: lambda from the true gradients over "
                "the main model (one extra backward) | hidden: c, v2 from gradients at the trunk's output states | "
                "last_layers: exact c, v2 over the last occ_last_layers decoder layers | ema: running average of "
                "the paper's proxies (occ_ema_beta)."})
    occ_lambda_plus: float = field(default=1.0, metadata={"help": "lambda_plus of Eq. 13 (absorbs the "
                                                                    "smoothness prefactor)."})
    occ_eps: float = field(default=1e-8, metadata={"help": "eps of Eq. 13."})
    occ_clip: bool = field(default=False, metadata={"help": "OCC-Clip (App. E): c_hat -> max(c_hat, 0)."})
    occ_last_layers: int = field(default=1, metadata={
        "help": "last_layers estimator: number of final decoder layers (plus the final norm) c and v2 are taken "
                "over."})
    occ_ema_beta: float = field(default=0.9, metadata={
        "help": "ema estimator: weight of the history in the running average of c_hat and v2_hat, per "
                "micro-batch. The average is not saved in checkpoints: a resumed run restarts it."})
    occ_fidelity_every: int = field(default=0, metadata={
        "help": "Every N optimizer steps also compute, on the same micro-batch, the exact c and v2 and every "
                "estimator's (hidden, last_layers, ema, the proxies), for every regime that runs the heads: "
                "mtp/c_<estimator>/k, mtp/v2_<estimator>/k. 0 = never."})
    mtp_log_acceptance: bool = field(default=True, metadata={
        "help": "Log mtp/accept/k, the expected speculative acceptance sum_v min(p_main, p_head) on completion "
                "tokens (no gradient; one extra LM-head pass per head)."})
    mtp_head_loss: str = field(default="none", metadata={
        "help": "A head-only term added under every regime, its gradient stopped at the heads' inputs (trunk, "
                "embeddings and LM head detached): none | ce (the sampled tokens) | distill (KL from the policy's own "
                "next-token distribution). The heads then always learn, while lambda (or mtp_coef) decides only what "
                "reaches the trunk; none keeps OCC as the paper defines it."})
    mtp_head_coef: float = field(default=0.1, metadata={"help": "Weight of the mtp_head_loss term."})
    mtp_draft_tokens: int = field(default=0, metadata={
        "help": "Rollouts: the live MTP heads draft up to this many tokens per trunk forward and the policy verifies "
                "them by speculative sampling (lossless: completions follow the policy's own sampling law). 0 = "
                "plain model.generate. At most mtp_num_heads."})
    mtp_draft_policy: str = field(default="fixed", metadata={
        "help": "fixed: always mtp_draft_tokens drafts | adaptive: per rollout, the draft count in "
                "0..mtp_draft_tokens with the most expected tokens per second (live acceptance, measured costs)."})

    def __post_init__(self):
        self.check_mtp_fields()
        super().__post_init__()

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig) -> "MTPGRPOConfig":
        """A plain GRPOConfig (already resolved by TRL's own __post_init__, so not re-run) with the MTP fields at
        their defaults: what MTPGRPOTrainer makes of a GRPOConfig, so a TRL script runs unchanged."""
        new = cls.__new__(cls)
        new.__dict__.update(vars(args))
        for f in fields(cls):
            if f.name not in new.__dict__:
                setattr(new, f.name, f.default_factory() if f.default is MISSING else f.default)
        new.check_mtp_fields()
        return new

    def check_mtp_fields(self) -> None:
        """Each MTP field's value, with an error naming the field."""
        _check_choice("mtp_regime", self.mtp_regime, REGIMES)
        check_draft_options(self.mtp_draft_tokens, self.mtp_draft_policy, self.mtp_num_heads)
        _check_choice("loss_type", self.loss_type, TRL_LOSS_TYPES)
        _check_choice("mtp_head_loss", self.mtp_head_loss, HEAD_LOSSES)
        if not isinstance(self.mtp_head_coef, (int, float)) or not math.isfinite(self.mtp_head_coef):
            raise ValueError(f"mtp_head_coef must be a finite number, got {self.mtp_head_coef!r}")
        if self.mtp_draft_tokens and self.mtp_regime == "none":
            raise ValueError("mtp_draft_tokens > 0 drafts with the MTP heads, which mtp_regime=none does not attach; "
                             "use e.g. mtp_regime=detach (heads trained, policy untouched)")
        if self.mtp_draft_tokens and getattr(self, "use_vllm", False):
            raise ValueError("mtp_draft_tokens > 0 with use_vllm=true is not supported: the heads draft through "
                             "transformers generation; set use_vllm=false or mtp_draft_tokens=0")
        if self.mtp_draft_tokens and getattr(self, "use_transformers_paged", False):
            raise ValueError("mtp_draft_tokens > 0 with use_transformers_paged=true is not supported")
        _check_choice("occ_variant", self.occ_variant, OCC_VARIANTS)
        _check_choice("mtp_init", self.mtp_init, INIT_CHOICES)
        if isinstance(self.mtp_num_heads, bool) or not isinstance(self.mtp_num_heads, int) or self.mtp_num_heads < 1:
            raise ValueError(f"mtp_num_heads must be an integer >= 1, got {self.mtp_num_heads!r}")
        for name in ("mtp_coef", "occ_lambda_plus", "occ_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.occ_eps <= 0:
            raise ValueError(f"occ_eps must be > 0, got {self.occ_eps!r}")
        if isinstance(self.occ_last_layers, bool) or not isinstance(self.occ_last_layers, int) or \
                self.occ_last_layers < 1:
            raise ValueError(f"occ_last_layers must be an integer >= 1, got {self.occ_last_layers!r}")
        if not isinstance(self.occ_ema_beta, (int, float)) or not 0.0 <= self.occ_ema_beta < 1.0:
            raise ValueError(f"occ_ema_beta must be in [0, 1), got {self.occ_ema_beta!r}")
        if not isinstance(self.occ_fidelity_every, int) or self.occ_fidelity_every < 0:
            raise ValueError(f"occ_fidelity_every must be an integer >= 0, got {self.occ_fidelity_every!r}")

    @property
    def needs_mtp(self) -> bool:
        return self.mtp_regime != "none"


def check_draft_options(num_draft_tokens, policy, num_heads) -> None:
    """mtp_draft_tokens in 0..mtp_num_heads, mtp_draft_policy one of DRAFT_POLICIES (shared by train, sft, eval)."""
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or \
            not 0 <= num_draft_tokens <= num_heads:
        raise ValueError(f"mtp_draft_tokens must be an integer in 0..{num_heads} (mtp_num_heads), "
                         f"got {num_draft_tokens!r}")
    _check_choice("mtp_draft_policy", policy, DRAFT_POLICIES)


def _check_choice(name, value, choices, why=""):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}{why}; got {value!r}")


def whole_run_mean_loss(path: str, fallback: float) -> float:
    """Mean training loss over every optimizer step of the run, from the per-step `loss` rows of its
    metrics.jsonl (each row a mean over the steps since the previous one, weighted by their number): what the
    Trainer's `train_loss` is for an uninterrupted run, and stays after a resume (the Trainer's own then averages
    the resumed steps only)."""
    if not os.path.isfile(path):
        return fallback
    total, steps, previous = 0.0, 0, 0
    for _, row in read_jsonl(path, "metrics file", tolerate_torn_tail=True):
        if "loss" in row and "step" in row and row["step"] > previous:
            total += row["loss"] * (row["step"] - previous)
            steps += row["step"] - previous
            previous = row["step"]
    return total / steps if steps else fallback


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log dict (TRL's keys plus ours) to `<output_dir>/metrics.jsonl`, one JSON object a line."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "metrics.jsonl")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "train_loss" in row:  # the Trainer's covers only the steps of this process; the log covers the run
            row["train_loss"] = whole_run_mean_loss(self.path, row["train_loss"])
        append_jsonl(self.path, row)

    def on_step_end(self, args, state, control, **kwargs):
        kill_point("train_step")  # fault injection (mtprl.faults); a no-op without MTPRL_KILL_AT


def _add_mtp_forward(model, temperature: float) -> None:
    """Let `model(input_ids=..., attention_mask=..., mtp_logprobs={...})` return `forward_logprobs(...)`.

    Going through the model's own forward (as TRL's fused LM head does) keeps DDP/FSDP wrappers in the loop.
    Without `mtp_logprobs` the forward is the one it had (TRL's fused head, generation)."""
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, mtp_logprobs=None, **kwargs):
        if mtp_logprobs is None:
            return original_forward(*args, **kwargs)
        return forward_logprobs(self, kwargs["input_ids"], kwargs.get("attention_mask"), temperature=temperature,
                                **mtp_logprobs)

    model.forward = types.MethodType(forward, model)


def _grad_dot(params, grads) -> torch.Tensor:
    """<p.grad, g> summed over parameters (float64 accumulation; a parameter without .grad counts 0)."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for p, g in zip(params, grads):
        if p.grad is not None:
            total = total + (p.grad.float() * g.float()).sum().double()
    return total


@dataclass
class DeferredHead:
    """occ exact: head k's MTP gradient, stashed until TRL's backward of the RL loss has run."""

    depth: int
    params: list  # main-model parameters, then head parameters
    grads: list  # g_MTP over `params` (rank mean)
    dot_before: torch.Tensor  # <.grad before TRL's backward, g_MTP> over the main model (rank mean)


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


class MTPGRPOTrainer(MTPCheckpointMixin, GRPOTrainer):
    """GRPOTrainer whose model carries MTP heads trained under `args.mtp_regime` (see MTPGRPOConfig)."""

    def __init__(self, model, reward_funcs=None, args: MTPGRPOConfig | None = None, **kwargs):
        if args is None:  # TRL's default output directory
            name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = MTPGRPOConfig(f"{name.split('/')[-1]}-GRPO")
        elif not isinstance(args, MTPGRPOConfig):
            if not isinstance(args, GRPOConfig):
                raise TypeError(f"args must be a GRPOConfig or MTPGRPOConfig, got {type(args).__name__}")
            args = MTPGRPOConfig.from_grpo_config(args)
        # A reward function that raises scores 0 for the samples it fails on, instead of stopping the run (sync or
        # async). None: no reward functions (environment-owned rewards), as TRL allows; TRL checks the source.
        if reward_funcs is not None:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs = [safe_reward(f) if callable(f) and not isinstance(f, torch.nn.Module) else f
                            for f in funcs]
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.add_callback(MetricsJsonlCallback(args.output_dir))
        self.regime = regime_for(args.mtp_regime, args.occ_variant)  # None: plain GRPO
        self._ledger: ForwardLedger | None = None
        self._deferred: list[DeferredHead] = []  # occ exact: stashed MTP gradients awaiting TRL's backward
        self._draft_policy = (make_draft_policy(args.mtp_draft_policy, args.mtp_draft_tokens)
                              if args.mtp_draft_tokens else None)
        if self.regime is None:
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        attach_or_load_heads(unwrapped, args.mtp_num_heads, init=args.mtp_init, source=unwrapped.config._name_or_path)
        _add_mtp_forward(unwrapped, self.temperature)
        give_reference_the_heads(unwrapped, None if self.ref_model is None
                                 else self.accelerator.unwrap_model(self.ref_model))
        self._main_params = [p for n, p in unwrapped.named_parameters()
                             if p.requires_grad and not n.startswith("mtp_heads.")]
        self._head_params = [p for p in unwrapped.mtp_heads.parameters() if p.requires_grad]
        needs_last = self.regime.lambda_from == "last_layers" or args.occ_fidelity_every > 0
        self._last_params = last_layer_params(unwrapped, args.occ_last_layers) if needs_last else []
        last_ids = {id(p) for p in self._last_params}
        self._last_index = [i for i, p in enumerate(self._main_params) if id(p) in last_ids]
        self._ema: dict[int, OCCStats] = {}  # head depth -> running average of the proxies (`ema` estimator)
        if self.regime.lambda_from == "exact" and (args.fp16 or self.is_deepspeed_enabled):
            raise ValueError("occ_variant=exact adds lambda * g_MTP to the parameters' .grad after the backward; "
                             "that needs unscaled, unpartitioned gradients: not with fp16 loss scaling or DeepSpeed "
                             "(use bf16, DDP or FSDP, or occ_variant=last_layers / hidden)")
        generate_every = args.steps_per_generation * self.num_iterations
        if args.mtp_regime == "occ" and args.gradient_accumulation_steps % generate_every == 0:
            warnings.warn(
                f"OCC cannot see any policy change: with gradient_accumulation_steps={args.gradient_accumulation_steps}"
                f", steps_per_generation={args.steps_per_generation} and num_iterations={self.num_iterations} every "
                "rollout is used for exactly one optimizer step, so logp - logp_old = 0 and lambda = 0 throughout "
                "(OCC degenerates to detach without its CE). Set steps_per_generation > gradient_accumulation_steps "
                "or num_iterations > 1.", stacklevel=2)

    # ------------------------------------------------------------------------------------------ rollout
    def _generate_single_turn(self, *args, **kwargs):
        """TRL's generation, with the live heads drafting (`mtp_draft_tokens`): the heads trained a moment ago."""
        if self._draft_policy is None:
            return super()._generate_single_turn(*args, **kwargs)
        train = self._metrics["train"]
        self._draft_policy.observe_acceptance(
            [train[f"mtp/accept/{k}"][-1] if train.get(f"mtp/accept/{k}") else None
             for k in range(1, self.args.mtp_draft_tokens + 1)])
        mode = "train" if self.model.training else "eval"

        def log(out):
            for name, value in out.metrics().items():
                self._metrics[mode][name].append(value)

        with drafted_generate(self.accelerator.unwrap_model(self.model), self._draft_policy, log):
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
                   "return_hidden": torch.is_grad_enabled() and (self.regime.lambda_from == "hidden"
                                                                 or self.args.mtp_head_loss != "none"
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

    def _compute_loss(self, model, inputs):
        with self._recording_forwards() as ledger, self._trunk_cut() as cut:
            rl_loss = super()._compute_loss(model, inputs)  # TRL's own loss, untouched
        if self.regime is None:
            return rl_loss
        logprobs = ledger.only("TRL's _compute_loss", self.args.mtp_regime)
        loss, metrics = self._loss_with_mtp_term(rl_loss, logprobs, inputs, cut)
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return loss

    def _trunk_cut(self):
        """occ last_layers on a training micro-batch: cut the graph at the input of the last `occ_last_layers`
        layers for the loss forward (`split_backward.TrunkCut`). Not on fidelity steps: those need gradients
        through the whole trunk for the other estimators."""
        if (self.regime is None or self.regime.lambda_from != "last_layers" or not self.model.training
                or not torch.is_grad_enabled() or self._fidelity_step()):
            return nullcontext()
        decoder = decoder_of(self.accelerator.unwrap_model(self.model))
        return TrunkCut(decoder.layers[-self.args.occ_last_layers])

    def _fidelity_step(self) -> bool:
        every = self.args.occ_fidelity_every
        return every > 0 and self.model.training and self.state.global_step % every == 0

    def _reduced_stats(self, delta_rl, delta_mtp, mask, estimator) -> OCCStats:
        """Proxies of c and v2 from log-prob changes (Eq. 12), summed across data-parallel ranks so that every
        rank computes the same lambda."""
        stats = occ_statistics(delta_rl, delta_mtp, mask, estimator=estimator, eps=self.args.occ_eps,
                               clip=self.args.occ_clip)
        return OCCStats(*self.accelerator.reduce(torch.stack(list(stats)), reduction="sum"))

    def _mean_across_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Parameter gradients averaged over data-parallel ranks (what DDP does to .grad), so c and v2 are the
        global ones and every rank gets one lambda. One flat all-reduce; nothing to do on one process."""
        if self.accelerator.num_processes == 1 or not tensors:
            return tensors
        flat = self.accelerator.reduce(torch.cat([t.reshape(-1) for t in tensors]), reduction="mean")
        return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def _gradient_estimate(self, source, rl_loss, head_loss, hidden, rl_grads) -> OCCStats:
        """c and v2 of the `hidden`, `last_layers` or `exact` estimator (occ.py) for one head loss. d rl_loss / d X
        is computed once per micro-batch (`rl_grads`) and shared by every head."""
        if source == "hidden":
            if hidden is None:
                raise RuntimeError("the hidden estimator needs the trunk's output states of this forward (one "
                                   "forward chunk per micro-batch)")
            inputs = [hidden]
        else:
            inputs = self._main_params if source == "exact" else self._last_params
        if source not in rl_grads:
            rl_grads[source] = loss_gradients(rl_loss, inputs)
            if source != "hidden":
                rl_grads[source] = self._mean_across_ranks(rl_grads[source])
        g_mtp = loss_gradients(head_loss, inputs)
        if source == "hidden":  # per-token states: ranks hold disjoint tokens, so their sums add up
            stats = gradient_statistics(rl_grads[source], g_mtp)
            return OCCStats(*self.accelerator.reduce(torch.stack(list(stats)), reduction="sum"))
        return gradient_statistics(rl_grads[source], self._mean_across_ranks(g_mtp))

    def _defer_exact(self, depth, head_loss) -> None:
        """occ exact, step 1 of 2: backpropagate head k's loss on its own (the one extra backward) and stash its
        gradient g_MTP over the main model and the heads (one extra copy of the gradients). TRL's backward of
        the RL loss then runs as usual; `_after_backward` reads g_RL off .grad and adds lambda * g_MTP."""
        params = self._main_params + self._head_params
        grads = self._mean_across_ranks(loss_gradients(head_loss, params))
        before = _grad_dot(self._main_params, grads)  # .grad may already hold earlier micro-batches' gradients
        self._deferred.append(DeferredHead(depth, params, grads, self.accelerator.reduce(before, reduction="mean")))

    def _after_backward(self) -> None:
        """occ exact, step 2 of 2 (after TRL's backward of the RL loss): c = <g_RL, g_MTP> with g_RL = .grad now
        minus .grad before, v2 = ||g_MTP||^2 over the main model, then .grad += lambda * g_MTP (heads included).
        Under DDP both gradients are rank means (.grad is averaged on the synchronising micro-batch and the dot
        is averaged otherwise; <mean a, b> = mean <a, b>), so every rank adds the same lambda * g_MTP."""
        deferred, self._deferred = self._deferred, []
        if not deferred:
            return
        args, n_main = self.args, len(self._main_params)
        lambdas = []
        for d in deferred:  # every head's c from TRL's gradient alone, before any lambda * g_MTP is added
            after = self.accelerator.reduce(_grad_dot(self._main_params, d.grads), reduction="mean")
            c = (after - d.dot_before).float()
            v2 = torch.stack([(g.float() ** 2).sum() for g in d.grads[:n_main]]).sum()
            stats = OCCStats(c, v2)
            lam = self._finite_or_zero(lambda_from_stats(stats, lambda_plus=args.occ_lambda_plus, eps=args.occ_eps,
                                                         clip=args.occ_clip), d.depth, stats)
            lambdas.append(lam)
            for name, value in ((f"mtp/lambda/{d.depth}", lam), (f"mtp/c_exact/{d.depth}", c),
                                (f"mtp/v2_exact/{d.depth}", v2)):
                self._metrics["train"][name].append(value.item())
        for d, lam in zip(deferred, lambdas):
            for p, g in zip(d.params, d.grads):
                if p.grad is None:
                    p.grad = (lam * g).to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype), alpha=lam.item())

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._after_backward()
        return loss

    def _joint_head_losses(self, logprobs, inputs, make_head):
        """For detached regimes (detach, distill) on a fidelity step: their head losses recomputed on the live
        trunk, so that c and v2 are defined over the main model's parameters as for the joint regimes."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with self.accelerator.autocast():
            mtp, _, distill, _ = head_logprobs(unwrapped, logprobs.hidden, input_ids, attention_mask,
                                            inputs["completion_ids"].size(1), self.temperature, "joint",
                                            compute_distill=self.regime.needs_distill)
        return [self.regime.term(make_head(k, mtp[:, k], None if distill is None else distill[:, k])[0]).loss
                for k in range(mtp.shape[1])]

    def _head_only_losses(self, logprobs, inputs, token_mask):
        """`mtp_head_loss` per head [K]: the heads re-run on the trunk's states, embeddings and LM head detached
        (their gradient reaches the heads' own parameters only)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        kind = self.args.mtp_head_loss
        with self.accelerator.autocast():
            mtp, _, distill, context = head_logprobs(unwrapped, logprobs.hidden, input_ids, attention_mask,
                                                     inputs["completion_ids"].size(1), self.temperature, "detach",
                                                     compute_distill=kind == "distill")
        return head_only_loss(kind, mtp, distill, token_mask.unsqueeze(1) * context.to(token_mask.dtype))

    def _loss_with_mtp_term(self, rl_loss, logprobs: LogProbs, inputs, cut: TrunkCut | None = None):
        """TRL's loss plus the regime's MTP term for this micro-batch (summed over heads), and its metrics.
        `cut`: the graph was cut below the last layers (occ last_layers, see `_trunk_cut`)."""
        args, regime = self.args, self.regime
        token_mask = (inputs["completion_mask"] if "tool_mask" not in inputs
                      else inputs["completion_mask"] * inputs["tool_mask"])
        main, mtp = logprobs.main, logprobs.mtp
        old_main = inputs.get("old_per_token_logps")
        old_main = main.detach() if old_main is None else old_main
        old_mtp = inputs.get("old_mtp_logps")
        old_mtp = mtp.detach() if old_mtp is None else old_mtp
        delta_rl = (main - old_main).detach()
        num_heads = mtp.shape[1]
        training = self.model.training and torch.is_grad_enabled()
        fidelity = training and self._fidelity_step()
        rl_grads = {}  # d rl_loss / d X per estimator input X: once per micro-batch, shared by the heads

        def make_head(k, logq, distill):
            depth = k + 1
            # the tokens head k has context for (a prompt of K tokens or fewer leaves the first ones without)
            mask = (token_mask if logprobs.mtp_mask is None
                    else token_mask * logprobs.mtp_mask[:, k].to(token_mask.dtype))
            old_logq = old_main if regime.ratio_against == "main" else old_mtp[:, k]
            # Logged for every regime: the proxies are how the regimes differ.
            stats = self._reduced_stats(delta_rl, (logq - old_logq).detach(), mask, regime.estimator)

            def proxy_lambda(lambda_plus_scale=1.0):
                lam = lambda_from_stats(stats, estimator=regime.estimator,
                                        lambda_plus=args.occ_lambda_plus * lambda_plus_scale, eps=args.occ_eps,
                                        clip=args.occ_clip)
                return self._finite_or_zero(lam, depth, stats)

            def estimated_lambda(head_loss):
                source = regime.lambda_from
                if source == "hat":
                    return proxy_lambda()
                if source == "ema":
                    est = self._ema.get(depth, stats)
                elif not training:  # gradient estimators need a backward: no lambda outside training
                    return torch.zeros((), device=head_loss.device)
                elif source == "exact":
                    self._defer_exact(depth, head_loss)
                    return None
                elif source == "last_layers" and cut is not None:
                    return None  # set below, by the split backward
                else:
                    est = self._gradient_estimate(source, rl_loss, head_loss, logprobs.hidden, rl_grads)
                lam = lambda_from_stats(est, lambda_plus=args.occ_lambda_plus, eps=args.occ_eps, clip=args.occ_clip)
                return self._finite_or_zero(lam, depth, est)

            return HeadBatch(depth=depth, num_heads=num_heads, logq=logq, old_logq=old_logq,
                             advantages=inputs["advantages"], mask=mask, mtp_coef=args.mtp_coef, distill=distill,
                             policy_loss=functools.partial(self._policy_loss, mask=mask, inputs=inputs),
                             token_mean=functools.partial(self._token_mean, mask=mask),
                             proxy_lambda=proxy_lambda, estimated_lambda=estimated_lambda), stats

        total, metrics, deferred = rl_loss.new_zeros(()), {}, False
        heads = [make_head(k, mtp[:, k], None if logprobs.distill is None else logprobs.distill[:, k])
                 for k in range(num_heads)]
        if training:  # the running average sees every training micro-batch, whichever the regime
            for head, stats in heads:
                self._ema[head.depth] = ema_statistics(self._ema.get(head.depth), stats, args.occ_ema_beta)
        terms = [regime.term(head) for head, _ in heads]
        if fidelity:
            joint_losses = (self._joint_head_losses(logprobs, inputs, make_head)
                            if regime.mtp_grad == "detach" else None)
            for k, ((head, stats), term) in enumerate(zip(heads, terms)):
                # c and v2 of the head's own loss with coefficient 1 (the released code's lambda sits inside it)
                loss = (joint_losses[k] if joint_losses is not None else
                        head.policy_loss(head.logq, head.old_logq, head.advantages) if term.coef_in_loss else term.loss)
                sources = [s for s in GRADIENT_SOURCES
                           if not (s == "exact" and term.coef is None)]  # exact comes from _after_backward
                for source in sources:
                    est = self._gradient_estimate(source, rl_loss, loss, logprobs.hidden, rl_grads)
                    metrics[f"mtp/c_{source}/{head.depth}"] = est.c_hat.item()
                    metrics[f"mtp/v2_{source}/{head.depth}"] = est.v2_hat.item()
                metrics[f"mtp/c_ema/{head.depth}"] = self._ema[head.depth].c_hat.item()
                metrics[f"mtp/v2_ema/{head.depth}"] = self._ema[head.depth].v2_hat.item()
        split = []  # (depth, head loss) whose lambda the split backward sets (occ last_layers)
        for (head, stats), term in zip(heads, terms):
            depth = head.depth
            if term.coef is None and cut is not None:
                split.append((depth, term.loss))
            elif term.coef is None:
                deferred = True
            else:
                total = total + (term.loss if term.coef_in_loss else term.coef.to(term.loss.dtype) * term.loss)
                metrics[f"mtp/lambda/{depth}"] = float(term.coef)
            metrics[f"mtp/c_hat/{depth}"] = stats.c_hat.item()
            metrics[f"mtp/v2_hat/{depth}"] = stats.v2_hat.item()
            metrics[f"mtp/loss/{depth}"] = term.loss.item()
            if logprobs.accept is not None:
                acc = logprobs.accept[:, depth - 1]
                sums = self.accelerator.reduce(torch.stack([(acc * head.mask).sum(), head.mask.sum().float()]),
                                               reduction="sum")
                metrics[f"mtp/accept/{depth}"] = (sums[0] / sums[1].clamp(min=1.0)).item()
        if args.mtp_head_loss != "none" and training:  # the heads always learn, whatever reaches the trunk
            head_losses = self._head_only_losses(logprobs, inputs, token_mask)
            total = total + args.mtp_head_coef * head_losses.mean() / self.current_gradient_accumulation_steps
            for k, value in enumerate(head_losses.tolist(), start=1):
                metrics[f"mtp/head_loss/{k}"] = value
        if deferred:  # keep the head parameters in this backward's graph (DDP expects every parameter used)
            total = total + sum(p.sum() for p in self._head_params) * 0.0
        if split:
            loss, lambdas = split_backward_loss(rl_loss + total, [loss for _, loss in split],
                                                self._main_params + self._head_params, cut.pairs,
                                                lambda k, g_rl, g_head: self._last_layers_lambda(split[k][0], g_rl,
                                                                                                 g_head))
            for (depth, _), lam in zip(split, lambdas):
                metrics[f"mtp/lambda/{depth}"] = lam.item()
            return loss, metrics
        return rl_loss + total, metrics

    def _last_layers_lambda(self, depth, g_rl, g_head):
        """lambda from c and v2 over the last layers' parameters (rank means), for `split_backward_loss`."""
        def last(grads):  # no gradient = zeros (a last-layer parameter neither loss reaches)
            return self._mean_across_ranks([torch.zeros_like(self._main_params[i]) if grads[i] is None else grads[i]
                                            for i in self._last_index])
        stats = gradient_statistics(last(g_rl), last(g_head))
        lam = lambda_from_stats(stats, lambda_plus=self.args.occ_lambda_plus, eps=self.args.occ_eps,
                                clip=self.args.occ_clip)
        return self._finite_or_zero(lam, depth, stats)

    def _finite_or_zero(self, coef, depth, stats):
        """A NaN/inf lambda (NaN log-probs upstream) must not poison the weights: use 0 for this micro-batch,
        count it, and say why."""
        if torch.isfinite(coef):
            return coef
        warnings.warn(f"OCC lambda for head {depth} is {coef.item()} (c_hat={stats.c_hat.item()}, "
                      f"v2_hat={stats.v2_hat.item()}) at step {self.state.global_step}; using 0 for this micro-batch")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][f"mtp/lambda_nonfinite/{depth}"].append(1.0)
        return torch.zeros_like(coef)


# ---------------------------------------------------------------------------------------------------- SFT


@dataclass
class MTPSFTConfig(SFTConfig):
    """SFTConfig for the warm start: main CE plus `mtp_coef` x the mean CE of the MTP heads (MTP pretraining,
    as in DeepSeek-V3), on completion tokens."""

    mtp_num_heads: int = field(default=1, metadata={"help": "Number of MTP depths K."})
    mtp_coef: float = field(default=1.0, metadata={"help": "Weight of the mean MTP CE against the main CE."})
    mtp_init: str = field(default="copy_last_layer", metadata={"help": "copy_last_layer | random"})
    mtp_log_acceptance: bool = field(default=True, metadata={
        "help": "Log mtp/accept/k (no gradient; one extra full-vocabulary LM-head pass per head)."})
    mtp_only: bool = field(default=False, metadata={
        "help": "Warm fresh heads for a model without MTP weights: the main model is frozen (trunk, embeddings, "
                "lm_head) and the heads learn the main head's distribution, KL(p_main || q_k), on the model's own "
                "samples of the dataset's prompts (self-distillation)."})
    mtp_only_max_new_tokens: int = field(default=64, metadata={
        "help": "mtp_only: tokens sampled per prompt for the self-distillation text."})
    mtp_draft_tokens: int = field(default=0, metadata={
        "help": "mtp_only self-sampling and the evaluations: heads draft up to this many tokens per trunk forward "
                "(lossless speculative sampling, as in MTPGRPOConfig). 0 = plain model.generate."})
    mtp_draft_policy: str = field(default="fixed", metadata={"help": "fixed | adaptive (as in MTPGRPOConfig)."})
    answer_suffix_fraction: float = field(default=0.0, metadata={
        "help": "Fraction of the warm-start completions written '<answer>!', a format the verifier does not fully "
                "accept (reasoning-gym gives partial credit; avg@k counts it wrong): a stand-in for the "
                "answer-format errors that RL from verifiable rewards fixes in real models (a missing \\boxed{}), "
                "so that RL has a behaviour to learn that transfers across questions. 0 = clean answers."})

    def __post_init__(self):
        _check_choice("mtp_init", self.mtp_init, INIT_CHOICES)
        check_draft_options(self.mtp_draft_tokens, self.mtp_draft_policy, self.mtp_num_heads)
        if not 0.0 <= self.answer_suffix_fraction <= 1.0:
            raise ValueError(f"answer_suffix_fraction must be in [0, 1], got {self.answer_suffix_fraction!r}")
        if isinstance(self.mtp_num_heads, bool) or not isinstance(self.mtp_num_heads, int) or self.mtp_num_heads < 1:
            raise ValueError(f"mtp_num_heads must be an integer >= 1, got {self.mtp_num_heads!r}")
        if not math.isfinite(self.mtp_coef):
            raise ValueError(f"mtp_coef must be a finite number, got {self.mtp_coef!r}")
        super().__post_init__()


class MTPSFTTrainer(MTPCheckpointMixin, SFTTrainer):
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
        _add_mtp_forward(unwrapped, temperature=1.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        num_heads = self.accelerator.unwrap_model(model).mtp_heads.num_heads
        keep = input_ids.shape[1] - num_heads - 1  # every token that every head can score
        mtp_only = self.args.mtp_only
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    mtp_logprobs={"logits_to_keep": keep, "compute_accept": self.args.mtp_log_acceptance,
                                  "compute_distill": mtp_only, "mtp_grad": "detach" if mtp_only else "joint"})
        mask = (labels[:, -keep:] != -100) & (attention_mask[:, -keep:] == 1)
        head_mask = mask.unsqueeze(1) & out.mtp_mask  # [B, K, L]: a left-padded short row gives some heads no context
        main_ce = -masked_mean(out.main, mask)
        head_ce = mtp_ce_loss(out.mtp, head_mask)
        mode = "train" if self.model.training else "eval"
        if mtp_only:
            head_kl = torch.stack([masked_mean(out.distill[:, k], head_mask[:, k]) for k in range(num_heads)])
            loss = head_kl.mean()
            for k in range(num_heads):
                self._metrics[mode][f"mtp/distill/{k + 1}"].append(head_kl[k].item())
        else:
            loss = main_ce + self.args.mtp_coef * head_ce.mean()
        self._metrics[mode]["main_ce"].append(main_ce.item())
        for k in range(num_heads):
            self._metrics[mode][f"mtp/loss/{k + 1}"].append(head_ce[k].item())
            if out.accept is not None:
                self._metrics[mode][f"mtp/accept/{k + 1}"].append(masked_mean(out.accept[:, k], head_mask[:, k]).item())
        return (loss, out) if return_outputs else loss
