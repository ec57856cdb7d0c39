"""Offline stand-ins for the Hub repositories TRL's GRPO tests load: tiny random models under the
`trl-internal-testing/...` ids, written into a Hugging Face hub cache (so `from_pretrained("trl-internal-testing/X")`
resolves offline exactly as it would after a download), and the `zen` datasets built by TRL's own
`scripts/generate_zen_dataset.py` and saved to disk.

Sizes follow TRL's `scripts/generate_tiny_models` (hidden 8, 2 layers, bf16; reward models hidden 16, one label).
The tokenizer is SmolLM2's (the one real tokenizer this machine has, `make smollm2`) with the family's chat
template from TRL's own `trl/chat_templates/` where TRL ships one: real BPE tokens, so one-word prompts are one
or two tokens as with the real tokenizers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ORG = "trl-internal-testing"
SMALL = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)
REWARD = dict(SMALL, hidden_size=16, num_labels=1)

# hub id suffix -> (transformers class, config kwargs, chat template file in trl/chat_templates or None = ChatML)
MODELS = {
    "tiny-Qwen2ForCausalLM-2.5": ("Qwen2ForCausalLM", SMALL, "qwen2_5.jinja"),
    "tiny-Qwen2ForSequenceClassification-2.5": ("Qwen2ForSequenceClassification", REWARD, "qwen2_5.jinja"),
    "tiny-Qwen3ForCausalLM": ("Qwen3ForCausalLM", SMALL, "qwen3.jinja"),
    "tiny-Qwen3ForSequenceClassification": ("Qwen3ForSequenceClassification", REWARD, "qwen3.jinja"),
    "tiny-Qwen3MoeForCausalLM": ("Qwen3MoeForCausalLM", dict(SMALL, num_experts=4, num_experts_per_tok=2,
                                                              norm_topk_prob=True), "qwen3.jinja"),
    "tiny-LlamaForCausalLM-3.2": ("LlamaForCausalLM", SMALL, "llama3_2.jinja"),
    "tiny-LlamaForSequenceClassification-3.2": ("LlamaForSequenceClassification", REWARD, "llama3_2.jinja"),
    "tiny-MistralForCausalLM-0.2": ("MistralForCausalLM", SMALL, None),
    "tiny-Gemma2ForCausalLM": ("Gemma2ForCausalLM", SMALL, "gemma.jinja"),
    "tiny-Cohere2ForCausalLM": ("Cohere2ForCausalLM", dict(SMALL, logit_scale=1.0, use_embedding_sharing=True),
                                "cohere2.jinja"),
    "tiny-Glm4MoeForCausalLM": ("Glm4MoeForCausalLM", dict(SMALL, moe_intermediate_size=32, head_dim=2,
                                                           n_routed_experts=4, num_experts_per_tok=2,
                                                           use_qk_norm=True), "glm4moe.jinja"),
    "tiny-GptOssForCausalLM": ("GptOssForCausalLM", dict(SMALL, num_local_experts=4, num_experts_per_tok=2),
                               "gptoss.jinja"),
    "tiny-NemotronHForCausalLM-nano": ("NemotronHForCausalLM", dict(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
        layers_block_type=["mamba", "attention", "moe"], mamba_num_heads=8, mamba_head_dim=4, mamba_n_groups=1,
        ssm_state_size=16, mamba_d_conv=4, mamba_expand=2, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, use_mamba_kernels=False),
        "nemotron_3_nano.jinja"),
}
SNAPSHOT = "0" * 40  # the commit hash the stand-ins live under in the hub cache


def _write_to_hub_cache(hub_cache: Path, repo_id: str, kind: str, src: Path) -> None:
    repo_dir = hub_cache / f"{kind}s--{repo_id.replace('/', '--')}"
    snap = repo_dir / "snapshots" / SNAPSHOT
    if snap.exists():
        shutil.rmtree(snap)
    shutil.copytree(src, snap)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(SNAPSHOT)


def build_models(hub_cache: Path, tokenizer_dir: str, only: set[str] | None = None) -> list[str]:
    """Write each stand-in (random weights, seed 0) into `hub_cache`; returns the hub ids written."""
    import tempfile

    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, GenerationConfig

    templates = Path(trl.__file__).parent / "chat_templates"
    written = []
    for name, (cls_name, kwargs, template) in MODELS.items():
        repo_id = f"{ORG}/{name}"
        if only is not None and repo_id not in only:
            continue
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        if template is not None:
            tok.chat_template = (templates / template).read_text(encoding="utf-8")
        cls = getattr(transformers, cls_name)
        ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = cls(cls.config_class(**ids, **kwargs)).to(torch.bfloat16)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if "CausalLM" in cls_name:
                GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id).save_pretrained(tmp)
            _write_to_hub_cache(hub_cache, repo_id, "model", Path(tmp))
        written.append(repo_id)
    return written


def build_zen(trl_src: Path, out_dir: Path) -> list[str]:
    """Run TRL's own scripts/generate_zen_dataset.py with its push replaced by a save to `out_dir/<config>`."""
    import importlib.util

    from datasets import DatasetDict, disable_progress_bars

    disable_progress_bars()
    saved = []

    def save(self, repo_id, config_name="default", **_):
        self.save_to_disk(str(out_dir / config_name))
        saved.append(config_name)

    spec = importlib.util.spec_from_file_location("generate_zen_dataset", trl_src / "scripts/generate_zen_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = DatasetDict.push_to_hub
    DatasetDict.push_to_hub = save
    try:
        module.main(0.1, True, f"{ORG}/zen")
    finally:
        DatasetDict.push_to_hub = original
    (out_dir / "configs.json").write_text(json.dumps(saved))
    return saved


def load_zen(zen_dir: str, name: str | None = None, split: str | None = None, streaming: bool = False, **_):
    """`load_dataset("trl-internal-testing/zen", name, split=..., streaming=...)` from the saved stand-in."""
    from datasets import load_from_disk

    path = os.path.join(zen_dir, name or "default")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"zen stand-in has no config {name!r} under {zen_dir}")
    data = load_from_disk(path)
    if streaming:
        from datasets import IterableDatasetDict

        data = IterableDatasetDict({k: v.to_iterable_dataset() for k, v in data.items()})
    return data if split is None else data[split]
