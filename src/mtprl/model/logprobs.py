"""Main-head and MTP-head log-probabilities of the completion tokens from one trunk forward.

`forward_logprobs` is the one place a batch goes through the trunk and the heads. Log-probabilities go through
TRL's chunked LM-head kernel (the one GRPOTrainer itself uses), so neither the main head nor the MTP heads ever
materialise `[B, L, V]` logits with gradient; the expected speculative acceptance (full distributions, no
gradient) is tiled over rows.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl.kernels import ChunkedLogProbFunction

from .mtp import decoder_of, get_mtp_heads, main_states, recording_head_input

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
    # [B, K, L] the head's divergence from the main head per token (compute_divergence): KL(p_main || q_head)
    # ("kl") or 1 - sum_v min(p_main, q_head) ("tv"); grad into the heads only
    divergence: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # [B, T, H] trunk output states, live graph (return_hidden=True)
    # [B, K, L] head k has context for token j: position j-k-1 is a real token (a prompt of K tokens or fewer, or a
    # short left-padded row, leaves the first tokens without one; their mtp / accept / divergence entries hold 0)
    mtp_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # MoE router load-balancing loss of the trunk (compute_aux_loss=True)



def logit_transform(model) -> tuple[float | None, float]:
    """(final_logit_softcapping or None, logit_scale or 1.0) of the model's text config."""
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


def transform_logits(logits, softcap, scale):
    """The model's own post-LM-head transform (logit scale, then final softcap, as Cohere / Gemma forwards apply
    them), the one place it is written: (logits, d(logits)/d(pre-softcap logits)) (1 without softcap)."""
    logits = logits * scale
    if softcap is None:
        return logits, 1.0
    t = torch.tanh(logits / softcap)
    return softcap * t, 1.0 - t * t


def _logits(hidden, weight, bias, temperature, softcap, scale):
    """Float32 logits / temperature of one row tile, as the LM head (with logit scale and softcap) gives them;
    also d(logits)/d(pre-softcap logits) for the chain rule (1 without softcap)."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    logits, dcap = transform_logits(logits, softcap, scale)
    return logits / temperature, dcap


def _kl_tile(log_p, log_q):
    """KL(p || q) per row, and its gradient with respect to the head's logits: q - p."""
    p = log_p.exp()
    return (p * (log_p - log_q)).sum(-1), log_q.exp() - p


def _tv_tile(log_p, log_q):
    """1 - sum_v min(p, q) per row (the total variation: the probability that speculative sampling rejects a
    draft from q; Bebop's head objective), and its gradient with respect to the head's logits. Where q < p the
    min is q (m = 1[q < p]), so with S = sum_v m_v q_v: d/dz_j (1 - sum_v m_v q_v) = q_j (S - m_j)."""
    p, q = log_p.exp(), log_q.exp()
    m = (q < p).to(q.dtype)
    return 1.0 - torch.minimum(p, q).sum(-1), q * ((m * q).sum(-1, keepdim=True) - m)


# Head divergences from the main head's distribution, per token (`compute_divergence`): name -> tile function
# (log p, log q) -> (value per row, d value / d head logits).
HEAD_DIVERGENCES = {"kl": _kl_tile, "tv": _tv_tile}


class ChunkedHeadDivergence(torch.autograd.Function):
    """Per-token divergence of the head from the main head (`HEAD_DIVERGENCES`: KL(p_main || q_head) or
    1 - sum_v min(p_main, q_head)) over the full vocabulary, tiled over rows, with gradient into the head's hidden
    states only (the main distribution and the LM head are targets, not trained).

    Each tile function gives the gradient with respect to the head logits, so the forward computes
    `d D / d h = (dD/dz * dcap / T) @ W * scale` tile by tile and keeps only that `[N, H]` tensor: no
    `[N, V]` tensor is ever kept for backward."""

    @staticmethod
    def forward(ctx, head_hidden, main_hidden, weight, bias, temperature, softcap, scale, kind):
        tile = HEAD_DIVERGENCES[kind]
        n = head_hidden.shape[0]
        value = torch.empty(n, device=head_hidden.device, dtype=torch.float32)
        grad = torch.empty(head_hidden.shape, device=head_hidden.device, dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, n, _ACCEPT_ROWS):
                rows = slice(start, start + _ACCEPT_ROWS)
                log_p = torch.log_softmax(_logits(main_hidden[rows], weight, bias, temperature, softcap, scale)[0], -1)
                z_q, dcap = _logits(head_hidden[rows], weight, bias, temperature, softcap, scale)
                value[rows], d_logits = tile(log_p, torch.log_softmax(z_q, -1))
                grad[rows] = ((d_logits * dcap) @ weight.float()) * (scale / temperature)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = head_hidden.dtype
        return value

    @staticmethod
    def backward(ctx, grad_value):
        (grad,) = ctx.saved_tensors
        return (grad * grad_value.unsqueeze(-1)).to(ctx.hidden_dtype), None, None, None, None, None, None, None


def head_divergence(kind, head_hidden, main_hidden, weight, bias=None, temperature=1.0, softcap=None, scale=1.0):
    """`kind` ("kl" | "tv") of the head from the main head per token, for hidden states [B, L, H] -> [B, L];
    gradient into `head_hidden` only."""
    if kind not in HEAD_DIVERGENCES:
        raise ValueError(f"head divergence must be one of {', '.join(HEAD_DIVERGENCES)}, got {kind!r}")
    batch, length, dim = head_hidden.shape
    value = ChunkedHeadDivergence.apply(head_hidden.reshape(-1, dim), main_hidden.detach().reshape(-1, dim),
                                        weight.detach(), None if bias is None else bias.detach(), temperature,
                                        softcap, scale, kind)
    return value.view(batch, length)


def _processed_probs(hidden, weight, bias, temperature, softcap, scale, truncation):
    logits = _logits(hidden, weight, bias, temperature, softcap, scale)[0]
    if truncation is not None and len(truncation):
        logits = truncation(None, logits.float())
    return torch.softmax(logits, dim=-1)


@torch.no_grad()
def _expected_acceptance(main_hidden, head_hiddens, weight, bias, temperature, softcap, scale, truncation=None,
                         draft_vocab=None):
    """sum_v min(p_main, p_head) per token: the probability that a draft sampled from the head is accepted
    by speculative sampling against the main head. Full distributions, so rows are tiled.

    `truncation`: the sampler's top-k / top-p warpers (a transformers `LogitsProcessorList`, applied after the
    temperature to target and draft alike, as the sampler does), so the number is the acceptance under the law
    the rollouts are drawn from; None: the untruncated distributions at `temperature`. `draft_vocab`: the token
    ids the heads draft from (trimmed drafting: q over those rows of the LM head, processed there, zero elsewhere,
    as `speculative_generate(draft_vocab=...)` drafts); None: the full vocabulary."""
    batch, length, dim = main_hidden.shape
    q_weight, q_bias = weight, bias
    if draft_vocab is not None:
        draft_vocab = draft_vocab.to(weight.device)
        q_weight, q_bias = weight[draft_vocab], None if bias is None else bias[draft_vocab]
    main_flat = main_hidden.reshape(-1, dim)
    heads_flat = [h.reshape(-1, dim) for h in head_hiddens]
    out = torch.empty(len(heads_flat), main_flat.shape[0], device=main_flat.device, dtype=torch.float32)
    for start in range(0, main_flat.shape[0], _ACCEPT_ROWS):
        rows = slice(start, start + _ACCEPT_ROWS)
        p = _processed_probs(main_flat[rows], weight, bias, temperature, softcap, scale, truncation)
        if draft_vocab is not None:
            p = p[:, draft_vocab]
        for k, h in enumerate(heads_flat):
            q = _processed_probs(h[rows], q_weight, q_bias, temperature, softcap, scale, truncation)
            out[k, rows] = torch.minimum(p, q).sum(-1)
    return out.view(len(heads_flat), batch, length).transpose(0, 1)


def _check_inputs(model, input_ids, attention_mask, logits_to_keep, mtp_grad) -> int:
    if mtp_grad not in MTP_GRAD_CHOICES:
        raise ValueError(f"mtp_grad must be one of {MTP_GRAD_CHOICES}, got {mtp_grad!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    seq_len, keep = input_ids.shape[1], int(logits_to_keep)
    if not 1 <= keep <= seq_len - 1:
        raise ValueError(f"logits_to_keep={keep} with seq_len={seq_len}: the main head scores completion token j "
                         f"from position j-1, so the prompt needs a token (need 1 <= logits_to_keep <= {seq_len - 1})")
    return keep


def _with_head_context(h0, input_ids, attention_mask, keep, num_heads):
    """Head K scores completion token j from position j-K-1: when the sequence is too short for that (a prompt of K
    tokens or fewer), pad it on the left with masked positions, for the heads only (the trunk never sees them).
    Returns (h0, input_ids, attention_mask, context [B, K, keep]): head k has a real token at position j-k-1."""
    batch, seq_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    missing = keep + num_heads + 1 - seq_len
    if missing > 0:
        h0 = torch.nn.functional.pad(h0, (0, 0, missing, 0))
        input_ids = torch.nn.functional.pad(input_ids, (missing, 0))
        attention_mask = torch.nn.functional.pad(attention_mask, (missing, 0))
        seq_len += missing
    context = torch.stack([attention_mask[:, seq_len - keep - 1 - k: seq_len - 1 - k]
                           for k in range(1, num_heads + 1)], dim=1).bool()
    return h0, input_ids, attention_mask, context


def head_logprobs(model, h0, input_ids, attention_mask, logits_to_keep, temperature=1.0, mtp_grad="joint", *,
                  compute_divergence=None):
    """The MTP heads on the trunk states they read, `h0` [B, T, H] (the decoder's output, or for MiMo-layout heads
    the state before its final norm: `mtp.recording_head_input`): (log-probs [B, K, L] of the last
    `logits_to_keep` tokens, each head's hidden states over those positions, the divergence `compute_divergence`
    (None, "kl": KL(p_main || q_k), "tv": 1 - sum_v min(p_main, q_k)) [B, K, L] or None, context [B, K, L]:
    head k has a real token at position j-k-1). Called by `forward_logprobs`, and by the trainer to re-run
    detached heads on the live trunk when it measures gradient statistics (`occ_fidelity_every`). Pad positions
    and positions without context are not masked here."""
    keep = _check_inputs(model, input_ids, attention_mask, logits_to_keep, mtp_grad)
    heads, decoder = get_mtp_heads(model), decoder_of(model)
    main_hidden = None
    if compute_divergence is not None:  # the main head's states, from the heads' input (`mtp.main_states`)
        main_hidden = main_states(model, h0[:, input_ids.shape[1] - keep - 1: input_ids.shape[1] - 1])
    h0, input_ids, attention_mask, context = _with_head_context(h0, input_ids, attention_mask, keep, heads.num_heads)
    seq_len = input_ids.shape[1]
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    softcap, scale = logit_transform(model)
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
    targets = input_ids[:, -keep:]
    mtp = torch.stack(
        [_token_logprobs(h, weight, bias, targets, temperature, softcap, scale)[0] for h in head_hidden], dim=1
    )
    divergence = None
    if compute_divergence is not None:
        if compute_divergence not in HEAD_DIVERGENCES:
            raise ValueError(f"compute_divergence must be None or one of {', '.join(HEAD_DIVERGENCES)}, got "
                             f"{compute_divergence!r}")
        divergence = torch.stack([head_divergence(compute_divergence, h, main_hidden, weight, bias, temperature,
                                                  softcap, scale) for h in head_hidden], dim=1)
    return mtp, head_hidden, divergence, context


def router_aux_loss(model, router_logits, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss exactly as the model's own forward computes it (`load_balancing_loss_func` of
    its modelling module, with its expert counts), from the trunk's router logits."""
    import sys

    module = sys.modules[type(model).__module__]
    loss_func = getattr(module, "load_balancing_loss_func", None)
    cfg = model.config.get_text_config()
    experts = getattr(model, "num_experts", None) or getattr(cfg, "num_experts", None) or \
        getattr(cfg, "num_local_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None) or getattr(cfg, "num_experts_per_tok", None)
    if loss_func is None or experts is None or top_k is None:
        raise NotImplementedError(
            f"{cfg.model_type}: the router load-balancing loss with MTP heads needs the modelling module's "
            "load_balancing_loss_func and the expert counts (num_experts, num_experts_per_tok); set "
            "router_aux_loss_coef: 0 to train without it")
    return loss_func(router_logits, experts, top_k, attention_mask)


def main_logprobs(model, input_ids, attention_mask, logits_to_keep, temperature=1.0) -> torch.Tensor:
    """[B, L] main-head log-probs of the last `logits_to_keep` tokens (0 on padding), the trunk and the tiled LM
    head only: what `forward_logprobs(...).main` gives, without running the MTP heads."""
    keep = _check_inputs(model, input_ids, attention_mask, logits_to_keep, "joint")
    h0 = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    lm_head = model.get_output_embeddings()
    softcap, scale = logit_transform(model)
    seq_len = input_ids.shape[1]
    main, _ = _token_logprobs(h0[:, seq_len - keep - 1: seq_len - 1], lm_head.weight, lm_head.bias,
                              input_ids[:, -keep:], temperature, softcap, scale)
    return main if attention_mask is None else main.masked_fill(attention_mask[:, -keep:] == 0, 0.0)


def forward_logprobs(model, input_ids, attention_mask, logits_to_keep, temperature=1.0, mtp_grad="joint", *,
                     compute_entropy=False, compute_accept=False, compute_divergence=None,
                     return_hidden=False, compute_aux_loss=False, accept_truncation=None,
                     accept_draft_vocab=None) -> LogProbs:
    """Main and MTP log-probabilities of the last `logits_to_keep` tokens from one trunk forward.

    mtp_grad="joint": the MTP heads see the live trunk, embeddings and lm_head, so an MTP loss trains them.
    mtp_grad="detach": hidden states, embeddings and lm_head weights enter the heads detached; an MTP loss
    then only reaches MTP-only parameters (the verl/slime default during RL).
    compute_accept: also the expected acceptance `sum_v min(p_main, q_k)` of every head, under `temperature` and
    `accept_truncation` (the sampler's top-k / top-p warpers, `mtprl.generation.speculative.logits_warpers(1.0, k, p)`; None:
    no truncation) and `accept_draft_vocab` (the token ids the heads draft from; None: all). compute_divergence: also
    every head's per-token divergence from the main head ("kl": KL(p_main || q_k); "tv": 1 - sum_v
    min(p_main, q_k), `head_divergence`), whose gradient reaches the heads only. return_hidden: also the trunk
    states the heads read (with their graph: the decoder's output, or the state before its final norm for MiMo-layout
    heads), which the `hidden` OCC estimator differentiates both losses against. compute_aux_loss:
    also the MoE router load-balancing loss of the trunk, as the model's own forward gives it (what TRL adds, times
    router_aux_loss_coef, to its loss).
    """
    keep = _check_inputs(model, input_ids, attention_mask, logits_to_keep, mtp_grad)
    decoder, seq_len = decoder_of(model), input_ids.shape[1]
    router = {"output_router_logits": True} if compute_aux_loss else {}
    with recording_head_input(model) as head_input:
        trunk = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **router)
    h0 = trunk.last_hidden_state
    hh = head_input.of(h0)  # what the heads read (the same tensor unless they read the state before the final norm)
    aux_loss = router_aux_loss(model, trunk.router_logits, attention_mask) if compute_aux_loss else None
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    softcap, scale = logit_transform(model)
    main_hidden = h0[:, seq_len - keep - 1: seq_len - 1]
    main, entropy = _token_logprobs(main_hidden, weight, bias, input_ids[:, -keep:], temperature, softcap, scale,
                                    entropy=compute_entropy)
    mtp, head_hidden, divergence, context = head_logprobs(model, hh, input_ids, attention_mask, keep, temperature,
                                                       mtp_grad, compute_divergence=compute_divergence)
    accept = None
    if compute_accept:
        accept = _expected_acceptance(main_hidden.detach(), [h.detach() for h in head_hidden], weight.detach(),
                                      None if bias is None else bias.detach(), temperature, softcap, scale,
                                      accept_truncation, accept_draft_vocab)
    pad = None if attention_mask is None else attention_mask[:, -keep:] == 0
    if pad is not None:
        main = main.masked_fill(pad, 0.0)
        entropy = None if entropy is None else entropy.masked_fill(pad, 0.0)
    head_pad = ~context if pad is None else pad.unsqueeze(1) | ~context
    mtp = mtp.masked_fill(head_pad, 0.0)
    accept = None if accept is None else accept.masked_fill(head_pad, 0.0)
    divergence = None if divergence is None else divergence.masked_fill(head_pad, 0.0)
    return LogProbs(main=main, mtp=mtp, entropy=entropy, accept=accept, divergence=divergence,
                    hidden=hh if return_hidden else None, mtp_mask=~head_pad, aux_loss=aux_loss)


def add_mtp_forward(model, temperature: float) -> None:
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
