"""The gain estimator where the exact answer is known: a tiny transformers model over 4 tokens whose 3-token
completions can all be enumerated, so J(theta) = mean_p sum_y pi(y|p) r(p, y) is a finite sum and dJ is exact.

`importance_gain` is unbiased there and its 95% interval covers the exact dJ at about the nominal rate; two broken
variants (the sample's own reward inside its baseline; the log-ratio in place of the importance weight) fail the
same test. The probe's sequence log-probs sum to one over the enumeration."""

import itertools

import numpy as np
import pytest
import torch
from conftest import tiny_causal_lm

from mtprl import importance_gain
from mtprl.core.gain import fit_gain_curve, gain_curve_with_interval, per_prompt_gains
from mtprl.model.mtp import attach_mtp_heads
from mtprl.analysis.probe import HeldOut, sequence_logps

V, PROMPT_LEN, COMP_LEN, PROMPTS = 4, 3, 3, 20


def _enumeration():
    """Every (prompt, completion) pair: sequences [P * V^L, PROMPT_LEN + COMP_LEN], prompt index, rewards."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (PROMPTS, PROMPT_LEN), generator=g)
    completions = torch.tensor(list(itertools.product(range(V), repeat=COMP_LEN)))
    seqs = torch.cat([prompts.repeat_interleave(len(completions), 0), completions.repeat(PROMPTS, 1)], dim=1)
    prompt_of = np.repeat(np.arange(PROMPTS), len(completions))
    target = prompts[:, 0].repeat_interleave(len(completions))
    rewards = (completions.repeat(PROMPTS, 1) == target[:, None]).any(dim=1).double().numpy()  # 0/1 verifiable
    return seqs, prompt_of, rewards


def _held(seqs):
    return HeldOut(np.zeros(len(seqs)), [seqs], [torch.ones_like(seqs)], [PROMPT_LEN], np.zeros(len(seqs)))


@pytest.fixture(scope="module")
def exact_problem():
    """pi_theta and pi_theta' over every completion (theta' = one gradient-ascent step on the exact J), and the
    exact dJ."""
    model = tiny_causal_lm(vocab_size=V, seed=3)
    attach_mtp_heads(model, 1)
    seqs, prompt_of, rewards = _enumeration()
    old = sequence_logps(model, _held(seqs), 1.0)
    probs = old.exp().view(PROMPTS, -1)
    torch.testing.assert_close(probs.sum(1), torch.ones(PROMPTS, dtype=probs.dtype), atol=1e-6, rtol=0)
    r = torch.from_numpy(rewards).view(PROMPTS, -1)
    with torch.enable_grad():
        model.zero_grad()
        logp = torch.nn.functional.log_softmax(model(seqs).logits[:, PROMPT_LEN - 1:-1].float(), -1)
        seq_logp = logp.gather(-1, seqs[:, PROMPT_LEN:, None]).squeeze(-1).sum(1).view(PROMPTS, -1)
        (seq_logp.exp() * r).sum(1).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(0.3 * p.grad)
    new = sequence_logps(model, _held(seqs), 1.0)
    exact = float(((new.exp().view(PROMPTS, -1) - probs) * r).sum(1).mean())
    return old.view(PROMPTS, -1), new.view(PROMPTS, -1), r, exact


def _draw(problem, generator, samples=4):
    """M samples per prompt from pi_theta (exactly, from the enumerated distribution)."""
    old, new, r, _ = problem
    idx = torch.multinomial(old.exp(), samples, replacement=True, generator=generator)  # [P, M]
    rows = torch.arange(PROMPTS)[:, None].expand_as(idx)
    return (new[rows, idx].flatten(), old[rows, idx].flatten(), r[rows, idx].flatten(),
            rows.flatten())


def _self_baseline(new, old, r, pid):
    """Broken: the baseline is the prompt's mean reward *including* the sample itself."""
    r, pid = r.numpy(), pid.numpy()
    means = np.bincount(pid, r) / np.bincount(pid)
    terms = np.expm1((new - old).numpy()) * (r - means[pid])
    return float((np.bincount(pid, terms) / np.bincount(pid)).mean())


def _log_ratio(new, old, r, pid):
    """Broken: log(w) in place of the importance weight w - 1 (the first-order score-function estimate)."""
    r, pid = r.numpy(), pid.numpy()
    count = np.bincount(pid).astype(float)
    loo = (np.bincount(pid, r)[pid] - r) / (count[pid] - 1)
    terms = (new - old).numpy() * (r - loo)
    return float((np.bincount(pid, terms) / count).mean())


def test_importance_gain_is_unbiased_and_covers_the_exact_gain_and_broken_variants_fail(exact_problem):
    exact = exact_problem[3]
    g = torch.Generator().manual_seed(1)
    estimates, covered, broken_self, broken_log = [], 0, [], []
    draws = 400
    for _ in range(draws):
        new, old, r, pid = _draw(exact_problem, g)
        est, low, high = importance_gain(new, old, r, pid, resamples=1000)
        estimates.append(est)
        covered += low <= exact <= high
        broken_self.append(_self_baseline(new, old, r, pid))
        broken_log.append(_log_ratio(new, old, r, pid))
    mean, se = np.mean(estimates), np.std(estimates) / np.sqrt(draws)
    print(f"exact dJ {exact:.4f}; importance_gain {mean:.4f} (se {se:.4f}), coverage {covered / draws:.3f}; "
          f"self baseline {np.mean(broken_self):.4f}; log ratio {np.mean(broken_log):.4f}")
    assert exact > 0.02  # a step that matters
    assert abs(mean - exact) < 3 * se
    assert 0.88 <= covered / draws <= 0.99
    for broken in (broken_self, broken_log):
        assert abs(np.mean(broken) - exact) > 4 * np.std(broken) / np.sqrt(draws)


def test_per_prompt_gains_against_a_hand_computation():
    new = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.05])
    old = torch.tensor([0.0, 0.0, 0.1, 0.1, 0.0])
    r = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0])
    pid = [7, 7, 3, 3, 3]  # prompt 7 first
    w = np.exp((new.double() - old.double()).numpy()) - 1
    g7 = (w[0] * (1 - 0) + w[1] * (0 - 1)) / 2
    g3 = (w[2] * (1 - 0.25) + w[3] * (0.5 - 0.5) + w[4] * (0 - 0.75)) / 3
    np.testing.assert_allclose(per_prompt_gains(new, old, r, pid), [g7, g3], rtol=1e-12)
    est, low, high = importance_gain(new, old, r, pid)
    assert est == pytest.approx((g7 + g3) / 2) and low <= est <= high
    with pytest.raises(ValueError, match="1-D of one length"):
        per_prompt_gains(new[:3], old, r, pid)


def test_parabola_fit_recovers_a_known_curve_and_its_peak():
    lambdas = [-1.0, 0.0, 0.5, 1.0, 2.0, 4.0]
    a, b = 0.02, -0.01  # peak at -a / 2b = 1.0
    rng = np.random.default_rng(0)
    per_prompt = np.array([[0.3 + a * lam + b * lam * lam] for lam in lambdas]) + rng.normal(0, 0.02, (6, 200))
    curve, low, high = gain_curve_with_interval(lambdas, per_prompt, resamples=400)
    assert curve.best_lambda == pytest.approx(1.0, abs=0.2) and low <= 1.0 <= high
    assert curve.linear == pytest.approx(a, abs=0.005) and curve.quadratic == pytest.approx(b, abs=0.002)
    upward = fit_gain_curve(lambdas, [0.0 + 0.01 * lam * lam for lam in lambdas])
    assert upward.best_lambda == 4.0  # no interior peak: the grid's best end
    with pytest.raises(ValueError, match="must contain 0"):
        fit_gain_curve([1.0, 2.0], [0.1, 0.2])


def _consistently_better(prompts=40, seed=0):
    """per-prompt gains of a 3-point grid (0, a, b) whose b beats a by 0.01 on *every* prompt while the prompts
    themselves differ by ~1: on shared samples b is the best point in every resample."""
    rng = np.random.default_rng(seed)
    base = rng.normal(1.0, 1.0, prompts)  # a mean gain of ~1 +- 0.16 over lambda = 0: 0 is never the best point
    return np.stack([np.zeros(prompts), base, base + 0.01])


def test_best_point_probability_is_exact_where_the_order_holds_on_every_prompt_and_independent_resampling_fails():
    from mtprl.core.gain import best_point_probability

    per_prompt = _consistently_better()
    assert best_point_probability(per_prompt) == [0.0, 0.0, 1.0]

    def broken(x, resamples=2000, seed=0):  # each lambda resampled on its own: the shared samples' pairing lost
        rng = np.random.default_rng(seed)
        counts = np.zeros(len(x))
        for _ in range(resamples):
            means = [row[rng.integers(0, len(row), len(row))].mean() for row in x]
            counts[int(np.argmax(means))] += 1
        return counts / resamples

    assert broken(per_prompt)[2] < 0.7  # the same exact answer (1 on b among a and b) missed by far
    tie = np.stack([np.zeros(40), np.ones(40), np.ones(40)])
    assert best_point_probability(tie) == pytest.approx([0.0, 0.5, 0.5])


def test_share_of_best_is_exact_on_a_known_curve_and_the_unrelative_variant_is_not():
    from mtprl.core.gain import share_of_best

    rng = np.random.default_rng(1)
    zero = rng.normal(0.3, 1.0, 50)  # the lambda = 0 update's own gain, noisy per prompt
    best = zero + rng.uniform(0.5, 1.5, 50)  # every prompt gains over lambda = 0
    half = zero + 0.5 * (best - zero)  # exactly half the best point's gain on every prompt
    per_prompt = np.stack([zero, half, best])
    share, low, high = share_of_best(per_prompt, [0.0, 0.5, 1.0], 0.5)
    assert share == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    unrelative = per_prompt[1].mean() / per_prompt[2].mean()  # dJ, not dJ - dJ(0): the broken reading
    assert abs(unrelative - 0.5) > 0.05
    assert share_of_best(np.stack([zero, zero - 1, zero - 2]), [0.0, 1.0, 2.0], 1.0) is None  # nothing gains


def test_importance_ess_against_the_hand_formula():
    from mtprl.core.gain import importance_ess

    old = torch.zeros(4, dtype=torch.float64)
    assert importance_ess(old, old) == (pytest.approx(4.0), pytest.approx(0.25))  # theta' = theta: all samples
    new = torch.log(torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    w = np.array([1.0, 1.0, 2.0, 4.0])
    assert importance_ess(new, old) == (pytest.approx(w.sum() ** 2 / (w ** 2).sum()), pytest.approx(4 / 8))
