"""Speculative sampling with the MTP heads: greedy equals model.generate, sampled tokens follow the exact processed
distribution (and a biased sampler is caught by the same test), tokens per verify match the heads' acceptance."""

import copy
import itertools

import pytest
import torch
from conftest import noisy_cycle_batch, tiny_causal_lm, trained_drafter
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import mtprl
from mtprl.generation import speculative
from mtprl.generation.speculative import speculative_generate


@pytest.fixture(scope="module")
def drafter2():
    return trained_drafter(num_heads=2)


@pytest.fixture(scope="module")
def drafter1():
    return trained_drafter(num_heads=1, seed=1)


def _imperfect(model, sigma=0.1, seed=0):
    """A copy whose heads' projections carry noise: greedy drafts are then sometimes wrong (ragged acceptance)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.mtp_heads.layers:
            layer.eh_proj.weight.add_(sigma * torch.randn(layer.eh_proj.weight.shape, generator=g))
    return model


def _prompts(seed=1, batch=6, length=7, pads=(4, 2, 0, 1, 0, 3)):
    """Noisy prompts of different lengths, left-padded with token 0."""
    g = torch.Generator().manual_seed(seed)
    ids = noisy_cycle_batch(batch, length, 40, 0.3, g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads[:batch]):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


@pytest.mark.parametrize("heads,eos", [(1, None), (2, None), (1, 12), (2, [12, 30])])
def test_greedy_equals_generate(drafter1, drafter2, heads, eos):
    model = _imperfect(drafter1 if heads == 1 else drafter2)
    ids, mask = _prompts()
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0,
                         eos_token_id=eos)
    for drafts in range(heads + 1):
        out = speculative_generate(model, ids, mask, max_new_tokens=24, num_draft_tokens=drafts, do_sample=False,
                                   eos_token_id=eos, pad_token_id=0)
        assert out.sequences.shape == ref.shape
        assert torch.equal(out.sequences, ref), (heads, drafts, eos)
        if drafts:
            # drafting really happened, raggedly: some drafts accepted, some rejected
            assert 0 < sum(out.accepted) < sum(out.drafted)
    if eos is not None:
        # rows ended at different lengths, and an EOS was committed inside an accepted run of drafts
        ends = [(row == 0).nonzero().min().item() if (row[ids.shape[1]:] == 0).any() else None for row in ref]
        assert len(set(ends)) > 1


def test_eos_inside_accepted_drafts_ends_row(drafter2):
    """The cycle walks 2, 3, 4, ...: from a clean prompt every draft is accepted, so EOS arrives as a draft."""
    g = torch.Generator().manual_seed(3)
    ids = noisy_cycle_batch(1, 6, 40, 0.0, g)
    eos = 2 + (int(ids[0, -1]) - 2 + 5) % 38  # five tokens into row 0's completion
    ref = drafter2.generate(input_ids=ids, do_sample=False, max_new_tokens=16, pad_token_id=0, eos_token_id=eos)
    out = speculative_generate(drafter2, ids, None, max_new_tokens=16, num_draft_tokens=2, do_sample=False,
                               eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    row0 = out.sequences[0, ids.shape[1]:].tolist()
    assert row0[4] == eos and all(t == 0 for t in row0[5:])
    # prefill commits token 0, cycle 1 tokens 1-3 (two drafts + the trunk's), cycle 2 token 4 = EOS as draft 1
    assert out.verify_forwards == 3 and out.accepted == [2, 2]


def _exact_joint(model, prompt, steps, warpers):
    """P(x_1..x_steps | prompt) of the processed distribution, by full forwards over every prefix (no cache)."""
    vocab = model.config.vocab_size
    joint = torch.zeros((vocab,) * steps, dtype=torch.float64)
    for prefix in itertools.product(range(vocab), repeat=steps - 1):
        seq = torch.tensor([list(prompt) + list(prefix)])
        logits = model(input_ids=seq).logits[0, len(prompt) - 1:].float()
        probs = torch.softmax(warpers(None, logits), -1).double()  # [steps, V]
        prob = 1.0
        for j, tok in enumerate(prefix):
            prob = prob * probs[j, tok]
        joint[prefix] = prob * probs[steps - 1]
    return joint


def _chi_square_pvalue(counts, expected, min_expected=5.0):
    """Pearson chi-square p-value, cells with expected count < min_expected pooled into one."""
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return 1.0 - torch.distributions.Chi2(torch.tensor(float(dof))).cdf(stat.float()).item()


@pytest.fixture(scope="module")
def law_setup():
    """A random 8-token model with peaked distributions and 2 heads that disagree with it often."""
    torch.manual_seed(0)
    model = tiny_causal_lm("qwen2", seed=4, vocab_size=8, initializer_range=0.35)
    mtprl.attach_mtp_heads(model, num_heads=2)
    prompt = [3, 1, 4]
    temperature, top_k, top_p = 0.9, 6, 0.9
    warpers = speculative.logits_warpers(temperature, top_k, top_p)
    assert any(isinstance(w, TopKLogitsWarper) for w in warpers)
    assert any(isinstance(w, TopPLogitsWarper) for w in warpers)
    with torch.no_grad():
        joint = _exact_joint(model, prompt, 3, warpers)
    return model, prompt, dict(temperature=temperature, top_k=top_k, top_p=top_p), joint


def _sample_joint(model, prompt, options, n=6000, seed=0):
    ids = torch.tensor([prompt] * n)
    out = speculative_generate(model, ids, None, max_new_tokens=3, num_draft_tokens=2, do_sample=True,
                               pad_token_id=0, generator=torch.Generator().manual_seed(seed), **options)
    gen = out.sequences[:, len(prompt):]
    vocab = model.config.vocab_size
    flat = gen[:, 0] * vocab * vocab + gen[:, 1] * vocab + gen[:, 2]
    return torch.bincount(flat, minlength=vocab ** 3).double(), out


def test_sampled_law_matches_processed_distribution(law_setup):
    model, prompt, options, joint = law_setup
    counts, out = _sample_joint(model, prompt, options)
    # the heads drafted and were rejected often: the residual path is exercised
    assert 0.1 < out.accept_rate < 0.9, out.accept_rate
    p = _chi_square_pvalue(counts, joint.flatten() * counts.sum())
    assert p > 1e-3, p


def test_biased_sampler_fails_the_same_test(law_setup, monkeypatch):
    """Accepting every draft commits the heads' distribution: the same chi-square test must reject it."""
    model, prompt, options, joint = law_setup
    honest = speculative.accept_drafts

    def accept_all(p, q, drafts, *, greedy, generator=None):
        n, nxt, acc = honest(p, q, drafts, greedy=greedy, generator=generator)
        full = torch.full_like(n, drafts.shape[1])
        bonus = torch.multinomial(p[:, -1], 1, generator=generator).squeeze(-1)
        return full, bonus, torch.ones_like(acc)

    monkeypatch.setattr(speculative, "accept_drafts", accept_all)
    counts, _ = _sample_joint(model, prompt, options)
    assert _chi_square_pvalue(counts, joint.flatten() * counts.sum()) < 1e-6


def test_tokens_per_verify_match_expected_acceptance(drafter2):
    """1 + a1 + a1*a2 from the heads' expected acceptance (mtp/accept/k) on the same samples, within 15%."""
    ids, mask = _prompts(seed=5, batch=16, pads=(0,) * 16)
    for drafts in (1, 2):
        out = speculative_generate(drafter2, ids, mask, max_new_tokens=96, num_draft_tokens=drafts,
                                   pad_token_id=0, generator=torch.Generator().manual_seed(drafts))
        seqs = out.sequences
        accept = mtprl.forward_logprobs(drafter2, seqs, torch.ones_like(seqs), 96, compute_accept=True).accept
        a = accept.mean(dim=(0, 2)).tolist()
        predicted = 1 + a[0] + (a[0] * a[1] if drafts == 2 else 0.0)
        print(f"drafts={drafts}: {out.accept_length:.3f} tokens per verify, predicted {predicted:.3f} from "
              f"expected acceptance {[round(x, 3) for x in a]}")
        assert abs(out.accept_length - predicted) / predicted < 0.15, (drafts, out.accept_length, predicted)
        assert out.accept_length > 1.3
        for k in range(1, drafts + 1):
            assert abs(out.conditional_accept_rate_at(k) - a[k - 1]) < 0.1


def test_realised_acceptance_at_top_p_matches_the_expected_acceptance_under_the_same_truncation(drafter2):
    """At top-p 0.5 the sampler's depth-1 acceptance is sum_v min(p, q) of the *truncated* distributions (what
    `mtp/accept/1` reports with the sampler's truncation); the untruncated number, which eval.json used to
    report, is off by more than the sampling noise."""
    from mtprl.generation.speculative import logits_warpers

    model = _imperfect(drafter2, sigma=0.3)
    ids, mask = _prompts(seed=5, batch=16, pads=(0,) * 16)
    out = speculative_generate(model, ids, mask, max_new_tokens=96, num_draft_tokens=1, pad_token_id=0,
                               top_p=0.5, generator=torch.Generator().manual_seed(3))
    seqs = out.sequences
    truncated = mtprl.forward_logprobs(model, seqs, torch.ones_like(seqs), 96, compute_accept=True,
                                       accept_truncation=logits_warpers(1.0, 0, 0.5)).accept[:, 0].mean().item()
    untruncated = mtprl.forward_logprobs(model, seqs, torch.ones_like(seqs), 96,
                                         compute_accept=True).accept[:, 0].mean().item()
    realised, n = out.accept_rate_at(1), out.drafted[0]
    se = (realised * (1 - realised) / n) ** 0.5
    print(f"realised {realised:.3f} (se {se:.3f}, {n} drafts), expected truncated {truncated:.3f}, "
          f"untruncated {untruncated:.3f}")
    assert abs(realised - truncated) < 4 * se + 0.02
    assert abs(realised - untruncated) > 4 * se + 0.02


def test_zero_drafts_is_plain_sampling_and_bad_options_are_refused(drafter2):
    ids, mask = _prompts()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = speculative_generate(drafter2, ids, mask, max_new_tokens=10, num_draft_tokens=0, pad_token_id=0, generator=g1)
    b = speculative_generate(drafter2, ids, mask, max_new_tokens=10, num_draft_tokens=0, pad_token_id=0, generator=g2)
    assert torch.equal(a.sequences, b.sequences) and a.sequences.shape == (6, 17)
    assert a.verify_forwards == 10 and a.accept_length == 1.0
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer in 0..2"):
        speculative_generate(drafter2, ids, mask, max_new_tokens=4, num_draft_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="repetition_penalty=1.2"):
        speculative.check_generation_options({"repetition_penalty": 1.2, "top_p": 0.9})
    with pytest.raises(ValueError, match="min_p=0.05"):
        speculative.check_generation_options({"min_p": 0.05})
    speculative.check_generation_options({"repetition_penalty": 1.0, "min_p": None, "top_k": 5})
    right_padded = mask.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        speculative_generate(drafter2, ids, right_padded, max_new_tokens=4, num_draft_tokens=1, pad_token_id=0)


# ---- trimmed drafting (draft_vocab): lossless whatever subset the heads draft from

def _draft_vocab_law(model, prompt, options, draft_vocab, n=6000, seed=0):
    ids = torch.tensor([prompt] * n)
    out = speculative_generate(model, ids, None, max_new_tokens=3, num_draft_tokens=2, do_sample=True,
                               pad_token_id=0, generator=torch.Generator().manual_seed(seed),
                               draft_vocab=draft_vocab, **options)
    gen = out.sequences[:, len(prompt):]
    vocab = model.config.vocab_size
    return torch.bincount(gen[:, 0] * vocab * vocab + gen[:, 1] * vocab + gen[:, 2], minlength=vocab ** 3).double(), out


def test_trimmed_draft_vocabulary_keeps_the_law(law_setup):
    """Drafts from 4 of the 8 tokens only; the excluded ones carry real target mass, and they are still sampled at
    their exact rates (the verify and the residual use the full target)."""
    model, prompt, options, joint = law_setup
    draft_vocab = torch.tensor([0, 2, 5, 7])
    excluded = torch.tensor([1, 3, 4, 6])
    first_token_mass = joint.sum(dim=(1, 2))
    assert first_token_mass[excluded].sum() > 0.2, first_token_mass  # the target really wants excluded tokens
    counts, out = _draft_vocab_law(model, prompt, options, draft_vocab)
    assert 0.05 < out.accept_rate < 0.9, out.accept_rate
    drafted = out.sequences[:, len(prompt):]
    assert torch.isin(drafted, excluded).float().mean() > 0.2  # excluded tokens committed (from the residual)
    assert _chi_square_pvalue(counts, joint.flatten() * counts.sum()) > 1e-3


def test_trimmed_draft_with_target_cut_to_the_draft_vocabulary_fails_the_same_test(law_setup, monkeypatch):
    """A broken trimmed sampler that verifies against the target renormalised over the draft vocabulary (q's
    support) never commits the excluded tokens: the same chi-square test rejects it."""
    model, prompt, options, joint = law_setup
    honest = speculative.accept_drafts

    def cut_target(p, q, drafts, *, greedy, generator=None):
        support = (q > 0).any(dim=1, keepdim=True) if q is not None else torch.ones_like(p[:, :1], dtype=torch.bool)
        cut = torch.where(support, p, torch.zeros_like(p))
        mass = cut.sum(-1, keepdim=True)
        return honest(torch.where(mass > 0, cut / mass.clamp(min=1e-30), p), q, drafts, greedy=greedy,
                      generator=generator)

    monkeypatch.setattr(speculative, "accept_drafts", cut_target)
    counts, _ = _draft_vocab_law(model, prompt, options, torch.tensor([0, 2, 5, 7]))
    assert _chi_square_pvalue(counts, joint.flatten() * counts.sum()) < 1e-6


@pytest.mark.parametrize("heads", [1, 2])
def test_trimmed_greedy_equals_generate_where_the_argmax_is_outside_the_draft_vocabulary(drafter1, drafter2,
                                                                                           heads):
    model = _imperfect(drafter1 if heads == 1 else drafter2)
    ids, mask = _prompts()
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0)
    generated = ref[:, ids.shape[1]:]
    draft_vocab = torch.arange(0, model.config.vocab_size, 2)  # the even tokens: half the greedy path is odd
    outside = ~torch.isin(generated, draft_vocab)
    assert 0.2 < outside.float().mean() < 0.8
    out = speculative_generate(model, ids, mask, max_new_tokens=24, num_draft_tokens=heads, do_sample=False,
                               pad_token_id=0, draft_vocab=draft_vocab)
    assert torch.equal(out.sequences, ref)
    assert 0 < sum(out.accepted) < sum(out.drafted)


def test_tokens_per_verify_match_expected_acceptance_with_a_trimmed_vocabulary(drafter2):
    """With drafts from 22 of the 40 tokens, acceptance drops, and `forward_logprobs(accept_draft_vocab=...)`
    predicts the new tokens per verify within 15% (the full-vocabulary prediction does not)."""
    ids, mask = _prompts(seed=5, batch=16, pads=(0,) * 16)
    draft_vocab = torch.arange(18, 40)
    out = speculative_generate(drafter2, ids, mask, max_new_tokens=96, num_draft_tokens=2, pad_token_id=0,
                               generator=torch.Generator().manual_seed(2), draft_vocab=draft_vocab)
    seqs = out.sequences

    def predicted(vocab):
        accept = mtprl.forward_logprobs(drafter2, seqs, torch.ones_like(seqs), 96, compute_accept=True,
                                        accept_draft_vocab=vocab).accept
        a = accept.mean(dim=(0, 2)).tolist()
        return 1 + a[0] + a[0] * a[1], a, accept

    trimmed, a, accept = predicted(draft_vocab)
    full, _, _ = predicted(None)
    walk = speculative.expected_accept_length(accept, torch.full((seqs.shape[0],), 96), 2)
    print(f"walk prediction {walk:.3f}")
    assert abs(out.accept_length - walk) / walk < 0.05  # 1.567 predicted by the walk, 1.558 measured
    print(f"trimmed: {out.accept_length:.3f} tokens per verify, predicted {trimmed:.3f} (full vocabulary "
          f"{full:.3f}), acceptance {[round(x, 3) for x in a]}")
    assert abs(out.accept_length - trimmed) / trimmed < 0.15
    assert abs(out.accept_length - full) / full > 0.15  # trimming cost acceptance, which only the trimmed sees
    # (the per-draft rate is not compared: drafts are made more often where acceptance is low, at tokens outside
    # the draft vocabulary, so per draft it sits below the per-position mean; tokens per verify weighs that in)


def test_bad_draft_vocabulary_is_refused_naming_it(drafter2):
    ids, mask = _prompts(batch=2)
    for bad, words in [(torch.tensor([[1, 2]]), "1-D"), (torch.tensor([], dtype=torch.long), "non-empty"),
                       (torch.tensor([0, 40]), "outside 0..39"), (torch.tensor([0.5, 2.0]), "token ids")]:
        with pytest.raises(ValueError, match="draft_vocab") as err:
            speculative_generate(drafter2, ids, mask, max_new_tokens=4, num_draft_tokens=1, pad_token_id=0,
                                 draft_vocab=bad)
        assert words in str(err.value)


def test_expected_accept_length_walk_against_a_monte_carlo_of_the_sampler_walk():
    """The walk's E(j) recursion against a direct simulation of the cycle walk (accept draft m+1 at token j+m with
    probability accept[m, j+m] until the first rejection, commit n+1 tokens): clustered easy tokens make the mean
    formula 1 + a1 + a1 a2 overshoot, the walk does not; a walk that forgets the jump (advances one token per
    accepted run) is caught."""
    from mtprl.generation.speculative import expected_accept_length

    g = torch.Generator().manual_seed(0)
    n_tok, depth = 60, 2
    easy = (torch.arange(n_tok) // 6) % 2 == 0  # runs of 6 easy tokens, then 6 hard ones
    accept = torch.where(easy, 0.95, 0.05).expand(2, depth, n_tok).clone()
    lengths = torch.tensor([n_tok, 45])
    walk = expected_accept_length(accept, lengths, depth)
    tokens = cycles = 0
    for b, n in enumerate(lengths.tolist()):
        for _ in range(2000):
            j, c = 1, 1  # the prefill commits token 0
            while j < n:
                run = 0
                while run < depth and j + run < n and torch.rand(1, generator=g).item() < accept[b, run, j + run]:
                    run += 1
                j, c = j + run + 1, c + 1
            tokens, cycles = tokens + n, cycles + c
    simulated = tokens / cycles
    a1, a2 = accept[:, 0].mean().item(), accept[:, 1].mean().item()
    print(f"walk {walk:.4f}, simulated {simulated:.4f}, mean formula {1 + a1 + a1 * a2:.4f}")
    assert abs(walk - simulated) < 0.01
    assert (1 + a1 + a1 * a2) - simulated > 0.1  # the mean formula is off here
    # a broken walk that drops the last accepted token's jump is off by more than the noise
    broken = expected_accept_length(accept, lengths, depth - 1)
    assert abs(broken - simulated) > 0.1
