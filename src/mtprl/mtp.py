"""Multi-Token-Prediction heads in the DeepSeek-V3 layout, and one-forward log-probabilities for RL.

Depth k (1..K) at sequence position t:

    h^k_t      = post_norm_k( Block_k( eh_proj_k( cat[ enorm_k(Emb(x_{t+k})), hnorm_k(h^{k-1}_t) ] ) ) )
    logits^k_t = lm_head(h^k_t)                      -> predicts x_{t+k+1}

`h^0` is the main model's last hidden state (after its final norm, i.e. what `lm_head` sees, as in
transformers' own MTP drafting), `Emb` and `lm_head` are the main model's. Each depth is transformers'
`MtpLayer`, whose `mtp_block` is one decoder layer of the base model's own class, so the parameter names
(`enorm`, `hnorm`, `eh_proj`, `mtp_block`, `post_norm`) map one to one onto DeepSeek-V3-style MTP weights.

Log-probabilities go through TRL's chunked LM-head kernel (the one GRPOTrainer itself uses), so neither
the main head nor the MTP heads ever materialise `[B, L, V]` logits with gradient.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING, create_causal_mask
from transformers.modeling_layers import MtpLayer
from transformers.utils import ModelOutput
from trl.kernels import ChunkedLogProbFunction

MTP_CONFIG_NAME = "mtp_config.json"
MTP_WEIGHTS_NAME = "mtp_heads.safetensors"
INIT_CHOICES = ("copy_last_layer", "random")
MTP_GRAD_CHOICES = ("joint", "detach")
# Vocabulary tile of the chunked LM head (TRL's default); tokens are tiled by the kernel itself.
_VOCAB_CHUNK = 32768
# Token rows per tile when we do need full distributions (expected acceptance, no gradient).
_ACCEPT_ROWS = 512


@dataclass
class LogProbs(ModelOutput):
    """Per-token log-probabilities of the completion tokens, batch first.

    `main[b, j]` scores completion token j under the main head; `mtp[b, k-1, j]` scores *the same token*
    under MTP head k (predicted from position j-k-1, before it). Positions where the attention mask is 0
    hold 0, as in TRL. A `ModelOutput`, so it can be returned through a DDP-wrapped model's forward.
    """

    main: torch.Tensor | None = None  # [B, L]
    mtp: torch.Tensor | None = None  # [B, K, L]
    entropy: torch.Tensor | None = None  # [B, L] main-head entropy (compute_entropy=True)
    accept: torch.Tensor | None = None  # [B, K, L] sum_v min(p_main, p_head), no grad (compute_accept=True)


class MTPHeads(nn.Module):
    """K sequential MTP depths. `layers[k-1]` is depth k, a transformers `MtpLayer`."""

    def __init__(self, config, decoder_layer_cls: type[nn.Module], norm_cls: type[nn.Module], num_heads: int,
                 init: str = "copy_last_layer"):
        super().__init__()
        _check_num_heads(num_heads)
        self.config = config  # the base model's text config, re-indexed to K decoder layers
        self.init = init
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
        for k, layer in enumerate(self.layers, start=1):
            h = h[:, : seq_len - k]
            inputs_embeds = embed_tokens(input_ids[:, k:])
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


def _check_num_heads(num_heads) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")


def _decoder(model: nn.Module) -> nn.Module:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers at model.get_decoder().layers; MTP heads are built "
            "from the base model's own decoder layer class and need a Llama/Qwen2/Qwen3-style causal LM"
        )
    return decoder


def get_mtp_heads(model: nn.Module) -> MTPHeads:
    heads = getattr(model, "mtp_heads", None)
    if not isinstance(heads, MTPHeads):
        raise ValueError(f"{type(model).__name__} has no MTP heads: call mtprl.attach_mtp_heads(model) first")
    return heads


def attach_mtp_heads(model: nn.Module, num_heads: int = 1, init: str = "copy_last_layer") -> MTPHeads:
    """Build K MTP depths for `model`, register them as `model.mtp_heads` and return them.

    init="copy_last_layer" copies the main model's last decoder layer into every `mtp_block` (a warm start
    that already maps hidden states to hidden states); "random" uses the model's own initialiser.
    The projections `eh_proj` always start from the model's initialiser.
    """
    _check_num_heads(num_heads)
    if init not in INIT_CHOICES:
        raise ValueError(f"init must be one of {INIT_CHOICES}, got {init!r}")
    decoder = _decoder(model)
    last_layer = decoder.layers[-1]
    norm_cls = next((type(m) for name, m in last_layer.named_modules() if "norm" in name.lower()), None)
    if norm_cls is None:
        raise ValueError(f"{type(last_layer).__name__} has no norm submodule to reuse for enorm/hnorm/post_norm")

    config = copy.deepcopy(model.config.get_text_config(decoder=True))
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = num_heads
    if layer_types:
        # MTP layers restart layer indexing at 0; give them the attention type of the layer they copy.
        config.layer_types = [layer_types[-1]] * num_heads

    heads = MTPHeads(config, type(last_layer), norm_cls, num_heads, init=init)
    if hasattr(model, "_init_weights"):
        heads.apply(model._init_weights)
    if init == "copy_last_layer":
        for layer in heads.layers:
            layer.mtp_block.load_state_dict(last_layer.state_dict())
    ref = next(last_layer.parameters())
    heads.to(device=ref.device, dtype=ref.dtype)
    model.mtp_heads = heads
    return heads


def _logit_transform(model) -> tuple[float | None, float]:
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    return softcap, 1.0 if scale is None else float(scale)


def _token_logprobs(hidden, weight, bias, targets, temperature, softcap, scale, entropy=False):
    """Log-prob of `targets` under `lm_head(hidden) / temperature`, tiled over the vocabulary."""
    batch, length, dim = hidden.shape
    out = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, dim), weight, bias, targets.reshape(-1), temperature, _VOCAB_CHUNK, softcap, scale,
        ("entropy",) if entropy else (),
    )
    logps = out[0].view(batch, length)
    return logps, (out[1].view(batch, length) if entropy else None)


def _probs(hidden, weight, bias, temperature, softcap, scale):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.softmax(logits / temperature, dim=-1)


@torch.no_grad()
def _expected_acceptance(main_hidden, head_hiddens, weight, bias, temperature, softcap, scale):
    """sum_v min(p_main, p_head) per token: the probability that a draft sampled from the head is accepted
    by speculative sampling against the main head. Full distributions, so rows are tiled."""
    batch, length, dim = main_hidden.shape
    main_flat = main_hidden.reshape(-1, dim)
    heads_flat = [h.reshape(-1, dim) for h in head_hiddens]
    out = torch.empty(len(heads_flat), main_flat.shape[0], device=main_flat.device, dtype=torch.float32)
    for start in range(0, main_flat.shape[0], _ACCEPT_ROWS):
        rows = slice(start, start + _ACCEPT_ROWS)
        p = _probs(main_flat[rows], weight, bias, temperature, softcap, scale)
        for k, h in enumerate(heads_flat):
            q = _probs(h[rows], weight, bias, temperature, softcap, scale)
            out[k, rows] = torch.minimum(p, q).sum(-1)
    return out.view(len(heads_flat), batch, length).transpose(0, 1)


def forward_logprobs(model, input_ids, attention_mask, logits_to_keep, temperature=1.0, mtp_grad="joint", *,
                     compute_entropy=False, compute_accept=False) -> LogProbs:
    """Main and MTP log-probabilities of the last `logits_to_keep` tokens from one trunk forward.

    mtp_grad="joint": the MTP heads see the live trunk, embeddings and lm_head, so an MTP loss trains them.
    mtp_grad="detach": hidden states, embeddings and lm_head weights enter the heads detached; an MTP loss
    then only reaches MTP-only parameters (the verl/slime default during RL).
    """
    if mtp_grad not in MTP_GRAD_CHOICES:
        raise ValueError(f"mtp_grad must be one of {MTP_GRAD_CHOICES}, got {mtp_grad!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    heads = get_mtp_heads(model)
    num_heads, seq_len, keep = heads.num_heads, input_ids.shape[1], int(logits_to_keep)
    if not 1 <= keep <= seq_len - num_heads - 1:
        raise ValueError(
            f"logits_to_keep={keep} with seq_len={seq_len} and {num_heads} MTP head(s): head K scores completion "
            f"token j from position j-K-1, so the prompt must be longer than K (need 1 <= logits_to_keep <= "
            f"{seq_len - num_heads - 1})"
        )
    decoder = _decoder(model)
    h0 = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    softcap, scale = _logit_transform(model)
    targets = input_ids[:, -keep:]

    main_hidden = h0[:, seq_len - keep - 1: seq_len - 1]
    main, entropy = _token_logprobs(main_hidden, weight, bias, targets, temperature, softcap, scale,
                                    entropy=compute_entropy)

    embed = model.get_input_embeddings()
    if mtp_grad == "detach":
        h0, weight = h0.detach(), weight.detach()
        bias = None if bias is None else bias.detach()

        def embed_tokens(ids):
            with torch.no_grad():
                return embed(ids)
    else:
        embed_tokens = embed
    head_states = heads(h0, input_ids, attention_mask, embed_tokens, getattr(decoder, "rotary_emb", None))
    # h^k has length T-k; its positions T-k-1-L .. T-k-2 predict the L completion tokens.
    head_hidden = [h[:, seq_len - k - 1 - keep: seq_len - k - 1] for k, h in enumerate(head_states, start=1)]
    mtp = torch.stack(
        [_token_logprobs(h, weight, bias, targets, temperature, softcap, scale)[0] for h in head_hidden], dim=1
    )

    accept = None
    if compute_accept:
        accept = _expected_acceptance(main_hidden.detach(), [h.detach() for h in head_hidden], weight.detach(),
                                      None if bias is None else bias.detach(), temperature, softcap, scale)
    if attention_mask is not None:
        pad = attention_mask[:, -keep:] == 0
        main = main.masked_fill(pad, 0.0)
        mtp = mtp.masked_fill(pad.unsqueeze(1), 0.0)
        entropy = None if entropy is None else entropy.masked_fill(pad, 0.0)
        accept = None if accept is None else accept.masked_fill(pad.unsqueeze(1), 0.0)
    return LogProbs(main=main, mtp=mtp, entropy=entropy, accept=accept)


# --------------------------------------------------------------------------------------------------- saving

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
    save_file({k: v.detach().contiguous() for k, v in state.items()}, os.path.join(path, MTP_WEIGHTS_NAME),
              metadata={"format": "pt"})
    with open(os.path.join(path, MTP_CONFIG_NAME), "w") as f:
        json.dump({"num_heads": heads.num_heads, "init": heads.init,
                   "decoder_layer_class": type(heads.layers[0].mtp_block).__name__,
                   "layout": "transformers.modeling_layers.MtpLayer"}, f, indent=2)


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


def require_files(path, names, what) -> None:
    for name in names:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"checkpoint {str(path)!r} is missing {name} ({what})")


def has_mtp_checkpoint(path) -> bool:
    return os.path.isfile(os.path.join(path, MTP_CONFIG_NAME))


def load_mtp_heads(model, path) -> MTPHeads:
    """Attach the heads stored in checkpoint directory `path` to `model` (replacing any it has)."""
    require_files(path, (MTP_CONFIG_NAME, MTP_WEIGHTS_NAME), "the MTP heads, written by mtprl.save_pretrained")
    cfg_file = os.path.join(path, MTP_CONFIG_NAME)
    with open(cfg_file) as f:
        mtp_cfg = json.load(f)
    if not isinstance(mtp_cfg.get("num_heads"), int):
        raise ValueError(f"{cfg_file} has no integer 'num_heads' field")
    heads = attach_mtp_heads(model, num_heads=mtp_cfg["num_heads"], init="random")
    heads.init = mtp_cfg.get("init", "copy_last_layer")
    load_mtp_weights(heads, path)
    return heads


def load_mtp_weights(heads: MTPHeads, path) -> None:
    """Load `path/mtp_heads.safetensors` into existing heads in place (so an optimizer's references to their
    parameters stay valid, as on resume). A mismatch names the file and the keys."""
    from safetensors.torch import load_file

    require_files(path, (MTP_WEIGHTS_NAME,), "the MTP heads, written by mtprl.save_pretrained")
    weights_file = os.path.join(path, MTP_WEIGHTS_NAME)
    state = load_file(weights_file, device=str(next(heads.parameters()).device))
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_file} does not match {heads.num_heads} MTP head(s): "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_pretrained(path, **from_pretrained_kwargs):
    """Load a checkpoint directory written by `save_pretrained`: returns `(model, tokenizer)` with the MTP
    heads attached (`tokenizer` is None when the directory holds none). Every file is checked before any
    weights are read."""
    from transformers import AutoModelForCausalLM

    from .models import load_tokenizer

    path = str(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    require_files(path, ("config.json",), "the main model's config")
    weight_files = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if not any(os.path.isfile(os.path.join(path, f)) for f in weight_files):
        raise FileNotFoundError(f"checkpoint {path!r} is missing the main-model weights ({' or '.join(weight_files)})")
    require_files(path, (MTP_CONFIG_NAME, MTP_WEIGHTS_NAME), "the MTP heads, written by mtprl.save_pretrained")
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    load_mtp_heads(model, path)
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(path) if has_tokenizer else None
    return model, tokenizer
