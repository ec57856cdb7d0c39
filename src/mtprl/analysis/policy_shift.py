"""How far RL moved the policy: the held-out KL between the end policy and the start policy.

`held_out_kl(end, start, ...)` samples completions of held-out prompts from the *end* policy (temperature 1, no
truncation: the law RL samples rollouts from) and sums, over each completion's positions, the exact next-token
KL(p_end || p_start) over the whole vocabulary. By the chain rule that sum is an unbiased estimate of the
sequence-level KL(p_end || p_start) for that prompt, with the sampling noise of the prefixes only (no noise from
sampling the token at each position). Reported per completion (the sequence KL, nats) and per completion token.

Why the end policy samples: a frozen drafter is judged on the text the *current* policy writes, so the KL that says
how stale it can be is the one under the current policy's own samples.
"""

from __future__ import annotations

import torch

from ..model.eval_mode import evaluating
from ..data.evaluation import completion_mask
from ..data.prompts import prompt_text


def next_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)) over the last dimension, exact: [..., V] -> [...] (nats)."""
    logp, logq = torch.log_softmax(logits_p.float(), -1), torch.log_softmax(logits_q.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def completion_kl(end, start, sequences: torch.Tensor, attention_mask: torch.Tensor, gen_len: int) -> torch.Tensor:
    """Per sequence, the sum over its completion tokens (the last `gen_len` positions, masked) of the exact next-token
    KL(p_end || p_start) at the positions that predicted them: [N]."""
    # logits only where they predict a completion token (transformers' logits_to_keep): no [N, T, V] tensor
    logits = [m(input_ids=sequences, attention_mask=attention_mask, logits_to_keep=gen_len + 1).logits[:, :-1]
              for m in (end, start)]
    kl = next_token_kl(*logits)
    return (kl * attention_mask[:, -gen_len:].float()).sum(-1)


@torch.no_grad()
def held_out_kl(end, start, tokenizer, prompts, *, k: int = 4, max_new_tokens: int = 48, batch_size: int = 32,
                seed: int = 0) -> dict:
    """The held-out KL(p_end || p_start): `k` completions per prompt sampled from `end` (temperature 1, no top-k or
    top-p); per completion the sum of exact next-token KLs (`completion_kl`). Returns the mean per completion
    (`kl_per_completion`, with its standard error over completions), per token (`kl_per_token`: total KL over
    total completion tokens) and the counts."""
    device = next(end.parameters()).device
    per_seq, tokens = [], 0
    with evaluating(end, seed), evaluating(start):
        for i in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                            add_special_tokens=False).to(device)
            seqs = end.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                num_return_sequences=k, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            prompt_mask = enc["attention_mask"].repeat_interleave(k, 0)
            mask = completion_mask(seqs, prompt_mask, tokenizer.eos_token_id)
            gen_len = seqs.shape[1] - prompt_mask.shape[1]
            per_seq.append(completion_kl(end, start, seqs, mask, gen_len).cpu())
            tokens += int(mask[:, -gen_len:].sum())
    kl = torch.cat(per_seq).double()
    return {"kl_per_completion": kl.mean().item(),
            "kl_per_completion_se": (kl.std(unbiased=True) / len(kl) ** 0.5).item() if len(kl) > 1 else 0.0,
            "kl_per_token": kl.sum().item() / max(tokens, 1), "completions": len(kl), "tokens": tokens}
