"""LambdaCalibrator and the pure regime losses without a TRL trainer: each lambda source against the pure functions
of occ.py on a tiny real model, the exact source's after-backward step against autograd, the guard."""

import math
import warnings

import pytest
import torch
from conftest import tiny_causal_lm

import mtprl
from mtprl import exact_occ_coefficient, occ_coefficient
from mtprl.core.calibration import CalibrationSettings, LambdaCalibrator, RLGradients
from mtprl.core.objectives import masked_mean, policy_loss
from mtprl.core.occ import OCCStats, ema_statistics, hidden_state_statistics, lambda_from_stats
from mtprl.training.mtp_step import StepSettings, mtp_step
from mtprl.core.regimes import MTP_TERMS, LossScaling, head_data


def _batch(seed=0, batch=4, length=5, heads=2):
    g = torch.Generator().manual_seed(seed)
    main = torch.randn(batch, length, generator=g, requires_grad=True)
    mtp = torch.randn(batch, heads, length, generator=g, requires_grad=True)
    old_main = (main - 0.3 * torch.rand(batch, length, generator=g)).detach()
    old_mtp = (mtp - 0.3 * torch.rand(batch, heads, length, generator=g)).detach()
    mask = torch.ones(batch, length)
    mask[1, -2:] = 0
    return main, mtp, old_main, old_mtp, mask, torch.randn(batch, generator=g)


def _scaling():
    return LossScaling(loss_type="grpo")


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_proxy_lambda_is_occ_coefficient_of_the_heads_deltas(variant):
    main, mtp, old_main, old_mtp, mask, adv = _batch()
    regime = MTP_TERMS[f"occ:{variant}"]
    heads = head_data(main, mtp, old_main, old_mtp, mask, adv, regime.ratio_against)
    cal = LambdaCalibrator(CalibrationSettings(lambda_plus=2.0), [], [])
    stats = cal.proxies((main - old_main).detach(), heads, regime.proxy_reduction)
    for k, (h, s) in enumerate(zip(heads, stats)):
        old = old_main if variant == "reference" else old_mtp[:, k]
        want = occ_coefficient(main - old_main, mtp[:, k] - old, mask, estimator=regime.proxy_reduction,
                               lambda_plus=2.0 / (2 if variant == "reference" else 1))
        got = (cal.advantage_lambda(regime, s, h.depth, 2, {}) if regime.lambda_in_advantages
               else cal.proxy_lambda(regime, s, h.depth, {}))
        torch.testing.assert_close(got, want)


def test_ema_lambda_follows_the_recursion_over_micro_batches():
    regime = MTP_TERMS["occ:ema"]
    cal = LambdaCalibrator(CalibrationSettings(ema_beta=0.5), [], [])
    running = None
    for seed in range(3):
        main, mtp, old_main, old_mtp, mask, adv = _batch(seed, heads=1)
        heads = head_data(main, mtp, old_main, old_mtp, mask, adv)
        stats = cal.proxies((main - old_main).detach(), heads)
        cal.update_ema(heads, stats)
        running = ema_statistics(running, stats[0], 0.5)
        got = cal.proxy_lambda(regime, stats[0], 1, {})
        torch.testing.assert_close(got, lambda_from_stats(running))


def _model_losses(seed=0):
    model = tiny_causal_lm("qwen2", seed=seed).train()
    mtprl.attach_mtp_heads(model, num_heads=1)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    out = mtprl.forward_logprobs(model, ids, None, 5, return_hidden=True)
    mask = torch.ones(3, 5)
    rl = policy_loss(out.main, out.main.detach() - 0.1, torch.randn(3, generator=g), mask, loss_type="grpo")
    mtp_loss = -masked_mean(out.mtp[:, 0], mask)
    main_params = [p for n, p in model.named_parameters() if not n.startswith("mtp_heads.")]
    return model, out, rl, mtp_loss, main_params, list(model.mtp_heads.parameters())


def test_hidden_source_is_hidden_state_statistics():
    model, out, rl, mtp_loss, main_params, head_params = _model_losses()
    cal = LambdaCalibrator(CalibrationSettings(), main_params, head_params)
    got = cal.gradient_stats("hidden", RLGradients(rl, out.hidden), mtp_loss)
    want = hidden_state_statistics(rl, mtp_loss, out.hidden)
    torch.testing.assert_close(torch.stack(list(got)), torch.stack(list(want)))


def test_exact_source_after_backward_puts_g_rl_plus_lambda_g_mtp_on_grad():
    """One extra backward: the MTP loss alone (stashed), then the RL loss's own backward, then add_exact_terms.
    .grad must be g_RL + lambda g_MTP with lambda = exact_occ_coefficient (two independent autograd passes)."""
    model, out, rl, mtp_loss, main_params, head_params = _model_losses()
    params = main_params + head_params
    lam, c, v2 = exact_occ_coefficient(rl, mtp_loss, main_params)
    g_rl = torch.autograd.grad(rl, params, retain_graph=True, allow_unused=True)
    g_mtp = torch.autograd.grad(mtp_loss, params, retain_graph=True, allow_unused=True)
    cal = LambdaCalibrator(CalibrationSettings(), main_params, head_params)
    stash = cal.stash_exact_gradient(1, mtp_loss)
    assert all(p.grad is None for p in params)  # the stash is a value; nothing is written to .grad yet
    rl.backward()
    metrics = cal.add_exact_terms([stash])
    assert metrics["mtp/lambda/1"][0] == pytest.approx(lam.item(), rel=1e-5)
    assert metrics["mtp/c_exact/1"][0] == pytest.approx(c.item(), rel=1e-5)
    for p, a, b in zip(params, g_rl, g_mtp):
        want = (torch.zeros_like(p) if a is None else a) + lam * (torch.zeros_like(p) if b is None else b)
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5)


def _step_inputs(out):
    """TRL's micro-batch fields the MTP step reads, for `_model_losses`' forward."""
    return {"completion_mask": torch.ones(3, 5), "advantages": torch.ones(3),
            "old_per_token_logps": out.main.detach() - 0.1, "old_mtp_logps": out.mtp.detach() - 0.1}


@pytest.mark.parametrize("training", [True, False])
def test_mtp_step_exact_returns_its_after_backward_step(training):
    """The exact source: the step's loss holds no head term, and `after_backward` (run after the backward) adds it;
    off training there is no backward, lambda is 0 and nothing is left to run."""
    losses = _model_losses()
    model, out, rl, mtp_loss, main_params, head_params = losses
    cal = LambdaCalibrator(CalibrationSettings(), main_params, head_params)
    settings = StepSettings(MTP_TERMS["occ:exact"], training=training)
    result = mtp_step(rl, out, _step_inputs(out), settings, _scaling(), cal)
    assert result.loss.item() == pytest.approx(rl.item())  # the head's term is not in the loss
    if not training:
        assert result.after_backward is None and result.metrics["mtp/lambda/1"] == [0.0]
        return
    assert "mtp/lambda/1" not in result.metrics
    result.loss.backward()
    after = result.after_backward()
    assert set(after) == {"mtp/lambda/1", "mtp/c_exact/1", "mtp/v2_exact/1"}


def test_a_non_finite_lambda_becomes_zero_and_is_counted():
    cal = LambdaCalibrator(CalibrationSettings(), [], [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = {}
        lam = cal.lambda_from(OCCStats(torch.tensor(float("nan")), torch.tensor(1.0)), 2, metrics)
    assert lam.item() == 0.0 and "head 2" in str(caught[0].message)
    assert metrics == {"mtp/lambda_nonfinite/2": [1.0]}
    broken = lambda_from_stats(OCCStats(torch.tensor(float("nan")), torch.tensor(1.0)))  # the unguarded formula
    assert math.isnan(broken.item())


@pytest.mark.parametrize("name", ["detach", "ce", "policy", "occ:paper"])
def test_regime_losses_are_pure_functions_of_plain_data(name):
    """Same data in, same loss out, no gradient written anywhere: the losses only build a graph."""
    main, mtp, old_main, old_mtp, mask, adv = _batch()
    regime = MTP_TERMS[name]
    heads = head_data(main, mtp, old_main, old_mtp, mask, adv, regime.ratio_against)
    first = [regime.loss(h, _scaling()) for h in heads]
    again = [regime.loss(h, _scaling()) for h in heads]
    assert main.grad is None and mtp.grad is None
    for k, (a, b) in enumerate(zip(first, again)):
        assert a.item() == b.item()
        want = (-masked_mean(mtp[:, k], mask) if regime.loss.__name__ == "ce_on_samples"
                else policy_loss(mtp[:, k], old_mtp[:, k], adv, mask, loss_type="grpo"))
        torch.testing.assert_close(a, want)


def test_adam_geometry_and_cross_fitted_c_against_autograd_and_the_optimizers_state():
    """c_P = <g_RL, P g_MTP>, v2_P = <g_MTP, P g_MTP> with P from AdamW's bias-corrected exp_avg_sq (after one step
    on a gradient g: v_hat = g^2, so P = 1 / (|g| + eps)), and the cross-fitted c against the previous micro-batch's
    g_MTP, each against flattened autograd gradients."""
    from mtprl.core.calibration import adam_preconditioner

    model, out, rl, mtp_loss, main_params, head_params = _model_losses()
    g_rl = torch.autograd.grad(rl, main_params, retain_graph=True, allow_unused=True)
    g_rl = [torch.zeros_like(p) if g is None else g for g, p in zip(g_rl, main_params)]
    g_mtp = [torch.zeros_like(p) if g is None else g for g, p in
             zip(torch.autograd.grad(mtp_loss, main_params, retain_graph=True, allow_unused=True), main_params)]
    shadow = [p.detach().clone().requires_grad_() for p in main_params]  # the graph keeps the real ones intact
    opt = torch.optim.AdamW(shadow, lr=1e-3, eps=1e-8)
    for p, g in zip(shadow, g_mtp):
        p.grad = g.clone() + 0.5  # some gradient the optimizer has seen
    opt.step()
    P = adam_preconditioner(opt, shadow)
    for g, q in zip(g_mtp, P):
        torch.testing.assert_close(q, 1.0 / ((g + 0.5).abs() + 1e-8))
    cal = LambdaCalibrator(CalibrationSettings(), main_params, head_params)
    grads = RLGradients(rl, out.hidden)
    cal.gradient_stats("exact", grads, mtp_loss)  # fills the exact g_RL cache, as fidelity does
    first = cal.exact_geometry(1, grads, mtp_loss, P)
    c_p = sum(float((a * q * b).sum()) for a, b, q in zip(g_rl, g_mtp, P))
    v2_p = sum(float((b * b * q).sum()) for b, q in zip(g_mtp, P))
    assert first["mtp/c_adam/1"] == pytest.approx(c_p, rel=1e-4)
    assert first["mtp/v2_adam/1"] == pytest.approx(v2_p, rel=1e-4)
    assert "mtp/c_cross/1" not in first  # no previous micro-batch yet
    second = cal.exact_geometry(1, grads, mtp_loss, None)  # same batch again: the cross-fit reduces to the exact c
    assert second["mtp/c_cross/1"] == pytest.approx(sum(float((a * b).sum()) for a, b in zip(g_rl, g_mtp)), rel=1e-4)
    assert adam_preconditioner(torch.optim.AdamW(shadow), shadow) is None  # before the first step
