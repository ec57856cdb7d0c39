"""Native MTP checkpoints: the MTP layers a model family ships, imported into mtprl's heads and exported back.

mtprl's heads are transformers' own `MtpLayer`s (`mtprl.model.mtp`), so a family's MTP weights are a renaming away.
Everything that differs between families is data, one `NativeLayout` per family, checked against
transformers' `MtpModel` (modeling_layers.py, conversion_mapping.py) and vLLM's model files
(deepseek_mtp.py, glm4_moe_mtp.py, mimo_mtp.py, qwen3_next_mtp.py):

| family | checkpoint keys of depth k | concatenation | h^0 | output norm | read by |
|---|---|---|---|---|---|
| DeepSeek-V3 | model.layers.{L+k}.{enorm,hnorm,eh_proj,shared_head.norm,<block>} | [emb, hidden] | after final norm | shared_head.norm | transformers MtpModel |
| GLM-4.5 | same as DeepSeek-V3 | [emb, hidden] | after final norm | shared_head.norm | transformers MtpModel |
| MiMo | model.mtp_layers.{k}.{token_layernorm,hidden_layernorm,input_proj,final_layernorm,<block>} | [hidden, emb] | before final norm, no token embedding at position 0 | final_layernorm | name map here |
| Qwen3-Next / Qwen3.5 | mtp.{pre_fc_norm_embedding,pre_fc_norm_hidden,fc,norm}, mtp.layers.0.<block> (one depth) | [emb, hidden] | after final norm | mtp.norm | name map here |

(L = num_hidden_layers; k from 0; <block> = the decoder layer's own names.) Depth 1 reads the main model's last
hidden state after its final norm (what `lm_head` sees) for DeepSeek-V3, GLM-4.5 and Qwen3-Next; MiMo's reads it
before the final norm (vLLM's `MiMoModel.forward` returns `hidden_states + residual` and `compute_logits` applies
the norm; the drafter gets the former) and zeroes the token embedding at position 0 (`mimo_mtp.py`); heads in
MiMo's layout do the same (`use_layout`, `mtp.recording_head_input`). Depth k+1 reads depth k's normed output
(transformers' `MtpLayer` chaining; the checkpoints of these families ship one depth, where both agree).

- `find_native_layout(model, path)`: which family's MTP weights a checkpoint directory carries (None: none).
- `load_native_heads(model, path)`: attach heads holding them (the count from the config's depth field).
- `export_native(model, out, tokenizer)`: write main model + heads in the family's own names and layout.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from .mtp import MTPHeads, attach_mtp_heads, decoder_of, get_mtp_heads, mtp_layers_config

INDEX_NAME = "model.safetensors.index.json"
MTP_SHARD_NAME = "model-mtp.safetensors"


@dataclass(frozen=True)
class NativeLayout:
    """One family's MTP checkpoint layout. Names map the parts of our `MtpLayer` (enorm, hnorm, eh_proj,
    post_norm, mtp_block) onto checkpoint names under `prefix`."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values the layout is looked for in
    prefix: str  # checkpoint prefix of depth k; {index} = first_index + k
    first_index: str  # "num_hidden_layers" (depths numbered after the main layers) or "0"
    parts: tuple[tuple[str, str], ...]  # (our MtpLayer part, the checkpoint's name for it); "" = prefix itself
    depth_field: str  # config field holding the number of depths, as the family's config.json spells it
    hidden_first: bool  # eh_proj input is [hnorm(h), enorm(emb)] (MiMo) instead of [enorm(emb), hnorm(h)]
    read_by_transformers: bool  # transformers.modeling_layers.MtpModel loads it (its weight conversions)
    shared_copies: tuple[tuple[str, str], ...] = ()  # per-depth copies of shared weights the family ships
    max_depths: int | None = None  # the most depths the layout can hold
    h0: str = "after_final_norm"  # which main-model state feeds depth 1: after the final norm or before it
    mask_first_position: bool = False  # depth 1's token embedding zeroed at the sequence's first position

    def index(self, config, k: int) -> int:
        return (config.num_hidden_layers if self.first_index == "num_hidden_layers" else 0) + k

    def key_prefix(self, config, k: int) -> str:
        return self.prefix.format(index=self.index(config, k))

    def to_checkpoint(self, config, ours: str) -> str:
        """`layers.{k}.<part>...` of MTPHeads -> the checkpoint key."""
        match = re.match(r"layers\.(\d+)\.(.*)", ours)
        if match is None:
            raise ValueError(f"not an MTP head parameter: {ours!r}")
        k, rest = int(match.group(1)), match.group(2)
        for part, theirs in self.parts:
            if rest.startswith(part + "."):
                return self.key_prefix(config, k) + theirs + rest[len(part) + 1:]
        raise ValueError(f"{self.name}: no checkpoint name for head parameter {ours!r}")


_DEEPSEEK_PARTS = (("enorm", "enorm."), ("hnorm", "hnorm."), ("eh_proj", "eh_proj."),
                   ("post_norm", "shared_head.norm."), ("mtp_block", ""))
_DEEPSEEK_COPIES = (("shared_head.head.weight", "lm_head"), ("embed_tokens.weight", "embed_tokens"))

LAYOUTS = (
    NativeLayout("deepseek_v3", ("deepseek_v3",), "model.layers.{index}.", "num_hidden_layers", _DEEPSEEK_PARTS,
                 "num_nextn_predict_layers", hidden_first=False, read_by_transformers=True,
                 shared_copies=_DEEPSEEK_COPIES),
    NativeLayout("glm4_moe", ("glm4_moe",), "model.layers.{index}.", "num_hidden_layers", _DEEPSEEK_PARTS,
                 "num_nextn_predict_layers", hidden_first=False, read_by_transformers=True,
                 shared_copies=_DEEPSEEK_COPIES),
    NativeLayout("mimo", ("mimo", "qwen2"), "model.mtp_layers.{index}.", "0",
                 (("enorm", "token_layernorm."), ("hnorm", "hidden_layernorm."), ("eh_proj", "input_proj."),
                  ("post_norm", "final_layernorm."), ("mtp_block", "")),
                 "num_nextn_predict_layers", hidden_first=True, read_by_transformers=False,
                 h0="before_final_norm", mask_first_position=True),
    # Qwen3-Next / Qwen3.5: one depth; fc and the three norms sit at `mtp.` and the block at `mtp.layers.0.`.
    # (vLLM re-applies that one depth for further draft tokens; `mtp_num_hidden_layers` counts its blocks.)
    NativeLayout("qwen3_next", ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"), "mtp.", "0",
                 (("enorm", "pre_fc_norm_embedding."), ("hnorm", "pre_fc_norm_hidden."), ("eh_proj", "fc."),
                  ("post_norm", "norm."), ("mtp_block", "layers.0.")),
                 "mtp_num_hidden_layers", hidden_first=False, read_by_transformers=False, max_depths=1),
)
LAYOUT_BY_NAME = {layout.name: layout for layout in LAYOUTS}


# ---------------------------------------------------------------------------------------------- checkpoint files

def checkpoint_keys(path) -> dict[str, str]:
    """Every tensor name in a checkpoint directory's safetensors files -> the file holding it."""
    from safetensors import safe_open

    path = str(path)
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        return {}
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def num_depths(config, layout: NativeLayout) -> int:
    text = config.get_text_config(decoder=True)
    n = getattr(text, layout.depth_field, None)
    if n is None:
        n = getattr(text, "num_mtp_layers", None)
    return int(n or 0)


def find_native_layout(model, path) -> NativeLayout | None:
    """The layout whose MTP weights checkpoint directory `path` carries for `model`, or None."""
    if not path or not os.path.isdir(str(path)):
        return None
    config = model.config.get_text_config(decoder=True)
    keys = None
    for layout in LAYOUTS:
        if config.model_type not in layout.model_types or num_depths(model.config, layout) < 1:
            continue
        keys = checkpoint_keys(path) if keys is None else keys
        prefix = layout.key_prefix(config, 0)
        if any(k.startswith(prefix) for k in keys):
            return layout
    return None


def heads_config(model, layout: NativeLayout, depths: int):
    """The config the family's MTP layers are built from (`mtp.mtp_layers_config`) plus its concatenation order
    (read by transformers' `MtpLayer`)."""
    config = mtp_layers_config(model, depths)
    config.mtp_hidden_states_first = layout.hidden_first
    return config


# ---------------------------------------------------------------------------------------------- import

def load_native_heads(model, path, layout: NativeLayout | None = None) -> MTPHeads:
    """Attach MTP heads holding the family's own MTP weights from checkpoint directory `path`. Families that
    transformers covers go through `MtpModel.from_pretrained` (its weight conversions, e.g. per-expert MoE
    tensors); the others through the layout's name map. Every head parameter must be found."""
    layout = layout or find_native_layout(model, path)
    if layout is None:
        raise ValueError(f"{path!r} carries no native MTP weights mtprl knows (families: "
                         f"{', '.join(LAYOUT_BY_NAME)})")
    check_h0(layout, model)
    depths = num_depths(model.config, layout)
    if layout.max_depths is not None and depths > layout.max_depths:
        raise ValueError(f"{path}: {layout.depth_field}={depths}, but the {layout.name} layout holds at most "
                         f"{layout.max_depths} MTP depth(s) (one depth of several blocks is not supported)")
    heads = attach_mtp_heads(model, depths, init="random", config=heads_config(model, layout, depths))
    heads.init, heads.fresh = "native", False
    use_layout(heads, layout)
    if layout.read_by_transformers:
        state = _read_with_transformers(model, layout, depths)
    else:
        state = _read_with_name_map(model, path, layout, heads)
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: the {layout.name} MTP weights do not match {depths} head(s): missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return heads


def _read_with_transformers(model, layout, depths) -> dict[str, torch.Tensor]:
    from transformers.modeling_layers import MtpModel

    # MtpModel finds the MTP keys from the class's `_keys_to_ignore_on_load_unexpected`, which names the
    # released model's layer number (61 for DeepSeek-V3): point it at this checkpoint's own numbering.
    config = model.config.get_text_config(decoder=True)
    patterns = [re.escape(layout.key_prefix(config, k)) + ".*" for k in range(depths)]
    saved = model.__dict__.get("_keys_to_ignore_on_load_unexpected")
    model._keys_to_ignore_on_load_unexpected = patterns
    try:
        mtp = MtpModel.from_pretrained(model, device_map={"": next(model.parameters()).device})
    finally:
        if saved is None:
            del model._keys_to_ignore_on_load_unexpected
        else:
            model._keys_to_ignore_on_load_unexpected = saved
    return {"layers." + name: v for name, v in mtp.layers.state_dict().items()}


def _read_with_name_map(model, path, layout, heads) -> dict[str, torch.Tensor]:
    """Each head parameter from the checkpoint tensors it is stored as. The main model's weight conversions
    (e.g. MoE experts: one tensor per expert on disk, one fused tensor in transformers) are applied the way
    export applies them, reversed: the parameter's element indices are sent through transformers'
    `revert_weight_conversion` (what `save_pretrained` runs), which says where each stored element goes."""
    from safetensors import safe_open
    from transformers.core_model_loading import revert_weight_conversion

    config = model.config.get_text_config(decoder=True)
    files, handles, state = checkpoint_keys(path), {}, {}
    for ours, target in heads.state_dict().items():
        stored_as = layout.to_checkpoint(config, ours)
        ids = torch.arange(target.numel(), dtype=torch.float64).view(target.shape)
        flat, seen = torch.empty(target.numel(), dtype=target.dtype), 0
        for key, where in revert_weight_conversion(model, {stored_as: ids}).items():
            if key not in files:
                raise ValueError(f"{path}: the {layout.name} checkpoint has no tensor {key!r} (MTP head parameter "
                                 f"{ours!r})")
            if files[key] not in handles:
                handles[files[key]] = safe_open(files[key], framework="pt")
            tensor = handles[files[key]].get_tensor(key)
            if tensor.numel() != where.numel():
                raise ValueError(f"{files[key]}: {key} has shape {tuple(tensor.shape)}, the model's MTP layer "
                                 f"expects {tuple(where.shape)}")
            flat[where.reshape(-1).long()] = tensor.reshape(-1).to(target.dtype)
            seen += where.numel()
        if seen != target.numel():
            raise ValueError(f"{path}: {ours!r} maps onto {seen} stored elements, expected {target.numel()}")
        state[ours] = flat.view(target.shape)
    return state


# ---------------------------------------------------------------------------------------------- export

def native_state_dict(model, layout: NativeLayout) -> dict[str, torch.Tensor]:
    """The heads' tensors under the family's checkpoint names (weight conversions reverted as transformers does
    when it saves, e.g. fused MoE experts split per expert), plus the per-depth shared copies it ships."""
    from transformers.core_model_loading import revert_weight_conversion

    heads = get_mtp_heads(model)
    config = model.config.get_text_config(decoder=True)
    ours = {layout.to_checkpoint(config, name): t.detach() for name, t in heads.state_dict().items()}
    shared = {"lm_head": model.get_output_embeddings().weight, "embed_tokens": model.get_input_embeddings().weight}
    for k in range(heads.num_heads):
        for name, which in layout.shared_copies:
            ours[layout.key_prefix(config, k) + name] = shared[which].detach()
    return {k: v.detach().contiguous().clone() for k, v in revert_weight_conversion(model, ours).items()}


def export_native(model, out: str, tokenizer=None) -> str:
    """Write `model` (main + MTP heads) to `out` in its family's own checkpoint layout: the main model as
    `save_pretrained` writes it, the MTP tensors in one more shard (`model-mtp.safetensors`) listed in the
    index, and the family's depth count in config.json. Returns the layout's name."""
    from safetensors.torch import save_file

    heads = get_mtp_heads(model)
    layout = LAYOUT_BY_NAME.get(getattr(heads, "native", None) or "")
    if layout is None:
        layout = next((lay for lay in LAYOUTS if model.config.model_type in lay.model_types
                       and lay.hidden_first == bool(getattr(heads.config, "mtp_hidden_states_first", False))), None)
    if layout is None:
        raise ValueError(f"no native MTP layout for model type {model.config.model_type!r} (known: "
                         f"{', '.join(LAYOUT_BY_NAME)}); export with --format mtprl")
    mtp_state = native_state_dict(model, layout)
    main_state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp_heads.")}
    setattr(model.config.get_text_config(decoder=True), layout.depth_field, heads.num_heads)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, state_dict=main_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    weight_map = _main_weight_map(out)
    save_file(mtp_state, os.path.join(out, MTP_SHARD_NAME), metadata={"format": "pt"})
    weight_map.update({k: MTP_SHARD_NAME for k in mtp_state})
    total = sum(os.path.getsize(os.path.join(out, f)) for f in set(weight_map.values()))
    with open(os.path.join(out, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return layout.name


def _main_weight_map(out: str) -> dict[str, str]:
    """The main model's tensor -> shard map. A single `model.safetensors` becomes shard 1 of an index (loaders
    read the index only when no `model.safetensors` is there)."""
    from safetensors import safe_open

    index = os.path.join(out, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single, shard = os.path.join(out, "model.safetensors"), "model-main.safetensors"
    os.replace(single, os.path.join(out, shard))
    with safe_open(os.path.join(out, shard), framework="pt") as f:
        return {k: shard for k in f.keys()}


def check_h0(layout: NativeLayout, model) -> None:
    """mtprl's heads read the trunk's last state after its final norm or before it (`mtp.recording_head_input`);
    either needs a decoder with a final norm, and a layout asking for another state is refused."""
    if layout.h0 not in ("after_final_norm", "before_final_norm") or getattr(decoder_of(model), "norm", None) is None:
        raise ValueError(f"{layout.name}: depth 1 reads {layout.h0}, which mtprl's heads do not provide")


def use_layout(heads: MTPHeads, layout: NativeLayout | None) -> MTPHeads:
    """Heads that compute what the family's own MTP layers compute: which trunk state depth 1 reads and the
    first-position mask (their concatenation order is in their config, `heads_config`). None: mtprl's own."""
    heads.native = None if layout is None else layout.name
    heads.h0 = "after_final_norm" if layout is None else layout.h0
    heads.mask_first_position = layout is not None and layout.mask_first_position
    return heads
