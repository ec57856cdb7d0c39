"""Rollouts drafted by the live MTP heads: how many drafts per verify forward (`fixed` | `adaptive`), and the hook
that sends TRL's `model.generate(...)` call through `mtprl.generation.speculative.speculative_generate`.

The adaptive policy (the RL stacks fix the draft length) picks, per rollout, the number of drafts D in
0..mtp_draft_tokens that maximises expected tokens per second at the current batch size,

    tokens/s(D) = measured tokens/s with D drafts / E_then(D) * E_now(D),   E(D) = 1 + a_1 + a_1 a_2 + ...

from the rollouts it measured with D drafts (whole rollouts: the cost of a verify forward and of the draft steps,
rows ending early) and the live per-depth acceptance a_k (the sampler's counts and `mtp/accept/k` of the training
step), so the choice follows the heads as RL moves the policy. When the verify forward is compute-bound (large
batches on a CPU) or completions are too short to draft, D = 0 wins and the policy stays there.
"""

from __future__ import annotations

import copy
import math
import statistics
import types
from contextlib import contextmanager

import torch

from .draft_vocab import DraftVocabulary, generated_mask
from .speculative import SpeculativeOutput, check_generation_options, speculative_generate

DRAFT_POLICIES = ("fixed", "adaptive")


class FixedDraft:
    """Always `num_draft_tokens` drafts."""

    def __init__(self, num_draft_tokens: int, vocabulary: DraftVocabulary | None = None):
        self.num_draft_tokens = num_draft_tokens
        self.vocabulary = vocabulary  # which tokens the heads draft from (None: all)

    def choose(self, batch_size: int) -> int:
        return self.num_draft_tokens

    def observe(self, out: SpeculativeOutput, batch_size: int) -> None:
        pass

    def observe_acceptance(self, rates: list[float]) -> None:
        pass


def _bucket(batch_size: int) -> int:
    """Batch sizes within a factor of two share cost measurements."""
    return 1 << max(0, math.ceil(math.log2(max(batch_size, 1))))


class AdaptiveDraft:
    """Drafts chosen per rollout: the D in 0..max_draft_tokens with the most expected completion tokens per second.

    For each (batch-size bucket, D) the policy keeps the tokens per second it measured (the whole rollout: prefill,
    drafting, verifying, rows ending early), each divided by the tokens per verify cycle that the acceptance of the
    moment predicted, `E(D) = 1 + a_1 + a_1 a_2 + ...`; its prediction is the geometric mean of the last `window`
    of those, times `E(D)` with today's live acceptance (the sampler's counts and the training step's
    `mtp/accept/k`). So a drift of the heads' acceptance during RL moves the choice at once, and what acceptance
    cannot see (a compute-bound verify, completions that end after three tokens) is in the measurement.

    Timing noise is the enemy on short rollouts (tens of milliseconds on a CPU measure anywhere within a factor of
    two), so: every D is measured `explore` times at a batch size (the first measurement of each is a warm-up and
    dropped) and, for short rollouts, until `explore_seconds` of it are measured (at most `max_explore` times).
    The policy starts on plain sampling (D = 0) and moves to another D only on clear evidence: it wins (drafting
    over plain sampling by `margin` more) by twice the standard error of the measured difference in mean log
    speed; while it wins but not yet clearly, the less certain of the two is measured again (at most
    `max_challenge` times each). So noise alone neither makes the policy lose to plain sampling nor flips it away
    from a real gain. Every `recheck_every` rollouts the least recently measured D is measured again."""

    def __init__(self, max_draft_tokens: int, beta: float = 0.7, window: int = 16, explore: int = 2,
                 recheck_every: int = 16, vocabulary: DraftVocabulary | None = None, explore_seconds: float = 0.25,
                 max_explore: int = 6, margin: float = 0.05, max_challenge: int = 16):
        self.max_draft_tokens = max_draft_tokens
        self.vocabulary = vocabulary  # which tokens the heads draft from (None: all)
        self.beta = beta  # weight of the history in the running average of the acceptance
        self.window, self.explore, self.recheck_every = window, explore, recheck_every
        self.explore_seconds, self.max_explore = explore_seconds, max_explore
        self.margin, self.max_challenge = margin, max_challenge
        self.accept: list[float | None] = [None] * max_draft_tokens  # conditional acceptance per depth
        self.samples: dict[tuple[int, int], list[float]] = {}  # (bucket, D) -> tokens/s / E(D), newest last
        self.measured: dict[tuple[int, int], int] = {}  # (bucket, D) -> measurements so far
        self.seconds: dict[tuple[int, int], float] = {}  # (bucket, D) -> rollout seconds measured after warm-up
        self.last_measured: dict[tuple[int, int], int] = {}  # (bucket, D) -> rollout count when last measured
        self.rollouts: dict[int, int] = {}  # bucket -> rollouts chosen
        self.current: dict[int, int] = {}  # bucket -> the D chosen now (plain sampling until drafting wins)

    def _ema(self, old, new):
        return new if old is None else self.beta * old + (1 - self.beta) * new

    def expected_tokens(self, drafts: int) -> float:
        """Tokens per verify cycle: 1 + a_1 + a_1 a_2 + ... (unmeasured depths count as 0)."""
        total, run = 1.0, 1.0
        for a in self.accept[:drafts]:
            run *= a or 0.0
            total += run
        return total

    def predicted_tokens_per_s(self, drafts: int, batch_size: int) -> float | None:
        """Geometric mean of the measured tokens/s / E_then(D), times E_now(D)."""
        samples = self.samples.get((_bucket(batch_size), drafts))
        if not samples:
            return None
        return math.exp(statistics.fmean(math.log(x) for x in samples)) * self.expected_tokens(drafts)

    def _log_se(self, drafts: int, batch_size: int) -> float:
        """Standard error of the mean log tokens/s of D's measurements (0 with a single one)."""
        samples = self.samples.get((_bucket(batch_size), drafts), [])
        if len(samples) < 2:
            return 0.0
        return statistics.stdev(math.log(x) for x in samples) / math.sqrt(len(samples))

    def _explored(self, key) -> bool:
        """Enough measurements of (bucket, D) to compare: `explore` (the warm-up included), and `explore_seconds`
        of rollouts after the warm-up unless `max_explore` were taken."""
        n = self.measured.get(key, 0)
        return n >= self.explore and (n >= self.max_explore or self.seconds.get(key, 0.0) >= self.explore_seconds)

    def choose(self, batch_size: int) -> int:
        bucket = _bucket(batch_size)
        count = self.rollouts[bucket] = self.rollouts.get(bucket, 0) + 1
        options = range(self.max_draft_tokens + 1)
        for drafts in options:  # measure every option at this batch size first
            if not self._explored((bucket, drafts)):
                return drafts
        if count % self.recheck_every == 0:
            return min(options, key=lambda d: self.last_measured.get((bucket, d), 0))
        current = self.current.get(bucket, 0)
        best = max(options, key=lambda d: self.predicted_tokens_per_s(d, batch_size))
        if best == current:
            return current
        gain = math.log(self.predicted_tokens_per_s(best, batch_size) /
                        self.predicted_tokens_per_s(current, batch_size))
        if current == 0:
            gain -= math.log1p(self.margin)  # drafting must beat plain sampling by the margin
        se_best, se_current = self._log_se(best, batch_size), self._log_se(current, batch_size)
        if gain > 2 * math.hypot(se_best, se_current):
            self.current[bucket] = best
            return best
        if gain > 0:  # ahead but not clearly: measure the less certain of the two again
            uncertain = best if se_best >= se_current else current
            if self.measured[(bucket, uncertain)] < self.max_challenge:
                return uncertain
        return current

    def observe(self, out: SpeculativeOutput, batch_size: int) -> None:
        key = (_bucket(batch_size), out.num_draft_tokens)
        expected = self.expected_tokens(out.num_draft_tokens)  # the acceptance this rollout ran under
        for k in range(out.num_draft_tokens):
            if out.reached[k]:
                self.accept[k] = self._ema(self.accept[k], out.accepted[k] / out.reached[k])
        self.measured[key] = self.measured.get(key, 0) + 1
        self.last_measured[key] = self.rollouts.get(key[0], 0)
        sample = out.committed_tokens / max(out.seconds, 1e-9) / expected
        # an option's first measurement is a warm-up (allocations, caches): replaced by the second
        kept = [] if self.measured[key] == 2 else self.samples.get(key, [])
        self.samples[key] = (kept + [sample])[-self.window:]
        if self.measured[key] >= 2:
            self.seconds[key] = self.seconds.get(key, 0.0) + out.seconds

    def observe_acceptance(self, rates: list[float]) -> None:
        """Expected acceptance of each head on the latest training batch (`mtp/accept/k`)."""
        for k, rate in enumerate(rates[: self.max_draft_tokens]):
            if rate is not None and math.isfinite(rate):
                self.accept[k] = self._ema(self.accept[k], rate)


def make_draft_policy(name: str, num_draft_tokens: int, vocab_size: int = 0, model=None):
    """The rollout policy `name` over 0..num_draft_tokens drafts; `vocab_size` > 0 trims the heads' drafts to that
    many most frequent tokens of the recent rollouts (`DraftVocabulary`; `model` gives the LM head's size)."""
    if name not in DRAFT_POLICIES:
        raise ValueError(f"mtp_draft_policy must be one of {', '.join(DRAFT_POLICIES)}, got {name!r}")
    vocabulary = None
    if vocab_size:
        if model is None:
            raise ValueError("mtp_draft_vocab_size needs the model (the size of its LM head)")
        vocabulary = DraftVocabulary(vocab_size, model.get_output_embeddings().weight.shape[0])
    cls = FixedDraft if name == "fixed" else AdaptiveDraft
    return cls(num_draft_tokens, vocabulary=vocabulary)


def draft_vocab_of(policy) -> torch.Tensor | None:
    """The token ids a policy's heads draft from now (None: the full vocabulary, or no policy)."""
    vocabulary = getattr(policy, "vocabulary", None)
    return None if vocabulary is None else vocabulary.ids()


def sample_with_heads(model, input_ids, attention_mask, policy, **options) -> SpeculativeOutput:
    """One rollout: the policy picks the drafts for this batch size and the tokens they come from, the sampler
    runs, the policy learns from it (its costs, acceptance and, when trimming, the tokens the policy wrote)."""
    batch = input_ids.shape[0]
    out = speculative_generate(model, input_ids, attention_mask, num_draft_tokens=policy.choose(batch),
                               draft_vocab=draft_vocab_of(policy), **options)
    policy.observe(out, batch)
    if getattr(policy, "vocabulary", None) is not None:
        prompt_len = input_ids.shape[1]
        policy.vocabulary.observe(out.sequences[:, prompt_len:],
                                  generated_mask(out.sequences, prompt_len, options.get("eos_token_id")))
    return out


def options_from_generation_config(config, **overrides) -> dict:
    """speculative_generate's options from a `GenerationConfig` (TRL's), refusing what the sampler does not do."""
    values = {**config.to_dict(), **overrides}
    check_generation_options(values)
    return {"max_new_tokens": values["max_new_tokens"], "do_sample": bool(values.get("do_sample")),
            "temperature": values.get("temperature") or 1.0, "top_p": values.get("top_p") or 1.0,
            "top_k": values.get("top_k") or 0, "eos_token_id": values.get("eos_token_id"),
            "pad_token_id": values["pad_token_id"]}


@contextmanager
def drafted_generate(model, policy, on_output):
    """Within the block, `model.generate(input_ids=..., attention_mask=..., generation_config=...)` (TRL's call)
    samples through the heads; `on_output(SpeculativeOutput)` sees each rollout's counts."""

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if extra:
            raise ValueError(f"speculative rollouts: unsupported generate() inputs {sorted(extra)}")
        # what model.generate would sample with: the call's config, unset fields from the model's own (as
        # transformers' _prepare_generation_config fills them), so a model default such as min_p is refused, not lost
        config = copy.deepcopy(generation_config)
        config.update(**self.generation_config.to_dict(), defaults_only=True)
        out = sample_with_heads(self, input_ids, attention_mask, policy, **options_from_generation_config(config))
        on_output(out)
        return out.sequences

    had_own = "generate" in model.__dict__
    original = model.__dict__.get("generate")
    model.generate = types.MethodType(generate, model)
    try:
        yield
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate


def repeat_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int):
    """`num_return_sequences=k` for the sampler: each prompt row k times, in generate's order."""
    return input_ids.repeat_interleave(k, dim=0), attention_mask.repeat_interleave(k, dim=0)


def merged_rollout_metrics(outputs: list[SpeculativeOutput]) -> dict[str, float]:
    """The rollout metrics of several sampler calls taken together (sums of counts, not means of ratios)."""
    if not outputs:
        return {}
    drafts = max(o.num_draft_tokens for o in outputs)
    total = SpeculativeOutput(sequences=outputs[0].sequences, num_draft_tokens=drafts, drafted=[0] * drafts,
                              reached=[0] * drafts, accepted=[0] * drafts)
    for o in outputs:
        for name in ("verify_forwards", "row_cycles", "committed_tokens", "prefill_seconds", "loop_seconds"):
            setattr(total, name, getattr(total, name) + getattr(o, name))
        for k in range(o.num_draft_tokens):
            total.drafted[k] += o.drafted[k]
            total.reached[k] += o.reached[k]
            total.accepted[k] += o.accepted[k]
    metrics = total.metrics()
    metrics["rollout/draft_tokens"] = sum(o.num_draft_tokens for o in outputs) / len(outputs)
    trimmed = [o.draft_vocab.numel() for o in outputs if o.draft_vocab is not None]
    if trimmed:  # mean size over the calls that drafted from a trimmed vocabulary
        metrics["rollout/draft_vocab_size"] = sum(trimmed) / len(trimmed)
    return metrics
