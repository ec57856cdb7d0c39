"""Checkpoints: the one module that reads and writes MTP heads, and decides whether a model's heads are
attached fresh or loaded.

A checkpoint directory is one complete model: the main model exactly as `model.save_pretrained` writes it (so
plain `AutoModelForCausalLM.from_pretrained(dir)` loads it), plus `mtp_heads.safetensors` (the heads' weights,
transformers' `MtpLayer` names) and `mtp_config.json` (their count and layout), plus the tokenizer.

- `attach_or_load_heads(model, ...)`: the one function `load_model` and both trainers call.
- `save_pretrained` / `load_pretrained`: the public round trip.
- `MTPCheckpointMixin`: the trainers' `_save` / `_load_from_checkpoint`, so TRL checkpoints and resume keep the
  heads too.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from ..io.faults import kill_point
from ..io.jsonl import atomic_replace, atomic_write_json
from .mtp import MTPHeads, attach_mtp_heads, get_mtp_heads
from .native import LAYOUT_BY_NAME, LAYOUTS, find_native_layout, heads_config, load_native_heads, use_layout

MTP_CONFIG_NAME = "mtp_config.json"
MTP_WEIGHTS_NAME = "mtp_heads.safetensors"
MAIN_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # a LoRA run's trunk (`mtprl.model.lora`)
_HEADS_WHAT = "the MTP heads, written by mtprl.save_pretrained"


# ---------------------------------------------------------------------------------------------------- writing

def split_state_dict(state_dict: dict[str, torch.Tensor]):
    """(main-model entries, MTP-head entries without the `mtp_heads.` prefix)."""
    main = {k: v for k, v in state_dict.items() if not k.startswith("mtp_heads.")}
    heads = {k[len("mtp_heads."):]: v for k, v in state_dict.items() if k.startswith("mtp_heads.")}
    return main, heads


def save_mtp_heads(heads: MTPHeads, path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `mtp_heads.safetensors` and `mtp_config.json` into `path`."""
    from safetensors.torch import save_file

    state = heads.state_dict() if state_dict is None else state_dict
    os.makedirs(path, exist_ok=True)
    # written under a temporary name and renamed: a kill mid-write never leaves a half file that looks complete
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_replace(os.path.join(path, MTP_WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(path, MTP_CONFIG_NAME),
                      {"num_heads": heads.num_heads, "init": heads.init,
                       "decoder_layer_class": type(heads.layers[0].mtp_block).__name__, "native": heads.native,
                       "layout": "transformers.modeling_layers.MtpLayer"})


def save_pretrained(model, path, tokenizer=None, **kwargs) -> None:
    """Write one complete checkpoint directory: the main model exactly as `model.save_pretrained` would
    (so plain `AutoModelForCausalLM.from_pretrained(path)` loads it), plus `mtp_heads.safetensors` and
    `mtp_config.json`, plus the tokenizer when given."""
    heads = get_mtp_heads(model)
    main_state, head_state = split_state_dict(model.state_dict())
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, state_dict=main_state, **kwargs)
    save_mtp_heads(heads, path, head_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------------------- reading

def require_files(path, names, what) -> None:
    for name in names:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"checkpoint {str(path)!r} is missing {name} ({what})")


def has_mtp_checkpoint(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(str(path), MTP_CONFIG_NAME))


def has_main_weights(path) -> bool:
    return any(os.path.isfile(os.path.join(str(path), f)) for f in MAIN_WEIGHT_FILES)


def is_complete_checkpoint(path) -> bool:
    """Main-model weights (or, for a LoRA run, the adapter's) and MTP head weights are both there (a finished
    save)."""
    trunk = has_main_weights(path) or any(os.path.isfile(os.path.join(str(path), f)) for f in ADAPTER_WEIGHT_FILES)
    return trunk and os.path.isfile(os.path.join(str(path), MTP_WEIGHTS_NAME))


def load_mtp_weights(heads: MTPHeads, path) -> None:
    """Load `path/mtp_heads.safetensors` into existing heads in place (so an optimizer's references to their
    parameters stay valid, as on resume). A mismatch names the file and the keys."""
    from safetensors.torch import load_file

    require_files(path, (MTP_WEIGHTS_NAME,), _HEADS_WHAT)
    weights_file = os.path.join(path, MTP_WEIGHTS_NAME)
    state = load_file(weights_file, device=str(next(heads.parameters()).device))
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match {heads.num_heads} MTP head(s): "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    heads.fresh = False


def load_mtp_heads(model, path) -> MTPHeads:
    """Attach the heads stored in checkpoint directory `path` to `model` (replacing any it has)."""
    require_files(path, (MTP_CONFIG_NAME, MTP_WEIGHTS_NAME), _HEADS_WHAT)
    cfg_file = os.path.join(path, MTP_CONFIG_NAME)
    with open(cfg_file) as f:
        mtp_cfg = json.load(f)
    if not isinstance(mtp_cfg.get("num_heads"), int):
        raise ValueError(f"{cfg_file} has no integer 'num_heads' field")
    native, n = mtp_cfg.get("native"), mtp_cfg["num_heads"]
    if native is not None and native not in LAYOUT_BY_NAME:
        raise ValueError(f"{cfg_file}: unknown native MTP layout {native!r} (known: {', '.join(LAYOUT_BY_NAME)})")
    config = None if native is None else heads_config(model, LAYOUT_BY_NAME[native], n)
    heads = attach_mtp_heads(model, num_heads=n, init="random", config=config)
    heads.init = mtp_cfg.get("init", "copy_last_layer")
    use_layout(heads, None if native is None else LAYOUT_BY_NAME[native])
    load_mtp_weights(heads, path)
    return heads


# config fields by which a model family declares its MTP layers (what a checkpoint without their tensors claims)
DEPTH_FIELDS = tuple(dict.fromkeys(layout.depth_field for layout in LAYOUTS))


def attach_or_load_heads(model, num_heads: int | None = None, init: str = "copy_last_layer",
                         source: str | None = None, layout: str | None = None) -> MTPHeads:
    """The heads `model` trains with, in this order:
    1. heads it already carries (kept as they are; fresh ones rebuilt when `layout` asks for another layout);
    2. the heads stored in `source` when it is an mtprl checkpoint directory (its trained heads);
    3. the model family's own MTP layers when `source` is a checkpoint that ships them (`mtprl.model.native`);
    4. fresh heads (`num_heads`, default 1, initialised by `init`), in the native `layout` when given (MiMo's:
       what vLLM's `mtp` drafter computes) or mtprl's own.
    `num_heads=None` accepts whatever count 1-3 give; a number that differs from it is an error, and so are
    trained heads in another layout than `layout`."""
    heads = getattr(model, "mtp_heads", None)
    origin = "the model"
    if layout is not None and layout not in LAYOUT_BY_NAME:
        raise ValueError(f"mtp_native_layout={layout!r}: not a native MTP layout (known: {', '.join(LAYOUT_BY_NAME)})")
    if layout is not None and heads is not None and heads.native != layout:
        if not heads.fresh:
            raise ValueError(f"mtp_native_layout={layout}: the model's MTP heads are trained heads in the "
                             f"{heads.native or 'mtprl'} layout; their weights do not compute the {layout} formula")
        owner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT
        del owner.mtp_heads  # fresh heads of the other layout: rebuilt below in this one
        heads = None
    if heads is None and has_mtp_checkpoint(source):
        heads, origin = load_mtp_heads(model, source), f"{source} ({MTP_CONFIG_NAME}, {MTP_WEIGHTS_NAME})"
    if heads is None and (shipped := find_native_layout(model, source)) is not None:
        heads, origin = load_native_heads(model, source, shipped), f"{source} ({shipped.name} MTP layers)"
    if heads is None:
        claimed = {f: getattr(model.config.get_text_config(), f, None) for f in DEPTH_FIELDS}
        claimed = {f: n for f, n in claimed.items() if isinstance(n, int) and n > 0}
        if claimed:
            warnings.warn(f"{source or 'the model'}: its config declares MTP layers "
                          f"({', '.join(f'{f}={n}' for f, n in claimed.items())}) but ships no MTP tensors mtprl can "
                          f"read; attaching fresh heads instead (init={init})")
        count = num_heads or 1
        config = None if layout is None else heads_config(model, LAYOUT_BY_NAME[layout], count)
        heads = use_layout(attach_mtp_heads(model, count, init=init, config=config),
                           None if layout is None else LAYOUT_BY_NAME[layout])
        print(f"[mtprl] MTP heads: {heads.num_heads} fresh head(s) attached (init={init}"
              f"{'' if layout is None else f', {layout} layout'})", flush=True)
        return heads
    if num_heads is not None and heads.num_heads != num_heads:
        raise ValueError(f"mtp_num_heads={num_heads} but {origin} carries {heads.num_heads} MTP head(s)")
    if origin != "the model":
        print(f"[mtprl] MTP heads: {heads.num_heads} loaded from {origin}", flush=True)
    return heads


def load_tokenizer(path: str, **kwargs):
    """AutoTokenizer, except for tokenizers saved as a plain `TokenizersBackend` (the char tokenizer): for
    model types such as qwen2 AutoTokenizer substitutes the model family's own tokenizer class, which would
    rebuild a byte-level pipeline around our character vocabulary."""
    from transformers import AutoTokenizer, TokenizersBackend

    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file) as f:
            if json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast"):
                return TokenizersBackend.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, **kwargs)


def load_pretrained(path, **from_pretrained_kwargs):
    """Load a checkpoint directory written by `save_pretrained`: returns `(model, tokenizer)` with the MTP
    heads attached (`tokenizer` is None when the directory holds none). Every file is checked before any
    weights are read."""
    from transformers import AutoModelForCausalLM

    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    require_files(path, ("config.json",), "the main model's config")
    if not has_main_weights(path):
        raise FileNotFoundError(f"checkpoint {path!r} is missing the main-model weights "
                                f"({' or '.join(MAIN_WEIGHT_FILES)})")
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    if has_mtp_checkpoint(path):  # mtprl's own layout (save_pretrained, `mtprl export --format mtprl`)
        require_files(path, (MTP_CONFIG_NAME, MTP_WEIGHTS_NAME), _HEADS_WHAT)
        load_mtp_heads(model, path)
    elif (layout := find_native_layout(model, path)) is not None:  # `mtprl export`'s default: the family's own
        load_native_heads(model, path, layout)
    else:
        require_files(path, (MTP_CONFIG_NAME, MTP_WEIGHTS_NAME), _HEADS_WHAT + " (or a native MTP layout)")
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(path) if has_tokenizer else None
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- trainers

class MTPCheckpointMixin:
    """Trainer checkpoints keep the heads in their own files, so `<checkpoint>/model.safetensors` is a plain HF
    model and `mtprl.load_pretrained(<checkpoint>)` restores everything; resuming restores the heads too."""

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = self.accelerator.unwrap_model(self.model)
        heads = getattr(unwrapped, "mtp_heads", None)
        if heads is None:
            return super()._save(output_dir, state_dict=state_dict)
        state_dict = unwrapped.state_dict() if state_dict is None else state_dict
        main_state, head_state = split_state_dict(state_dict)
        super()._save(output_dir, state_dict=main_state)  # plain AutoModelForCausalLM.from_pretrained loads this
        kill_point("checkpoint_save")
        if self.args.should_save:
            save_mtp_heads(heads, output_dir, head_state)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        unwrapped = self.accelerator.unwrap_model(model if model is not None else self.model)
        if getattr(unwrapped, "mtp_heads", None) is not None:
            load_mtp_weights(unwrapped.mtp_heads, resume_from_checkpoint)
