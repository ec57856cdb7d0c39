"""MTPGRPOTrainer on the tiny preset with real TRL: parity with stock GRPOTrainer, regimes, OCC, resume."""

import copy
import functools
import json
import math
import warnings

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import mtprl
from conftest import (COMMON, PROMPTS, _crafted_inputs, _dataset, _loss_and_grads, _mtp_trainer, _small_model,
                      _with_old_logprobs, digit_reward)
from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer

@pytest.mark.parametrize("loss_type,level", [("grpo", "token"), ("dapo", "token"), ("dr_grpo", "token"),
                                             ("grpo", "sequence"), ("dapo", "sequence"), ("dr_grpo", "sequence")])
def test_parity_with_stock_grpo_trainer(tmp_path, loss_type, level):
    """regime none, and regime policy with mtp_coef=0 (main log-probs through our one-forward path), give
    TRL's own loss and gradients on the same batch."""
    model, tok = _small_model()
    stock_model = copy.deepcopy(model)
    stock_args = GRPOConfig(output_dir=str(tmp_path / "stock"), loss_type=loss_type, importance_sampling_level=level,
                            **COMMON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = GRPOTrainer(model=stock_model, reward_funcs=[digit_reward], args=stock_args,
                            train_dataset=_dataset(), processing_class=tok)
    inputs = _crafted_inputs()
    inputs["old_per_token_logps"] = -torch.rand(8, 5) * 4  # off-policy: ratios move, some clip
    ref_loss, ref_grads = _loss_and_grads(stock, inputs)

    for regime in ("none", "policy"):
        trainer = _mtp_trainer(tmp_path, regime, model=(copy.deepcopy(model), tok), mtp_regime=regime,
                               mtp_coef=0.0, loss_type=loss_type, importance_sampling_level=level)
        inp = dict(inputs, old_mtp_logps=-torch.rand(8, 2, 5))
        loss, grads = _loss_and_grads(trainer, inp)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=f"{regime}: {name}")


def _trunk_grad_diff(tmp_path, regime, **overrides):
    """Max |grad(total) - grad(TRL loss alone)| over trunk parameters, and the head gradient norm."""
    model, tok = _small_model()
    base = _mtp_trainer(tmp_path, "none", model=(copy.deepcopy(model), tok), mtp_regime="none")
    trainer = _mtp_trainer(tmp_path, regime, model=(model, tok), mtp_regime=regime, mtp_coef=0.5, **overrides)
    inputs = _with_old_logprobs(trainer, _crafted_inputs())
    _, g_none = _loss_and_grads(base, inputs)
    _, g = _loss_and_grads(trainer, inputs)
    trunk = max((g[n] - g_none[n]).abs().max().item() for n in g_none)
    heads = sum(v.norm().item() for n, v in g.items() if n.startswith("mtp_heads."))
    return trunk, heads, trainer


def test_detach_mtp_term_reaches_heads_only(tmp_path):
    trunk, heads, _ = _trunk_grad_diff(tmp_path, "detach")
    assert trunk == 0.0 and heads > 0


@pytest.mark.parametrize("regime", ["ce", "policy", "occ"])
def test_joint_regimes_change_the_trunk_gradient(tmp_path, regime):
    trunk, heads, trainer = _trunk_grad_diff(tmp_path, regime)
    assert trunk > 1e-6 and heads > 0
    lam = trainer._metrics["train"]["mtp/lambda/1"][-1]
    assert math.isfinite(lam) and lam != 0.0


def test_occ_paper_lambda_is_the_batch_estimator_on_the_batch(tmp_path):
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", occ_lambda_plus=0.7)
    inputs = _with_old_logprobs(trainer, _crafted_inputs())
    _loss_and_grads(trainer, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        out = mtprl.forward_logprobs(trainer.model, ids, mask, 5)
    for k in range(2):
        expected = mtprl.occ_coefficient(out.main - inputs["old_per_token_logps"],
                                         out.mtp[:, k] - inputs["old_mtp_logps"][:, k], inputs["completion_mask"],
                                         lambda_plus=0.7)
        assert trainer._metrics["train"][f"mtp/lambda/{k + 1}"][-1] == pytest.approx(expected.item(), rel=1e-4)


def test_occ_exact_lambda_equals_exact_occ_coefficient(tmp_path):
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", occ_variant="exact", mtp_num_heads=1, loss_type="dapo")
    inputs = _with_old_logprobs(trainer, _crafted_inputs())
    inputs["old_mtp_logps"] = inputs["old_mtp_logps"][:, :1]
    _loss_and_grads(trainer, inputs)
    got = trainer._metrics["train"]["mtp/lambda/1"][-1]
    # Independently: TRL's stock loss on the same batch and the head's DAPO loss with TRL's normaliser.
    model = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    out = mtprl.forward_logprobs(model, ids, mask, 5)
    m = inputs["completion_mask"]
    rl = mtprl.policy_loss(out.main, inputs["old_per_token_logps"], inputs["advantages"], m, loss_type="dapo",
                           epsilon_low=0.2, epsilon_high=0.2, normalizer=m.sum().float())
    head = mtprl.policy_loss(out.mtp[:, 0], inputs["old_mtp_logps"][:, 0], inputs["advantages"], m,
                             loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, normalizer=m.sum().float())
    main_params = [p for n, p in model.named_parameters() if not n.startswith("mtp_heads.")]
    lam, c, v2 = mtprl.exact_occ_coefficient(rl, head, main_params)
    assert got == pytest.approx(lam.item(), rel=1e-4)
    assert trainer._metrics["train"]["mtp/c_exact/1"][-1] == pytest.approx(c.item(), rel=1e-4)


def _metrics(path):
    with open(path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("regime", ["detach", "ce", "policy", "occ"])
def test_each_regime_trains_two_real_steps(tmp_path, regime):
    trainer = _mtp_trainer(tmp_path, mtp_regime=regime, max_steps=2, steps_per_generation=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    rows = [r for r in _metrics(tmp_path / "run") if "mtp/lambda/1" in r]
    assert len(rows) == 2
    for row in rows:
        for k in (1, 2):
            assert math.isfinite(row[f"mtp/lambda/{k}"]) and 0 <= row[f"mtp/accept/{k}"] <= 1
        assert "step_time" in row and "reward" in rows[0]
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("mtp_heads.") for n in changed)
    assert any(n.startswith("model.layers.") for n in changed)


def test_occ_lambda_is_zero_on_first_minibatch_of_a_rollout_and_not_after(tmp_path):
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", max_steps=4, steps_per_generation=2)
    trainer.train()
    lam = [r["mtp/lambda/1"] for r in _metrics(tmp_path / "run") if "mtp/lambda/1" in r]
    c_hat = [r["mtp/c_hat/1"] for r in _metrics(tmp_path / "run") if "mtp/c_hat/1" in r]
    assert len(lam) == 4
    assert abs(lam[0]) < 1e-3 and abs(lam[2]) < 1e-3  # policy == old policy: delta_rl = 0
    assert abs(lam[1]) > 1e-3 and abs(lam[3]) > 1e-3
    assert abs(c_hat[1]) > 1e3 * abs(c_hat[0])


def test_occ_warns_when_it_cannot_see_policy_change(tmp_path):
    model, tok = _small_model()
    with pytest.warns(UserWarning, match="OCC cannot see any policy change"):
        MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], processing_class=tok, train_dataset=_dataset(),
                       args=MTPGRPOConfig(output_dir=str(tmp_path), mtp_regime="occ", **COMMON))


def test_resume_gives_the_same_losses_and_lambdas(tmp_path):
    kw = dict(mtp_regime="occ", max_steps=4, steps_per_generation=2, save_strategy="steps", save_steps=2)
    straight = _mtp_trainer(tmp_path, "straight", **kw)
    straight.train()
    first = _mtp_trainer(tmp_path, "resumed", model=_small_model(), **kw)
    first.args.max_steps = 2
    first.train()
    second = _mtp_trainer(tmp_path, "resumed", model=_small_model(seed=5), **kw)  # other init: the checkpoint wins
    second.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    a = {r["step"]: r for r in _metrics(tmp_path / "straight") if "loss" in r}
    b = {r["step"]: r for r in _metrics(tmp_path / "resumed") if "loss" in r}
    for step in (3, 4):
        for key in ("loss", "mtp/lambda/1", "mtp/lambda/2", "mtp/loss/1"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
    ckpt = tmp_path / "resumed" / "checkpoint-2"
    assert (ckpt / "mtp_heads.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()


def test_checkpoint_loads_with_heads(tmp_path):
    trainer = _mtp_trainer(tmp_path, mtp_regime="ce", max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model, tok = mtprl.load_pretrained(str(tmp_path / "final"))
    trained = dict(trainer.model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, trained[name])
    assert tok is not None and tok.decode(tok("7+8=")["input_ids"]) == "7+8="


def test_bad_config_values_name_the_field(tmp_path):
    for field, value, match in [("mtp_regime", "joint", "mtp_regime"), ("occ_variant", "fast", "occ_variant"),
                                ("mtp_coef", float("nan"), "mtp_coef"), ("occ_lambda_plus", float("inf"),
                                                                          "occ_lambda_plus"),
                                ("mtp_num_heads", 0, "mtp_num_heads"), ("occ_fidelity_every", -1,
                                                                        "occ_fidelity_every")]:
        with pytest.raises(ValueError, match=match):
            MTPGRPOConfig(output_dir=str(tmp_path), **{field: value})
    with pytest.raises(ValueError, match="loss_type"):  # TRL's own check of an unknown loss type
        MTPGRPOConfig(output_dir=str(tmp_path), loss_type="ppo-ish")


def test_a_reward_function_that_raises_scores_zero_and_training_goes_on(tmp_path):
    def flaky(prompts, completions, **kwargs):
        if "7-4=" in prompts:
            raise RuntimeError("scorer crashed")
        return [1.0] * len(completions)

    model, tok = _small_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[flaky], processing_class=tok, train_dataset=_dataset(),
                                 args=MTPGRPOConfig(output_dir=str(tmp_path / "run"), mtp_regime="ce", max_steps=2,
                                                    **COMMON))
        trainer.train()
    rows = [r for r in _metrics(tmp_path / "run") if "rewards/failures" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    # Each rollout holds 2 prompts x 4 samples; the "7-4=" prompt's samples score 0, the others 1.
    for r in rows:
        assert r["rewards/flaky/mean"] == pytest.approx(1.0 - r["rewards/failures"] / 8)
    assert sum(r["rewards/failures"] for r in rows) > 0


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_policy_loss_with_the_trainers_scaling_is_trls_own_loss(tmp_path, loss_type, level):
    """objectives.policy_loss, fed the main head's log-probs and scaled as the trainer scales it, equals the value
    of TRL's own `_compute_loss` on the same batch, with gradient accumulation and in eval mode. A TRL upgrade
    that changes its loss math breaks this test instead of the training."""
    model, tok = _small_model()
    settings = dict(COMMON, loss_type=loss_type, importance_sampling_level=level, gradient_accumulation_steps=2,
                    steps_per_generation=4, epsilon_high=0.28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[digit_reward], train_dataset=_dataset(),
                            processing_class=tok, args=GRPOConfig(output_dir=str(tmp_path / "stock"), **settings))
    ours = _mtp_trainer(tmp_path, "ours", model=(model, tok), mtp_regime="policy", **settings)
    inputs = _crafted_inputs()
    inputs["old_per_token_logps"] = -torch.rand(8, 5, generator=torch.Generator().manual_seed(3)) * 4
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    for training in (True, False):
        for trainer in (stock, ours):
            trainer.model.train(training)
            trainer.current_gradient_accumulation_steps = 2
        expected = stock._compute_loss(stock.model, inputs)
        main = mtprl.forward_logprobs(ours.model, ids, mask, 5).main
        got = ours.loss_scaling(inputs).policy_loss(main, inputs["old_per_token_logps"], inputs["advantages"],
                                                   inputs["completion_mask"])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, msg=f"training={training}")


def test_an_mtp_regime_whose_loss_gets_no_head_logprobs_raises(tmp_path, monkeypatch):
    """If TRL's loss stopped computing the policy log-probs through `_get_per_token_logps_and_entropies` (and so
    not on the forward that gave the heads' log-probs), the run must stop, not train as GRPO."""
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ")
    inputs = _with_old_logprobs(trainer, _crafted_inputs())
    trl_loss = GRPOTrainer._compute_loss

    def loss_with_its_own_forward(self, model, inputs):  # a TRL whose loss runs a forward of its own
        self._get_per_token_logps_and_entropies = functools.partial(
            GRPOTrainer._get_per_token_logps_and_entropies, self)
        try:
            return trl_loss(self, model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", loss_with_its_own_forward)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with pytest.raises(RuntimeError, match="silently train as plain GRPO"):
        trainer.compute_loss(trainer.model, inputs)


def test_rollout_mtp_logprobs_come_from_the_forward_trl_kept_as_old(tmp_path):
    """A second forward through the same model during the rollout (as TRL's reference forward through a PEFT
    model is) must not replace the old MTP log-probs: they are the ones of the forward TRL kept as old."""
    holder = {}

    def reward_with_an_extra_forward(prompts, completions, completion_ids, **kwargs):
        trainer = holder["trainer"]
        ids = torch.randint(3, 90, (len(completions), 12), generator=torch.Generator().manual_seed(7))
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 5)
        return digit_reward(completions)

    model, tok = _small_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[reward_with_an_extra_forward], processing_class=tok,
                                 train_dataset=_dataset(),
                                 args=MTPGRPOConfig(output_dir=str(tmp_path / "run"), mtp_regime="occ",
                                                    mtp_num_heads=2, steps_per_generation=2, **COMMON))
    holder["trainer"] = trainer
    batch = [{"prompt": p} for p in PROMPTS[:2] for _ in range(4)]
    output = trainer._generate_and_score_completions(batch)
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
    mask = torch.cat([output["prompt_mask"], output["completion_mask"]], 1)
    with torch.no_grad():
        expected = mtprl.forward_logprobs(trainer.model, ids, mask, output["completion_ids"].shape[1])
    torch.testing.assert_close(output["old_per_token_logps"], expected.main)
    torch.testing.assert_close(output["old_mtp_logps"], expected.mtp)


def test_distill_regime_reaches_heads_only_and_its_loss_is_the_masked_kl(tmp_path):
    trunk, heads, trainer = _trunk_grad_diff(tmp_path, "distill")
    assert trunk == 0.0 and heads > 0
    inputs = _with_old_logprobs(trainer, _crafted_inputs())
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        out = mtprl.forward_logprobs(trainer.model, ids, mask, 5, compute_divergence="kl")
    m = inputs["completion_mask"].float()
    for k in (1, 2):
        expected = (out.divergence[:, k - 1] * m).sum() / m.sum()
        assert trainer._metrics["train"][f"mtp/loss/{k}"][-1] == pytest.approx(expected.item(), rel=1e-4)
        assert trainer._metrics["train"][f"mtp/lambda/{k}"][-1] == pytest.approx(0.5)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    """TRL's gradient_checkpointing with the heads attached: the same loss and gradients as without."""
    grads = []
    for checkpointing in (False, True):
        trainer = _mtp_trainer(tmp_path, f"gc{checkpointing}", mtp_regime="occ", gradient_checkpointing=checkpointing)
        inputs = _with_old_logprobs(trainer, _crafted_inputs())
        grads.append(_loss_and_grads(trainer, inputs))
    (loss_a, g_a), (loss_b, g_b) = grads
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert set(g_a) == set(g_b) and any(n.startswith("mtp_heads.") for n in g_a)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sft_mtp_only_keeps_the_main_model_bit_identical_and_raises_acceptance(tmp_path):
    from mtprl import MTPSFTConfig, MTPSFTTrainer

    model, tok = _small_model()
    with torch.no_grad():  # a peaked main distribution (a random one is near uniform: any head would match it)
        model.get_output_embeddings().weight.mul_(40.0)
    mtprl.attach_mtp_heads(model, 1, init="random")
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    data = Dataset.from_list([{"prompt": p, "completion": str(eval(p[:-1]))} for p in prompts])
    enc = tok([p + str(eval(p[:-1])) for p in prompts[:32]], return_tensors="pt", padding=True, padding_side="left")

    def acceptance():
        with torch.no_grad():
            out = mtprl.forward_logprobs(model, enc["input_ids"], enc["attention_mask"], 3, compute_accept=True)
        m = enc["attention_mask"][:, -3:].float()
        return ((out.accept[:, 0] * m).sum() / m.sum()).item()

    before_params = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("mtp_heads.")}
    before = acceptance()
    args = MTPSFTConfig(output_dir=str(tmp_path / "sft"), mtp_only=True, mtp_num_heads=1, max_steps=40,
                        per_device_train_batch_size=16, learning_rate=3e-3, logging_steps=10, report_to=[],
                        use_cpu=True, bf16=False, save_strategy="no", max_length=32, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.train()
    for name, p in model.named_parameters():
        if not name.startswith("mtp_heads."):
            assert torch.equal(p, before_params[name]), name
    after = acceptance()
    assert after > before + 0.1, (before, after)
    rows = [r for r in _metrics(tmp_path / "sft") if "mtp/distill/1" in r]
    assert rows and rows[-1]["mtp/distill/1"] < rows[0]["mtp/distill/1"]


def _independent_losses(model, inputs):
    """TRL's DAPO loss and head 1's DAPO policy loss on one micro-batch, written from mtprl's public functions."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    out = mtprl.forward_logprobs(model, ids, mask, inputs["completion_ids"].shape[1], return_hidden=True)
    m = inputs["completion_mask"]
    kw = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, normalizer=m.sum().float())
    rl = mtprl.policy_loss(out.main, inputs["old_per_token_logps"], inputs["advantages"], m, **kw)
    head = mtprl.policy_loss(out.mtp[:, 0], inputs["old_mtp_logps"][:, 0], inputs["advantages"], m, **kw)
    return rl, head, out


def test_occ_exact_one_backward_with_gradient_accumulation(tmp_path):
    """Two accumulated micro-batches: each lambda equals exact_occ_coefficient on its micro-batch (1e-5), and the
    accumulated gradient equals autograd's sum of grad(rl_m + lambda_m head_m), heads included."""
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", occ_variant="exact", mtp_head_loss="none", mtp_num_heads=1,
                           loss_type="dapo",
                           gradient_accumulation_steps=2, occ_lambda_plus=0.7)
    model = trainer.model
    reference = copy.deepcopy(model)
    batches = []
    for seed in (0, 1):
        inputs = _with_old_logprobs(trainer, _crafted_inputs(seed=seed), seed=seed + 3)
        inputs["old_mtp_logps"] = inputs["old_mtp_logps"][:, :1]
        batches.append(inputs)
    model.train()
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad(set_to_none=True)
    for inputs in batches:
        trainer.compute_loss(model, inputs).backward()
        trainer.finish_backward()
    lambdas = trainer._metrics["train"]["mtp/lambda/1"][-2:]

    main = [p for n, p in reference.named_parameters() if not n.startswith("mtp_heads.")]
    expected_total = 0.0
    for inputs, got in zip(batches, lambdas):
        rl, head, _ = _independent_losses(reference, inputs)
        lam, _, _ = mtprl.exact_occ_coefficient(rl, head, main, lambda_plus=0.7)
        assert got == pytest.approx(lam.item(), rel=1e-5)
        assert abs(lam.item()) > 1e-4
        expected_total = expected_total + rl + lam * head
    reference.zero_grad(set_to_none=True)
    expected_total.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("variant", ["hidden", "last_layers"])
def test_occ_gradient_estimators_set_lambda_from_their_pure_function(tmp_path, variant):
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", occ_variant=variant, mtp_num_heads=1, loss_type="dapo",
                           occ_lambda_plus=0.5)
    inputs = _with_old_logprobs(trainer, _crafted_inputs())
    inputs["old_mtp_logps"] = inputs["old_mtp_logps"][:, :1]
    reference = copy.deepcopy(trainer.model)
    _loss_and_grads(trainer, inputs)
    rl, head, out = _independent_losses(reference, inputs)
    if variant == "hidden":
        stats = mtprl.core.occ.hidden_state_statistics(rl, head, out.hidden)
    else:
        stats = mtprl.core.occ.parameter_statistics(rl, head, mtprl.model.mtp.last_layer_params(reference, 1))
    expected = 0.5 * stats.c_hat / (stats.v2_hat + 1e-8)
    assert trainer._metrics["train"]["mtp/lambda/1"][-1] == pytest.approx(expected.item(), rel=1e-5)


def test_occ_ema_lambda_is_the_running_average_of_the_proxies(tmp_path):
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", occ_variant="ema", mtp_num_heads=1, occ_ema_beta=0.5)
    c_avg = v_avg = None
    for seed in (0, 1, 2):
        inputs = _with_old_logprobs(trainer, _crafted_inputs(seed=seed), seed=seed + 7)
        inputs["old_mtp_logps"] = inputs["old_mtp_logps"][:, :1]
        _loss_and_grads(trainer, inputs)
        c, v = trainer._metrics["train"]["mtp/c_hat/1"][-1], trainer._metrics["train"]["mtp/v2_hat/1"][-1]
        c_avg = c if c_avg is None else 0.5 * c_avg + 0.5 * c
        v_avg = v if v_avg is None else 0.5 * v_avg + 0.5 * v
        assert trainer._metrics["train"]["mtp/lambda/1"][-1] == pytest.approx(c_avg / (v_avg + 1e-8), rel=1e-4)


def test_fidelity_logs_every_estimator_and_detach_uses_the_joint_ce_statistics(tmp_path):
    """occ_fidelity_every on a detach run logs c and v2 of every estimator; they are those of the CE loss on the
    live trunk, i.e. the very numbers a `ce` run computes on the same batch and weights."""
    model, tok = _small_model()
    inputs = None
    logged = {}
    for regime in ("detach", "ce"):
        trainer = _mtp_trainer(tmp_path, regime, model=(copy.deepcopy(model), tok), mtp_regime=regime,
                               occ_fidelity_every=1)
        inputs = inputs or _with_old_logprobs(trainer, _crafted_inputs())
        _loss_and_grads(trainer, inputs)
        logged[regime] = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for source in ("exact", "hidden", "last_layers", "ema", "hat"):
        for k in (1, 2):
            for stat in ("c", "v2"):
                key = f"mtp/{stat}_{source}/{k}"
                assert math.isfinite(logged["detach"][key]), key
                assert logged["detach"][key] == pytest.approx(logged["ce"][key], rel=1e-5, abs=1e-12), key
    assert logged["detach"]["mtp/v2_exact/1"] > logged["detach"]["mtp/v2_last_layers/1"] > 0


@pytest.mark.parametrize("variant", ["exact", "hidden", "last_layers", "ema"])
def test_occ_variants_train_two_real_steps(tmp_path, variant):
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", occ_variant=variant, max_steps=2, steps_per_generation=2,
                           occ_fidelity_every=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    rows = [r for r in _metrics(tmp_path / "run") if "mtp/lambda/1" in r]
    assert len(rows) == 2
    for key in ("mtp/lambda/1", "mtp/c_exact/2", "mtp/v2_hidden/1", "mtp/c_last_layers/2", "mtp/c_ema/1"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()
               if n.startswith("mtp_heads."))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_occ_last_layers_split_backward_is_autograds_gradient(tmp_path, checkpointing):
    """occ last_layers cuts the graph below the last layer and backpropagates one combined loss: every lambda
    equals parameter_statistics over the last layer (1e-5), and the loss and every gradient (trunk below and
    above the cut, heads) equal autograd's of rl + sum_k lambda_k head_k on the uncut model; with TRL's
    gradient checkpointing too."""
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", occ_variant="last_layers", mtp_head_loss="none",
                           mtp_num_heads=2, loss_type="dapo",
                           occ_lambda_plus=0.7, gradient_checkpointing=checkpointing)
    reference = copy.deepcopy(trainer.model)
    inputs = _with_old_logprobs(trainer, _crafted_inputs())
    trainer.model.train()
    with trainer._trunk_cut() as cut:
        assert cut is not None and cut.layer is trainer.model.model.layers[-1]
    loss, grads = _loss_and_grads(trainer, inputs)

    rl, _, out = _independent_losses(reference, inputs)
    m = inputs["completion_mask"]
    kw = dict(loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2, normalizer=m.sum().float())
    expected = rl
    for k in range(2):
        head = mtprl.policy_loss(out.mtp[:, k], inputs["old_mtp_logps"][:, k], inputs["advantages"], m, **kw)
        stats = mtprl.core.occ.parameter_statistics(rl, head, mtprl.model.mtp.last_layer_params(reference, 1))
        lam = 0.7 * stats.c_hat / (stats.v2_hat + 1e-8)
        assert trainer._metrics["train"][f"mtp/lambda/{k + 1}"][-1] == pytest.approx(lam.item(), rel=1e-5)
        assert abs(lam.item()) > 1e-4
        expected = expected + lam.detach() * head
    reference.zero_grad(set_to_none=True)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(grads) == set(reference_grads) and any(n.startswith("model.layers.0.") for n in grads)
    for name, g in reference_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_a_scorer_that_fails_on_every_sample_stops_training_at_the_first_step(tmp_path):
    from mtprl.data.scoring import RewardFailure

    def needs_ground_truth(prompts, completions, **kwargs):
        return [float(c == kwargs["ground_truth"]) for c in completions]

    trainer = _mtp_trainer(tmp_path, mtp_regime="ce", max_steps=3)
    trainer.reward_funcs = [mtprl.training.rewards.safe_reward(needs_ground_truth)]
    with pytest.raises(RewardFailure, match="every one of the 8 samples"):
        trainer.train()
    assert trainer.state.global_step == 0
    with pytest.raises(ValueError, match="reward_failure must be one of zero, raise"):
        MTPGRPOConfig(output_dir=str(tmp_path / "x"), reward_failure="ignore", **COMMON)


def test_resuming_through_the_python_api_logs_each_step_once(tmp_path):
    """MTPGRPOTrainer.train(resume_from_checkpoint=True) after a finished 3-step run to max_steps 4: the trainer
    itself cuts metrics.jsonl back to the checkpoint (no step twice, one summary row)."""
    kw = dict(mtp_regime="occ", steps_per_generation=2, save_strategy="steps", save_steps=3)
    first = _mtp_trainer(tmp_path, "run", max_steps=3, **kw)
    first.train()
    assert [r["step"] for r in _metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3]
    second = _mtp_trainer(tmp_path, "run", max_steps=4, **kw)
    second.train(resume_from_checkpoint=True)
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "train_loss" in r] == [4]


@pytest.mark.parametrize("regime", ["detach", "ce", "policy", "occ"])
def test_a_bf16_run_trains_two_steps_per_regime_on_the_cpu(tmp_path, regime):
    """bf16 on the CPU (TRL's bf16 autocast, the model and heads in bfloat16): finite lambda and loss, heads kept in
    the model's dtype, the metrics logged, both the trunk and the heads moved."""
    model, tok = _small_model()
    model.to(torch.bfloat16)
    trainer = _mtp_trainer(tmp_path, model=(model, tok), mtp_regime=regime, max_steps=2, steps_per_generation=2,
                           bf16=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    rows = [r for r in _metrics(tmp_path / "run") if "mtp/lambda/1" in r]
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row["mtp/lambda/1"]) and math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    assert {p.dtype for p in trainer.model.mtp_heads.parameters()} == {torch.bfloat16}
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("mtp_heads.") for n in changed) and any(n.startswith("model.layers.") for n in changed)


def test_use_liger_kernel_is_refused_where_trl_would_skip_the_mtp_term(tmp_path):
    """A TRL with a fused Liger GRPO loss (compute_liger_loss, returned instead of _compute_loss) would train plain
    GRPO: refused at construction, naming the field. TRL 1.16 has no such path (use_liger_kernel only swaps layer
    kernels at train()), so there the trainer builds and its loss is still _compute_loss."""
    from mtprl.training.trainer import MTPGRPOTrainer

    class FusedLigerTRL(MTPGRPOTrainer):
        def compute_liger_loss(self, model, inputs):  # the shape of TRL's fused path
            raise AssertionError("never reached")

    model, tok = _small_model()
    kw = dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=2, mtp_regime="occ", use_liger_kernel=True)
    with pytest.raises(ValueError, match="use_liger_kernel"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            FusedLigerTRL(model=model, reward_funcs=[digit_reward], args=MTPGRPOConfig(**kw), train_dataset=_dataset(),
                          processing_class=tok)
    trainer = _mtp_trainer(tmp_path, name="stock", mtp_regime="occ", use_liger_kernel=True)
    assert not hasattr(trainer, "compute_liger_loss")


def test_fsdp_refuses_the_settings_that_read_sharded_gradients_and_names_them():
    from mtprl.core.regimes import regime_for
    from mtprl.training.trainer import sharded_gradient_refusal

    def args(**kw):
        return MTPGRPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to=[], **kw)

    for kw, named in [(dict(mtp_regime="occ", occ_variant="exact"), "occ_variant=exact"),
                      (dict(mtp_regime="occ", occ_variant="last_layers"), "occ_variant=last_layers"),
                      (dict(mtp_regime="ce", occ_fidelity_every=4), "occ_fidelity_every"),
                      (dict(mtp_regime="ce", mtp_grad_clip="separate"), "mtp_grad_clip=separate"),
                      (dict(mtp_regime="ce", mtp_optimizer_state="separate"), "mtp_optimizer_state=separate")]:
        a = args(**kw)
        message = sharded_gradient_refusal(a, regime_for(a.mtp_regime, a.occ_variant), fsdp=True)
        assert message and named in message and "occ_variant paper" in message, (kw, message)
        assert sharded_gradient_refusal(a, regime_for(a.mtp_regime, a.occ_variant), fsdp=False) is None
    for kw in (dict(mtp_regime="occ", occ_variant="paper"), dict(mtp_regime="detach", mtp_grad_clip="separate")):
        a = args(**kw)  # log-prob proxies; the separate clip by parameter group reads .grad alone (shard_stats)
        assert sharded_gradient_refusal(a, regime_for(a.mtp_regime, a.occ_variant), fsdp=True) is None, kw


@pytest.mark.parametrize("variant", ["paper", "exact"])
def test_a_lora_trunk_trains_its_adapter_and_the_heads_in_full(tmp_path, variant):
    """TRL's peft_config: the trunk adapted by LoRA (its base weights frozen, bit-identical after training), the heads
    (copied from the base weights of the adapted last layer) trained in full, OCC's lambda set over what trains."""
    from peft import LoraConfig

    model, tok = _small_model()
    kw = dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=2, mtp_regime="occ", occ_variant=variant,
              max_steps=2, steps_per_generation=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=MTPGRPOConfig(**kw),
                                 train_dataset=_dataset(), processing_class=tok,
                                 peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    # every lambda source's sums run over what trains: the adapter (main) and the whole heads, no base weight
    named = dict(trainer.model.named_parameters())
    lora = {id(p) for n, p in named.items() if ".lora_" in n and "mtp_heads." not in n}
    heads = {id(p) for n, p in named.items() if "mtp_heads." in n}
    assert {id(p) for p in trainer.calibrator.main_params} == lora and lora
    assert {id(p) for p in trainer.calibrator.head_params} == heads
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n or "mtp_heads." in n for n in changed), sorted(changed)[:5]
    assert any("mtp_heads." in n for n in changed) and any(".lora_B." in n for n in changed)
    rows = [r for r in _metrics(tmp_path / "run") if "mtp/lambda/1" in r]
    assert all(math.isfinite(r["mtp/lambda/1"]) for r in rows) and rows[1]["mtp/lambda/1"] != 0
    if variant == "paper":  # the proxies need a change since the rollout: 0 on its first micro-batch
        assert rows[0]["mtp/lambda/1"] == 0.0
    else:  # the exact lambda's v2 is the MTP gradient over the parameters that train: the adapter's and the heads'
        assert rows[0]["mtp/v2_exact/1"] > 0


@pytest.mark.parametrize("regime", ["none", "detach", "ce", "policy", "occ", "distill", "frozen"])
def test_evaluate_before_training_works_under_every_regime(tmp_path, regime):
    """`trainer.evaluate()` on a fresh trainer: transformers sets current_gradient_accumulation_steps inside its
    training loop only, and the MTP loss used to read it (AttributeError under every MTP regime)."""
    from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer

    model, tok = _small_model()
    kw = dict(COMMON, output_dir=str(tmp_path / regime), mtp_num_heads=2, mtp_regime=regime,
              per_device_eval_batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=MTPGRPOConfig(**kw),
                                 train_dataset=_dataset(), eval_dataset=_dataset().select(range(8)),
                                 processing_class=tok)
        metrics = trainer.evaluate()
    assert "eval_loss" in metrics and math.isfinite(metrics["eval_loss"])
    if regime not in ("none", "frozen"):  # the MTP term was computed in eval mode too
        assert any(k.startswith("eval_mtp/") for k in metrics), sorted(metrics)


def test_eval_on_start_then_training(tmp_path):
    """`eval_on_start: true` with OCC: evaluates before the first step, then trains."""
    from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer

    model, tok = _small_model()
    kw = dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=2, mtp_regime="occ", max_steps=1,
              eval_strategy="steps", eval_steps=1, eval_on_start=True, per_device_eval_batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=MTPGRPOConfig(**kw),
                                 train_dataset=_dataset(), eval_dataset=_dataset().select(range(8)),
                                 processing_class=tok)
        trainer.train()
    evals = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert [row["step"] for row in evals] == [0, 1]
