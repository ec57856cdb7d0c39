"""The configs: `MTPGRPOConfig` (RL), `MTPSFTConfig` (warm start), the head and draft fields they share with
`mtprl eval`, and one validation helper per kind of check. Invalid values fail at construction, naming the field.

Two words, used the same way in the config help, the code, the metrics and the report:
- the proxies' *reduction* (`regimes.Regime.proxy_reduction`, `occ.PROXY_REDUCTIONS`): `batch` (the paper's Eq. 13,
  sums over the micro-batch) or `token` (the released code's per-token ratio, averaged);
- the *lambda source* (`regimes.LAMBDA_SOURCES`), where OCC's lambda comes from: `hat` (the paper's log-prob
  proxies c_hat, v2_hat), `ema` (their running average), `hidden`, `last_layers`, `exact` (gradients). The config
  field that picks it (with the released-code variant) is `occ_variant`; the metric keys are mtp/c_<source>/k.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields

from trl import GRPOConfig, SFTConfig

from ..model.native import LAYOUT_BY_NAME
from ..model.mtp import INIT_CHOICES
from ..core.objectives import HEAD_LOSSES
from ..core.regimes import OCC_VARIANTS, REGIMES
from ..generation.rollout import DRAFT_POLICIES
from ..data.sft_data import ANSWER_FORMATS
from ..data.scoring import REWARD_FAILURE_MODES
from .trl_compat import TRL_LOSS_TYPES
from .update_geometry import GRAD_CLIP_MODES, OPTIMIZER_STATE_MODES

# ------------------------------------------------------------------------------------------- validation helpers


def check_choice(name, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_int(name, value, low, high=None, high_name="") -> None:
    """An integer (not a bool) in [low, high] (high None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        where = f">= {low}" if high is None else f"in {low}..{high}{f' ({high_name})' if high_name else ''}"
        raise ValueError(f"{name} must be an integer {where}, got {value!r}")


def check_number(name, value, low=None, high=None, *, low_open=False, high_open=False) -> None:
    """A finite number (not a bool), optionally within bounds (closed unless `*_open`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = ""
        if low is not None or high is not None:
            left = "-inf" if low is None else low
            right = "inf" if high is None else high
            opening = "(" if low_open or low is None else "["
            closing = ")" if high_open or high is None else "]"
            bounds = f" in {opening}{left}, {right}{closing}"
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")


def check_draft_options(num_draft_tokens, policy, num_heads, vocab_size=0) -> None:
    """mtp_draft_tokens in 0..mtp_num_heads, mtp_draft_policy one of DRAFT_POLICIES, mtp_draft_vocab_size >= 0
    (train, sft, eval)."""
    check_int("mtp_draft_tokens", num_draft_tokens, 0, num_heads, "mtp_num_heads")
    check_choice("mtp_draft_policy", policy, DRAFT_POLICIES)
    check_int("mtp_draft_vocab_size", vocab_size, 0)


def check_reporting(report_to) -> None:
    """Each `report_to` integration is installed (else transformers fails mid-setup with a traceback)."""
    from transformers.integrations import get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    missing = [n for n in names if n not in ("all", "none") and n not in get_available_reporting_integrations()]
    if missing:
        raise ValueError(f"report_to: {', '.join(missing)} is not installed here (pip install it, or set report_to "
                         "none)")


# ------------------------------------------------------------------------------------------- shared fields


DRAFT_TOKENS_HELP = (
    "The MTP heads draft up to this many tokens per trunk forward and the model verifies them by speculative sampling "
    "(lossless: samples follow the policy's own sampling law); in RL the live heads draft the rollouts. 0 = plain "
    "model.generate. At most mtp_num_heads.")
DRAFT_POLICY_HELP = (
    "fixed: always mtp_draft_tokens drafts | adaptive: per rollout, the draft count in 0..mtp_draft_tokens with the "
    "most expected tokens per second (live acceptance, measured costs).")


DRAFT_VOCAB_HELP = (
    "Trimmed drafting: the heads draft only from this many tokens, the most frequent of the recent rollouts "
    "(refreshed after every rollout; the first drafts from all), so a draft step runs that many rows of the LM head "
    "instead of all. Lossless (the verify uses the full distribution); costs acceptance where the policy writes a "
    "token outside the set. 0 = the full vocabulary.")


REWARD_FAILURE_HELP = (
    "A reward function that raises: zero (that sample scores 0 and is counted in rewards/failures; the first failure "
    "prints its traceback; a batch on which every sample fails stops the run) | raise (any failure stops the run, as "
    "in TRL).")


@dataclass
class DraftFields:
    """How the MTP heads draft samples (RL rollouts, `sft --mtp_only` self-sampling, evaluations)."""

    mtp_draft_tokens: int = field(default=0, metadata={"help": DRAFT_TOKENS_HELP})
    mtp_draft_policy: str = field(default="fixed", metadata={"help": DRAFT_POLICY_HELP})
    mtp_draft_vocab_size: int = field(default=0, metadata={"help": DRAFT_VOCAB_HELP})


@dataclass
class HeadFields(DraftFields):
    """The MTP heads of a run: how many, how fresh ones start, what is logged about them, how they draft."""

    mtp_num_heads: int = field(default=1, metadata={"help": "Number of MTP depths K (heads are attached if the "
                                                            "model has none)."})
    mtp_init: str = field(default="copy_last_layer", metadata={"help": "Initialisation of freshly attached heads: "
                                                                        "copy_last_layer | random."})
    mtp_native_layout: str = field(default="", metadata={
        "help": "Build fresh heads in a model family's native MTP layout (its concatenation order, the trunk state "
                "depth 1 reads, its first-position mask): mimo (Qwen2 / Llama-style trunks; what vLLM's mtp drafter "
                "computes, the default with use_vllm and mtp_draft_tokens). Empty: mtprl's own. Heads "
                "loaded from a checkpoint keep theirs."})
    mtp_log_acceptance: bool = field(default=True, metadata={
        "help": "Log mtp/accept/k, the expected speculative acceptance sum_v min(p_main, p_head) on completion "
                "tokens, with p and q under the rollouts' sampling law (temperature, top_k, top_p), so it predicts "
                "rollout/spec_accept_rate/1 (no gradient; one extra LM-head pass per head)."})

    def check_head_fields(self) -> None:
        check_int("mtp_num_heads", self.mtp_num_heads, 1)
        check_choice("mtp_init", self.mtp_init, INIT_CHOICES)
        check_choice("mtp_native_layout", self.mtp_native_layout, ("", *LAYOUT_BY_NAME))
        check_draft_options(self.mtp_draft_tokens, self.mtp_draft_policy, self.mtp_num_heads,
                            self.mtp_draft_vocab_size)


# ------------------------------------------------------------------------------------------- RL


@dataclass
class MTPGRPOConfig(HeadFields, GRPOConfig):
    """GRPOConfig plus the MTP/OCC fields. Invalid values fail here, naming the field."""

    mtp_regime: str = field(default="occ", metadata={
        "help": "How MTP heads train during RL: none (plain GRPO) | frozen (plain GRPO's loss; the heads stay "
                "attached, draft with mtp_draft_tokens, and are never trained: the frozen-head baseline) | detach "
                "(CE, no gradient into the main model) | "
                "ce (CE, joint) | policy (the RL loss on each head, fixed mtp_coef) | occ (policy loss scaled by "
                "OCC's lambda) | distill (KL from the policy's own distribution, no gradient into the main model). "
                "The regime's term is what the trunk sees (through joint heads, weighted by mtp_coef or lambda); "
                "mtp_head_loss is a second, head-only term that never reaches the trunk (docs/regimes.md)."})
    mtp_coef: float = field(default=0.1, metadata={"help": "Fixed MTP coefficient for detach, ce, policy, distill."})
    mtp_heads_from: str | None = field(default=None, metadata={
        "help": "An mtprl checkpoint directory whose MTP heads replace the model's own before RL (same count; the "
                "main model is still model_name_or_path): arms of one comparison that start from one policy with "
                "heads warmed differently, e.g. by `sft --mtp_only true --mtp_only_loss tv`."})
    occ_variant: str = field(default="paper", metadata={
        "help": "Where OCC's lambda comes from (its lambda source). paper: the log-prob proxies c_hat, v2_hat with "
                "the batch reduction (Eq. 13), head ratio against the head's own old log-probs, lambda scales the "
                "head loss | reference: the released code (token reduction, ratio against the main old log-probs, "
                "lambda scales the head's advantages, lambda_plus / K) | exact: the true gradients over the main "
                "model (one extra backward) | hidden: gradients at the trunk's output states | last_layers: exact c, "
                "v2 over the last occ_last_layers decoder layers | ema: running average of the proxies "
                "(occ_ema_beta)."})
    occ_lambda_plus: float = field(default=1.0, metadata={
        "help": "lambda_plus of Eq. 13: it absorbs the unknown smoothness prefactor (1 - L eta) / (L eta), so it is "
                "swept, not derived (the paper: 0.1-2.0, Table 3). Start at 1 for paper, ema, exact and last_layers "
                "(their lambda is on the parameter-space scale); the hidden source measures c and v2 at the trunk "
                "output, about 5e-5 of the exact lambda on the tiny model, so it needs about 2e4 (1/5e-5) for the "
                "same coefficient (docs/guide-estimators.md, 'Choosing occ_lambda_plus')."})
    occ_eps: float = field(default=1e-8, metadata={"help": "eps of Eq. 13."})
    occ_clip: bool = field(default=False, metadata={"help": "OCC-Clip (App. E): c_hat -> max(c_hat, 0)."})
    occ_last_layers: int = field(default=1, metadata={
        "help": "last_layers lambda source: number of final decoder layers (plus the final norm) c and v2 are taken "
                "over."})
    occ_ema_beta: float = field(default=0.9, metadata={
        "help": "ema lambda source: weight of the history in the running average of c_hat and v2_hat, per "
                "micro-batch. The average is not saved in checkpoints: a resumed run restarts it (one rollout's "
                "micro-batches rebuild it)."})
    occ_fidelity_every: int = field(default=0, metadata={
        "help": "Every N optimizer steps also compute, on the same micro-batch, the exact c and v2 and every "
                "lambda source's (hidden, last_layers, ema, the proxies), for every regime that runs the heads: "
                "mtp/c_<source>/k, mtp/v2_<source>/k. 0 = never."})
    mtp_head_loss: str = field(default="auto", metadata={
        "help": "A head-only term added under every regime, its gradient stopped at the heads' inputs (trunk, "
                "embeddings and LM head detached): none | ce (the sampled tokens) | distill (KL from the policy's own "
                "next-token distribution) | tv (1 - sum_v min(p_main, q_k): one minus the speculative acceptance, so "
                "the heads are trained as drafters) | auto (none, except under occ when every rollout feeds one "
                "optimizer step: there lambda = 0 throughout and the heads would never learn, so ce, and the start "
                "warning says so). "
                "The heads then always learn, while lambda (or mtp_coef) decides only what reaches the trunk; none "
                "keeps OCC as the paper defines it. Against mtp_regime: mtp_regime: ce / distill are the regime's term "
                "(ce reaches the trunk, distill does not, both weighted by mtp_coef); mtp_head_loss: ce / distill "
                "are the same losses on detached heads, weighted by mtp_head_coef, beside any regime."})
    mtp_head_coef: float = field(default=0.1, metadata={"help": "Weight of the mtp_head_loss term."})
    occ_first_update: str = field(default="zero", metadata={
        "help": "OCC's lambda on the first update after each rollout, where the policy has not moved yet and the "
                "proxies give 0: zero (the paper) | carry (the last lambda of the previous rollout's updates, per "
                "head; 0 before any). mtp/lambda_pos<i>/k logs lambda per position i within a rollout."})
    mtp_grad_clip: str = field(default="shared", metadata={
        "help": "shared: TRL's clip of the summed gradient to max_grad_norm (a large MTP gradient shrinks the "
                "policy's part of the step) | separate: the policy's gradient clipped alone to max_grad_norm and the "
                "MTP term's whole contribution (heads and what reaches the trunk) alone to mtp_max_grad_norm, then "
                "added. Where the MTP term reaches the trunk, separate takes its gradient apart with one extra "
                "backward per micro-batch (docs/guide-geometry.md)."})
    mtp_max_grad_norm: float | None = field(default=None, metadata={
        "help": "The MTP term's own clip budget under mtp_grad_clip: separate (None: max_grad_norm; 0: no clip)."})
    mtp_log_update_norm: bool = field(default=True, metadata={
        "help": "Log update_norm (||delta theta|| of every optimizer step). It keeps one copy of the trainable "
                "parameters from before the step until after it; set false on models where that copy does not fit."})
    mtp_optimizer_state: str = field(default="shared", metadata={
        "help": "shared: one AdamW over the summed gradient (its second moment mixes the two terms) | separate: the "
                "MTP term's gradient at coefficient 1 gets its own Adam moments on the trunk, and the trunk moves "
                "by the policy's AdamW step plus lambda times the MTP term's own Adam step (one more pair of moments "
                "for the trunk; saved in checkpoints as mtp_moments.pt)."})
    reward_failure: str = field(default="zero", metadata={"help": REWARD_FAILURE_HELP})

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
        check_choice("mtp_regime", self.mtp_regime, REGIMES)
        self.check_head_fields()
        check_choice("loss_type", self.loss_type, TRL_LOSS_TYPES)
        check_choice("mtp_head_loss", self.mtp_head_loss, (*HEAD_LOSSES, "auto"))
        check_number("mtp_head_coef", self.mtp_head_coef)
        check_choice("reward_failure", self.reward_failure, REWARD_FAILURE_MODES)
        check_reporting(self.report_to)
        # sampling divides the logits by it (TRL's kernel, the drafter's warpers): 0 would fail mid-run
        check_number("temperature", self.temperature, 0.0, low_open=True)
        if self.mtp_draft_tokens and self.mtp_regime == "none":
            raise ValueError("mtp_draft_tokens > 0 drafts with the MTP heads, which mtp_regime=none does not attach; "
                             "use mtp_regime=frozen (heads drafting, never trained) or detach (heads trained, policy "
                             "untouched)")
        if self.mtp_regime == "frozen" and self.mtp_head_loss not in ("none", "auto"):
            raise ValueError(f"mtp_head_loss={self.mtp_head_loss} trains the heads, which mtp_regime=frozen keeps "
                             "fixed; use mtp_head_loss=none (or auto) with frozen, or mtp_regime=detach to train them")
        if getattr(self, "use_vllm", False) and self.needs_mtp:
            self._check_vllm()
        if self.mtp_draft_tokens and getattr(self, "use_transformers_paged", False):
            raise ValueError("mtp_draft_tokens > 0 with use_transformers_paged=true is not supported")
        check_choice("occ_variant", self.occ_variant, OCC_VARIANTS)
        for name in ("mtp_coef", "occ_lambda_plus"):
            check_number(name, getattr(self, name))
        check_number("occ_eps", self.occ_eps, 0.0, low_open=True)
        check_int("occ_last_layers", self.occ_last_layers, 1)
        check_number("occ_ema_beta", self.occ_ema_beta, 0.0, 1.0, high_open=True)
        check_int("occ_fidelity_every", self.occ_fidelity_every, 0)
        check_choice("occ_first_update", self.occ_first_update, ("zero", "carry"))
        check_choice("mtp_grad_clip", self.mtp_grad_clip, GRAD_CLIP_MODES)
        check_choice("mtp_optimizer_state", self.mtp_optimizer_state, OPTIMIZER_STATE_MODES)
        if self.mtp_max_grad_norm is not None:
            check_number("mtp_max_grad_norm", self.mtp_max_grad_norm, 0.0)
        if (self.mtp_regime == "occ" and self.occ_variant == "last_layers"
                and "separate" in (self.mtp_grad_clip, self.mtp_optimizer_state)):
            raise ValueError("occ_variant=last_layers takes lambda and the loss from one backward of the graph cut "
                             "below the last layers, while mtp_grad_clip / mtp_optimizer_state = separate need the "
                             "MTP term's gradient apart over the whole trunk (a second backward): the two paths "
                             "exclude each other; use occ_variant=hidden or exact with the separate clip / moments, "
                             "or the shared ones with last_layers")
        if self.mtp_optimizer_state == "separate" and self.mtp_regime == "occ" and self.occ_variant == "reference":
            raise ValueError("mtp_optimizer_state=separate needs the MTP term at coefficient 1, but occ_variant="
                             "reference puts lambda inside the head's advantages; use occ_variant=paper (or any "
                             "other lambda source) or mtp_optimizer_state=shared")

    def _check_vllm(self) -> None:
        """use_vllm with MTP heads: TRL's colocate mode, the heads drafting inside vLLM (`generation.vllm_engine`)."""
        if self.vllm_mode != "colocate":
            raise ValueError(
                f"vllm_mode={self.vllm_mode!r} with mtp_regime={self.mtp_regime}: TRL's server mode syncs weights to "
                "`trl vllm-serve` over NCCL (CUDA only) and pushes every parameter name, the heads' included, and "
                "syncs no drafter; mtprl runs vLLM in colocate mode (vllm_mode: colocate), where it syncs the "
                "target and the drafter after every optimizer step")
        if self.mtp_draft_tokens:
            if self.mtp_draft_policy != "fixed" or self.mtp_draft_vocab_size:
                raise ValueError("mtp_draft_tokens with use_vllm: vLLM drafts a fixed number of tokens from the "
                                 "full vocabulary; set mtp_draft_policy: fixed and mtp_draft_vocab_size: 0")

    @property
    def needs_mtp(self) -> bool:
        return self.mtp_regime != "none"


# ------------------------------------------------------------------------------------------- SFT


@dataclass
class MTPSFTConfig(HeadFields, SFTConfig):
    """SFTConfig for the warm start: main CE plus `mtp_coef` x the mean CE of the MTP heads (MTP pretraining,
    as in DeepSeek-V3), on completion tokens."""

    mtp_coef: float = field(default=1.0, metadata={"help": "Weight of the mean MTP CE against the main CE."})
    mtp_only: bool = field(default=False, metadata={
        "help": "Warm fresh heads for a model without MTP weights: the main model is frozen (trunk, embeddings, "
                "lm_head) and the heads learn mtp_only_loss (default: the main head's distribution, "
                "KL(p_main || q_k)) on the model's own samples of the dataset's prompts (self-distillation)."})
    mtp_only_max_new_tokens: int = field(default=64, metadata={
        "help": "mtp_only: tokens sampled per prompt for the self-distillation text."})
    mtp_only_loss: str = field(default="distill", metadata={
        "help": "mtp_only: what the heads learn on the self-sampled text, in mtp_head_loss's vocabulary. distill: "
                "KL(p_main || q_k), the policy's own distribution | tv: 1 - sum_v min(p_main, q_k), one minus the "
                "speculative acceptance (the heads trained as drafters) | ce: the sampled tokens."})
    answer_format: str = field(default="answer", metadata={
        "help": "The warm start's completions: answer (the reference answer alone) | working (chain_sum only: the "
                "running sum written out line by line, '4 - 1 = 3', '3 - 7 = -4', then 'Answer: -4'; completions of "
                "20-45 tokens, where drafting has something to accelerate)."})
    answer_suffix_fraction: float = field(default=0.0, metadata={
        "help": "Fraction of the warm-start completions written '<answer>!', a format the verifier does not fully "
                "accept (reasoning-gym gives partial credit; avg@k counts it wrong): a stand-in for the "
                "answer-format errors that RL from verifiable rewards fixes in real models (a missing \\boxed{}), "
                "so that RL has a behaviour to learn that transfers across questions. 0 = clean answers."})

    def __post_init__(self):
        self.check_head_fields()
        check_number("answer_suffix_fraction", self.answer_suffix_fraction, 0.0, 1.0)
        check_choice("mtp_only_loss", self.mtp_only_loss, HEAD_LOSSES[1:])
        check_choice("answer_format", self.answer_format, ANSWER_FORMATS)
        check_number("mtp_coef", self.mtp_coef)
        super().__post_init__()
