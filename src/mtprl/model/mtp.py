"""Multi-Token-Prediction heads in the DeepSeek-V3 layout: the architecture, and attaching it to a model.

Depth k (1..K) at sequence position t:

    h^k_t      = post_norm_k( Block_k( eh_proj_k( cat[ enorm_k(Emb(x_{t+k})), hnorm_k(h^{k-1}_t) ] ) ) )
    logits^k_t = lm_head(h^k_t)                      -> predicts x_{t+k+1}

`h^0` is the main model's last hidden state (after its final norm, i.e. what `lm_head` sees, as in
transformers' own MTP drafting), `Emb` and `lm_head` are the main model's. Each depth is transformers'
`MtpLayer`, whose `mtp_block` is one decoder layer of the base model's own class, so the parameter names
(`enorm`, `hnorm`, `eh_proj`, `mtp_block`, `post_norm`) map one to one onto DeepSeek-V3-style MTP weights.

Where the rest lives: log-probabilities of the heads and the main head from one trunk forward in
`mtprl.model.logprobs`; checkpoint files and "attach or load the heads" in `mtprl.model.checkpoints`.
"""

from __future__ import annotations

import copy

from contextlib import contextmanager

import torch
from torch import nn
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_causal_mask
from transformers.modeling_layers import MtpLayer

INIT_CHOICES = ("copy_last_layer", "random")


class MTPHeads(nn.Module):
    """K sequential MTP depths. `layers[k-1]` is depth k, a transformers `MtpLayer`."""

    def __init__(self, config, decoder_layer_cls: type[nn.Module], norm_cls: type[nn.Module], num_heads: int,
                 init: str = "copy_last_layer"):
        super().__init__()
        _check_num_heads(num_heads)
        self.config = config  # the base model's text config, re-indexed to K decoder layers
        self.init = init
        self.native: str | None = None  # the model family whose own MTP weights these are (mtprl.model.native)
        # What depth 1 reads, as the family's own MTP layers do (`native.use_layout` sets both): the trunk's last
        # state after its final norm (DeepSeek-V3, GLM-4.5, Qwen3-Next, mtprl's own) or before it (MiMo); and
        # whether the token embedding of the sequence's first position is zeroed (vLLM's MiMo drafter does).
        self.fresh = True  # as initialised; False once trained weights are loaded into them
        self.h0: str = "after_final_norm"
        self.mask_first_position: bool = False
        self.layers = nn.ModuleList(
            [MtpLayer(config, decoder_layer_cls, norm_cls, layer_idx=k) for k in range(num_heads)]
        )

    @property
    def num_heads(self) -> int:
        return len(self.layers)

    def forward(self, hidden_states, input_ids, attention_mask, embed_tokens, rotary_emb, position_ids=None):
        """Run every depth over the whole sequence.

        hidden_states: `h^0`, [B, T, H]. Returns `[h^1, ..., h^K]` with `h^k` of shape [B, T-k, H]:
        `h^k[:, t]` predicts `x_{t+k+1}`. Depth k needs `Emb(x_{t+k})`, which does not exist for the last k
        positions, so each depth is one position shorter than the one before.
        """
        batch, seq_len = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).unsqueeze(0).expand(batch, -1)
        layer_types = getattr(self.config, "layer_types", None)
        outputs, h = [], hidden_states
        first = first_positions(attention_mask, input_ids) if self.mask_first_position else None
        for k, layer in enumerate(self.layers, start=1):
            h = h[:, : seq_len - k]
            inputs_embeds = embed_tokens(input_ids[:, k:])
            if first is not None:  # the row whose hidden state is the sequence's first token: no token embedding
                inputs_embeds = inputs_embeds.masked_fill(first[:, : seq_len - k].unsqueeze(-1), 0.0)
            # Like transformers' MtpModel, depth k runs at the positions of the tokens it embeds. A key is
            # valid only if both its hidden state and its embedded token are real (not padding).
            pos = position_ids[:, k:]
            mask2d = None if attention_mask is None else attention_mask[:, : seq_len - k] * attention_mask[:, k:]
            layer_type = layer_types[k - 1] if layer_types else "full_attention"
            mask_fn = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(layer_type, create_causal_mask)
            if isinstance(mask_fn, dict):
                raise NotImplementedError(f"MTP heads do not support hybrid layer type {layer_type!r}")
            mask = mask_fn(config=self.config, inputs_embeds=inputs_embeds, attention_mask=mask2d,
                           past_key_values=None, position_ids=pos)
            position_embeddings = rotary_emb(inputs_embeds, pos) if rotary_emb is not None else None
            h = layer(inputs_embeds, h, position_embeddings=position_embeddings, attention_mask=mask,
                      position_ids=pos, past_key_values=None, use_cache=False)
            outputs.append(h)
        return outputs


def first_positions(attention_mask, input_ids) -> torch.Tensor:
    """[B, T] True at each row's first real token (left padding skipped; position 0 without a mask)."""
    if attention_mask is None:
        first = torch.zeros_like(input_ids, dtype=torch.bool)
        first[:, 0] = True
        return first
    real = attention_mask.bool()
    return real & (real.long().cumsum(1) == 1)


class HeadInput:
    """The trunk states the heads read, caught during one trunk forward (`recording_head_input`)."""

    def __init__(self):
        self.states: torch.Tensor | None = None  # the final norm's input, where the heads read it

    def of(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """The heads' input for a forward whose output (after the final norm) is `last_hidden_state`."""
        return last_hidden_state if self.states is None else self.states


@contextmanager
def recording_head_input(model):
    """Open around a trunk forward: yields a `HeadInput` whose `of(last_hidden_state)` is what depth 1 reads.
    For heads with `h0 == "before_final_norm"` (MiMo) the final norm's input is caught by a forward pre-hook
    (removed on exit); otherwise it is the decoder's output itself."""
    heads, box = getattr(model, "mtp_heads", None), HeadInput()
    if heads is None or heads.h0 == "after_final_norm":
        yield box
        return
    norm = getattr(decoder_of(model), "norm", None)
    if norm is None:
        raise ValueError(f"MTP heads read h0={heads.h0}, but {type(model).__name__}'s decoder has no final norm")
    handle = norm.register_forward_pre_hook(lambda module, args: setattr(box, "states", args[0]))
    try:
        yield box
    finally:
        handle.remove()


def main_states(model, head_input: torch.Tensor) -> torch.Tensor:
    """The states the LM head reads, from the heads' input: the final norm applied where the heads read the state
    before it, else the same tensor."""
    heads = getattr(model, "mtp_heads", None)
    if heads is not None and heads.h0 == "before_final_norm":
        return decoder_of(model).norm(head_input)
    return head_input


def _check_num_heads(num_heads) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")


def decoder_of(model: nn.Module) -> nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at model.get_decoder().layers; MTP heads are built "
            "from the base model's own decoder layer class and need a Llama/Qwen2/Qwen3-style causal LM"
        )
    return decoder


def last_layer_params(model: nn.Module, n: int) -> list[nn.Parameter]:
    """Trainable parameters of the trunk's last `n` decoder layers and its final norm (the `last_layers` OCC
    estimator's c and v2 are taken over these)."""
    decoder = decoder_of(model)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(decoder.layers):
        raise ValueError(f"occ_last_layers must be an integer in 1..{len(decoder.layers)} (the trunk's decoder "
                         f"layers), got {n!r}")
    modules = list(decoder.layers[-n:]) + [m for m in (getattr(decoder, "norm", None),) if m is not None]
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def get_mtp_heads(model: nn.Module) -> MTPHeads:
    heads = getattr(model, "mtp_heads", None)
    if not isinstance(heads, MTPHeads):
        raise ValueError(f"{type(model).__name__} has no MTP heads: call mtprl.attach_mtp_heads(model) first")
    return heads


def freeze_heads(heads: nn.Module) -> None:
    """`mtp_regime: frozen`: the heads keep their weights (no gradient, so no optimizer state and no weight decay)
    and only draft."""
    for p in heads.parameters():
        p.requires_grad_(False)


def mtp_layers_config(model: nn.Module, num_heads: int):
    """The config K MTP depths are built from: transformers' own `get_mtp_config` where the model's config
    declares `num_mtp_layers` (DeepSeek-V3, GLM-4.5: layer types re-indexed, MoE blocks for MoE families), else
    the text config re-indexed to K layers, each of the last main layer's attention type (MTP layers restart
    layer indexing at 0)."""
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "num_mtp_layers", None):
        config = model.config.get_mtp_config()
    else:
        config = copy.deepcopy(text)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[-1]] * num_heads
    config.num_hidden_layers = num_heads
    return config


def base_weights(state: dict) -> dict:
    """A layer's state dict without PEFT's LoRA wrappers: `x.base_layer.w` -> `x.w`, adapter weights dropped (a head
    copies the frozen base weights of a LoRA-adapted trunk layer; at LoRA's init, B = 0, that is the layer itself)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items()
            if ".lora_" not in k and "lora_magnitude_vector" not in k}


def attach_mtp_heads(model: nn.Module, num_heads: int = 1, init: str = "copy_last_layer", config=None) -> MTPHeads:
    """Build K MTP depths for `model`, register them as `model.mtp_heads` and return them.

    init="copy_last_layer" copies the main model's last decoder layer into every `mtp_block` (a warm start
    that already maps hidden states to hidden states); "random" uses the model's own initialiser.
    The projections `eh_proj` always start from the model's initialiser. `config`: the layers' config when a
    model family prescribes one (`mtprl.model.native.heads_config`); by default `mtp_layers_config`.
    """
    _check_num_heads(num_heads)
    if init not in INIT_CHOICES:
        raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
    decoder = decoder_of(model)
    last_layer = decoder.layers[-1]
    norm_cls = next((type(m) for name, m in last_layer.named_modules() if "norm" in name.lower()), None)
    if norm_cls is None:
        raise ValueError(f"{type(last_layer).__name__} has no norm submodule to reuse for enorm/hnorm/post_norm")

    config = mtp_layers_config(model, num_heads) if config is None else config
    config.num_hidden_layers = num_heads
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "rms_norm_eps", None) is None:  # MtpLayer reads it; LayerNorm families name it otherwise
        eps = next((getattr(config, name) for name in ("layer_norm_eps", "norm_eps", "layer_norm_epsilon")
                    if getattr(config, name, None) is not None), None)
        if eps is None:
            raise ValueError(f"{model_type}: MTP heads need the norm epsilon of the model's decoder layer (config "
                             "field rms_norm_eps or layer_norm_eps); this config has neither")
        config.rms_norm_eps = eps
    try:
        heads = MTPHeads(config, type(last_layer), norm_cls, num_heads, init=init)
    except (AttributeError, TypeError, KeyError, IndexError) as e:
        raise ValueError(
            f"{model_type}: MTP heads cannot be built from its decoder layer {type(last_layer).__name__} "
            f"({type(e).__name__}: {e}); heads are one decoder layer of the model's own class, as in "
            "Llama/Qwen2/Qwen3-style models (hybrid Mamba/attention stacks such as NemotronH are not supported)"
        ) from e
    if hasattr(model, "_init_weights"):
        heads.apply(model._init_weights)
    if init == "copy_last_layer":
        for layer in heads.layers:
            layer.mtp_block.load_state_dict(base_weights(last_layer.state_dict()))
    ref = next(last_layer.parameters())
    heads.to(device=ref.device, dtype=ref.dtype)
    model.mtp_heads = heads
    return heads
