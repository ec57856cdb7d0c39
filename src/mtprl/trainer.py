"""`MTPGRPOTrainer`: TRL's GRPOTrainer with jointly trained MTP heads and OCC.

What changes against stock GRPOTrainer, and nothing else:
- one trunk forward per micro-batch gives main *and* MTP log-probs (`_get_per_token_logps_and_entropies`);
- at rollout time the old MTP log-probs come out of the same forward as TRL's old main log-probs and travel
  in the batch (`old_mtp_logps`) through TRL's shuffle and split;
- `_compute_loss` adds the MTP term of the chosen regime to TRL's own loss, which stays untouched;
- checkpoints keep the heads in their own files (`_save`, `_load_from_checkpoint`);
- every log line also goes to `<output_dir>/metrics.jsonl`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import types
import warnings
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from .mtp import (
    attach_mtp_heads,
    forward_logprobs,
    has_mtp_checkpoint,
    load_mtp_heads,
    load_mtp_weights,
    save_mtp_heads,
    split_state_dict,
)
from .objectives import LOSS_TYPES, masked_mean, mtp_ce_loss, policy_loss
from .occ import OCCStats, exact_occ_coefficient, lambda_from_stats, occ_statistics
from .tasks import safe_reward

REGIMES = ("none", "detach", "ce", "policy", "occ")
OCC_VARIANTS = ("paper", "reference", "exact")


@dataclass
class MTPGRPOConfig(GRPOConfig):
    """GRPOConfig plus the MTP/OCC fields. Invalid values fail here, naming the field."""

    mtp_num_heads: int = field(default=1, metadata={"help": "Number of MTP depths K (heads are attached if the "
                                                            "model has none)."})
    mtp_regime: str = field(default="occ", metadata={
        "help": "How MTP heads train during RL: none (plain GRPO) | detach (CE, no gradient into the main model) | "
                "ce (CE, joint) | policy (the RL loss on each head, fixed mtp_coef) | occ (policy loss scaled by "
                "OCC's lambda)."})
    mtp_coef: float = field(default=0.1, metadata={"help": "Fixed MTP coefficient for detach, ce and policy."})
    mtp_init: str = field(default="copy_last_layer", metadata={"help": "Initialisation of freshly attached heads: "
                                                                        "copy_last_layer | random."})
    occ_variant: str = field(default="paper", metadata={
        "help": "paper: batch estimator, head ratio against the head's own old log-probs, lambda scales the head "
                "loss | reference: the released code (token estimator, ratio against the main old log-probs, "
                "lambda scales the head's advantages, lambda_plus / K) | exact: lambda from true gradients."})
    occ_lambda_plus: float = field(default=1.0, metadata={"help": "lambda_plus of Eq. 13 (absorbs the "
                                                                    "smoothness prefactor)."})
    occ_eps: float = field(default=1e-8, metadata={"help": "eps of Eq. 13."})
    occ_clip: bool = field(default=False, metadata={"help": "OCC-Clip (App. E): c_hat -> max(c_hat, 0)."})
    occ_fidelity_every: int = field(default=0, metadata={
        "help": "Every N optimizer steps also compute the exact c and v2 beside the proxies (two extra backward "
                "passes on that step), logged as mtp/c_exact/k and mtp/v2_exact/k. 0 = never."})
    mtp_log_acceptance: bool = field(default=True, metadata={
        "help": "Log mtp/accept/k, the expected speculative acceptance sum_v min(p_main, p_head) on completion "
                "tokens (no gradient; one extra LM-head pass per head)."})

    def __post_init__(self):
        _check_choice("mtp_regime", self.mtp_regime, REGIMES)
        _check_choice("occ_variant", self.occ_variant, OCC_VARIANTS)
        _check_choice("mtp_init", self.mtp_init, ("copy_last_layer", "random"))
        if isinstance(self.mtp_num_heads, bool) or not isinstance(self.mtp_num_heads, int) or self.mtp_num_heads < 1:
            raise ValueError(f"mtp_num_heads must be an integer >= 1, got {self.mtp_num_heads!r}")
        for name in ("mtp_coef", "occ_lambda_plus", "occ_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.occ_eps <= 0:
            raise ValueError(f"occ_eps must be > 0, got {self.occ_eps!r}")
        if not isinstance(self.occ_fidelity_every, int) or self.occ_fidelity_every < 0:
            raise ValueError(f"occ_fidelity_every must be an integer >= 0, got {self.occ_fidelity_every!r}")
        if self.mtp_regime != "none":
            _check_choice("loss_type", self.loss_type, LOSS_TYPES, why=" with MTP heads")
        super().__post_init__()

    @property
    def needs_mtp(self) -> bool:
        return self.mtp_regime != "none"


def _check_choice(name, value, choices, why=""):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}{why}; got {value!r}")


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log dict (TRL's keys plus ours) to `<output_dir>/metrics.jsonl`, one JSON object a line."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "metrics.jsonl")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


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


class MTPCheckpointMixin:
    """Checkpoints keep the heads in their own files, so `<checkpoint>/model.safetensors` is a plain HF model
    and `mtprl.load_pretrained(<checkpoint>)` restores everything; resuming restores the heads too."""

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        heads = getattr(unwrapped, "mtp_heads", None)
        if heads is None:
            return super()._save(output_dir, state_dict=state_dict)
        state_dict = unwrapped.state_dict() if state_dict is None else state_dict
        main_state, head_state = split_state_dict(state_dict)
        super()._save(output_dir, state_dict=main_state)  # plain AutoModelForCausalLM.from_pretrained loads this
        if self.args.should_save:
            save_mtp_heads(heads, output_dir, head_state)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if getattr(unwrapped, "mtp_heads", None) is not None:
            load_mtp_weights(unwrapped.mtp_heads, resume_from_checkpoint)


class MTPGRPOTrainer(MTPCheckpointMixin, GRPOTrainer):
    """GRPOTrainer whose model carries MTP heads trained under `args.mtp_regime` (see MTPGRPOConfig)."""

    def __init__(self, model, reward_funcs, args: MTPGRPOConfig | None = None, **kwargs):
        if args is None:
            args = MTPGRPOConfig("mtprl-output")
        if not isinstance(args, MTPGRPOConfig):
            raise TypeError(f"args must be an MTPGRPOConfig, got {type(args).__name__}")
        # A reward function that raises scores 0 for the samples it fails on, instead of stopping the run.
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        reward_funcs = [safe_reward(f) if callable(f) and not isinstance(f, torch.nn.Module) else f for f in funcs]
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self.add_callback(MetricsJsonlCallback(args.output_dir))
        self._last_logprobs = None
        if not args.needs_mtp:
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        if getattr(unwrapped, "mtp_heads", None) is None:
            source = unwrapped.config._name_or_path
            if source and os.path.isdir(source) and has_mtp_checkpoint(source):
                load_mtp_heads(unwrapped, source)  # an mtprl checkpoint: keep its trained heads
            else:
                attach_mtp_heads(unwrapped, args.mtp_num_heads, init=args.mtp_init)
        if unwrapped.mtp_heads.num_heads != args.mtp_num_heads:
            raise ValueError(f"mtp_num_heads={args.mtp_num_heads} but the model carries "
                             f"{unwrapped.mtp_heads.num_heads} MTP head(s)")
        _add_mtp_forward(unwrapped, self.temperature)
        self._main_params = [p for n, p in unwrapped.named_parameters()
                             if p.requires_grad and not n.startswith("mtp_heads.")]
        generate_every = args.steps_per_generation * self.num_iterations
        if args.mtp_regime == "occ" and args.gradient_accumulation_steps % generate_every == 0:
            warnings.warn(
                f"OCC cannot see any policy change: with gradient_accumulation_steps={args.gradient_accumulation_steps}"
                f", steps_per_generation={args.steps_per_generation} and num_iterations={self.num_iterations} every "
                "rollout is used for exactly one optimizer step, so logp - logp_old = 0 and lambda = 0 throughout "
                "(OCC degenerates to detach without its CE). Set steps_per_generation > gradient_accumulation_steps "
                "or num_iterations > 1.", stacklevel=2)

    # ------------------------------------------------------------------------------------------ forward
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        unwrapped = self.accelerator.unwrap_model(model)
        if not self.args.needs_mtp or getattr(unwrapped, "mtp_heads", None) is None:  # plain GRPO, ref model
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        if compute_aux_loss or any(v is not None for v in kwargs.values()):
            raise NotImplementedError("MTP heads support text-only, non-MoE models")
        request = {"logits_to_keep": logits_to_keep, "compute_entropy": compute_entropy,
                   "mtp_grad": "detach" if self.args.mtp_regime == "detach" else "joint",
                   "compute_accept": self.args.mtp_log_acceptance and torch.is_grad_enabled()}
        batch_size = batch_size or input_ids.size(0)
        chunks = []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            with self.accelerator.autocast():
                chunks.append(model(input_ids=input_ids[rows], attention_mask=attention_mask[rows],
                                    mtp_logprobs=request))

        def cat(name):
            parts = [getattr(c, name) for c in chunks]
            return None if parts[0] is None else torch.cat(parts, dim=0)

        self._last_logprobs = {name: cat(name) for name in ("main", "mtp", "entropy", "accept")}
        return self._last_logprobs["main"], self._last_logprobs["entropy"], None

    def _generate_and_score_completions(self, inputs):
        self._last_logprobs = None
        output = super()._generate_and_score_completions(inputs)
        if self._last_logprobs is not None and output.get("old_per_token_logps") is not None:
            # The rollout-time forward that gave TRL its old main log-probs gave the old MTP ones too.
            output["old_mtp_logps"] = self._last_logprobs["mtp"]
        self._last_logprobs = None
        return output

    # ------------------------------------------------------------------------------------------ loss
    def _policy_loss(self, logps, old_logps, advantages, mask, inputs):
        """objectives.policy_loss scaled exactly as TRL scales its own loss for gradient accumulation."""
        args, train = self.args, self.model.training
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

    def _compute_loss(self, model, inputs):
        self._last_logprobs = None
        rl_loss = super()._compute_loss(model, inputs)  # TRL's own loss, untouched
        if not self.args.needs_mtp or self._last_logprobs is None:
            return rl_loss
        out, self._last_logprobs = self._last_logprobs, None
        mtp_loss, metrics = self._mtp_term(rl_loss, out, inputs)
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return rl_loss + mtp_loss

    def _fidelity_step(self) -> bool:
        every = self.args.occ_fidelity_every
        return self.args.occ_variant == "exact" or (every > 0 and self.model.training
                                                      and self.state.global_step % every == 0)

    def _mtp_term(self, rl_loss, out, inputs):
        """The regime's MTP term for this micro-batch, and its metrics."""
        args = self.args
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        advantages = inputs["advantages"]
        main, mtp = out["main"], out["mtp"]
        old_main = inputs.get("old_per_token_logps")
        old_main = main.detach() if old_main is None else old_main
        old_mtp = inputs.get("old_mtp_logps")
        old_mtp = mtp.detach() if old_mtp is None else old_mtp
        delta_rl = (main - old_main).detach()
        num_heads = mtp.shape[1]
        reference = args.mtp_regime == "occ" and args.occ_variant == "reference"
        fidelity = args.mtp_regime == "occ" and self._fidelity_step()

        total, metrics = rl_loss.new_zeros(()), {}
        for k in range(num_heads):
            head, logq = str(k + 1), mtp[:, k]
            old_q = old_main if reference else old_mtp[:, k]
            # Proxies of c and v2 from log-prob changes (Eq. 12), summed across data-parallel ranks so that
            # every rank computes the same lambda. Logged for every regime: it is how the regimes differ.
            stats = occ_statistics(delta_rl, (logq - old_q).detach(), mask, estimator="token" if reference else "batch",
                                   eps=args.occ_eps, clip=args.occ_clip)
            stats = OCCStats(*self.accelerator.reduce(torch.stack(list(stats)), reduction="sum"))

            if args.mtp_regime in ("detach", "ce"):
                coef = torch.tensor(args.mtp_coef)
                term = mtp_ce_loss(logq, mask)
                if self.model.training:
                    term = term / self.current_gradient_accumulation_steps
            elif args.mtp_regime == "policy":
                coef = torch.tensor(args.mtp_coef)
                term = self._policy_loss(logq, old_q, advantages, mask, inputs)
            elif reference:
                # Released code: lambda multiplies the head's advantages, lambda_plus is shared by the K heads.
                coef = lambda_from_stats(stats, estimator="token", lambda_plus=args.occ_lambda_plus / num_heads,
                                         eps=args.occ_eps, clip=args.occ_clip)
                coef = self._finite_or_zero(coef, head, stats)
                term = self._policy_loss(logq, old_q, advantages * coef, mask, inputs)
            else:  # occ, paper or exact: lambda scales the head's policy loss
                coef = lambda_from_stats(stats, estimator="batch", lambda_plus=args.occ_lambda_plus,
                                         eps=args.occ_eps, clip=args.occ_clip)
                term = self._policy_loss(logq, old_q, advantages, mask, inputs)

            if fidelity:
                lam_exact, c_exact, v2_exact = exact_occ_coefficient(
                    rl_loss, term, self._main_params, lambda_plus=args.occ_lambda_plus, eps=args.occ_eps,
                    clip=args.occ_clip)
                metrics[f"mtp/c_exact/{head}"] = c_exact.item()
                metrics[f"mtp/v2_exact/{head}"] = v2_exact.item()
                if args.occ_variant == "exact":
                    coef = lam_exact
            if args.mtp_regime == "occ" and not reference:
                coef = self._finite_or_zero(coef, head, stats)
            weight = 1.0 if reference else coef.to(term.dtype)  # reference: lambda is already in the advantages
            total = total + weight * term

            metrics[f"mtp/lambda/{head}"] = float(coef)
            metrics[f"mtp/c_hat/{head}"] = stats.c_hat.item()
            metrics[f"mtp/v2_hat/{head}"] = stats.v2_hat.item()
            metrics[f"mtp/loss/{head}"] = term.item()
            if out["accept"] is not None:
                acc = out["accept"][:, k]
                sums = self.accelerator.reduce(torch.stack([(acc * mask).sum(), mask.sum().float()]), reduction="sum")
                metrics[f"mtp/accept/{head}"] = (sums[0] / sums[1].clamp(min=1.0)).item()
        return total, metrics

    def _finite_or_zero(self, coef, head, stats):
        """A NaN/inf lambda (NaN log-probs upstream) must not poison the weights: use 0 for this micro-batch,
        count it, and say why."""
        if torch.isfinite(coef):
            return coef
        warnings.warn(f"OCC lambda for head {head} is {coef.item()} (c_hat={stats.c_hat.item()}, "
                      f"v2_hat={stats.v2_hat.item()}) at step {self.state.global_step}; using 0 for this micro-batch")
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][f"mtp/lambda_nonfinite/{head}"].append(1.0)
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

    def __post_init__(self):
        _check_choice("mtp_init", self.mtp_init, ("copy_last_layer", "random"))
        if isinstance(self.mtp_num_heads, bool) or not isinstance(self.mtp_num_heads, int) or self.mtp_num_heads < 1:
            raise ValueError(f"mtp_num_heads must be an integer >= 1, got {self.mtp_num_heads!r}")
        if not math.isfinite(self.mtp_coef):
            raise ValueError(f"mtp_coef must be a finite number, got {self.mtp_coef!r}")
        super().__post_init__()


class MTPSFTTrainer(MTPCheckpointMixin, SFTTrainer):
    """SFTTrainer whose loss is main CE + mtp_coef * mean_k CE_k, from one trunk forward."""

    def __init__(self, model, args: MTPSFTConfig, **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(MetricsJsonlCallback(args.output_dir))
        unwrapped = self.accelerator.unwrap_model(self.model)
        if getattr(unwrapped, "mtp_heads", None) is None:
            attach_mtp_heads(unwrapped, args.mtp_num_heads, init=args.mtp_init)
        _add_mtp_forward(unwrapped, temperature=1.0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        num_heads = self.accelerator.unwrap_model(model).mtp_heads.num_heads
        keep = input_ids.shape[1] - num_heads - 1  # every token that every head can score
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    mtp_logprobs={"logits_to_keep": keep, "compute_accept": self.args.mtp_log_acceptance})
        mask = (labels[:, -keep:] != -100) & (attention_mask[:, -keep:] == 1)
        main_ce = -masked_mean(out.main, mask)
        head_ce = mtp_ce_loss(out.mtp, mask)
        loss = main_ce + self.args.mtp_coef * head_ce.mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["main_ce"].append(main_ce.item())
        for k in range(num_heads):
            self._metrics[mode][f"mtp/loss/{k + 1}"].append(head_ce[k].item())
            if out.accept is not None:
                self._metrics[mode][f"mtp/accept/{k + 1}"].append(masked_mean(out.accept[:, k], mask).item())
        return (loss, out) if return_outputs else loss
