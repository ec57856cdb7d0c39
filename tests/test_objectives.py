"""policy_loss and mtp_ce_loss against hand-written per-token loops."""

import math

import pytest
import torch

from mtprl import mtp_ce_loss, policy_loss

EPS_LOW, EPS_HIGH = 0.2, 0.28


def _inputs(seed=0, batch=4, length=6):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(batch, length, generator=g) * 3
    old = logps + 0.4 * torch.randn(batch, length, generator=g)  # ratios well outside the clip range too
    adv = torch.randn(batch, generator=g)
    mask = (torch.rand(batch, length, generator=g) > 0.3).float()
    mask[:, 0] = 1
    mask[-1] = 0  # one fully masked sequence
    return logps, old, adv, mask


def _clipped_term(ratio, a):
    clipped = min(max(ratio, 1 - EPS_LOW), 1 + EPS_HIGH)
    return -min(ratio * a, clipped * a)


def _hand_loss(logps, old, adv, mask, loss_type, level, normalizer=None, max_len=None):
    batch, length = logps.shape
    per_token = [[0.0] * length for _ in range(batch)]
    for i in range(batch):
        a = float(adv[i])
        if level == "sequence":
            n = sum(float(mask[i, t]) for t in range(length))
            s = sum(float(logps[i, t] - old[i, t]) * float(mask[i, t]) for t in range(length))
            seq_ratio = math.exp(s / max(n, 1.0))
        for t in range(length):
            ratio = seq_ratio if level == "sequence" else math.exp(float(logps[i, t] - old[i, t]))
            per_token[i][t] = _clipped_term(ratio, a) * float(mask[i, t])
    count = float(mask.sum())
    total = sum(sum(r) for r in per_token)
    if loss_type == "grpo":
        return sum(sum(per_token[i]) / max(float(mask[i].sum()), 1.0) for i in range(batch)) / batch
    if loss_type == "bnpo":
        return total / max(count, 1.0)
    if loss_type == "dr_grpo":
        return total / (batch * (max_len or length))
    return total / (normalizer if normalizer is not None else max(count, 1.0))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_policy_loss_matches_hand_formula(loss_type, level):
    logps, old, adv, mask = _inputs()
    got = policy_loss(logps, old, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                      epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    assert got.dim() == 0
    assert got.item() == pytest.approx(_hand_loss(logps, old, adv, mask, loss_type, level), rel=1e-5, abs=1e-6)


def test_dapo_normalizer_and_dr_grpo_length():
    logps, old, adv, mask = _inputs(seed=1)
    got = policy_loss(logps, old, adv, mask, loss_type="dapo", normalizer=torch.tensor(37.0),
                      epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    assert got.item() == pytest.approx(_hand_loss(logps, old, adv, mask, "dapo", "token", normalizer=37.0), rel=1e-5)
    got = policy_loss(logps, old, adv, mask, loss_type="dr_grpo", max_completion_length=64,
                      epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH)
    assert got.item() == pytest.approx(_hand_loss(logps, old, adv, mask, "dr_grpo", "token", max_len=64), rel=1e-5)


def test_gradient_is_advantage_weighted_score_inside_the_trust_region():
    # With logps == old_logps (ratio 1, nothing clipped), d loss / d logp_t = -A_i * m_t / count for dapo.
    logps, _, adv, mask = _inputs(seed=2)
    logps.requires_grad_(True)
    policy_loss(logps, logps.detach(), adv, mask, loss_type="dapo").backward()
    expected = -adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(logps.grad, expected)


def test_token_level_advantages_and_clip_higher():
    logps, old, adv, mask = _inputs(seed=3)
    adv_tok = adv[:, None].expand_as(logps).clone()
    a = policy_loss(logps, old, adv, mask, loss_type="bnpo")
    b = policy_loss(logps, old, adv_tok, mask, loss_type="bnpo")
    torch.testing.assert_close(a, b)
    # A ratio of 1.25 with positive advantage is inside [0.8, 1.28] (clip-higher) but clipped by a symmetric 0.2.
    lp, old1 = torch.log(torch.tensor([[1.25]])), torch.zeros(1, 1)
    one, m = torch.ones(1), torch.ones(1, 1)
    assert policy_loss(lp, old1, one, m).item() == pytest.approx(-1.25)
    assert policy_loss(lp, old1, one, m, epsilon_high=0.2).item() == pytest.approx(-1.2)


def test_unknown_loss_type_and_level_raise_with_supported_values():
    logps, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match=r"grpo.*bnpo.*dr_grpo.*dapo"):
        policy_loss(logps, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"token.*sequence"):
        policy_loss(logps, old, adv, mask, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(logps, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logps, old, adv[:-1], mask)


def test_mtp_ce_loss_is_masked_mean_nll():
    logps, _, _, mask = _inputs()
    logps[mask == 0] = float("nan")  # padding values must not leak
    hand = sum(-float(logps[i, t]) for i in range(4) for t in range(6) if mask[i, t]) / float(mask.sum())
    assert mtp_ce_loss(logps, mask).item() == pytest.approx(hand, rel=1e-6)
    stacked = torch.stack([logps, 2 * logps], dim=1)  # [B, K=2, L]
    per_head = mtp_ce_loss(stacked, mask)
    assert per_head.shape == (2,)
    assert per_head.tolist() == pytest.approx([hand, 2 * hand], rel=1e-6)
