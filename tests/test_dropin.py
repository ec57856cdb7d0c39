"""MTPGRPOTrainer as a drop-in for TRL's GRPOTrainer: the constructor surface TRL 1.16 offers."""

import asyncio
import math
import json
import warnings

import pytest
from conftest import COMMON, _dataset, _small_model, digit_reward

from mtprl.training.rewards import safe_reward
from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer


async def async_digit_reward(completions, **kwargs):
    await asyncio.sleep(0)
    return digit_reward(completions)


async def async_picky(prompts, completions, **kwargs):
    if any("b" in c for c in completions):
        raise ValueError("cannot score b")
    return [1.0] * len(completions)


def test_async_reward_stays_async_and_failure_safe():
    wrapped = safe_reward(async_picky)
    assert asyncio.iscoroutinefunction(wrapped)
    logged = {}
    out = asyncio.run(wrapped(prompts=["p"] * 3, completions=["a", "b", "c"],
                              log_metric=lambda k, v: logged.__setitem__(k, v)))
    assert out == [1.0, 0.0, 1.0] and logged == {"rewards/failures": 1.0}
    assert asyncio.run(safe_reward(async_digit_reward)(prompts=["p"], completions=["12ab"])) == [0.5]


def test_training_with_an_async_reward_function(tmp_path):
    """The un-awaited coroutine bug: TRL must see an async callable and await it on its event loop."""
    model, tok = _small_model()
    args = MTPGRPOConfig(**dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=1, mtp_regime="none",
                                max_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[async_digit_reward, digit_reward], args=args,
                                 train_dataset=_dataset(), processing_class=tok)
    trainer.train()
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    # both functions scored the same completions: their means agree
    assert row["rewards/async_digit_reward/mean"] == pytest.approx(row["rewards/digit_reward/mean"])


def test_reward_funcs_are_optional_as_in_trl(tmp_path):
    model, tok = _small_model()
    args = MTPGRPOConfig(**dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=1, max_steps=1))
    # no reward source at all: TRL's own error, not a TypeError about a missing argument
    with pytest.raises(ValueError, match="reward"):
        MTPGRPOTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tok)


def test_prompt_of_k_tokens_or_fewer_masks_the_heads_without_context():
    """A one-token prompt with K=2 heads: head k has no context for the first k completion tokens; those are masked
    (0), and every other entry equals what the same tokens give with enough left padding in front."""
    import torch
    from conftest import tiny_causal_lm

    import mtprl

    model = tiny_causal_lm()
    mtprl.attach_mtp_heads(model, num_heads=2)
    ids = torch.tensor([[5, 7, 9, 11, 13], [6, 8, 10, 12, 14]])  # prompt = 1 token, 4 completion tokens
    short = mtprl.forward_logprobs(model, ids, None, 4)
    expected_context = torch.tensor([[False, True, True, True], [False, False, True, True]])
    assert torch.equal(short.mtp_mask[0], expected_context) and torch.equal(short.mtp_mask[1], expected_context)
    assert (short.mtp[~short.mtp_mask] == 0).all()
    padded_ids = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    padded_mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    padded = mtprl.forward_logprobs(model, padded_ids, padded_mask, 4)
    torch.testing.assert_close(short.main, padded.main, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded.mtp_mask, short.mtp_mask)
    torch.testing.assert_close(short.mtp, padded.mtp, atol=1e-5, rtol=1e-5)


def test_training_on_one_token_prompts(tmp_path):
    """The `logits_to_keep=...` error mid-training is gone: OCC trains on prompts shorter than K+1 tokens."""
    from datasets import Dataset

    model, tok = _small_model()
    args = MTPGRPOConfig(**dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=2, mtp_regime="occ",
                                max_steps=2, steps_per_generation=2))
    data = Dataset.from_list([{"prompt": p} for p in ["7", "9", "3", "1"] * 4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=args, train_dataset=data,
                                 processing_class=tok)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(math.isfinite(r["mtp/loss/2"]) for r in rows if "mtp/loss/2" in r)


def test_sync_ref_model_with_heads(tmp_path):
    """sync_ref_model mixes the policy into TRL's reference model every step through TRL's own callback: the
    reference gets a frozen copy of the starting heads, so its parameters are the policy's, name for name (what
    TRL's zip(strict=True) and its tests' ref_model.get_parameter(name) need), and after one step every one of them
    equals alpha * policy + (1 - alpha) * before, the heads included."""
    import copy

    import torch
    from trl.trainer.callbacks import SyncRefModelCallback

    import mtprl

    model, tok = _small_model()
    mtprl.attach_mtp_heads(model, num_heads=2)
    mtprl.save_pretrained(model, str(tmp_path / "start"), tokenizer=tok)
    model, tok = mtprl.load_pretrained(str(tmp_path / "start"))
    args = MTPGRPOConfig(**dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=2, mtp_regime="ce",
                                max_steps=1, beta=0.04, sync_ref_model=True, ref_model_sync_steps=1,
                                ref_model_mixup_alpha=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=args, train_dataset=_dataset(),
                                 processing_class=tok)
    assert any(type(c) is SyncRefModelCallback for c in trainer.callback_handler.callbacks)
    policy_start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ref_before = copy.deepcopy(dict(trainer.ref_model.named_parameters()))
    assert list(ref_before) == list(policy_start)
    for name, p in ref_before.items():
        assert torch.equal(p, policy_start[name]) or not name.startswith("mtp_heads."), name
        assert not p.requires_grad or not name.startswith("mtp_heads."), name
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    heads_moved = False
    for name, p in trainer.ref_model.named_parameters():
        expected = 0.5 * policy[name].detach() + 0.5 * ref_before[name].detach()
        torch.testing.assert_close(p.detach(), expected)
        heads_moved |= name.startswith("mtp_heads.") and not torch.equal(p, ref_before[name])
    assert heads_moved


TRL_LOSS_TYPES = [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"), ("cispo", "token"),
                  ("sapo", "token"), ("luspo", "sequence"), ("vespo", "token")]


@pytest.mark.parametrize("loss_type,level", TRL_LOSS_TYPES)
def test_head_policy_loss_equals_trls_loss_for_every_loss_type(tmp_path, loss_type, level):
    """The heads' policy loss for each loss type TRL 1.16 offers, given the main head's inputs, equals the loss
    stock GRPOTrainer computes for its main head on the same batch; TRL's metrics are not polluted by it."""
    import copy

    import torch
    from conftest import _crafted_inputs, _mtp_trainer
    from trl import GRPOConfig, GRPOTrainer

    import mtprl

    model, tok = _small_model()
    inputs = _crafted_inputs()
    inputs["old_per_token_logps"] = -torch.rand(8, 5) * 4  # off-policy: ratios move, some clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[digit_reward], train_dataset=_dataset(),
                            args=GRPOConfig(output_dir=str(tmp_path / "stock"), loss_type=loss_type,
                                            importance_sampling_level=level, **COMMON), processing_class=tok)
        trainer = _mtp_trainer(tmp_path, model=(model, tok), mtp_regime="policy", loss_type=loss_type,
                               importance_sampling_level=level)
    for t in (stock, trainer):
        t.model.train()
        t.current_gradient_accumulation_steps = 1
    ref = stock._compute_loss(stock.model, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    main = mtprl.forward_logprobs(trainer.model, ids, mask, 5).main
    before = {mode: dict(values) for mode, values in trainer._metrics.items()}
    ours = trainer.loss_scaling(inputs).policy_loss(main, inputs["old_per_token_logps"], inputs["advantages"],
                                                    inputs["completion_mask"])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert {mode: dict(values) for mode, values in trainer._metrics.items()} == before
    assert trainer.beta == 0.0 and "_get_per_token_logps_and_entropies" not in trainer.__dict__


def test_heads_train_with_a_loss_type_trl_added(tmp_path):
    import torch
    from conftest import _mtp_trainer

    trainer = _mtp_trainer(tmp_path, mtp_regime="policy", mtp_coef=1.0, loss_type="cispo", max_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("mtp_heads.")}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("loss_type,level", TRL_LOSS_TYPES)
def test_every_loss_type_trains_with_occ_when_trl_grpotrainer_is_rebound(tmp_path, monkeypatch, loss_type, level):
    """A harness that runs TRL's own tests against MTPGRPOTrainer rebinds `trl.GRPOTrainer` (here to a subclass of
    ours): the heads' loss must still go through TRL's own class (the base in the MRO), not the rebound name (that
    recursed into our `_compute_loss`). OCC at 2 updates per rollout, so lambda is non-zero on the second."""
    import torch
    import trl
    from conftest import _mtp_trainer

    from mtprl.training.trl_compat import trl_grpo_class

    class Rebound(MTPGRPOTrainer):
        pass

    monkeypatch.setattr(trl, "GRPOTrainer", Rebound)
    trainer = _mtp_trainer(tmp_path, mtp_regime="occ", loss_type=loss_type, importance_sampling_level=level,
                           steps_per_generation=2, max_steps=2, mtp_head_loss="none")
    assert trl_grpo_class(type(trainer)).__module__ == "trl.trainer.grpo_trainer"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("mtp_heads.")}
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"mtp/lambda/1"' in line]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["mtp/lambda/1"] == 0.0 and rows[1]["mtp/lambda/1"] != 0.0  # the first update sees no change
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the heads trained through their term


def test_moe_router_loss_with_heads_equals_trls(tmp_path):
    """A tiny Qwen3-MoE with its router load-balancing loss (router_aux_loss_coef 0.1): the loss and the trunk
    gradients with heads at mtp_coef 0 equal stock GRPOTrainer's, router loss included; the aux loss is logged."""
    import copy

    import torch
    from conftest import _crafted_inputs, _loss_and_grads
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    _, tok = _small_model()
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen3MoeForCausalLM(config)
    inputs = _crafted_inputs()
    inputs["old_per_token_logps"] = -torch.rand(8, 5) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=[digit_reward], train_dataset=_dataset(),
                            args=GRPOConfig(output_dir=str(tmp_path / "stock"), **COMMON), processing_class=tok)
        ours = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], train_dataset=_dataset(),
                              args=MTPGRPOConfig(output_dir=str(tmp_path / "ours"), mtp_num_heads=1,
                                                 mtp_regime="policy", mtp_coef=0.0, **COMMON),
                              processing_class=tok)
    assert stock.aux_loss_enabled and ours.aux_loss_enabled
    ref_loss, ref_grads = _loss_and_grads(stock, inputs)
    loss, grads = _loss_and_grads(ours, dict(inputs, old_mtp_logps=-torch.rand(8, 1, 5)))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    router = [n for n in ref_grads if "gate" in n and "mlp" in n]
    assert router  # the router weights get gradient (from the load-balancing loss and the experts' outputs)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
    assert ours._metrics["train"]["aux_loss"] == pytest.approx(stock._metrics["train"]["aux_loss"])


@pytest.mark.parametrize("family", ["cohere2", "nemotron_h"])
def test_heads_attach_to_layernorm_and_hybrid_families(family):
    """Cohere2 (LayerNorm, layer_norm_eps) and NemotronH (hybrid blocks) got an AttributeError from inside
    transformers; now they get heads whose log-probs are finite and do not depend on later tokens."""
    import torch
    from transformers import Cohere2Config, Cohere2ForCausalLM, NemotronHConfig, NemotronHForCausalLM

    import mtprl

    config_cls, model_cls = {"cohere2": (Cohere2Config, Cohere2ForCausalLM),
                             "nemotron_h": (NemotronHConfig, NemotronHForCausalLM)}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, eos_token_id=1, bos_token_id=2,
                                 pad_token_id=0)).eval()
    mtprl.attach_mtp_heads(model, num_heads=2)
    ids = torch.randint(3, 40, (2, 10))
    later = ids.clone()
    later[:, -1] = (ids[:, -1] + 1 - 3) % 37 + 3
    a = mtprl.forward_logprobs(model, ids, None, 5).mtp
    b = mtprl.forward_logprobs(model, later, None, 5).mtp
    assert torch.isfinite(a).all() and a.shape == (2, 2, 5)
    torch.testing.assert_close(a[..., :-1], b[..., :-1])  # no leak from the last token into earlier ones
    assert not torch.equal(a[..., -1], b[..., -1])  # the last token's own log-prob does change


def test_a_config_without_norm_epsilon_is_a_clear_error():
    import torch

    import mtprl
    from conftest import tiny_causal_lm

    model = tiny_causal_lm()
    model.config.__dict__["rms_norm_eps"] = None  # a config that does not say (bypassing validation)
    with pytest.raises(ValueError, match="qwen2: MTP heads need the norm epsilon"):
        mtprl.attach_mtp_heads(model)
    assert torch.is_tensor(next(model.parameters()))


@pytest.mark.parametrize("kind", ["ce", "distill", "tv"])
def test_head_only_term_trains_the_heads_even_when_lambda_is_zero(tmp_path, kind):
    """OCC at TRL's defaults (one optimizer step per rollout: delta_RL = 0, lambda = 0): without a head-only term the
    heads get no gradient; with mtp_head_loss they do, and the trunk's gradient is exactly TRL's (the term stops at
    the heads' inputs). The term equals the head CE / distillation KL computed on detached inputs."""
    import torch
    from conftest import _crafted_inputs, _loss_and_grads, _mtp_trainer

    import mtprl

    inputs = _crafted_inputs()  # no old log-probs: the first step after a rollout, lambda = 0
    grads = {}
    for name, extra in (("none", dict(mtp_head_loss="none")), ("with", dict(mtp_head_loss=kind, mtp_head_coef=0.5))):
        model, tok = _small_model()
        trainer = _mtp_trainer(tmp_path, name, model=(model, tok), mtp_regime="occ", **extra)
        _, grads[name] = _loss_and_grads(trainer, dict(inputs))
        assert trainer._metrics["train"]["mtp/lambda/1"][-1] == 0.0
    heads = [n for n in grads["with"] if n.startswith("mtp_heads.")]
    assert heads and not any(n.startswith("mtp_heads.") and g.abs().sum() > 0 for n, g in grads["none"].items())
    assert any(grads["with"][n].abs().sum() > 0 for n in heads)
    for name, g in grads["none"].items():  # the trunk sees TRL's gradient only
        if name.startswith("mtp_heads."):
            continue
        torch.testing.assert_close(grads["with"][name], g, atol=1e-7, rtol=1e-6, msg=name)
    # the logged term, recomputed independently from forward_logprobs with detached heads
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        out = mtprl.forward_logprobs(trainer.model, ids, mask, 5, mtp_grad="detach", compute_divergence="kl",
                                     compute_accept=True)
    m = inputs["completion_mask"].unsqueeze(1) * out.mtp_mask
    # tv: 1 - the expected acceptance sum_v min(p, q), from the acceptance code path, not the loss's
    per_token = {"ce": -out.mtp, "distill": out.divergence, "tv": 1 - out.accept}[kind]
    expected = [((per_token[:, k] * m[:, k]).sum() / m[:, k].sum()).item() for k in range(2)]
    logged = [trainer._metrics["train"][f"mtp/head_loss/{k}"][-1] for k in (1, 2)]
    assert logged == pytest.approx(expected, rel=1e-4)


def test_a_plain_grpo_config_is_accepted_as_is(tmp_path):
    """A TRL script passes its GRPOConfig unchanged: every field keeps the value TRL resolved (not re-derived, which
    would refuse generation_batch_size and steps_per_generation both set), the MTP fields take their defaults."""
    from dataclasses import fields

    from trl import GRPOConfig

    model, tok = _small_model()
    defaults = MTPGRPOConfig(**COMMON, output_dir=str(tmp_path / "d"))  # (a config resets accelerate's state)
    plain = GRPOConfig(**COMMON,
                       output_dir=str(tmp_path / "run"), max_steps=1, steps_per_generation=2)
    trainer = MTPGRPOTrainer(model=model, reward_funcs=digit_reward, args=plain, train_dataset=_dataset(),
                             processing_class=tok)
    assert type(trainer.args) is MTPGRPOConfig
    for f in fields(GRPOConfig):
        assert getattr(trainer.args, f.name) == getattr(plain, f.name), f.name
    assert trainer.args.generation_batch_size == plain.generation_batch_size == 2 * plain.per_device_train_batch_size
    for name in ("mtp_regime", "mtp_num_heads", "occ_variant", "mtp_head_loss", "mtp_draft_tokens"):
        assert getattr(trainer.args, name) == getattr(defaults, name), name
    trainer.train()
    assert any("mtp/lambda/1" in row for row in trainer.state.log_history)
    with pytest.raises(TypeError, match="GRPOConfig"):
        MTPGRPOTrainer(model=model, reward_funcs=digit_reward, args={"output_dir": "x"}, train_dataset=_dataset(),
                       processing_class=tok)


@pytest.mark.parametrize("loss_type,entropy_coef", [("cispo", 0.0), ("sapo", 0.0), ("luspo", 0.0), ("vespo", 0.0),
                                                    ("luspo", 0.5)])
def test_occ_trains_with_trls_own_loss_types_and_several_updates_per_rollout(tmp_path, loss_type, entropy_coef):
    """TRL's test_train_loss_types / test_entropy_bonus_scale settings with two updates per rollout and a reward
    *model* (a tiny Qwen2 sequence classifier): OCC trains (no 'ran 0 forwards' stop), lambda is non-zero on the
    second update of a rollout, and every parameter of the policy, heads included, moves."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    model, tok = _small_model()
    torch.manual_seed(1)
    reward_model = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id))
    kw = dict(COMMON, output_dir=str(tmp_path / loss_type), mtp_num_heads=1, mtp_regime="occ", loss_type=loss_type,
              importance_sampling_level="sequence" if loss_type == "luspo" else "token", learning_rate=0.1,
              per_device_train_batch_size=3, num_generations=3, max_completion_length=8, num_iterations=2,
              gradient_accumulation_steps=2, entropy_coef=entropy_coef, max_steps=3)
    trainer = MTPGRPOTrainer(model=model, reward_funcs=reward_model, args=MTPGRPOConfig(**kw),
                             train_dataset=_dataset(), processing_class=tok, reward_processing_classes=[tok])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    lambdas = [row["mtp/lambda/1"] for row in trainer.state.log_history if "mtp/lambda/1" in row]
    assert len(lambdas) == 3 and any(lam != 0.0 for lam in lambdas)
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(before[n], p)]
    assert not unchanged, unchanged


def test_the_drop_in_trains_the_heads_at_trls_defaults_and_says_how(tmp_path):
    """A plain GRPOConfig (one optimizer step per rollout) under the default occ: lambda = 0, so mtp_head_loss=auto
    picks the head-only ce term and the warning says so; set explicitly, nothing is chosen and nothing warns;
    with several updates per rollout auto keeps OCC alone."""
    import torch
    from trl import GRPOConfig

    def heads_moved(trainer):
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n.startswith("mtp_heads.")}
        trainer.train()
        return all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if n in before)

    model, tok = _small_model()
    plain = GRPOConfig(output_dir=str(tmp_path / "a"), max_steps=1, **COMMON)
    with pytest.warns(UserWarning, match="mtp_head_loss=auto chose ce"):
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=plain, train_dataset=_dataset(),
                                 processing_class=tok)
    assert trainer.head_loss == "ce" and heads_moved(trainer)
    assert all(row.get("mtp/lambda/1", 0.0) == 0.0 for row in trainer.state.log_history)  # OCC itself untouched

    model, tok = _small_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], train_dataset=_dataset(),
                                 processing_class=tok, args=MTPGRPOConfig(output_dir=str(tmp_path / "b"), max_steps=1,
                                                                          mtp_head_loss="none", **COMMON))
    assert trainer.head_loss == "none" and not any("OCC cannot see" in str(w.message) for w in caught)
    several = MTPGRPOConfig(output_dir=str(tmp_path / "c"), max_steps=1, steps_per_generation=2, **COMMON)
    model, tok = _small_model()
    assert MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=several, train_dataset=_dataset(),
                          processing_class=tok).head_loss == "none"
