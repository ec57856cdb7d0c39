"""The update instrumented and the two remedies (update_geometry.py): the separate clip against the policy-only
run and a hand computation, the MTP term's own Adam moments against a hand computation and bit for bit at lambda 0,
the metrics per optimizer step, and the moments saved and resumed."""

import copy
import json
import math

import pytest
import torch
from conftest import _crafted_inputs, _mtp_trainer, _small_model, _with_old_logprobs

import mtprl
from mtprl.core.objectives import masked_mean, policy_loss
from mtprl.training.update_geometry import MOMENTS_FILE, MTPMoments, clip_factor

MAX_NORM = 0.05  # small enough that the clip binds for both gradients on the tiny model


def _pair(tmp_path, **overrides):
    """Two trainers on copies of one tiny model: the `ce` regime (1 head, coef 3) and plain GRPO (`none`)."""
    model, tok = _small_model()
    common = dict(mtp_num_heads=1, loss_type="grpo", max_grad_norm=MAX_NORM, mtp_head_loss="none",
                  logging_steps=1)
    common.update(overrides)
    ce = _mtp_trainer(tmp_path, "ce", model=(copy.deepcopy(model), tok), mtp_regime="ce", mtp_coef=3.0, **common)
    none = _mtp_trainer(tmp_path, "none", model=(copy.deepcopy(model), tok), mtp_regime="none", **common)
    for t in (ce, none):
        t.create_optimizer_and_scheduler(num_training_steps=10)
    inputs = _with_old_logprobs(ce, _crafted_inputs(heads=1))
    inputs["old_mtp_logps"] = inputs["old_mtp_logps"][:, :1]
    return ce, none, inputs


def _trunk(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not n.startswith("mtp_heads.")}


def test_separate_clip_sees_the_policy_gradient_of_the_policy_only_run(tmp_path):
    """At one step from one state and batch, the ce-3 run's grad_norm/rl under the separate clip equals the
    grad_norm of the `none` run, and each clip factor is min(1, max / (norm + 1e-6)) of its own norm."""
    ce, none, inputs = _pair(tmp_path, mtp_grad_clip="separate")
    got = ce.update_on([inputs]).metrics
    ref = none.update_on([{k: v for k, v in inputs.items() if k != "old_mtp_logps"}]).metrics
    assert got["grad_norm/rl"][0] == pytest.approx(ref["grad_norm"][0], rel=1e-5)
    assert got["clip_factor/rl"][0] == pytest.approx(clip_factor(got["grad_norm/rl"][0], MAX_NORM))
    assert got["clip_factor/mtp"][0] == pytest.approx(clip_factor(got["grad_norm/mtp"][0], MAX_NORM))
    assert got["clip_factor/rl"][0] < 1 and got["clip_factor/mtp"][0] < 1  # both clips bind here
    assert got["grad_norm/mtp"][0] > got["grad_norm/rl"][0]  # CE at coefficient 3 is the larger gradient
    assert got["update_norm"][0] > 0


def _hand_gradients(trainer, inputs, coef):
    """g_RL and coef * g_CE over every parameter, from the pure functions and autograd (an independent path)."""
    model = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    out = mtprl.forward_logprobs(model, ids, mask, inputs["completion_ids"].shape[1])
    m = inputs["completion_mask"].float()
    rl = policy_loss(out.main, inputs["old_per_token_logps"], inputs["advantages"], m, loss_type="grpo",
                     epsilon_low=0.2, epsilon_high=0.2)
    ce = coef * masked_mean(-out.mtp[:, 0], m * out.mtp_mask[:, 0])
    params = [p for p in model.parameters() if p.requires_grad]
    g_rl = torch.autograd.grad(rl, params, retain_graph=True, allow_unused=True)
    g_ce = torch.autograd.grad(ce, params, allow_unused=True)
    zero = [torch.zeros_like(p) for p in params]
    return params, [z if g is None else g for g, z in zip(g_rl, zero)], [z if g is None else g for g, z in
                                                                           zip(g_ce, zero)]


def _norm(grads):
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


@pytest.mark.parametrize("clip_mode", ["shared", "separate"])
def test_one_sgd_step_with_either_clip_is_the_hand_computation(tmp_path, clip_mode):
    lr = 0.1
    ce, _, inputs = _pair(tmp_path, mtp_grad_clip=clip_mode, optim="sgd", learning_rate=lr)
    params, g_rl, g_ce = _hand_gradients(ce, inputs, 3.0)
    before = [p.detach().clone() for p in params]
    if clip_mode == "separate":
        f_rl, f_ce = clip_factor(_norm(g_rl), MAX_NORM), clip_factor(_norm(g_ce), MAX_NORM)
    else:
        f_rl = f_ce = clip_factor(_norm([a + b for a, b in zip(g_rl, g_ce)]), MAX_NORM)
    ce.update_on([inputs])
    for p, b, a, c in zip(params, before, g_rl, g_ce):
        torch.testing.assert_close(p.detach(), b - lr * (f_rl * a + f_ce * c), atol=1e-6, rtol=1e-5)


def test_separate_moments_one_step_is_the_hand_computation(tmp_path):
    """SGD for the policy's part, then the MTP term's own first Adam step on the trunk: -lr * coef * m_hat /
    (sqrt(v_hat) + eps) with m_hat = u and v_hat = u^2 at step 1 (u: the CE gradient at coefficient 1)."""
    lr = 0.1
    ce, _, inputs = _pair(tmp_path, mtp_optimizer_state="separate", optim="sgd", learning_rate=lr,
                          max_grad_norm=0.0)
    params, g_rl, g_ce = _hand_gradients(ce, inputs, 3.0)
    n_trunk = len(ce.calibrator.main_params)
    before = [p.detach().clone() for p in params]
    ce.update_on([inputs])
    eps = ce.args.adam_epsilon
    for i, (p, b, a, c) in enumerate(zip(params, before, g_rl, g_ce)):
        if i < n_trunk:  # the trunk: SGD on g_RL, then lambda x the unit gradient's own Adam step
            u = c / 3.0
            want = b - lr * a - lr * 3.0 * u / (u.abs() + eps)
            clear = u.abs() > 1e-6  # u / (|u| + eps) is ill-conditioned where |u| ~ eps: those entries only bounded
            torch.testing.assert_close(p.detach()[clear], want[clear], atol=1e-5, rtol=1e-4)
            assert float((p.detach() - want).abs().max()) <= 2 * lr * 3.0
            continue
        want = b - lr * c  # the heads: only the MTP term reaches them, through the run's optimizer
        torch.testing.assert_close(p.detach(), want, atol=1e-5, rtol=1e-4)


def test_separate_moments_at_lambda_zero_leave_the_trunk_update_of_the_policy_alone(tmp_path):
    """At coefficient 0 with separate moments the trunk's AdamW update equals, bit for bit, that of the same run
    with shared moments (the policy's gradient alone reaches AdamW), and the plain GRPO run's within float32. No
    clip here: with the MTP part kept apart the shared clip's factor comes from float64 norms, TRL's from torch's
    float32 ones (equal to about 1e-7, not bit for bit)."""
    model, tok = _small_model()
    kw = dict(mtp_num_heads=1, loss_type="grpo", mtp_head_loss="none", mtp_coef=0.0, max_grad_norm=0.0)
    runs = {state: _mtp_trainer(tmp_path, state, model=(copy.deepcopy(model), tok), mtp_regime="policy",
                                mtp_optimizer_state=state, **kw) for state in ("shared", "separate")}
    runs["none"] = _mtp_trainer(tmp_path, "none", model=(copy.deepcopy(model), tok), mtp_regime="none",
                                **{k: v for k, v in kw.items() if k != "mtp_coef"})
    inputs = _with_old_logprobs(runs["shared"], _crafted_inputs(heads=1))
    inputs["old_mtp_logps"] = inputs["old_mtp_logps"][:, :1]
    after = {}
    for name, trainer in runs.items():
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        batch = inputs if name != "none" else {k: v for k, v in inputs.items() if k != "old_mtp_logps"}
        trainer.update_on([batch, batch])
        after[name] = _trunk(trainer)
    assert after["shared"] != {} and all(torch.equal(after["shared"][n], after["separate"][n]) for n in after["none"])
    for n in after["none"]:
        torch.testing.assert_close(after["separate"][n], after["none"][n], atol=1e-6, rtol=1e-5)


def test_moments_are_saved_and_resumed_with_the_optimizer(tmp_path):
    ce, _, inputs = _pair(tmp_path, mtp_optimizer_state="separate")
    ce.update_on([inputs])
    ce._save_optimizer_and_scheduler(str(tmp_path))
    saved = torch.load(tmp_path / MOMENTS_FILE, weights_only=False)
    assert saved["step"] == 1 and any(float(m.abs().sum()) > 0 for m in saved["exp_avg"])
    fresh, _, _ = _pair(tmp_path / "again", mtp_optimizer_state="separate")
    fresh._load_optimizer_and_scheduler(str(tmp_path))
    for a, b in zip(fresh.mtp_moments.exp_avg_sq, ce.mtp_moments.exp_avg_sq):
        assert torch.equal(a, b)
    plain, _, _ = _pair(tmp_path / "plain", mtp_optimizer_state="separate")
    (tmp_path / MOMENTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=MOMENTS_FILE):
        plain._load_optimizer_and_scheduler(str(tmp_path))


def test_training_logs_the_step_metrics(tmp_path):
    """Every optimizer step of a real run logs grad_norm (TRL's), the clip factor and update_norm; detach splits
    the two gradients by parameter group at no extra backward."""
    trainer = _mtp_trainer(tmp_path, mtp_regime="detach", mtp_num_heads=1, max_steps=2, steps_per_generation=2)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert len(rows) == 2
    for r in rows:
        assert r["clip_factor"] == pytest.approx(min(1.0, 1.0 / (r["grad_norm"] + 1e-6)), rel=1e-4)
        assert r["grad_norm"] == pytest.approx(math.hypot(r["grad_norm/rl"], r["grad_norm/mtp"]), rel=1e-4)
        assert r["update_norm"] > 0


def test_moments_state_dict_round_trip_rejects_another_trunk():
    params = [torch.zeros(3, requires_grad=True)]
    moments = MTPMoments(params)
    moments.step([torch.ones(3)], 0.5, 0.1)
    with pytest.raises(ValueError, match="trainable parameters"):
        MTPMoments(params * 2).load_state_dict(moments.state_dict())


@pytest.mark.parametrize("first_update", ["zero", "carry"])
def test_occs_first_update_after_a_rollout_is_zero_or_carries_the_last_lambda(tmp_path, first_update):
    """OCC's lambda is logged per position within the rollout; at position 0 the proxies see no change (0), and
    occ_first_update=carry uses the previous rollout's last lambda there instead."""
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", mtp_num_heads=1, steps_per_generation=2, max_steps=4,
                           occ_first_update=first_update, mtp_head_loss="none")
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"mtp/lambda/1"' in line]
    assert [("mtp/lambda_pos0/1" in r, "mtp/lambda_pos1/1" in r) for r in rows] == [(True, False), (False, True)] * 2
    assert rows[0]["mtp/lambda_pos0/1"] == 0.0 and rows[1]["mtp/lambda_pos1/1"] != 0.0
    want = 0.0 if first_update == "zero" else rows[1]["mtp/lambda_pos1/1"]
    assert rows[2]["mtp/lambda_pos0/1"] == pytest.approx(want, rel=1e-6)


def test_separate_clip_keeps_the_head_only_term_with_the_mtp_part_under_the_exact_source(tmp_path):
    """occ exact stashes the head's gradient; the head-only term (mtp_head_loss: ce) must still be taken apart with
    the MTP part, so grad_norm/rl is the policy's alone (the none run's grad_norm)."""
    model, tok = _small_model()
    common = dict(mtp_num_heads=1, loss_type="grpo", max_grad_norm=MAX_NORM)
    occ = _mtp_trainer(tmp_path, "occ", model=(copy.deepcopy(model), tok), mtp_regime="occ", occ_variant="exact",
                       mtp_head_loss="ce", mtp_grad_clip="separate", **common)
    none = _mtp_trainer(tmp_path, "none", model=(copy.deepcopy(model), tok), mtp_regime="none", **common)
    for t in (occ, none):
        t.create_optimizer_and_scheduler(num_training_steps=10)
    inputs = _with_old_logprobs(occ, _crafted_inputs(heads=1))
    inputs["old_mtp_logps"] = inputs["old_mtp_logps"][:, :1]
    got = occ.update_on([inputs]).metrics
    ref = none.update_on([{k: v for k, v in inputs.items() if k != "old_mtp_logps"}]).metrics
    assert got["grad_norm/rl"][0] == pytest.approx(ref["grad_norm"][0], rel=1e-5)
    assert got["grad_norm/mtp"][0] > 0
