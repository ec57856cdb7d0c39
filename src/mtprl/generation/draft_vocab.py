"""Which tokens the heads draft from (`mtp_draft_vocab_size`): the N most frequent tokens of the run's recent
rollouts, refreshed after every rollout as the policy moves.

A draft step of a real model is dominated by the LM head (SmolLM2-135M: 49,152 rows, about a tenth of a trunk
step); FastMTP (arXiv 2509.18362) drafts over a few thousand frequent tokens instead. Speculative sampling stays
exact with any draft distribution (`speculative_generate(draft_vocab=...)`: q is zero off the subset, the verify
and the residual use the full target), so a subset costs acceptance only where the policy samples a token outside
it. Counts are exponentially decayed per rollout (`decay`), so the subset follows the text the policy writes now,
not what it wrote at the start. Until the first rollout is observed there is nothing to rank and the heads draft
from the full vocabulary.
"""

from __future__ import annotations

import torch


class DraftVocabulary:
    """Running token counts of completions; `ids()` is the `size` most frequent (None: the full vocabulary)."""

    def __init__(self, size: int, vocab_size: int, decay: float = 0.9):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"mtp_draft_vocab_size must be an integer >= 0 (0 = the full vocabulary), got {size!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.size, self.vocab_size, self.decay = size, vocab_size, decay
        self.counts = torch.zeros(vocab_size, dtype=torch.float64)
        self._ids: torch.Tensor | None = None

    @property
    def trims(self) -> bool:
        return 0 < self.size < self.vocab_size

    def observe(self, completions: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Count the tokens of one rollout's completions [B, N] (`mask` [B, N]: 1 where a token was generated)."""
        if not self.trims:
            return
        tokens = completions.reshape(-1) if mask is None else completions[mask.bool()]
        tokens = tokens.detach().to("cpu", torch.long)
        tokens = tokens[(tokens >= 0) & (tokens < self.vocab_size)]
        self.counts.mul_(self.decay).add_(torch.bincount(tokens, minlength=self.vocab_size).double())
        # ties (tokens never seen) go to the lowest ids; the order within the subset does not matter to the sampler
        self._ids = torch.topk(self.counts, self.size, sorted=False).indices.sort().values

    def ids(self) -> torch.Tensor | None:
        """The draft vocabulary now: sorted token ids, or None (the full vocabulary: not trimming, or nothing
        observed yet)."""
        return self._ids if self.trims else None

    def seed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Count `tokens` (e.g. the prompts an evaluation is about to sample from) only if nothing has been
        observed yet, so a single-batch evaluation drafts from a trimmed vocabulary too."""
        if self._ids is None:
            self.observe(tokens, mask)

    def coverage(self, completions: torch.Tensor, mask: torch.Tensor | None = None) -> float | None:
        """Share of these completion tokens inside the current draft vocabulary (None: not trimming yet)."""
        ids = self.ids()
        if ids is None:
            return None
        tokens = completions.reshape(-1) if mask is None else completions[mask.bool()]
        return float(torch.isin(tokens.cpu(), ids).float().mean()) if tokens.numel() else None


def generated_mask(sequences: torch.Tensor, prompt_len: int, eos_token_id) -> torch.Tensor:
    """[B, N] over the generated part of `sequences`: 1 up to and including each row's first EOS, 0 after it
    (the tail after a row's end holds padding, which is not text the policy wrote)."""
    gen = sequences[:, prompt_len:]
    if eos_token_id is None:
        return torch.ones_like(gen, dtype=torch.bool)
    eos = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                          device=gen.device)
    is_eos = torch.isin(gen, eos)
    return (is_eos.long().cumsum(1) - is_eos.long()) == 0
