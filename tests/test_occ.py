"""OCC: estimators against hand formulas, exact coefficient against flattened autograd, and the theory."""

import pytest
import torch
from conftest import tiny_causal_lm

import mtprl
from mtprl import exact_occ_coefficient, occ_coefficient


def _deltas(seed=0, batch=4, length=7):
    g = torch.Generator().manual_seed(seed)
    d_rl = 0.1 * torch.randn(batch, length, generator=g)
    d_mtp = 0.5 * d_rl + 0.1 * torch.randn(batch, length, generator=g)
    mask = (torch.rand(batch, length, generator=g) > 0.25).float()
    return d_rl, d_mtp, mask


def _hand_batch(d_rl, d_mtp, mask, lambda_plus=1.0, eps=1e-8, clip=False):
    c = sum(float(d_rl[i, t] * d_mtp[i, t]) for i in range(d_rl.shape[0]) for t in range(d_rl.shape[1]) if mask[i, t])
    v2 = sum(float(d_mtp[i, t]) ** 2 for i in range(d_rl.shape[0]) for t in range(d_rl.shape[1]) if mask[i, t])
    return lambda_plus * (max(c, 0.0) if clip else c) / (v2 + eps)


def _hand_token(d_rl, d_mtp, mask, lambda_plus=1.0, eps=1e-8, clip=False):
    ratios = [float(d_rl[i, t] * d_mtp[i, t]) / (float(d_mtp[i, t]) ** 2 + eps)
              for i in range(d_rl.shape[0]) for t in range(d_rl.shape[1]) if mask[i, t]]
    if clip:
        ratios = [max(r, 0.0) for r in ratios]
    return lambda_plus * sum(ratios) / max(len(ratios), 1)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("lambda_plus", [1.0, 0.3])
def test_estimators_match_hand_formulas(clip, lambda_plus):
    for seed in range(3):
        d_rl, d_mtp, mask = _deltas(seed)
        if seed == 2:
            d_mtp = -d_mtp  # negative alignment: clip matters
        got = occ_coefficient(d_rl, d_mtp, mask, estimator="batch", lambda_plus=lambda_plus, clip=clip)
        assert got.dim() == 0
        assert got.item() == pytest.approx(_hand_batch(d_rl, d_mtp, mask, lambda_plus, clip=clip), rel=1e-5)
        got = occ_coefficient(d_rl, d_mtp, mask, estimator="token", lambda_plus=lambda_plus, clip=clip)
        assert got.item() == pytest.approx(_hand_token(d_rl, d_mtp, mask, lambda_plus, clip=clip), rel=1e-5)


def test_negative_alignment_gives_negative_lambda_unless_clipped():
    d_rl, d_mtp, mask = _deltas()
    assert occ_coefficient(d_rl, -d_mtp, mask).item() < 0  # OCC-NoClip keeps the sign (App. E)
    assert occ_coefficient(d_rl, -d_mtp, mask, clip=True).item() == 0.0


@pytest.mark.parametrize("estimator", ["batch", "token"])
def test_masked_positions_do_not_change_lambda(estimator):
    d_rl, d_mtp, mask = _deltas()
    base = occ_coefficient(d_rl, d_mtp, mask, estimator=estimator)
    junk_rl, junk_mtp = d_rl.clone(), d_mtp.clone()
    junk_rl[mask == 0] = float("nan")
    junk_mtp[mask == 0] = 1e6
    assert occ_coefficient(junk_rl, junk_mtp, mask, estimator=estimator).item() == base.item()


@pytest.mark.parametrize("estimator", ["batch", "token"])
def test_zero_deltas_and_empty_mask_give_zero_not_nan(estimator):
    z = torch.zeros(3, 5)
    assert occ_coefficient(z, z, torch.ones(3, 5), estimator=estimator).item() == 0.0
    d_rl, d_mtp, _ = _deltas(batch=3, length=5)
    assert occ_coefficient(d_rl, d_mtp, torch.zeros(3, 5), estimator=estimator).item() == 0.0


def test_bad_shapes_and_estimator_raise():
    d_rl, d_mtp, mask = _deltas()
    with pytest.raises(ValueError, match="delta_mtp"):
        occ_coefficient(d_rl, d_mtp[:, :-1], mask)
    with pytest.raises(ValueError, match="mask"):
        occ_coefficient(d_rl, d_mtp, mask[:-1])
    with pytest.raises(ValueError, match=r"batch.*token"):
        occ_coefficient(d_rl, d_mtp, mask, estimator="mean")


def test_exact_coefficient_matches_flattened_autograd():
    torch.manual_seed(0)
    model = tiny_causal_lm()
    mtprl.attach_mtp_heads(model, num_heads=2)
    ids = torch.randint(1, 40, (3, 12))
    mask = torch.ones_like(ids)
    out = mtprl.forward_logprobs(model, ids, mask, 5)
    adv = torch.tensor([1.0, -0.5, 0.3])
    old = out.main.detach() - 0.05
    rl_loss = mtprl.policy_loss(out.main, old, adv, mask[:, -5:])
    mtp_loss = mtprl.policy_loss(out.mtp[:, 0], out.mtp[:, 0].detach() - 0.05, adv, mask[:, -5:])
    main_params = [p for n, p in model.named_parameters() if not n.startswith("mtp_heads.")]
    lam, c, v2 = exact_occ_coefficient(rl_loss, mtp_loss, main_params, lambda_plus=0.5)

    def flat_grad(loss):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in main_params])

    g_rl, g_mtp = flat_grad(rl_loss), flat_grad(mtp_loss)
    assert c.item() == pytest.approx(torch.dot(g_rl, g_mtp).item(), rel=1e-4)
    assert v2.item() == pytest.approx(torch.dot(g_mtp, g_mtp).item(), rel=1e-4)
    assert lam.item() == pytest.approx(0.5 * c.item() / (v2.item() + 1e-8), rel=1e-6)
    assert v2.item() > 0


def test_exact_coefficient_ignores_parameters_outside_the_list():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    head_only = torch.nn.Parameter(torch.tensor([3.0]))
    rl_loss = (w ** 2).sum()
    mtp_loss = (w * torch.tensor([1.0, -1.0])).sum() + 10 * head_only.sum()
    lam, c, v2 = exact_occ_coefficient(rl_loss, mtp_loss, [w])
    # grad rl = 2w = [2, 4], grad mtp wrt w = [1, -1]: c = -2, v2 = 2; head_only's gradient is not counted.
    assert (c.item(), v2.item()) == pytest.approx((-2.0, 2.0))
    assert lam.item() == pytest.approx(-1.0, rel=1e-6)


@pytest.mark.parametrize("alignment", [0.8, -0.6])
def test_optimal_lambda_maximises_one_step_gain_on_a_quadratic(alignment):
    """J(theta) = -(L/2)||theta - theta*||^2 is L-smooth with the bound of Eq. 1 tight, so Eq. 10 is the exact
    one-step change from MTP and lambda* = (1-L eta)/(L eta) * c / v^2 (Eq. 11) must beat 0 and 2 lambda*
    (the parabola's symmetric point) and every other lambda on a grid."""
    smooth, eta = 2.0, 0.1
    g = torch.Generator().manual_seed(0)
    target = torch.randn(8, generator=g)
    theta = torch.nn.Parameter(torch.randn(8, generator=g))
    # The auxiliary objective pulls towards a point partly along the RL direction (alignment > 0) or against it.
    rl_dir = (target - theta.detach())
    aux_target = theta.detach() + alignment * rl_dir + 0.5 * torch.randn(8, generator=g)

    def J(th):
        return -0.5 * smooth * ((th - target) ** 2).sum()

    rl_loss = -J(theta)
    mtp_loss = 0.5 * ((theta - aux_target) ** 2).sum()
    lam_star, c, v2 = exact_occ_coefficient(rl_loss, mtp_loss, [theta], lambda_plus=(1 - smooth * eta) / (smooth * eta),
                                            eps=0.0)
    g_rl = -torch.autograd.grad(rl_loss, theta, retain_graph=True)[0]  # ascent directions, as in Eq. 2
    g_mtp = -torch.autograd.grad(mtp_loss, theta)[0]

    def gain(lam):
        with torch.no_grad():
            return (J(theta + eta * (g_rl + lam * g_mtp)) - J(theta)).item()

    lam_star = lam_star.item()
    assert (lam_star > 0) == (alignment > 0)
    assert gain(lam_star) >= gain(0.0) - 1e-9
    assert gain(lam_star) >= gain(2 * lam_star) - 1e-9
    for lam in torch.linspace(-3 * abs(lam_star), 3 * abs(lam_star), 61).tolist():
        assert gain(lam_star) >= gain(lam) - 1e-9
    # The extra gain at the optimum is Eq. 27: (1 - L eta)^2 c^2 / (2 L v^2).
    extra = (1 - smooth * eta) ** 2 * c.item() ** 2 / (2 * smooth * v2.item())
    assert gain(lam_star) - gain(0.0) == pytest.approx(extra, rel=1e-4)


def test_bf16_inputs_give_a_float32_lambda_equal_to_the_float64_computation():
    """bf16 training: log-prob changes and gradients arrive in bf16; lambda and its sums are float32 and equal the
    float64 computation on the same bf16 values to 1e-3 (relative)."""
    from mtprl.core.occ import gradient_statistics

    g = torch.Generator().manual_seed(0)
    d_rl = (1e-2 * torch.randn(16, 512, generator=g)).bfloat16()
    d_mtp = (1e-2 * torch.randn(16, 512, generator=g) + 0.3 * d_rl.float()).bfloat16()
    mask = torch.rand(16, 512, generator=g) > 0.2
    lam = occ_coefficient(d_rl, d_mtp, mask, lambda_plus=0.7)
    m = mask.double()
    want = 0.7 * (d_rl.double() * d_mtp.double() * m).sum() / ((d_mtp.double() ** 2 * m).sum() + 1e-8)
    assert lam.dtype == torch.float32
    assert abs(lam.item() - want.item()) <= 1e-3 * abs(want.item())

    g_rl = [(torch.randn(256, 64, generator=g)).bfloat16() for _ in range(3)]
    g_mtp = [(0.5 * a.float() + torch.randn(256, 64, generator=g)).bfloat16() for a in g_rl]
    stats = gradient_statistics(g_rl, g_mtp)
    c = sum((a.double() * b.double()).sum() for a, b in zip(g_rl, g_mtp))
    v2 = sum((b.double() ** 2).sum() for b in g_mtp)
    assert stats.c_hat.dtype == stats.v2_hat.dtype == torch.float32
    assert abs(stats.c_hat.item() - c.item()) <= 1e-3 * abs(c.item())
    assert abs(stats.v2_hat.item() - v2.item()) <= 1e-3 * v2.item()


def test_a_bf16_model_gets_bf16_heads_and_a_float32_lambda():
    from mtprl.model.loading import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model = tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2).to(torch.bfloat16)
    mtprl.attach_mtp_heads(model, 2)
    assert all(p.dtype == torch.bfloat16 for p in model.mtp_heads.parameters())
    ids = torch.randint(3, len(tok), (4, 12), generator=torch.Generator().manual_seed(1))
    out = mtprl.forward_logprobs(model, ids, torch.ones_like(ids), 6)
    old = mtprl.forward_logprobs(model, ids, torch.ones_like(ids), 6)
    d_rl = out.main - (old.main - 0.01 * torch.rand(old.main.shape, generator=torch.Generator().manual_seed(2)))
    d_mtp = out.mtp[:, 0] - (old.mtp[:, 0] - 0.01 * torch.rand(old.main.shape, generator=torch.Generator().manual_seed(3)))
    lam = occ_coefficient(d_rl.bfloat16(), d_mtp.bfloat16(), torch.ones_like(ids[:, -6:]))
    want = (d_rl.bfloat16().double() * d_mtp.bfloat16().double()).sum() / ((d_mtp.bfloat16().double() ** 2).sum() + 1e-8)
    assert lam.dtype == torch.float32 and abs(lam.item() - want.item()) <= 1e-3 * abs(want.item())
