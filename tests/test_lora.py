"""LoRA through the command line as TRL's users run it (`--use_peft --lora_r --lora_target_modules`): the trunk
adapted, the heads outside PEFT and trained in full, the adapter and heads saved, resumed, evaluated and exported
as a merged model with its heads (`mtprl.model.lora`)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mtprl.cli import main
from mtprl.model.loading import load_model

pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = ["--task", "reasoning_gym:chain_sum", "--task_config",
        '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}', "--train_size", "64",
        "--eval_size", "8", "--eval_k", "2", "--eval_max_new_tokens", "4"]
TINY = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--logging_steps", "1"]
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.0",
        "--lora_target_modules", "q_proj", "v_proj"]


def _base(tmp_path):
    """A small base checkpoint on disk (a LoRA adapter names its base model) with no heads of its own."""
    from mtprl.model.loading import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model = tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    path = str(tmp_path / "base")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _train(base, run, *extra):
    return main(["train", "--config", os.path.join(ROOT, "configs", "tiny.yaml"), *TASK, *TINY, *LORA,
                 "--model_name_or_path", base, "--output_dir", run, "--per_device_train_batch_size", "8",
                 "--num_generations", "4", "--steps_per_generation", "1", "--save_steps", "1",
                 "--mtp_num_heads", "2", "--mtp_regime", "ce", "--mtp_coef", "1.0", "--learning_rate", "1e-2", "--eval_after", "false",
                 *extra])


def _adapter_and_heads(path):
    return load_file(os.path.join(path, "adapter_model.safetensors")), load_file(os.path.join(path, "mtp_heads.safetensors"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    base = _base(tmp)
    run = str(tmp / "run")
    assert _train(base, run, "--max_steps", "2") == 0
    return base, run


def test_a_lora_run_saves_the_adapter_and_the_heads_trained_in_full(lora_run):
    base, run = lora_run
    assert os.path.isfile(os.path.join(run, "adapter_config.json"))
    assert not os.path.isfile(os.path.join(run, "model.safetensors"))  # the base stays where it is
    adapter, heads = _adapter_and_heads(run)
    assert adapter and all("lora_" in k for k in adapter)
    assert not any("mtp_heads" in k for k in adapter)  # LoRA's q_proj / v_proj did not match the heads' layers
    assert not any("lora" in k or "base_layer" in k for k in heads)
    # (ce: the MTP term reaches the trunk through the adapter, so lora_B moves without reward variance)
    # the heads trained: fresh heads copy the base's last layer (copy_last_layer); after 2 steps they differ
    fresh, _ = load_model(base, num_heads=2)
    start = {k[len("mtp_heads."):]: v for k, v in fresh.state_dict().items() if k.startswith("mtp_heads.")}
    assert set(start) == set(heads)
    assert any(not torch.equal(start[k], heads[k]) for k in heads)
    # the base weights were not touched (only the adapter and the heads train)
    base_model, _ = load_model(base, num_heads=2)
    saved_base = load_file(os.path.join(base, "model.safetensors"))
    assert all(torch.equal(base_model.state_dict()[k], v) for k, v in saved_base.items())


def test_the_merged_run_computes_what_the_adapted_model_does_and_carries_its_heads(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, run = lora_run
    merged, _ = load_model(run)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run).eval()
    ids = torch.randint(4, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged.eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    lora_b = [v for k, v in load_file(os.path.join(run, "adapter_model.safetensors")).items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b)  # the adapter moved, so the equality is not the base's
    _, heads = _adapter_and_heads(run)
    assert all(torch.equal(merged.mtp_heads.state_dict()[k], v) for k, v in heads.items())


def test_eval_with_drafting_and_export_of_a_lora_run(lora_run, tmp_path):
    _, run = lora_run
    out = str(tmp_path / "eval.json")
    assert main(["eval", *TASK, "--model_name_or_path", run, "--eval_output", out, "--mtp_draft_tokens", "2"]) == 0
    result = json.load(open(out))
    assert result["num_questions"] == 8 and 0.0 <= result["avg@2"] <= 1.0
    assert result["rollout/draft_tokens"] == 2.0 and result["rollout/spec_accept_length"] >= 1.0  # drafted
    exported = str(tmp_path / "export")
    assert main(["export", "--model_name_or_path", run, "--output_dir", exported, "--format", "mtprl"]) == 0
    merged, _ = load_model(run)
    again, _ = load_model(exported)  # a plain mtprl checkpoint: the merged main model and the heads
    for (n, a), (m, b) in zip(merged.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(a, b), n


def test_a_lora_run_resumes_its_adapter_and_heads_bit_for_bit(lora_run, tmp_path):
    """Resumed from the run's checkpoint-1 (adapter, heads, optimizer), step 2 lands where the uninterrupted run did."""
    base, run = lora_run
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(run, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    assert _train(base, resumed, "--max_steps", "2", "--resume_from_checkpoint", "true") == 0
    for a, b in zip(_adapter_and_heads(run), _adapter_and_heads(resumed)):
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    start, _ = _adapter_and_heads(os.path.join(run, "checkpoint-1"))
    end, _ = _adapter_and_heads(run)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # step 2 did move the adapter
