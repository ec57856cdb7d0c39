"""What `mtprl sft` trains on: `sft_completions` (prompt + the reference answer, the full warm start) and
`self_distillation_data` (prompt + the model's own sampled completion, `--mtp_only`: the heads learn what the
policy predicts, on the policy's own text)."""

from __future__ import annotations

import json
import os

from .callbacks import phase
from .jsonl import atomic_write_text


def self_distillation_data(model, tokenizer, train_ds, cfg, draft=None):
    """prompt + the model's own sampled completion, for `sft --mtp_only`: the heads learn what the policy
    predicts, on the policy's own text. Kept in `<output_dir>/self_distillation.jsonl`, so that a resumed warm-up
    trains on the same text without sampling it again (minutes on a real model). `draft`: the heads draft the
    samples (`cli.draft_policy`)."""
    from datasets import Dataset

    from .evaluation import sample_completions

    path = os.path.join(cfg.output_dir, "self_distillation.jsonl")
    if os.path.isfile(path):
        phase(f"sft --mtp_only: reusing the self-sampled completions in {path}")
        with open(path) as f:
            return Dataset.from_list([json.loads(line) for line in f if line.strip()])
    phase(f"sft --mtp_only: sampling {len(train_ds)} completions of up to {cfg.mtp_only_max_new_tokens} tokens "
          "from the model itself")
    prompts = list(train_ds["prompt"])
    texts = sample_completions(model, tokenizer, prompts, max_new_tokens=cfg.mtp_only_max_new_tokens, seed=cfg.seed,
                               draft=draft)
    rows = [{"prompt": p, "completion": [{"role": "assistant", "content": t}] if isinstance(p, list) else t}
            for p, t in zip(prompts, texts) if t.strip()]
    os.makedirs(cfg.output_dir, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return Dataset.from_list(rows)


def sft_completions(train_ds, suffix_fraction: float, seed: int):
    """prompt + the reference answer as the completion; a seeded `suffix_fraction` of them written '<answer>!'
    (`answer_suffix_fraction`: an answer format the verifier does not fully accept)."""
    import numpy as np

    suffixed = np.random.default_rng(seed).random(len(train_ds)) < suffix_fraction
    return train_ds.map(lambda r, i: {"completion": r["answer"] + ("!" if suffixed[i] else "")},
                        with_indices=True).select_columns(["prompt", "completion"])

