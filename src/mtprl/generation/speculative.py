"""Lossless MTP self-speculative sampling, batched: the live heads draft, the trunk verifies.

One verify cycle for a row whose committed tokens are x_0 .. x_{L-1} (the trunk has run x_0 .. x_{L-2}):

    draft   depth 1 at index t = L-2 reads (h0_{L-2}, Emb(x_{L-1}))       -> d_1 ~ q_1   (predicts x_L)
            depth k at index t = L-2 reads (h^{k-1}_{L-2}, Emb(d_{k-1}))  -> d_k ~ q_k   (predicts x_{L+k-1})
    verify  one trunk forward over [x_{L-1}, d_1 .. d_D] gives p_0 .. p_D (p_j predicts x_{L+j})
    accept  d_j with probability min(1, p_{j-1}(d_j) / q_j(d_j)) until the first rejection (Leviathan et al. 2023,
            Chen et al. 2023); then draw one token from norm(max(0, p_n - q_{n+1})), or from p_D when all D passed.

Trimmed drafting (`draft_vocab`, FastMTP's vocabulary compression): the heads' logits are computed over those rows of
the LM head only and q is zero elsewhere; the verify and the residual use the full target p, so the output law is
unchanged (speculative sampling is exact for any draft distribution) and only the acceptance can drop.

p and q are the *processed* distributions plain sampling uses (transformers' own temperature, top-k and top-p
warpers, applied to target and draft alike), so every committed token is distributed exactly as under
`model.generate(do_sample=True)`; greedy (`do_sample=False`) commits the trunk's argmax, as `generate` does.

Depth k at index t is the training layout of `mtprl.model.mtp.MTPHeads`: it embeds x_{t+k}, reads depth k-1's state at t,
and runs at the position of x_{t+k}. Its KV cache therefore holds, for every index t <= L-2, an entry computed from
x_{t+k}; the entries with t >= L-k were computed from drafts. Each cycle invalidates those speculative entries
(t >= L-D) and recomputes every depth from t = L-D with the tokens then committed (teacher forcing, as in training,
so the acceptance measured here is the one `mtp/accept/k` predicts).

Batching with ragged acceptance: every cycle appends D+1 slots to the trunk cache and 2D slots to each depth's cache
for every row; slots a row does not use (rejected drafts, stale speculative entries, chunk padding) stay in the
cache but are masked out of every later attention through a per-row validity mask, and positions are explicit per
row, so a hole changes nothing (a masked key gets exactly zero weight). Finished rows (EOS or budget) leave the
batch: their cache rows are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                     TopKLogitsWarper, TopPLogitsWarper)
from transformers.masking_utils import create_causal_mask

from ..model.logprobs import logit_transform, transform_logits
from ..model.mtp import decoder_of, get_mtp_heads, recording_head_input


@dataclass
class SpeculativeOutput:
    """What `speculative_generate` returns: the sequences and the counts behind the rollout metrics.

    Per depth k (index k-1): `drafted[k]` drafts proposed, `reached[k]` drafts actually tested (every earlier draft
    of the cycle accepted), `accepted[k]` accepted. Counts run over active rows and cycles."""

    sequences: torch.Tensor  # [B, P + N]: left-padded prompt, completion, pad_token_id after a row's end
    num_draft_tokens: int
    verify_forwards: int = 0  # trunk forwards, the prefill included (it commits the first token)
    row_cycles: int = 0  # sum over trunk forwards of the rows still active: the denominator of tokens per verify
    committed_tokens: int = 0  # completion tokens written (EOS included, padding not)
    drafted: list[int] = field(default_factory=list)
    reached: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    draft_vocab: torch.Tensor | None = None  # the token ids the heads drafted from (None: the full vocabulary)
    prefill_seconds: float = 0.0
    loop_seconds: float = 0.0  # everything after the prefill: drafting, verifying, accepting

    @property
    def accept_length(self) -> float:
        """Tokens committed per verify forward and row, the trunk's own (bonus / correction) token included."""
        return self.committed_tokens / max(self.row_cycles, 1)

    @property
    def accept_rate(self) -> float:
        """Accepted drafts / proposed drafts, all depths."""
        return sum(self.accepted) / max(sum(self.drafted), 1)

    def accept_rate_at(self, depth: int) -> float:
        """vLLM's per-position rate: accepted drafts at depth k / drafts proposed at depth k."""
        return self.accepted[depth - 1] / max(self.drafted[depth - 1], 1)

    def conditional_accept_rate_at(self, depth: int) -> float:
        """P(draft k accepted | drafts 1..k-1 accepted): what `mtp/accept/k` predicts."""
        return self.accepted[depth - 1] / max(self.reached[depth - 1], 1)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.loop_seconds

    def metrics(self) -> dict[str, float]:
        """The rollout metrics under the names the RL stacks use."""
        out = {"rollout/draft_tokens": float(self.num_draft_tokens),
               "rollout/tokens_per_s": self.committed_tokens / max(self.seconds, 1e-9)}
        if self.num_draft_tokens > 0:
            if self.draft_vocab is not None:
                out["rollout/draft_vocab_size"] = float(self.draft_vocab.numel())
            out["rollout/spec_accept_length"] = self.accept_length
            out["rollout/spec_accept_rate"] = self.accept_rate
            for k in range(1, self.num_draft_tokens + 1):
                out[f"rollout/spec_accept_rate/{k}"] = self.accept_rate_at(k)
        return out


# Generation options the sampler implements (the processed distribution); anything else that changes the law of a
# token must be refused, not ignored.
UNSUPPORTED_OPTIONS = {  # option: the value that means "off"
    "repetition_penalty": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "top_h": None, "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "min_new_tokens": 0, "min_length": 0, "num_beams": 1,
    "num_return_sequences": 1, "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "renormalize_logits": False, "encoder_repetition_penalty": 1.0, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "watermarking_config": None, "penalty_alpha": None, "assistant_model": None,
}


def check_generation_options(options: dict) -> None:
    """Raise naming the first option the sampler does not implement (a repetition penalty, min_p, ...)."""
    for name, value in options.items():
        if name in UNSUPPORTED_OPTIONS and value is not None and value != UNSUPPORTED_OPTIONS[name]:
            raise ValueError(f"speculative sampling does not support the generation option {name}={value!r} "
                             f"(it would change the sampled distribution); set it to {UNSUPPORTED_OPTIONS[name]!r} "
                             "or use mtp_draft_tokens: 0")


def logits_warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """transformers' own warpers, in `generate`'s order (temperature, top-k, top-p): the processed distribution."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature!r}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


def processed_probs(logits: torch.Tensor, warpers: LogitsProcessorList) -> torch.Tensor:
    """softmax(warpers(logits)) in float32 over the last dim, for logits of any leading shape."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    flat = warpers(None, flat) if len(warpers) else flat
    return torch.softmax(flat, dim=-1).view(logits.shape)


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, *, greedy: bool,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling, batched. p: [B, D+1, V] target, q: [B, D, V] draft, drafts: [B, D].

    Returns (n [B]: drafts accepted, the run before the first rejection; next [B]: the token drawn from the residual
    norm(max(0, p_n - q_{n+1})) after a rejection or from p_D when all passed; accepted [B, D]: the per-draft test).
    Greedy: a draft is accepted iff it is the target's argmax, and the next token is the argmax of p_n."""
    batch, depth = drafts.shape
    rows = torch.arange(batch, device=p.device)
    if greedy:
        accepted = drafts == p[:, :depth].argmax(-1)
    elif depth == 0:
        accepted = drafts.bool()
    else:
        p_d = p[:, :depth].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
        q_d = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
        u = torch.rand(batch, depth, device=p.device, generator=generator)
        accepted = u * q_d <= p_d  # u <= p/q without dividing (q_d > 0: the draft was sampled from q)
    n = accepted.long().cumprod(dim=1).sum(dim=1)
    target = p[rows, n]  # p_n
    if greedy:
        return n, target.argmax(-1), accepted
    if depth > 0:
        rejected = n < depth
        q_next = q[rows, n.clamp(max=depth - 1)]
        residual = (target - q_next).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        # mass 0 only when p_n == q_{n+1}, where a rejection has probability 0: any choice is then lawful
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target)
        target = torch.where(rejected.unsqueeze(-1), residual, target)
    return n, torch.multinomial(target, 1, generator=generator).squeeze(-1), accepted


def expected_accept_length(accept: torch.Tensor, lengths: torch.Tensor, num_draft_tokens: int) -> float:
    """The sampler's expected `accept_length` (tokens per verify forward, the prefill's included) on given rows,
    from the heads' per-position expected acceptance `accept` [B, K, N] (`forward_logprobs(...).accept` over the
    completions: `accept[b, k, j]` = sum_v min(p, q) of head k+1 predicting token j) and each row's generated
    tokens `lengths` [B]. It walks each row as the sampler does: a cycle that must commit token j drafts tokens
    j .. j+D-1, the run of accepted drafts has P(n >= m) = prod_{i<m} accept[i, j+i], and the cycle commits n+1
    tokens, so E(j) = 1 + sum_n P(n) E(j+n+1) cycles remain (E = 0 past the row's end). Unlike
    `1 + a_1 + a_1 a_2` from mean acceptances, this sees that where easy tokens cluster, accepted drafts jump over
    easy positions and the drafts land more often where acceptance is low."""
    accept = accept.double().cpu()
    tokens = cycles = 0.0
    for b in range(accept.shape[0]):
        n_tok = int(lengths[b])
        if n_tok <= 0:
            continue
        remaining = [0.0] * (n_tok + num_draft_tokens + 2)  # E(j), zero from n_tok on
        for j in range(n_tok - 1, 0, -1):
            expected, run = 1.0, 1.0  # P(n >= m) as m grows
            for m in range(num_draft_tokens + 1):
                # P(the run stops at m | it reached m): draft m+1 rejected; after D drafts (or the row's end) it stops
                stop = 1.0 - float(accept[b, m, j + m]) if m < num_draft_tokens and j + m < n_tok else 1.0
                expected += run * stop * remaining[min(j + m + 1, n_tok)]
                run *= 1.0 - stop
            remaining[j] = expected
        tokens += n_tok
        cycles += 1.0 + remaining[1]  # the prefill commits token 0
    return tokens / max(cycles, 1.0)


def _lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits from the shared LM head, with the model's logit scale and softcap (as its forward applies)."""
    return transform_logits(model.get_output_embeddings()(hidden).float(), *logit_transform(model))[0]


def check_draft_vocab(draft_vocab, vocab_size: int, device) -> torch.Tensor | None:
    """The draft vocabulary as sorted unique token ids on `device` (None: the full vocabulary); raises naming
    `draft_vocab` for anything that is not a non-empty 1-D set of ids in 0..vocab_size-1."""
    if draft_vocab is None:
        return None
    ids = torch.as_tensor(draft_vocab)
    if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"draft_vocab must be a non-empty 1-D tensor of token ids, got dtype {ids.dtype} and shape "
                         f"{tuple(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"draft_vocab holds ids outside 0..{vocab_size - 1} (the LM head's rows): "
                         f"min {int(ids.min())}, max {int(ids.max())}")
    ids = torch.unique(ids.long())
    return None if ids.numel() == vocab_size else ids.to(device)


def _draft_logits_fn(model, draft_ids: torch.Tensor | None):
    """hidden -> float32 draft logits: the full LM head, or only its `draft_ids` rows (a [V_d, H] copy made once
    per call, so a draft step costs V_d / V of the LM head)."""
    if draft_ids is None:
        return lambda hidden: _lm_logits(model, hidden)
    head = model.get_output_embeddings()
    weight = head.weight[draft_ids]
    bias = None if getattr(head, "bias", None) is None else head.bias[draft_ids]
    softcap, scale = logit_transform(model)
    return lambda hidden: transform_logits(torch.nn.functional.linear(hidden, weight, bias).float(), softcap,
                                           scale)[0]


def _eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def _check_model(model, num_draft_tokens) -> int:
    heads = get_mtp_heads(model)
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or \
            not 0 <= num_draft_tokens <= heads.num_heads:
        raise ValueError(f"num_draft_tokens must be an integer in 0..{heads.num_heads} (the model's MTP depths), "
                         f"got {num_draft_tokens!r}")
    cfg = model.config.get_text_config()
    layer_types = set(getattr(cfg, "layer_types", None) or [])
    if (getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None)) or \
            layer_types - {"full_attention"}:
        raise NotImplementedError(
            f"speculative sampling needs full-attention layers (masked cache slots); {cfg.model_type} has "
            f"{sorted(layer_types) or 'a sliding window'}: use mtp_draft_tokens: 0")
    return heads.num_heads


class _Rows:
    """Per-row state of the active rows (all tensors batch first); `select` keeps a subset of rows."""

    def __init__(self, **tensors):
        self.__dict__.update(tensors)

    def select(self, keep: torch.Tensor) -> None:
        for name, value in list(self.__dict__.items()):
            self.__dict__[name] = value[keep]


@torch.no_grad()
def speculative_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         max_new_tokens: int, num_draft_tokens: int, do_sample: bool = True,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
                         pad_token_id: int, generator: torch.Generator | None = None,
                         draft_vocab: torch.Tensor | None = None) -> SpeculativeOutput:
    """Sample up to `max_new_tokens` per row with the model's own MTP heads drafting `num_draft_tokens` tokens per
    trunk forward (0: plain sampling through the same code). `draft_vocab`: 1-D token ids the heads draft from
    (None: the full vocabulary). Lossless; see the module docstring."""
    depth = _check_model(model, num_draft_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, prompt_len], got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    batch, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    attention_mask = attention_mask.bool()
    if (attention_mask[:, 1:].long() - attention_mask[:, :-1].long()).lt(0).any() or not attention_mask[:, -1].all():
        raise ValueError("attention_mask must be left-padded (every row's prompt ends at the last column), as TRL "
                         "and model.generate pad decoder-only prompts")
    warpers = logits_warpers(temperature, top_k, top_p) if do_sample else LogitsProcessorList()
    greedy = not do_sample
    eos = _eos_tensor(eos_token_id, device)
    D = num_draft_tokens
    out = SpeculativeOutput(sequences=input_ids, num_draft_tokens=D, drafted=[0] * D, reached=[0] * D,
                            accepted=[0] * D)
    decoder, heads = decoder_of(model), get_mtp_heads(model)
    embed, rotary = model.get_input_embeddings(), getattr(decoder, "rotary_emb", None)
    hidden_size = embed.weight.shape[1]
    vocab_size = model.get_output_embeddings().weight.shape[0]
    draft_ids = check_draft_vocab(draft_vocab, vocab_size, device)
    draft_logits = _draft_logits_fn(model, draft_ids)
    out.draft_vocab = draft_ids if D > 0 else None
    width = prompt_len + max_new_tokens + D + 1  # committed tokens plus room for a cycle's drafts

    def sample(probs):
        return probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    # ---- prefill: the trunk runs the prompt and samples x_P; the heads run over t = 0 .. P-1 (done in the loop)
    start = time.perf_counter()
    pad = (~attention_mask).sum(1)
    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    trunk_cache = DynamicCache()
    with recording_head_input(model) as head_input:
        trunk_out = decoder(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=positions,
                            past_key_values=trunk_cache, use_cache=True)
    h0 = trunk_out.last_hidden_state
    first = sample(processed_probs(_lm_logits(model, h0[:, -1]), warpers))
    h0 = head_input.of(h0)  # from here h0 is what the heads read (MiMo: the state before the final norm)
    seq = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    seq[:, :prompt_len] = input_ids
    seq[:, prompt_len] = first
    h0buf = h0.new_zeros(batch, width, hidden_size)
    h0buf[:, :prompt_len] = h0
    rows = _Rows(
        index=torch.arange(batch, device=device),  # row of the output
        seq=seq, h0=h0buf, pad=pad,
        length=torch.full((batch,), prompt_len + 1, dtype=torch.long, device=device),  # committed tokens (L)
        trunk_valid=attention_mask.clone(),  # per trunk-cache slot
        head_valid=torch.zeros(batch, 0, dtype=torch.bool, device=device),  # per head-cache slot (all depths)
        head_slot=torch.full((batch, width), -1, dtype=torch.long, device=device),  # index t -> head slot
    )
    final = torch.full((batch, prompt_len + max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    final_len = torch.zeros(batch, dtype=torch.long, device=device)
    out.committed_tokens, out.verify_forwards, out.row_cycles = batch, 1, batch
    done = (first.unsqueeze(1) == eos).any(1) if eos is not None else torch.zeros(batch, dtype=torch.bool,
                                                                                  device=device)
    if max_new_tokens == 1:
        done[:] = True
    head_cache = DynamicCache() if D > 0 else None
    chunk_start = torch.zeros(batch, dtype=torch.long, device=device)  # the prefill chunk: t = 0 .. P-1
    chunk_width = prompt_len
    out.prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    while True:
        # ---- rows that ended leave the batch (their output is final)
        if done.any():
            ended = done.nonzero().squeeze(1)
            for b in ended.tolist():
                n = int(rows.length[b])
                final[rows.index[b], :n] = rows.seq[b, :n]
                final_len[rows.index[b]] = n
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            rows.select(keep)
            chunk_start = chunk_start[keep]
            trunk_cache.batch_select_indices(keep)
            if head_cache is not None:
                head_cache.batch_select_indices(keep)
        n_rows = rows.length.shape[0]
        ar = torch.arange(n_rows, device=device)

        # ---- draft: every depth runs over its chunk t = chunk_start .. L-2 (ragged: valid slots first)
        drafts = torch.zeros(n_rows, D, dtype=torch.long, device=device)
        q = None
        if D > 0:
            offs = torch.arange(chunk_width, device=device)
            t_idx = chunk_start.unsqueeze(1) + offs  # [R, W]
            chunk_valid = (t_idx <= (rows.length - 2).unsqueeze(1)) & (t_idx >= rows.pad.unsqueeze(1))
            t_safe = t_idx.clamp(max=width - 1)
            frontier = (rows.length - 2 - chunk_start)  # chunk slot of t = L-2, whose output drafts
            mask2d = torch.cat([rows.head_valid, chunk_valid], dim=1).long()
            h = rows.h0.gather(1, t_safe.unsqueeze(-1).expand(-1, -1, hidden_size))
            q_list = []
            for k in range(1, D + 1):
                tok_idx = (t_idx + k).clamp(max=width - 1)
                tokens = rows.seq.gather(1, tok_idx)
                emb = embed(tokens)
                if heads.mask_first_position:  # as the heads' forward: no token embedding at the first position
                    emb = emb.masked_fill((t_idx == rows.pad.unsqueeze(1)).unsqueeze(-1), 0.0)
                pos = (t_idx + k - rows.pad.unsqueeze(1)).clamp(min=0)
                mask = create_causal_mask(config=heads.config, inputs_embeds=emb, attention_mask=mask2d,
                                          past_key_values=head_cache, position_ids=pos, layer_idx=k - 1)
                pe = rotary(emb, pos) if rotary is not None else None
                h = heads.layers[k - 1](emb, h, position_embeddings=pe, attention_mask=mask, position_ids=pos,
                                        past_key_values=head_cache, use_cache=True)
                q_k = processed_probs(draft_logits(h[ar, frontier]), warpers)
                d_k = sample(q_k)
                if draft_ids is not None:  # back to token ids; q is zero outside the draft vocabulary
                    d_k = draft_ids[d_k]
                    q_k = q_k.new_zeros(n_rows, vocab_size).index_copy_(1, draft_ids, q_k)
                drafts[:, k - 1] = d_k
                q_list.append(q_k)
                # d_k is x_{L+k-1}: deeper depths embed it (the slot is overwritten once a token is committed there)
                rows.seq[ar, rows.length + k - 1] = d_k
            q = torch.stack(q_list, dim=1)
            slots = rows.head_valid.shape[1] + offs
            rows.head_slot.scatter_(1, t_safe, torch.where(chunk_valid, slots.expand(n_rows, -1),
                                                           rows.head_slot.gather(1, t_safe)))
            rows.head_valid = torch.cat([rows.head_valid, chunk_valid], dim=1)

        # ---- verify: one trunk forward over [x_{L-1}, d_1 .. d_D]
        v_idx = rows.length.unsqueeze(1) - 1 + torch.arange(D + 1, device=device)
        v_tokens = rows.seq.gather(1, v_idx)
        v_pos = v_idx - rows.pad.unsqueeze(1)
        v_mask = torch.cat([rows.trunk_valid, torch.ones(n_rows, D + 1, dtype=torch.bool, device=device)], dim=1)
        with recording_head_input(model) as head_input:
            h_v = decoder(input_ids=v_tokens, attention_mask=v_mask.long(), position_ids=v_pos,
                          past_key_values=trunk_cache, use_cache=True).last_hidden_state
        p = processed_probs(_lm_logits(model, h_v), warpers)
        h_v = head_input.of(h_v)
        out.verify_forwards += 1
        out.row_cycles += n_rows
        n_acc, nxt, _ = accept_drafts(p, q, drafts, greedy=greedy, generator=generator)
        for k in range(D):
            out.drafted[k] += n_rows
            out.reached[k] += int((n_acc >= k).sum())
            out.accepted[k] += int((n_acc > k).sum())

        # ---- commit x_L .. x_{L+n} = d_1 .. d_n, next; cut at EOS and at the budget
        rows.h0.scatter_(1, v_idx.unsqueeze(-1).expand(-1, -1, hidden_size), h_v)
        rows.trunk_valid = torch.cat([rows.trunk_valid, torch.arange(D + 1, device=device) <= n_acc.unsqueeze(1)],
                                     dim=1)
        rows.seq[ar, rows.length + n_acc] = nxt
        new_idx = rows.length.unsqueeze(1) + torch.arange(D + 1, device=device)
        new_tok = rows.seq.gather(1, new_idx.clamp(max=width - 1))
        count = n_acc + 1
        room = prompt_len + max_new_tokens - rows.length
        count = torch.minimum(count, room)
        in_new = torch.arange(D + 1, device=device) < count.unsqueeze(1)
        if eos is not None:
            is_eos = torch.isin(new_tok, eos) & in_new
            first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), D + 1)
            count = torch.minimum(count, first_eos + 1)
            done = is_eos.any(1)
        else:
            done = torch.zeros(n_rows, dtype=torch.bool, device=device)
        out.committed_tokens += int(count.sum())
        if D > 1:
            # the heads' entries at t = L-D .. L-2 (this cycle's L) embedded drafts: masked, recomputed next cycle
            stale_t = rows.length.unsqueeze(1) - D + torch.arange(D - 1, device=device)
            stale = rows.head_slot.gather(1, stale_t.clamp(min=0))
            stale_rows = ar.unsqueeze(1).expand_as(stale)
            ok = (stale >= 0) & (stale_t >= 0)
            rows.head_valid[stale_rows[ok], stale[ok]] = False
        chunk_start = (rows.length - D).clamp(min=0)
        chunk_width = 2 * D  # t = L-D .. L'-2: count + D - 1 <= 2D slots
        rows.length = rows.length + count
        done = done | (rows.length >= prompt_len + max_new_tokens)
    out.loop_seconds = time.perf_counter() - start
    # model.generate's layout: as wide as the longest row, pad after a row's end
    out.sequences = final[:, :int(final_len.max())]
    return out
