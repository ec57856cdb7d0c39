"""The frozen-head baseline (`mtp_regime: frozen`), heads from another warm-up (`mtp_heads_from`), the warm-up's
own objective (`sft --mtp_only_loss`), completions long enough to draft (`answer_format: working`) and the held-out
KL that says how far RL moved the policy (`mtprl.analysis.policy_shift`)."""

import json
import os
import warnings

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import mtprl
from conftest import _mtp_trainer, _small_model
from mtprl.training.config import MTPGRPOConfig
from mtprl.analysis.policy_shift import completion_kl, held_out_kl, next_token_kl
from mtprl.data.sft_data import sft_completions, working
from mtprl.data.scoring import extract_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model_with_heads(seed=0):
    model, tok = _small_model()
    torch.manual_seed(seed)
    mtprl.attach_mtp_heads(model, 2, init="random")
    return model, tok


def test_frozen_heads_keep_their_weights_and_the_trunk_trains_exactly_as_plain_grpo(tmp_path):
    """Same model, seed and rollouts (no drafting): the trunk after 2 steps of `frozen` equals `none` bit for bit,
    the heads are untouched and hold no optimizer state."""
    runs = {}
    for regime in ("none", "frozen"):
        model, tok = _model_with_heads()
        heads_before = {n: p.detach().clone() for n, p in model.mtp_heads.named_parameters()}
        trainer = _mtp_trainer(tmp_path, name=regime, model=(model, tok), mtp_regime=regime, max_steps=2,
                               steps_per_generation=2, weight_decay=0.1)
        trainer.train()
        runs[regime] = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("mtp_heads.")}
        if regime == "frozen":
            assert all(torch.equal(p, heads_before[n]) for n, p in model.mtp_heads.named_parameters())
            optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            assert not any(id(p) in optimized for p in model.mtp_heads.parameters())
    start, _ = _model_with_heads()
    moved = [n for n, p in runs["none"].items() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert moved  # the policy did train
    for name, p in runs["none"].items():
        assert torch.equal(p, runs["frozen"][name]), name


def test_frozen_heads_draft_every_rollout(tmp_path):
    model, tok = _model_with_heads()
    heads_before = {n: p.detach().clone() for n, p in model.mtp_heads.named_parameters()}
    trainer = _mtp_trainer(tmp_path, model=(model, tok), mtp_regime="frozen", max_steps=2, steps_per_generation=1,
                           mtp_draft_tokens=2, mtp_draft_policy="fixed")
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    drafted = [r for r in rows if "rollout/spec_accept_length" in r]
    assert len(drafted) == 2 and all(r["rollout/draft_tokens"] == 2.0 for r in drafted)
    assert all(1.0 <= r["rollout/spec_accept_length"] <= 3.0 for r in drafted)
    assert all(torch.equal(p, heads_before[n]) for n, p in model.mtp_heads.named_parameters())


def test_frozen_and_none_name_the_fields_that_contradict_them(tmp_path):
    common = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, mtp_num_heads=2)
    with pytest.raises(ValueError, match="mtp_head_loss=tv trains the heads, which mtp_regime=frozen"):
        MTPGRPOConfig(mtp_regime="frozen", mtp_head_loss="tv", **common)
    with pytest.raises(ValueError, match="use mtp_regime=frozen"):
        MTPGRPOConfig(mtp_regime="none", mtp_draft_tokens=2, **common)
    assert MTPGRPOConfig(mtp_regime="frozen", mtp_draft_tokens=2, **common).mtp_draft_tokens == 2


def test_a_run_takes_its_heads_from_another_warm_up_and_a_frozen_run_saves_them_unchanged(tmp_path, capsys):
    from mtprl.cli import main
    from mtprl.model.loading import char_tokenizer, tiny_model

    tok = char_tokenizer()
    for name, seed, num_heads in (("base", 0, 2), ("other", 1, 2), ("one", 2, 1)):
        model = tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
        torch.manual_seed(seed)
        mtprl.attach_mtp_heads(model, num_heads, init="random")
        mtprl.save_pretrained(model, str(tmp_path / name), tokenizer=tok)

    def train(run, heads_from):
        return main(["train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--task", "reasoning_gym:chain_sum",
                     "--task_config", '{"min_terms": 2, "max_terms": 2}', "--train_size", "16", "--eval_size", "4",
                     "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
                     "--model_name_or_path", str(tmp_path / "base"), "--output_dir", str(tmp_path / run),
                     "--per_device_train_batch_size", "8", "--num_generations", "4", "--steps_per_generation", "1",
                     "--max_steps", "1", "--mtp_num_heads", "2", "--mtp_regime", "frozen", "--mtp_draft_tokens", "2",
                     "--eval_after", "false", "--eval_before", "false", "--mtp_heads_from", str(tmp_path / heads_from)])

    assert train("run", "other") == 0
    saved, other, base = (load_file(str(tmp_path / d / "mtp_heads.safetensors")) for d in ("run", "other", "base"))
    assert set(saved) == set(other) and all(torch.equal(saved[k], other[k]) for k in saved)
    assert any(not torch.equal(saved[k], base[k]) for k in saved)  # not the model's own heads
    assert json.load(open(tmp_path / "run" / "run_info.json"))["mtp_heads_from"] == str(tmp_path / "other")
    assert train("run1", "one") != 0
    assert "one/mtp_heads.safetensors does not match 2 MTP head(s): missing ['layers.1." in capsys.readouterr().err


# ------------------------------------------------------------------------------------ answer_format: working

@pytest.mark.parametrize("expression,answer,lines", [
    ("4 - 1 - 7", "-4", ["4 - 1 = 3", "3 - 7 = -4", "Answer: -4"]),
    ("0 - 4 - 8 + 7", "-5", ["0 - 4 = -4", "-4 - 8 = -12", "-12 + 7 = -5", "Answer: -5"]),
    ("9 + 9", "18", ["9 + 9 = 18", "Answer: 18"]),
])
def test_working_writes_the_running_sum_and_the_answer_the_verifier_reads(expression, answer, lines):
    text = working(expression, answer)
    assert text.split("\n") == lines
    assert extract_answer(text) == answer and extract_answer(text + "!") == answer + "!"


def test_working_refuses_what_it_cannot_write_and_names_the_row():
    with pytest.raises(ValueError, match="sums to -4, the reference answer is '5'"):
        working("4 - 1 - 7", "5")
    with pytest.raises(ValueError, match="not a chain sum"):
        working("4 * 1", "4")
    rows = Dataset.from_list([{"prompt": "p", "answer": "3", "metadata": json.dumps({"expression": "1 + 2"})},
                              {"prompt": "q", "answer": "2", "metadata": "{}"}])
    with pytest.raises(ValueError, match="train row 1 has no 'expression'"):
        sft_completions(rows, 0.0, 0, "working")


def test_working_completions_of_chain_sums_are_long_enough_to_draft():
    from mtprl.data.tasks import load_task_splits

    train, _ = load_task_splits("reasoning_gym:chain_sum", 200, 0, 0,
                                min_terms=3, max_terms=4, min_digits=1, max_digits=1)
    done = sft_completions(train, 0.5, 0, "working")
    lengths = [len(c) for c in done["completion"]]
    assert min(lengths) >= 20 and sum(lengths) / len(lengths) >= 28
    suffixed = [c.endswith("!") for c in done["completion"]]
    assert 0.35 < sum(suffixed) / len(suffixed) < 0.65
    for row, completion in zip(train, done["completion"]):
        assert extract_answer(completion).rstrip("!") == row["answer"]


# ------------------------------------------------------------------------------------ sft --mtp_only_loss

@pytest.mark.parametrize("head_loss,metric", [("tv", "mtp/tv/1"), ("ce", "mtp/loss/1")])
def test_the_head_warm_up_trains_its_own_objective_and_leaves_the_main_model(tmp_path, head_loss, metric):
    from mtprl import MTPSFTConfig, MTPSFTTrainer

    model, tok = _small_model()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    mtprl.attach_mtp_heads(model, 1, init="random")
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    data = Dataset.from_list([{"prompt": p, "completion": str(eval(p[:-1]))} for p in prompts])
    main_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("mtp_heads.")}
    args = MTPSFTConfig(output_dir=str(tmp_path / "sft"), mtp_only=True, mtp_only_loss=head_loss, mtp_num_heads=1,
                        max_steps=30, per_device_train_batch_size=16, learning_rate=3e-3, logging_steps=5,
                        report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_length=32, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.train()
    assert all(torch.equal(p, main_before[n]) for n, p in model.named_parameters() if not n.startswith("mtp_heads."))
    rows = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    values = [r[metric] for r in rows if metric in r]
    assert len(values) >= 3 and values[-1] < values[0]
    losses = [r["loss"] for r in rows if "loss" in r and metric in r]
    assert abs(losses[-1] - values[-1]) < 1e-4  # the loss trained on is that objective (one head: its mean)
    with pytest.raises(ValueError, match="mtp_only_loss"):
        MTPSFTConfig(output_dir=str(tmp_path), mtp_only=True, mtp_only_loss="kl", use_cpu=True, report_to=[])


# ------------------------------------------------------------------------------------ policy_shift

def test_next_token_kl_is_torchs_kl_divergence():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a),
                                             torch.distributions.Categorical(logits=b))
    assert torch.allclose(next_token_kl(a, b), want, atol=1e-6)
    assert next_token_kl(a, a).abs().max() < 1e-6


def _exact_two_token_kl(end, start, ids, eos):
    """KL(p_end || p_start) over every completion of at most 2 tokens (EOS ends one), by enumeration."""
    with torch.no_grad():
        first_end, first_start = end(input_ids=ids).logits[0, -1], start(input_ids=ids).logits[0, -1]
        p1 = torch.softmax(first_end.double(), -1)
        total = next_token_kl(first_end, first_start).double()
        vocab = p1.numel()
        seqs = torch.cat([ids.repeat(vocab, 1), torch.arange(vocab).unsqueeze(1)], 1)
        second = next_token_kl(end(input_ids=seqs).logits[:, -1], start(input_ids=seqs).logits[:, -1]).double()
        second[eos] = 0.0  # a completion that ended at its first token has no second position
        return (total + (p1 * second).sum()).item()


def test_held_out_kl_is_unbiased_for_the_sequence_kl_and_sampling_from_the_start_policy_is_not():
    """Completions of at most 2 tokens: the exact KL by enumeration of the first token; the estimator's mean over 3000
    completions within 4 standard errors of it, and the same estimator with completions sampled from the *start*
    policy (the wrong law) far outside."""
    (end, tok), (start, _) = _small_model(seed=0), _small_model(seed=1)
    with torch.no_grad():  # peaked, different next-token laws (random tiny models are near uniform and near alike)
        for m in (end, start):
            m.get_output_embeddings().weight.mul_(10.0)
    prompt = "1+2=\nAnswer: "
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    exact = _exact_two_token_kl(end, start, ids, tok.eos_token_id)
    got = held_out_kl(end, start, tok, [prompt] * 30, k=100, max_new_tokens=2, seed=0)
    assert got["completions"] == 3000
    assert abs(got["kl_per_completion"] - exact) < 4 * got["kl_per_completion_se"], (got, exact)
    same = held_out_kl(start, start, tok, [prompt] * 30, k=100, max_new_tokens=2, seed=0)  # a model against itself
    assert same["kl_per_completion"] < 1e-6
    # the broken variant: the end policy's KL, but on completions the start policy wrote
    torch.manual_seed(0)
    with torch.no_grad():
        seqs = start.generate(input_ids=ids.repeat(3000, 1), attention_mask=torch.ones_like(ids).repeat(3000, 1),
                              do_sample=True, top_k=0, max_new_tokens=2, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    from mtprl.data.evaluation import completion_mask
    mask = completion_mask(seqs, torch.ones_like(ids).repeat(3000, 1), tok.eos_token_id)
    broken = completion_kl(end, start, seqs, mask, seqs.shape[1] - ids.shape[1]).double()
    se = broken.std() / len(broken) ** 0.5
    assert abs(broken.mean().item() - exact) > 4 * max(se.item(), got["kl_per_completion_se"]), (broken.mean(), exact)
