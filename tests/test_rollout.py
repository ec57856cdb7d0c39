"""Rollouts through the heads: TRL's generation path samples with the live heads, the config refuses what it cannot
do, the adaptive policy picks the draft count with the most expected tokens per second, evaluation drafts."""

import json
import warnings

import pytest
import torch
from conftest import trained_drafter
from datasets import Dataset
from conftest import COMMON, PROMPTS, _mtp_trainer, _small_model

from mtprl.data.evaluation import evaluate
from mtprl.generation.rollout import AdaptiveDraft, FixedDraft, make_draft_policy
from mtprl.generation.speculative import SpeculativeOutput, speculative_generate
from mtprl.training.trainer import MTPGRPOConfig


def test_trl_generation_samples_through_the_live_heads(tmp_path):
    """`_generate_single_turn` (TRL's transformers path) returns what speculative_generate draws with the same
    random stream and the trainer's own heads, and logs the rollout metrics."""
    model, tok = _small_model()
    trainer = _mtp_trainer(tmp_path, model=(model, tok), mtp_draft_tokens=2, max_completion_length=8)
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS[:5]]
    torch.manual_seed(11)
    completions, _ = trainer._generate_single_turn(prompt_ids, None, {}, 1)

    width = max(map(len, prompt_ids))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompt_ids])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompt_ids]).unsqueeze(1)).long()
    torch.manual_seed(11)
    ref = speculative_generate(trainer.model, ids, mask, max_new_tokens=8, num_draft_tokens=2,
                               temperature=1.0, top_p=1.0, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id).sequences[:, width:]
    for row, completion in zip(ref.tolist(), completions):
        assert row[:len(completion)] == completion
    metrics = trainer._metrics["train"]
    assert metrics["rollout/draft_tokens"] == [2.0]
    assert metrics["rollout/spec_accept_length"][0] >= 1.0
    assert set(metrics) >= {"rollout/spec_accept_rate", "rollout/spec_accept_rate/1", "rollout/spec_accept_rate/2",
                            "rollout/tokens_per_s"}


def test_training_with_drafting_logs_rollout_metrics(tmp_path):
    trainer = _mtp_trainer(tmp_path, mtp_draft_tokens=1, mtp_regime="detach", max_steps=2,
                           steps_per_generation=1)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    drafted = [r for r in rows if "rollout/spec_accept_length" in r]
    assert len(drafted) == 2 and all(r["rollout/draft_tokens"] == 1.0 for r in drafted)
    assert all(0.0 <= r["rollout/spec_accept_rate/1"] <= 1.0 for r in drafted)


@pytest.mark.parametrize("overrides,message", [
    (dict(mtp_draft_tokens=3), "mtp_draft_tokens must be an integer in 0..2"),
    (dict(mtp_draft_tokens=1, mtp_draft_policy="greedy"), "mtp_draft_policy must be one of fixed, adaptive"),
    (dict(mtp_draft_tokens=1, mtp_regime="none"), "mtp_regime=none does not attach"),
    (dict(mtp_draft_tokens=1, use_vllm=True, mtp_draft_policy="adaptive"), "vLLM drafts a fixed number of tokens"),
    (dict(mtp_draft_tokens=1, use_vllm=True, vllm_mode="server"), "vllm_mode='server' with mtp_regime"),
])
def test_config_refuses_bad_draft_options(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        MTPGRPOConfig(**dict(COMMON, output_dir=str(tmp_path), mtp_num_heads=2, **overrides))


def test_repetition_penalty_is_a_clear_error_in_rollouts(tmp_path):
    trainer = _mtp_trainer(tmp_path, mtp_draft_tokens=1, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="repetition_penalty=1.3"):
        trainer._generate_single_turn([[5, 6, 7]], None, {}, 1)


def _fake_output(drafts, seconds, tokens, accepted, reached):
    return SpeculativeOutput(sequences=torch.zeros(1, 1), num_draft_tokens=drafts, committed_tokens=tokens,
                             loop_seconds=seconds, drafted=list(reached), reached=list(reached),
                             accepted=list(accepted))


def test_adaptive_policy_explores_then_maximises_tokens_per_second():
    policy = AdaptiveDraft(2, recheck_every=1000)
    # latency-bound: tokens/s grow with the drafts (100, 160, 200 tokens in 1 s)
    speed = {0: 100, 1: 160, 2: 200}
    for expected in (0, 0, 1, 1, 2, 2):
        assert policy.choose(8) == expected  # each option is measured twice at this batch size
        policy.observe(_fake_output(expected, 1.0, speed[expected], [8, 6][:expected], [10, 8][:expected]), 8)
    assert policy.expected_tokens(2) == pytest.approx(1 + 0.8 + 0.8 * 0.75)
    assert policy.choose(8) == 2
    # compute-bound at batch 32: drafting measured slower; the first (warm-up) measurement of D=0 was unlucky
    for d, tokens in ((0, 10), (0, 100), (1, 80), (1, 80), (2, 60), (2, 60)):
        assert policy.choose(32) == d
        policy.observe(_fake_output(d, 1.0, tokens, [8, 6][:d], [10, 8][:d]), 32)
    assert policy.choose(32) == 0  # the warm-up measurement is dropped
    # live acceptance from training moves the choice at batch 8: heads that stop agreeing stop drafting
    for _ in range(10):
        policy.observe_acceptance([0.05, 0.05])
    # predicted tokens/s = measured / E_then * E_now: 200 / 2.4 * 1.0525 = 88 < 100
    assert policy.predicted_tokens_per_s(2, 8) == pytest.approx(200 / 2.4 * policy.expected_tokens(2), rel=0.05)
    assert policy.choose(8) == 0
    # every `recheck_every` rollouts the least recently measured option is measured again
    recheck = AdaptiveDraft(1, recheck_every=4)
    for d in (0, 0, 1, 1):
        assert recheck.choose(1) == d
        recheck.observe(_fake_output(d, 1.0, 100 if d == 0 else 50, [1][:d], [10][:d]), 1)
    picks = []
    for _ in range(8):
        picks.append(recheck.choose(1))
        recheck.observe(_fake_output(picks[-1], 1.0, 100 if picks[-1] == 0 else 50, [1][:picks[-1]],
                                     [10][:picks[-1]]), 1)
    assert picks == [0, 0, 0, 1, 0, 0, 0, 1]
    assert isinstance(make_draft_policy("fixed", 2), FixedDraft) and make_draft_policy("fixed", 2).choose(64) == 2


def test_evaluation_with_drafting_keeps_the_law_and_reports_rollout_metrics():
    """Same avg@k machinery, heads drafting: rollout metrics appear; greedy-equivalent inputs agree on shape."""
    model = trained_drafter(num_heads=2)

    class Tok:  # a minimal tokenizer over the drafter's 40 tokens: token i <-> chr(ord('A') + i)
        pad_token_id, eos_token_id, chat_template = 0, 1, None

        def __call__(self, texts, **kwargs):
            rows = [[ord(c) - 65 for c in t] for t in texts]
            width = max(map(len, rows))
            ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
            mask = (ids != 0).long()

            class Enc(dict):
                def to(self, device):
                    return self
            return Enc(input_ids=ids, attention_mask=mask)

        def batch_decode(self, rows, skip_special_tokens=True):
            return ["".join(chr(65 + t) for t in r if t > 1) for r in rows.tolist()]

    data = Dataset.from_list([{"prompt": "CDEFG", "answer": "HIJ"}, {"prompt": "KLMN", "answer": "OPQ"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(model, Tok(), data, k=4, max_new_tokens=12, draft=make_draft_policy("fixed", 2))
    assert result["rollout/draft_tokens"] == 2.0 and result["rollout/spec_accept_length"] > 1.5
    assert result["k"] == 4 and result["num_questions"] == 2
    # mtp/accept/1 is under the evaluation's own law (top-p 0.7), so it predicts the realised depth-1 rate
    assert result["accept_law"] == "temperature 1.0, top-p 0.7"
    assert abs(result["mtp/accept/1"] - result["rollout/spec_accept_rate/1"]) < 0.05
    # trimmed: one batch, so the draft vocabulary comes from the prompts' tokens; mtp/accept/k is under it too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trimmed = evaluate(model, Tok(), data, k=8, max_new_tokens=12,
                           draft=make_draft_policy("fixed", 2, vocab_size=12, model=model))
    assert trimmed["rollout/draft_vocab_size"] == 12.0
    a1, a2 = trimmed["mtp/accept/1"], trimmed["mtp/accept/2"]
    assert a1 < result["mtp/accept/1"] - 0.1  # drafting from 12 of 40 tokens costs acceptance, and it shows
    predicted = 1 + a1 + a1 * a2
    assert abs(trimmed["rollout/spec_accept_length"] - predicted) / predicted < 0.15


def test_draft_vocabulary_is_the_most_frequent_recent_tokens_by_hand():
    from mtprl.generation.draft_vocab import DraftVocabulary, generated_mask

    vocab = DraftVocabulary(2, 6, decay=0.5)
    assert vocab.ids() is None  # nothing observed: the full vocabulary
    seqs = torch.tensor([[9, 9, 3, 3, 4, 1, 5, 5], [9, 9, 2, 1, 0, 0, 0, 0]])  # prompt of 2, EOS = 1, pad 0 after
    mask = generated_mask(seqs, 2, 1)
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    vocab.observe(seqs[:, 2:], mask)  # counts: 3 -> 2, 4 -> 1, 1 -> 2, 2 -> 1 (the tail 5 5 and pads not counted)
    assert vocab.ids().tolist() == [1, 3]
    vocab.observe(torch.tensor([[2, 2, 2, 4]]))  # decayed: 1 -> 1, 3 -> 1, 2 -> 0.5 + 3, 4 -> 0.5 + 1
    assert vocab.ids().tolist() == [2, 4]
    assert vocab.coverage(torch.tensor([[2, 4, 3, 0]])) == 0.5
    vocab.seed(torch.tensor([[5, 5, 5, 5]]))  # seeding only counts before the first observation
    assert vocab.ids().tolist() == [2, 4]
    assert DraftVocabulary(0, 6).ids() is None and DraftVocabulary(6, 6).ids() is None  # 0 or all: no trimming
    with pytest.raises(ValueError, match="mtp_draft_vocab_size"):
        DraftVocabulary(-1, 6)


def test_trimmed_policy_drafts_from_the_last_rollouts_most_frequent_tokens():
    """sample_with_heads: the first rollout drafts from all tokens; the second from the N tokens the first one
    wrote most often (recounted here by hand from its sequences)."""
    from mtprl.generation.rollout import sample_with_heads

    model = trained_drafter(num_heads=2)
    policy = make_draft_policy("fixed", 2, vocab_size=12, model=model)
    ids = torch.randint(2, 40, (8, 5), generator=torch.Generator().manual_seed(0))
    first = sample_with_heads(model, ids, None, policy, max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    assert first.draft_vocab is None and "rollout/draft_vocab_size" not in first.metrics()
    counts = torch.bincount(first.sequences[:, 5:].reshape(-1), minlength=40)
    second = sample_with_heads(model, ids, None, policy, max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    assert second.draft_vocab.numel() == 12 and second.metrics()["rollout/draft_vocab_size"] == 12.0
    in_vocab = counts[second.draft_vocab]
    outside = counts[~torch.isin(torch.arange(40), second.draft_vocab)]
    assert in_vocab.min() >= outside.max()  # the 12 most frequent (ties either way)
    with pytest.raises(ValueError, match="mtp_draft_vocab_size must be an integer >= 0"):
        MTPGRPOConfig(**dict(COMMON, output_dir="unused", mtp_num_heads=2, mtp_draft_tokens=1,
                             mtp_draft_vocab_size=-4))


def test_training_with_a_trimmed_draft_vocabulary(tmp_path):
    """train with mtp_draft_vocab_size: rollouts after the first draft from the trimmed set (logged)."""
    trainer = _mtp_trainer(tmp_path, mtp_draft_tokens=1, mtp_regime="detach", max_steps=3, steps_per_generation=1,
                           mtp_draft_vocab_size=8)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    sizes = [r.get("rollout/draft_vocab_size") for r in rows if "rollout/spec_accept_length" in r]
    assert sizes[0] is None and sizes[1:] == [8.0, 8.0]
    vocab = trainer._draft_policy.vocabulary.ids()
    assert vocab.numel() == 8


def _simulated_rollout(drafts, speed, seconds, rng):
    """A rollout of 1000 tokens taking `seconds` at plain sampling's speed (scaled by speed[0] / speed[drafts]),
    with a CPU's timing noise: log-normal with mean 1, sigma 0.35 for a 20-ms rollout (measured anywhere between
    10 and 40 ms), shrinking as 1/sqrt(length) for longer ones."""
    sigma = max(0.35 * (0.02 / seconds) ** 0.5, 0.03)
    noise = float(torch.empty(1).log_normal_(-sigma ** 2 / 2, sigma, generator=rng))
    return _fake_output(drafts, seconds * speed[0] / speed[drafts] * noise, 1000, [5, 4][:drafts], [10, 10][:drafts])


@pytest.mark.parametrize("seconds", [0.02, 2.0])
def test_adaptive_policy_does_not_lose_to_plain_sampling_under_noisy_timings(seconds):
    """Short (20 ms, noisy) and long (2 s) rollouts. Where drafting does not pay (D=0 best by 8%), over 200 rollouts
    (exploration included) the policy keeps >= 97% of always-D=0's throughput on average over 30 seeded runs (each
    paired with always-D=0 on the same noise draws), and no run falls below 93% (short) / 97% (long); where it pays
    (D=2 1.4x), it finds it."""
    no_gain = {0: 100.0, 1: 92.0, 2: 85.0}
    gain = {0: 100.0, 1: 125.0, 2: 140.0}

    def throughput(policy, speed, seed):
        rng = torch.Generator().manual_seed(seed)
        tokens = elapsed = 0.0
        for _ in range(200):
            out = _simulated_rollout(policy.choose(8), speed, seconds, rng)
            policy.observe(out, 8)
            tokens, elapsed = tokens + out.committed_tokens, elapsed + out.seconds
        return tokens / elapsed

    def ratio(speed, seed):
        return throughput(AdaptiveDraft(2), speed, seed) / throughput(FixedDraft(0), speed, seed)

    kept = [ratio(no_gain, s) for s in range(30)]
    found = [ratio(gain, s) for s in range(30)]
    print(f"{seconds}s rollouts: no gain to find: mean {sum(kept) / 30:.3f} min {min(kept):.3f}; 1.4x to find: "
          f"mean {sum(found) / 30:.3f} min {min(found):.3f}")
    assert sum(kept) / 30 >= 0.97 and min(kept) >= (0.93 if seconds < 0.1 else 0.97)
    assert sum(found) / 30 >= 1.25 and min(found) >= (1.1 if seconds < 0.1 else 1.3)
