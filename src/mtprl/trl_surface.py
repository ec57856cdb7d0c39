"""The private and undocumented names of TRL, transformers and accelerate that mtprl relies on, in one place.

`SURFACE` is the single source of truth: every method mtprl overrides or calls, every attribute it reads or patches,
that the libraries do not document as their API. docs/layout.md's last section is the same list as a table
(`python -m mtprl.trl_surface --markdown` prints it) and tests/test_trl_surface.py keeps the two equal. After a TRL or
transformers upgrade, `python -m mtprl.trl_surface` (or the test) names every entry that no longer resolves and where
mtprl uses it. accelerate appears only through its public API (`Accelerator.unwrap_model`, `autocast`, `reduce`,
`num_processes`), reached through `transformers.Trainer.accelerator`.

How an entry is checked (`check`):
- A name is imported and walked attribute by attribute: the longest importable module prefix, then `getattr` for the
  rest (`trl.GRPOTrainer._compute_loss`: module `trl`, class `GRPOTrainer`, method `_compute_loss`).
- `name(a, b, c)`: the callable's parameters (without `self` / `cls` / `ctx`) must start with `a, b, c` in this order,
  since mtprl passes them by position or mirrors them in an override; `name(a, ..., z)`: `a` first, then `z`
  somewhere after it (a keyword mtprl passes).
- An instance attribute (`instance="init"`: set when the object is built; `"later"`: set on the way, by the training
  loop or a quantizer) has nothing to `getattr` on the class. Building a trainer per check would be slow and would not
  reach the `"later"` ones, so the check is on the source: the attribute must still be spoken as `self.<name>` or as
  the string `"<name>"` in the source of the owner class or a class it derives from. A rename in TRL removes those,
  which is the change this guards against. tests/test_trl_surface.py also checks every `"init"` entry on a real tiny
  trainer, its model, heads, config and an argument parser.

`unlisted_collisions` is the other direction: a private name mtprl's trainers and parser define (a method, or an
attribute they assign) that TRL / transformers now also define and that `SURFACE` does not list as overridden: a name
TRL adds that mtprl would silently override.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import textwrap
from typing import NamedTuple

KINDS = ("overridden", "called", "read", "patched attribute")

HEADING = "## The TRL and transformers surface mtprl relies on"


class Use(NamedTuple):
    """One name of another library mtprl relies on."""

    name: str  # fully qualified; "(params)" appended where mtprl relies on the parameters' names and order
    kind: str  # one or more of KINDS, ", "-separated
    where: tuple[str, ...]  # mtprl's module.function (or module.Class.method) that relies on it
    why: str  # one line
    instance: str = ""  # "" (resolved by getattr), "init" or "later": an instance attribute (see the module doc)

    @property
    def dotted(self) -> str:
        """The name without its parameter list."""
        return self.name.split("(", 1)[0]

    @property
    def params(self) -> tuple[str, ...] | None:
        if "(" not in self.name:
            return None
        inner = self.name.split("(", 1)[1].rstrip(")")
        return tuple(p.strip() for p in inner.split(",") if p.strip())


_MAIN_HEAD_ONLY = ("training.trl_compat._main_head_extras_off",)

SURFACE: tuple[Use, ...] = (
    # ---------------------------------------------------------------- TRL: GRPOTrainer's methods
    Use("trl.GRPOTrainer._compute_loss(model, inputs)", "overridden, called",
        ("training.trainer.MTPGRPOTrainer._compute_loss", "training.trl_compat.trl_head_loss"),
        "TRL's own loss on the MTP forward's main log-probs; each head's loss through TRL's code for its loss types"),
    Use("trl.GRPOTrainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, "
        "batch_size, compute_entropy, compute_aux_loss)", "overridden, patched attribute",
        ("training.trainer.MTPGRPOTrainer._get_per_token_logps_and_entropies", "training.trl_compat.serving_logprobs"),
        "old log-probs at rollout through the heads; TRL's loss served the log-probs of our one forward"),
    Use("trl.GRPOTrainer._generate_and_score_completions(inputs)", "overridden, called",
        ("training.trainer.MTPGRPOTrainer._generate_and_score_completions", "training.update.UpdateMixin.draw_rollout"),
        "old_mtp_logps from the forward that gave old_per_token_logps; the probe draws a rollout as the run does"),
    Use("trl.GRPOTrainer._generate_single_turn", "overridden", ("training.trainer.MTPGRPOTrainer._generate_single_turn",),
        "the live heads draft the rollouts: TRL's generate call goes through the speculative sampler"),
    Use("trl.GRPOTrainer.use_vllm", "patched attribute", ("training.trainer.MTPGRPOTrainer.__init__",),
        "use_vllm: TRL builds no engine of its own during its __init__; mtprl's is set after the heads are attached",
        "init"),
    Use("trl.GRPOTrainer.vllm_generation", "patched attribute", ("training.trainer.MTPGRPOTrainer.__init__",),
        "TRL's generation object, built on mtprl's engine (generation.vllm_engine)", "later"),
    Use("trl.GRPOTrainer._last_loaded_step", "patched attribute", ("training.trainer.MTPGRPOTrainer.__init__",),
        "TRL syncs the engine before a rollout whenever the optimizer step moved", "later"),
    Use("trl.generation.vllm_generation.VLLMGeneration._init_vllm", "overridden",
        ("generation.vllm_engine.make_vllm_generation",),
        "the engine on mtprl's export (trunk, or trunk and heads in MiMo's layout with the mtp speculative method)"),
    Use("trl.generation.vllm_generation.VLLMGeneration.sync_weights", "overridden",
        ("generation.vllm_engine.make_vllm_generation",),
        "target by vLLM's layerwise reload (TRL's load_weights fails on the CPU backend), then the drafter"),
    Use("trl.generation.vllm_generation.VLLMGeneration._iter_named_params", "called",
        ("generation.vllm_engine.make_vllm_generation",),
        "the target's tensors as TRL hands them to vLLM (PEFT merged, FSDP gathered, vLLM's names)"),
    Use("trl.GRPOTrainer._prepare_inputs(generation_batch)", "patched attribute",
        ("training.update.UpdateMixin._inputs_as_given",),
        "training_step on a micro-batch mtprl hands it (TRL's would draw or reuse a rollout of its own)"),
    # ---------------------------------------------------------------- TRL: GRPOTrainer's attributes
    Use("trl.GRPOTrainer._metrics", "read, patched attribute",
        ("training.trainer.MTPGRPOTrainer._log_metrics", "training.trl_compat._metrics_discarded", "training.update.UpdateMixin.update_on"),
        "mtprl's metrics join TRL's per-mode lists, averaged at each log; a head's TRL-loss metrics are discarded",
        "init"),
    Use("trl.GRPOTrainer._step", "read, patched attribute",
        ("training.update.UpdateMixin.update_state", "training.update.UpdateMixin.restore_update_state"),
        "TRL's micro-step counter (which rollout is trained on) saved and restored around the probe's update",
        "init"),
    Use("trl.GRPOTrainer.epsilon_low", "read", ("training.trainer.MTPGRPOTrainer.loss_scaling",),
        "the lower clip bound of the heads' surrogate, as TRL resolved it from epsilon", "init"),
    Use("trl.GRPOTrainer.epsilon_high", "read", ("training.trainer.MTPGRPOTrainer.loss_scaling",),
        "the upper clip bound of the heads' surrogate, as TRL resolved it from epsilon_high", "init"),
    Use("trl.GRPOTrainer.aux_loss_enabled", "read, patched attribute",
        ("training.trainer.MTPGRPOTrainer._compute_loss", *_MAIN_HEAD_ONLY),
        "whether the MTP forward returns the router aux loss; off while a head's loss goes through TRL", "init"),
    Use("trl.GRPOTrainer.beta", "patched attribute", _MAIN_HEAD_ONLY,
        "the KL to the reference model belongs to the main head: 0 while a head's loss goes through TRL", "init"),
    Use("trl.GRPOTrainer._entropy_bonus_enabled", "patched attribute", _MAIN_HEAD_ONLY,
        "the entropy bonus belongs to the main head: off while a head's loss goes through TRL", "init"),
    Use("trl.GRPOTrainer.off_policy_mask_threshold", "patched attribute", _MAIN_HEAD_ONLY,
        "the off-policy sequence mask belongs to the main head: None while a head's loss goes through TRL", "init"),
    Use("trl.GRPOTrainer.top_entropy_quantile", "patched attribute", _MAIN_HEAD_ONLY,
        "the high-entropy token mask belongs to the main head: 1.0 while a head's loss goes through TRL", "init"),
    Use("trl.GRPOTrainer.temperature", "read",
        ("training.trainer.MTPGRPOTrainer._attach_heads", "training.trainer.MTPGRPOTrainer._rerun_heads"),
        "the heads' log-probs are taken at TRL's sampling temperature, as the main head's", "init"),
    Use("trl.GRPOTrainer.num_iterations", "read",
        ("training.trainer.MTPGRPOTrainer._occ_is_blind", "training.update.UpdateMixin.update_on", "training.update.UpdateMixin.draw_rollout"),
        "how many passes one rollout feeds (OCC sees no policy change when each rollout feeds one step)", "init"),
    Use("trl.GRPOTrainer.ref_model", "read", ("training.trainer.MTPGRPOTrainer._attach_heads",),
        "the reference model gets a frozen copy of the heads (TRL's sync_ref_model zips both models' parameters)",
        "init"),
    Use("trl.trainer.grpo_trainer.GRPOTrainer", "read", ("training.trl_compat.trl_grpo_class",),
        "TRL's own class found in the MRO by its module: a harness may rebind the name trl.GRPOTrainer"),
    # ---------------------------------------------------------------- TRL: SFTTrainer, utilities, kernels
    Use("trl.SFTTrainer._metrics", "read", ("training.sft_trainer.MTPSFTTrainer.compute_loss",),
        "the warm start's main CE, head CE and acceptance join TRL's logged metrics", "init"),
    Use("trl.trainer.utils.shuffle_sequence_dict(seq_dict)", "called", ("training.update.UpdateMixin.draw_rollout",),
        "the probe shuffles a rollout as TRL's _prepare_inputs does"),
    Use("trl.trainer.utils.split_tensor_dict(tensor_dict, num_chunks)", "called", ("training.update.UpdateMixin.draw_rollout",),
        "the probe splits a rollout into TRL's steps_per_generation micro-batches"),
    Use("trl.trainer.utils.get_config_model_id(config)", "called", ("training.trainer.MTPGRPOTrainer.__init__",),
        "TRL's default output_dir name when no args are given"),
    Use("trl.trainer.utils.is_async_callable(func)", "called", ("training.rewards.safe_reward",),
        "an async reward function stays async when wrapped, as TRL runs those on its event loop"),
    Use("trl.kernels.ChunkedLogProbFunction.forward(hidden, weight, bias, targets, temperature, chunk_size, "
        "final_logit_softcapping, logit_scale, outputs)", "called", ("model.logprobs._token_logprobs",),
        "TRL's chunked LM-head log-prob kernel (GRPOTrainer's own), called with positional arguments"),
    # ---------------------------------------------------------------- transformers: Trainer
    Use("transformers.Trainer._save(output_dir, state_dict)", "overridden", ("model.checkpoints.MTPCheckpointMixin._save",),
        "checkpoints keep the heads in mtp_heads.safetensors, the main weights a plain HF model"),
    Use("transformers.Trainer._load_from_checkpoint(resume_from_checkpoint, model)", "overridden",
        ("model.checkpoints.MTPCheckpointMixin._load_from_checkpoint",), "resuming restores the heads too"),
    Use("transformers.Trainer._clip_grad_norm(model)", "overridden, called",
        ("training.optimizer_step.OptimizerStepMixin._clip_grad_norm", "training.update.UpdateMixin.update_on"),
        "read-only there: the step's total norm for TRL's grad_norm (the clip runs inside the optimizer step); the "
        "probe's update calls it as the training loop does"),
    Use("transformers.Trainer.create_optimizer(model)", "overridden",
        ("training.optimizer_step.OptimizerStepMixin.create_optimizer",),
        "the run's optimizer wrapped so that its step() is optimizer_step (clip, step, the MTP term's moments, metrics)"),
    Use("transformers.Trainer._load_optimizer_and_scheduler(checkpoint)", "called, overridden",
        ("training.update.UpdateMixin.load_update_state", "training.optimizer_step.OptimizerStepMixin._load_optimizer_and_scheduler"),
        "the probe restores a checkpoint's optimizer and scheduler; the MTP term's own moments load beside them"),
    Use("transformers.Trainer._get_grad_norm(model, grad_norm)", "overridden, called",
        ("training.optimizer_step.OptimizerStepMixin._get_grad_norm", "training.update.UpdateMixin.update_on"),
        "the total norm is measured read-only where no clip runs (max_grad_norm 0)"),
    Use("transformers.Trainer._save_optimizer_and_scheduler(output_dir)", "overridden",
        ("training.optimizer_step.OptimizerStepMixin._save_optimizer_and_scheduler",),
        "mtp_optimizer_state: separate saves its moments beside the optimizer"),
    Use("transformers.Trainer.optimizer", "read, patched attribute",
        ("training.update.UpdateMixin.using_update_settings", "training.trainer.MTPGRPOTrainer._compute_loss"),
        "the probe's SGD counterfactual swaps the optimizer; Adam's preconditioner is read from its state", "later"),
    Use("transformers.Trainer.control", "read, patched attribute", ("training.update.UpdateMixin.update_on",),
        "the probe's update calls the optimizer-step callbacks as the training loop does", "init"),
    Use("transformers.Trainer.lr_scheduler", "read, patched attribute",
        ("training.update.UpdateMixin.using_update_settings", "training.update.UpdateMixin.update_on"),
        "the probe's update steps the run's scheduler; the SGD counterfactual swaps it", "later"),
    Use("transformers.Trainer.current_gradient_accumulation_steps", "read, patched attribute",
        ("training.trainer.MTPGRPOTrainer.loss_scaling", "training.trainer.MTPGRPOTrainer._step_settings",
         "training.update.UpdateMixin.update_on"),
        "the heads' loss is scaled by the accumulation as TRL's; the probe's update sets it as the loop does",
        "later"),
    Use("transformers.Trainer.is_deepspeed_enabled", "read", ("training.trainer.MTPGRPOTrainer._warn_about_settings",),
        "occ_variant=exact needs unpartitioned gradients: refused under DeepSpeed", "init"),
    Use("transformers.Trainer.is_fsdp_enabled", "read", ("training.trainer.MTPGRPOTrainer._warn_about_settings",),
        "settings that read global dot products or norms of .grad are refused under FSDP's sharded gradients",
        "init"),
    Use("transformers.Trainer.accelerator", "read",
        ("training.trainer.MTPGRPOTrainer._attach_heads", "training.trainer.MTPGRPOTrainer._mtp_forward",
         "model.checkpoints.MTPCheckpointMixin._save", "training.sft_trainer.MTPSFTTrainer.__init__"),
        "unwrap_model, autocast and reduce of the trainer's accelerate Accelerator", "init"),
    # ---------------------------------------------------------------- transformers: argument parser
    Use("transformers.HfArgumentParser._add_dataclass_arguments(dtype)", "overridden",
        ("cli.Parser._add_dataclass_arguments",), "--help groups fields by the class that defines them"),
    Use("transformers.HfArgumentParser._parse_dataclass_field(parser, field)", "called",
        ("cli.Parser._add_dataclass_arguments",), "each field added to its own argument group as transformers would"),
    Use("transformers.HfArgumentParser.dataclass_types", "read", ("cli.Parser.parse_args_and_config",),
        "an unknown YAML key is matched against every field for 'did you mean'", "init"),
    Use("transformers.HfArgumentParser._action_groups", "patched attribute", ("cli.Parser.__init__",),
        "argparse's own list of argument groups, reordered so mtprl's fields come first in --help", "init"),
    # ---------------------------------------------------------------- transformers: MTP layers, masks, caches
    Use("transformers.modeling_layers.MtpLayer(config, decoder_layer_cls, norm_cls, layer_idx)", "called",
        ("model.mtp.MTPHeads.__init__",), "each head depth is transformers' own MTP layer (DeepSeek-V3 layout)"),
    Use("transformers.modeling_layers.MtpLayer.forward(inputs_embeds, previous_hidden_state, position_embeddings, "
        "attention_mask, position_ids, past_key_values)", "called",
        ("model.mtp.MTPHeads.forward", "generation.speculative.speculative_generate"),
        "a depth runs on (token embeddings, previous depth's states), the first two by position"),
    Use("transformers.modeling_layers.MtpLayer.mtp_block", "read",
        ("model.mtp.attach_mtp_heads", "model.native.NativeLayout"),
        "init=copy_last_layer copies the trunk's last layer into it; a part of the native layouts", "init"),
    Use("transformers.modeling_layers.MtpLayer.enorm", "read", ("model.native.NativeLayout", "model.checkpoints.save_mtp_heads"),
        "a part name of mtp_heads.safetensors keys and of the native layouts' name maps", "init"),
    Use("transformers.modeling_layers.MtpLayer.hnorm", "read", ("model.native.NativeLayout", "model.checkpoints.save_mtp_heads"),
        "a part name of mtp_heads.safetensors keys and of the native layouts' name maps", "init"),
    Use("transformers.modeling_layers.MtpLayer.eh_proj", "read", ("model.native.NativeLayout", "model.checkpoints.save_mtp_heads"),
        "a part name of mtp_heads.safetensors keys and of the native layouts' name maps", "init"),
    Use("transformers.modeling_layers.MtpLayer.post_norm", "read",
        ("model.native.NativeLayout", "model.checkpoints.save_mtp_heads"),
        "a part name of mtp_heads.safetensors keys and of the native layouts' name maps", "init"),
    Use("transformers.modeling_layers.MtpModel.from_pretrained(main_model, device_map)", "called",
        ("model.native._read_with_transformers",), "DeepSeek-V3 / GLM-4.5 MTP weights read by transformers' own loader"),
    Use("transformers.modeling_layers.MtpModel.layers", "read", ("model.native._read_with_transformers",),
        "the loaded depths' state dict becomes the heads'", "init"),
    Use("transformers.PreTrainedModel._keys_to_ignore_on_load_unexpected", "patched attribute",
        ("model.native._read_with_transformers",),
        "MtpModel finds the MTP keys from it: pointed at this checkpoint's layer numbering for the load"),
    Use("transformers.PreTrainedModel._init_weights", "called", ("model.mtp.attach_mtp_heads",),
        "fresh heads (and every eh_proj) start from the model's own initialiser"),
    Use("transformers.PreTrainedConfig.get_mtp_config", "called", ("model.mtp.mtp_layers_config",),
        "the depths' config where the model declares num_mtp_layers (layer types re-indexed, MoE blocks)"),
    Use("transformers.masking_utils.create_causal_mask(config, inputs_embeds, attention_mask, past_key_values, "
        "position_ids, ..., layer_idx)", "called", ("model.mtp.MTPHeads.forward", "generation.speculative.speculative_generate"),
        "each depth's attention mask (ragged, padded, cached), built as the model's own forward builds it"),
    Use("transformers.masking_utils.LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING", "read", ("model.mtp.MTPHeads.forward",),
        "the mask function of a depth's layer type (full / sliding attention)"),
    Use("transformers.DynamicCache.batch_select_indices(indices)", "called", ("generation.speculative.speculative_generate",),
        "rows that finished leave the trunk's and the heads' KV caches"),
    Use("transformers.core_model_loading.revert_weight_conversion(model, state_dict)", "called",
        ("model.native._read_with_name_map", "model.native.native_state_dict"),
        "native MTP weights stored as transformers saves them (e.g. MoE experts split per expert)"),
    # ---------------------------------------------------------------- transformers: models, configs, generation
    Use("transformers.models.qwen2.modeling_qwen2.Qwen2Model.layers", "read",
        ("model.mtp.decoder_of", "model.mtp.attach_mtp_heads", "model.mtp.last_layer_params", "training.trainer.MTPGRPOTrainer._trunk_cut"),
        "the trunk's decoder layers (Llama / Qwen-style families name them so): the heads' layer class, OCC's cut",
        "init"),
    Use("transformers.models.qwen2.modeling_qwen2.Qwen2Model.norm", "read",
        ("model.mtp.last_layer_params", "model.native.check_h0"), "the trunk's final norm: h^0 is taken after it", "init"),
    Use("transformers.models.qwen2.modeling_qwen2.Qwen2Model.rotary_emb", "read",
        ("model.logprobs.head_logprobs", "generation.speculative.speculative_generate"),
        "the heads' rotary position embeddings are the trunk's own module", "init"),
    Use("transformers.models.qwen2_moe.modeling_qwen2_moe.load_balancing_loss_func(gate_logits, num_experts, top_k, "
        "attention_mask)", "called", ("model.logprobs.router_aux_loss",),
        "the router aux loss as the model's forward computes it, found in the model's own modelling module"),
    Use("transformers.PreTrainedConfig._name_or_path", "read",
        ("training.trainer.MTPGRPOTrainer._attach_heads", "training.sft_trainer.MTPSFTTrainer.__init__"),
        "the checkpoint the model came from: where its saved or native heads are loaded from", "init"),
    Use("transformers.PretrainedConfig", "called", ("model.loading._stock_class",),
        "transformers 4's spelling of PreTrainedConfig, still an alias in 5.x"),
    Use("transformers.PreTrainedConfig.quantization_config", "patched attribute", ("model.loading._drop_quantization",),
        "a de-quantized GGUF model forgets it was quantized, so the trainers train it", "later"),
    Use("transformers.PreTrainedModel.hf_quantizer", "patched attribute", ("model.loading._drop_quantization",),
        "a de-quantized GGUF model forgets it was quantized, so the trainers train it", "later"),
    Use("transformers.PreTrainedModel.is_quantized", "patched attribute", ("model.loading._drop_quantization",),
        "what the Trainer's quantization check reads; set False on a de-quantized GGUF model", "later"),
    Use("transformers.PreTrainedModel.quantization_method", "patched attribute", ("model.loading._drop_quantization",),
        "read by the Trainer's device placement; cleared on a de-quantized GGUF model", "later"),
    Use("transformers.GenerationMixin.generate", "patched attribute", ("generation.rollout.drafted_generate",),
        "TRL's generate(input_ids=, attention_mask=, generation_config=) on the policy goes to the sampler"),
    Use("transformers.GenerationConfig.update(defaults_only)", "called", ("generation.rollout.drafted_generate",),
        "the call's config completed with the model's defaults, as generate completes it"),
    Use("transformers.integrations.get_available_reporting_integrations", "called", ("training.config.check_reporting",),
        "report_to checked at config time, not mid-setup"),
)


# ------------------------------------------------------------------------------------------------ resolution

def _library(name: str) -> str:
    top = name.split(".", 1)[0]
    return {"trl": "TRL", "transformers": "transformers", "accelerate": "accelerate"}.get(top, top)


def _import_path(dotted: str):
    """(object, remaining attribute names) after importing the longest module prefix of `dotted`."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            return importlib.import_module(".".join(parts[:i])), parts[i:]
        except ImportError:
            continue
    raise ImportError(f"no module {parts[0]!r}")


def _walk(obj, attrs):
    for attr in attrs:
        obj = getattr(obj, attr)
    return obj


@functools.lru_cache(maxsize=None)
def _class_source(cls) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _spoken(cls, attr: str) -> bool:
    """`self.<attr>` or the string "<attr>" in the source of `cls` or a class it derives from."""
    pattern = re.compile(r"\bself\.%s\b|[\"']%s[\"']" % (re.escape(attr), re.escape(attr)))
    return any(pattern.search(_class_source(c)) for c in cls.__mro__ if c is not object)


def _parameters(obj) -> list[str]:
    names = list(inspect.signature(obj).parameters)
    while names and names[0] in ("self", "cls", "ctx"):
        names.pop(0)
    return names


def _params_problem(obj, wanted: tuple[str, ...]) -> str | None:
    try:
        have = _parameters(obj)
    except (TypeError, ValueError) as e:
        return f"has no signature ({e})"
    prefix = list(wanted[: wanted.index("...")] if "..." in wanted else wanted)
    later = list(wanted[wanted.index("...") + 1:]) if "..." in wanted else []
    rest = have[len(prefix):]
    ok = have[: len(prefix)] == prefix and all(p in rest for p in later) and \
        [p for p in rest if p in later] == later
    return None if ok else f"takes ({', '.join(have)}), mtprl relies on ({', '.join(wanted)})"


def _problem(use: Use) -> str | None:
    """What is wrong with `use` in the installed packages, or None."""
    dotted = use.dotted
    try:
        module, attrs = _import_path(dotted)
    except ImportError as e:
        return f"cannot be imported ({e})"
    try:
        if use.instance:
            owner = _walk(module, attrs[:-1])
            if not attrs or not inspect.isclass(owner):
                return "names no class attribute"
            if hasattr(owner, attrs[-1]) or _spoken(owner, attrs[-1]):
                return None
            return "no longer exists"
        obj = _walk(module, attrs)
    except AttributeError:
        return "no longer exists"
    return None if use.params is None else _params_problem(obj, use.params)


def check(entries=SURFACE) -> list[tuple[Use, str]]:
    """Every entry that does not resolve against the installed packages, with what is wrong."""
    return [(use, problem) for use in entries if (problem := _problem(use)) is not None]


def missing_names(entries=SURFACE) -> list[str]:
    """The names of `entries` (default: `SURFACE`) that no longer resolve (see the module doc for how)."""
    return [use.name for use, _ in check(entries)]


def message(use: Use, problem: str) -> str:
    """"TRL changed: <name> no longer exists; mtprl uses it in <where> for <why>" (or what else is wrong)."""
    where = ", ".join(use.where)
    return f"{_library(use.name)} changed: {use.dotted} {problem}; mtprl uses it in {where} for {use.why}"


def messages(entries=SURFACE) -> list[str]:
    """One line per entry that does not resolve: what changed, where mtprl uses it and what for."""
    return [message(use, problem) for use, problem in check(entries)]


# ------------------------------------------------------------------------------------------------ collisions

def _assigned_self_attributes(cls) -> set[str]:
    """Names `cls`'s own source assigns or deletes as `self.<name>` (tuple targets included)."""
    source = _class_source(cls)
    if not source:
        return set()
    names = set()
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        stack = list(targets)
        while stack:
            t = stack.pop()
            if isinstance(t, (ast.Tuple, ast.List)):
                stack.extend(t.elts)
            elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.add(t.attr)
    return names


def _mtprl_classes_to_watch():
    from .cli import Parser
    from .training.sft_trainer import MTPSFTTrainer
    from .training.trainer import MTPGRPOTrainer

    return (MTPGRPOTrainer, MTPSFTTrainer, Parser)


def unlisted_collisions(classes=None, entries=SURFACE) -> list[str]:
    """Names mtprl's own classes define (private methods and attributes, any attribute they assign on `self`) that
    the library classes below them also define, and that `entries` does not list: a name a new TRL / transformers
    added, which mtprl would now override without meaning to."""
    listed = {use.dotted.rsplit(".", 1)[-1] for use in entries}
    found = []
    for cls in classes or _mtprl_classes_to_watch():
        ours = [c for c in cls.__mro__ if c.__module__.split(".")[0] == "mtprl"]
        library = [c for c in cls.__mro__ if c not in ours and c is not object]
        names = {n for c in ours for n in vars(c) if n.startswith("_") and not n.startswith("__")}
        names |= {n for c in ours for n in _assigned_self_attributes(c)}
        for name in sorted(names - listed):
            owner = next((c for c in library if name in vars(c) or _spoken(c, name)), None)
            if owner is not None:
                found.append(f"{owner.__module__}.{owner.__qualname__} now defines {name}, which mtprl's "
                             f"{cls.__name__} also defines: list it in mtprl.trl_surface.SURFACE if the override "
                             "is meant, else rename mtprl's")
    return found


# ------------------------------------------------------------------------------------------------ the docs table

def markdown_rows(entries=SURFACE) -> list[str]:
    rows = ["| name | kind | where in mtprl | why |", "|---|---|---|---|"]
    for use in entries:
        where = ", ".join(f"`{w}`" for w in use.where)
        rows.append(f"| `{use.name}` | {use.kind} | {where} | {use.why} |")
    return rows


def markdown_section(entries=SURFACE) -> str:
    """The section of docs/layout.md that lists `entries` (tests/test_trl_surface.py keeps it equal to SURFACE)."""
    intro = ("The private or undocumented names of TRL, transformers and accelerate that mtprl overrides, calls, "
             "reads or patches. The list in code is `trl_surface.SURFACE`, the one source of truth: "
             "`python -m mtprl.trl_surface` names every entry that no longer resolves after an upgrade (and where "
             "mtprl uses it), `python -m mtprl.trl_surface --markdown` prints this table, and "
             "`tests/test_trl_surface.py` keeps the two equal. A name with parameters, `f(a, b)`, also relies on "
             "their names and order (`f(a, ..., z)`: `a` first, `z` later). accelerate is used only through its "
             "public `Accelerator` API, reached through `transformers.Trainer.accelerator`.")
    return "\n".join([HEADING, "", intro, "", *markdown_rows(entries)]) + "\n"


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mtprl.trl_surface", description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the docs/layout.md section instead")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_section(), end="")
        return 0
    problems = messages() + unlisted_collisions()
    for line in problems:
        print(line)
    if not problems:
        print(f"all {len(SURFACE)} names mtprl relies on resolve")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
