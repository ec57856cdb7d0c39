"""The probe's update against autograd: with plain SGD and a small learning rate, the measured change of the
held-out objective for each lambda matches the first-order prediction from the gradients; dJ(0) is one update
whichever term is probed; under detach the term never reaches the trunk (the curve is flat)."""

import numpy as np
import pytest
import torch
from conftest import PROMPTS, _mtp_trainer, _small_model
from datasets import Dataset

from mtprl.core.gain import per_prompt_gains
from mtprl.analysis.probe import after_update, sample_held_out, sequence_logps


class DigitScore:
    """A deterministic reward with spread on a random tiny model: the fraction of digits in the completion."""

    failures = 0

    def score(self, completion, answer, task, meta):
        return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def _setup(tmp_path, regime="policy", **overrides):
    model, tok = _small_model()
    # nn.Embedding's padding_idx drops that row's gradient from autograd although the forward reads it (samples can
    # hold the pad token), so autograd would not be the true derivative the first-order prediction needs
    model.get_input_embeddings().padding_idx = None
    trainer = _mtp_trainer(tmp_path, model=(model, tok), mtp_regime=regime, steps_per_generation=2,
                           **overrides)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    # J on the training prompts with the training reward: its gradient then has a real component along the update
    data = Dataset.from_list([{"prompt": p, "answer": "0"} for p in PROMPTS])
    held = sample_held_out(trainer.model, trainer.processing_class, data, samples=16, temperature=1.0,
                           max_new_tokens=6, seed=0, reward=DigitScore())
    return trainer, held, trainer.draw_rollout(0, seed=0)


def _logps64(model, held):
    """Sequence log-probs from the model's own logits (a path independent of the probe's tiled LM head)."""
    out = []
    for seqs, mask, width in zip(held.sequences, held.masks, held.prompt_widths):
        logits = model(input_ids=seqs, attention_mask=mask).logits[:, width - 1:-1].double()
        token = torch.log_softmax(logits, -1).gather(-1, seqs[:, width:, None]).squeeze(-1)
        out.append((token * mask[:, width:]).sum(1))
    return torch.cat(out)


def _objective(model, held, old):
    """J_hat(theta') on the fixed samples: the importance estimate, as a differentiable function of theta'."""
    w = torch.exp(_logps64(model, held) - old)
    r = torch.from_numpy(held.rewards)
    pid = torch.from_numpy(held.prompt_ids)
    count = torch.bincount(pid).double()
    loo = (torch.bincount(pid, r)[pid] - r) / (count[pid] - 1)
    return ((w - 1) * (r - loo) / count[pid]).sum() / len(count)


def test_measured_gain_matches_the_first_order_prediction_under_sgd(tmp_path):
    lr = 1e-4
    trainer, held, batches = _setup(tmp_path, optim="sgd", learning_rate=lr, max_grad_norm=0.0)
    model = trainer.model
    main = [p for n, p in model.named_parameters() if not n.startswith("mtp_heads.")]
    # d J_hat / d theta at theta' = theta, by autograd
    model.eval()
    with torch.no_grad():
        old = _logps64(model, held)
    grad_j = torch.autograd.grad(_objective(model, held, old), main)
    # the trainer's gradient at lambda = 0 and 1 (a second path: compute_loss + backward, no optimizer)
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # what transformers' loop sets
    total = {}
    for lam in (0.0, 1.0):
        model.zero_grad(set_to_none=True)
        with trainer.using_term(trainer.term_for("policy", lam)):
            for micro in batches:
                trainer.compute_loss(model, micro).backward()
        total[lam] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in main]
    model.zero_grad(set_to_none=True)
    g_rl, g_mtp = total[0.0], [b - a for a, b in zip(total[0.0], total[1.0])]
    assert sum(float(g.abs().sum()) for g in g_mtp) > 0  # the policy term reaches the trunk

    def measure():
        model.eval()
        with torch.no_grad():
            return per_prompt_gains(_logps64(model, held), old, held.rewards, held.prompt_ids).mean()

    for lam in (0.0, 1.0, 4.0):
        measured, _ = after_update(trainer, batches, measure, regime="policy", coef=lam)
        # steps_per_generation = 2 optimizer steps of SGD; to first order their sum is -lr * total gradient
        predicted = -lr * sum(float((gj.double() * (a + lam * b).double()).sum())
                              for gj, a, b in zip(grad_j, g_rl, g_mtp))
        print(f"lambda {lam}: measured {measured:.3e}, first-order {predicted:.3e}")
        assert abs(measured - predicted) <= 0.05 * abs(predicted) + 1e-9


def test_dj_at_zero_is_one_update_for_every_term_and_detach_is_flat(tmp_path):
    trainer, held, batches = _setup(tmp_path, max_grad_norm=0.0)
    logps = {}
    for term, lam in [("policy", 0.0), ("ce", 0.0), ("detach", 0.0), ("detach", 3.0), ("policy", 3.0)]:
        logps[term, lam], _ = after_update(trainer, batches, lambda: sequence_logps(trainer.model, held, 1.0),
                                           regime=term, coef=lam)
    after_restore = sequence_logps(trainer.model, held, 1.0)
    torch.testing.assert_close(after_restore, held.logps, rtol=0, atol=0)  # restore is exact
    assert torch.equal(logps["policy", 0.0], logps["ce", 0.0]) and torch.equal(logps["ce", 0.0],
                                                                              logps["detach", 0.0])
    assert torch.equal(logps["detach", 0.0], logps["detach", 3.0])  # the term never reaches the trunk
    assert not torch.equal(logps["policy", 0.0], logps["policy", 3.0])  # a joint term does
    assert not torch.equal(logps["policy", 0.0], held.logps)  # the update moved the policy
    assert np.isfinite(held.rewards).all()


def _sgd_by_hand(trainer, batches, lam, lr, max_grad_norm):
    """theta after one SGD step per micro-batch, by hand: autograd's gradient of compute_loss at the current theta,
    clipped over every trainable parameter when max_grad_norm > 0 (TRL's clip), then theta -= lr * g."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    for micro in batches:
        model.zero_grad(set_to_none=True)
        with trainer.using_term(trainer.term_for("policy", lam)):
            trainer.compute_loss(model, micro).backward()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        scale = min(1.0, max_grad_norm / (float(norm) + 1e-6)) if max_grad_norm > 0 else 1.0
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * scale * g
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    model.zero_grad(set_to_none=True)
    return start, after


def test_the_probes_sgd_counterfactuals_are_sgd_with_and_without_the_clip(tmp_path):
    """`sgd` keeps the run's clip, `sgd_no_clip` drops it: the update the probe measures under each
    (`using_update_settings`) lands on the hand computation, and the clip visibly binds in one and not the other."""
    from mtprl.analysis.probe import COUNTERFACTUALS

    trainer, _, batches = _setup(tmp_path, max_grad_norm=0.05)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    lr, lam = 1e-2, 2.0
    moved = {}
    for name in ("sgd", "sgd_no_clip"):
        clip = COUNTERFACTUALS[name].get("max_grad_norm", trainer.args.max_grad_norm)
        start, want = _sgd_by_hand(trainer, batches, lam, lr, clip)
        with trainer.using_update_settings(sgd_lr=lr, **COUNTERFACTUALS[name]):
            got, _ = after_update(trainer, batches, lambda: [p.detach().clone() for p in params], regime="policy",
                                  coef=lam)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        moved[name] = float(torch.sqrt(sum(((a - s).double() ** 2).sum() for a, s in zip(got, start))))
    assert moved["sgd"] <= 2 * lr * 0.05 * (1 + 1e-4)  # two steps, each clipped to lr * 0.05
    assert moved["sgd_no_clip"] > 3 * moved["sgd"]
    assert trainer.args.max_grad_norm == 0.05 and trainer.args.optim != "sgd"  # the run's settings are back


def _gradient(trainer, micro, lam, params):
    trainer.model.zero_grad(set_to_none=True)
    with trainer.using_term(trainer.term_for("policy", lam)):
        trainer.compute_loss(trainer.model, micro).backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    trainer.model.zero_grad(set_to_none=True)
    return grads


def test_a_detach_run_measuring_a_joint_term_under_the_separate_clip_clips_the_two_apart(tmp_path):
    """The probe's "measure another term" under `mtp_grad_clip: separate` (issue 42): a Detach run updated with the
    joint `policy` term. The step takes its split from the active term (one source): the policy's gradient g_RL
    (autograd at coefficient 0) clipped to max_grad_norm, the term's g_MTP (at lam, minus g_RL) clipped to
    mtp_max_grad_norm, summed; SGD then moves theta by -lr * that. Reading the split from the run's own regime
    (detach: by parameter group) would clip the trunk's summed gradient as the policy's and miss this."""
    trainer, _, batches = _setup(tmp_path, regime="detach", max_grad_norm=0.05, mtp_max_grad_norm=0.02)
    batches = batches[:1]
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    lr, lam = 1e-2, 3.0
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    g_rl = _gradient(trainer, batches[0], 0.0, params)
    g_mtp = [t - r for t, r in zip(_gradient(trainer, batches[0], lam, params), g_rl)]
    norm = {name: float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
            for name, grads in (("rl", g_rl), ("mtp", g_mtp))}
    f_rl, f_mtp = min(1.0, 0.05 / (norm["rl"] + 1e-6)), min(1.0, 0.02 / (norm["mtp"] + 1e-6))
    assert f_rl < 1 and f_mtp < 1  # both clips bind
    trunk = {id(p) for p in trainer.calibrator.main_params}
    assert any(float(g.abs().max()) > 0 for p, g in zip(params, g_mtp) if id(p) in trunk)  # the term reaches the trunk
    start = [p.detach().clone() for p in params]
    want = [s - lr * (f_rl * r + f_mtp * m) for s, r, m in zip(start, g_rl, g_mtp)]
    with trainer.using_update_settings(sgd_lr=lr, mtp_grad_clip="separate"):
        got, result = after_update(trainer, batches, lambda: [p.detach().clone() for p in params], regime="policy",
                                   coef=lam)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert result["clip_factor/rl"] == pytest.approx([f_rl], rel=1e-4)
    assert result["clip_factor/mtp"] == pytest.approx([f_mtp], rel=1e-4)
    # the run's own term and geometry are back (detach: heads apart by parameter group, nothing kept apart)
    assert trainer.term.regime.mtp_grad == "detach" and trainer.mtp_gradient_apart is None
