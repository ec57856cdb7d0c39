import warnings

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

VOCAB = 40

_FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_causal_lm(family: str = "qwen2", seed: int = 0, **overrides):
    """A random tiny causal LM of a real transformers architecture (float32, sdpa attention, eval mode)."""
    config_cls, model_cls = _FAMILIES[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    return model.eval()


@pytest.fixture
def make_model():
    return tiny_causal_lm


def noisy_cycle_batch(batch: int, length: int, vocab: int, noise: float, generator: torch.Generator):
    """Token sequences that walk the cycle 2, 3, ..., vocab-1 with a random start, each token replaced by a random
    one with probability `noise`: a language whose next tokens a small model and its MTP heads can learn, with
    enough randomness that speculative sampling rejects some drafts."""
    start = torch.randint(0, vocab - 2, (batch, 1), generator=generator)
    ids = 2 + (start + torch.arange(length)) % (vocab - 2)
    flip = torch.rand(batch, length, generator=generator) < noise
    return torch.where(flip, torch.randint(2, vocab, (batch, length), generator=generator), ids)


def trained_drafter(num_heads: int = 2, steps: int = 120, noise: float = 0.15, seed: int = 0, **overrides):
    """A tiny Qwen2 whose trunk and MTP heads were trained together (main CE + heads CE) on `noisy_cycle_batch`:
    its heads draft well (acceptance ~0.6-0.9), so speculative sampling accepts, rejects and ends rows raggedly."""
    import mtprl

    model = tiny_causal_lm("qwen2", seed=seed, **overrides).train()
    mtprl.attach_mtp_heads(model, num_heads=num_heads)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    keep = 30
    for _ in range(steps):
        ids = noisy_cycle_batch(16, keep + num_heads + 2, model.config.vocab_size, noise, g)
        out = mtprl.forward_logprobs(model, ids, None, keep)
        loss = -out.main.mean() - out.mtp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ------------------------------------------------------------------ MTPGRPOTrainer on the tiny preset (real TRL)
PROMPTS = ["12+3=", "7-4=", "20+22=", "9+9=", "31-5=", "8+14=", "40-1=", "6+6="]


def digit_reward(completions, **kwargs):
    """A real, deterministic reward with spread: the fraction of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def _dataset():
    return Dataset.from_list([{"prompt": p} for p in PROMPTS * 4])


def _small_model(seed=0):
    from mtprl.model.loading import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model = tiny_model(tok, seed=seed, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return model, tok


COMMON = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=6, learning_rate=1e-3,
              logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", beta=0.0, seed=0,
              lr_scheduler_type="constant", bf16=False)


def _mtp_trainer(tmp_path, name="run", model=None, **overrides):
    from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer

    model, tok = model if model is not None else _small_model()
    kw = dict(COMMON, output_dir=str(tmp_path / name), mtp_num_heads=2)
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=MTPGRPOConfig(**kw),
                              train_dataset=_dataset(), processing_class=tok)


def _crafted_inputs(seed=0, batch=8, prompt_len=6, comp_len=5, vocab=99, heads=2, drift=0.0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(3, vocab, (batch, comp_len), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, -2:] = 0
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.randn(batch, generator=g),
              "num_items_in_batch": completion_mask.sum()}
    return inputs


def _with_old_logprobs(trainer, inputs, drift=0.3, seed=1):
    """Old log-probs as if the policy had moved since the rollout: current ones minus a random drift."""
    import mtprl

    model = trainer.model
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = mtprl.forward_logprobs(model, ids, mask, inputs["completion_ids"].shape[1])
    inputs = dict(inputs)
    inputs["old_per_token_logps"] = out.main - drift * torch.rand(out.main.shape, generator=g)
    inputs["old_mtp_logps"] = out.mtp - drift * torch.rand(out.mtp.shape, generator=g)
    return inputs


def _loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by the train loop
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    from mtprl.training.trainer import MTPGRPOTrainer

    if isinstance(trainer, MTPGRPOTrainer):
        trainer.finish_backward()  # what training_step does after the backward (occ exact adds lambda * g_MTP)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads
