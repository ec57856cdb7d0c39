import pytest
import torch
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
