"""LoRA: a trunk adapted by PEFT beside MTP heads trained in full, the way TRL's users run GRPO.

The command line takes TRL's own flags (`--use_peft --lora_r 16 --lora_target_modules q_proj v_proj ...`, the PEFT
fields of `trl.ModelConfig`, with its help text) and builds the `LoraConfig` with TRL's `get_peft_config`. Python
users pass `peft_config=` to `MTPGRPOTrainer`, as to `GRPOTrainer`.

- The heads stay outside PEFT. Their layers copy a trunk layer, so LoRA's `target_modules` (`q_proj`, ...) would
  match them too and freeze their base weights; the trainer takes the heads off the model before TRL wraps it
  (`heads_off_for_peft`) and puts them back on the `PeftModel` after, so they train in full and every lambda source
  sees the parameters that actually train (the adapter's and the heads'). A user who wants the heads adapted by
  LoRA too names them in `lora_target_modules` with the heads attached by their own code after wrapping.
- A LoRA run directory holds TRL's adapter (`adapter_config.json`, `adapter_model.safetensors`) and the heads in
  mtprl's files; resume restores both. `load_adapted` (what `loading.load_model` calls for such a directory: `mtprl
  eval`, drafting, `mtprl export`) loads the base model the adapter names, merges the adapter into it and attaches
  the trained heads: the merged model computes what the adapted one does, without PEFT's per-layer detour.
"""

from __future__ import annotations

import dataclasses
import json
import os

from trl import ModelConfig

ADAPTER_CONFIG = "adapter_config.json"
# TRL's ModelConfig fields that configure PEFT (the rest of ModelConfig is the model, which TaskArguments names)
PEFT_FIELDS = ("use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
               "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")


def _peft_fields():
    out = []
    for f in dataclasses.fields(ModelConfig):
        if f.name in PEFT_FIELDS:
            default = (dict(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING
                       else dict(default=f.default))
            out.append((f.name, f.type, dataclasses.field(metadata=f.metadata, **default)))
    return out


# `mtprl train` / `compare`: TRL's PEFT flags, field for field (type, default and help are TRL's own)
LoraArguments = dataclasses.make_dataclass("LoraArguments", _peft_fields())
LoraArguments.__module__ = __name__
LoraArguments.__doc__ = "LoRA of the trunk: TRL's `ModelConfig` PEFT fields (`--use_peft --lora_r ...`)."


def peft_config_of(lora_args):
    """The `LoraConfig` TRL's scripts build from these flags (`trl.get_peft_config`); None without `use_peft`."""
    from trl import get_peft_config

    return get_peft_config(ModelConfig(**{name: getattr(lora_args, name) for name in PEFT_FIELDS}))


def heads_off_for_peft(model, peft_config):
    """Before TRL wraps `model` in PEFT: take its MTP heads off (returned, or None) so LoRA neither matches nor
    freezes them; `heads_back_on` registers them on the wrapped model."""
    if peft_config is None or isinstance(model, str) or getattr(model, "mtp_heads", None) is None:
        return None
    heads = model.mtp_heads
    del model.mtp_heads
    return heads


def heads_back_on(wrapped, heads) -> None:
    if heads is not None:
        wrapped.mtp_heads = heads
        for p in heads.parameters():
            p.requires_grad_(True)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str) -> str:
    """The base model a LoRA run directory's adapter was trained on (PEFT's `base_model_name_or_path`)."""
    cfg_file = os.path.join(path, ADAPTER_CONFIG)
    with open(cfg_file) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{cfg_file} names no base_model_name_or_path: the adapter cannot be loaded without its "
                         "base model (a LoRA run needs a base checkpoint on disk or a hub id, not the fresh `tiny` "
                         "preset)")
    return base
