"""What `mtprl sft` trains on: `sft_completions` (prompt + the reference answer, the full warm start) and
`self_distillation_data` (prompt + the model's own sampled completion, `--mtp_only`: the heads learn what the
policy predicts, on the policy's own text)."""

from __future__ import annotations

import json
import os

from ..io.callbacks import phase
from ..io.jsonl import atomic_write_text


def self_distillation_data(model, tokenizer, train_ds, cfg, draft=None):
    """prompt + the model's own sampled completion, for `sft --mtp_only`: the heads learn what the policy
    predicts, on the policy's own text. Kept in `<output_dir>/self_distillation.jsonl`, so that a resumed warm-up
    trains on the same text without sampling it again (minutes on a real model). `draft`: the heads draft the
    samples (`experiment.draft_policy`)."""
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


# `answer_format`: what a warm-start completion holds before its answer
ANSWER_FORMATS = ("answer", "working")


def working(expression: str, answer: str, where: str = "row") -> str:
    """A chain sum's running total written out, one operation a line, then the answer: '4 - 1 - 7' ->
    '4 - 1 = 3\n3 - 7 = -4\nAnswer: -4' (`extract_answer` reads what follows the last 'Answer:'). Checked against
    the reference answer, so a misparsed expression fails loudly instead of teaching a wrong sum."""
    parts = expression.split()
    if len(parts) < 3 or len(parts) % 2 == 0 or any(op not in "+-" for op in parts[1::2]):
        raise ValueError(f"answer_format=working: {where}: expression {expression!r} is not a chain sum "
                         "('a + b - c ...')")
    total, lines = int(parts[0]), []
    for op, term in zip(parts[1::2], parts[2::2]):
        new = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{total} {op} {term} = {new}")
        total = new
    if str(total) != str(answer).strip():
        raise ValueError(f"answer_format=working: {where}: {expression!r} sums to {total}, the reference answer "
                         f"is {answer!r}")
    return "\n".join(lines) + f"\nAnswer: {answer}"


def _working_completion(row: dict, index: int) -> str:
    expression = json.loads(row.get("metadata") or "{}").get("expression")
    if expression is None:
        raise ValueError(f"answer_format=working: train row {index} has no 'expression' in its metadata (the working "
                         "format writes out reasoning_gym chain_sum sums; use answer_format=answer for other tasks)")
    return working(expression, row["answer"], where=f"train row {index}")


def sft_completions(train_ds, suffix_fraction: float, seed: int, answer_format: str = "answer"):
    """prompt + the reference completion: the answer (`answer`) or the chain sum's working and then the answer
    (`working`); a seeded `suffix_fraction` of them end in '!' (`answer_suffix_fraction`: an answer format the
    verifier does not fully accept)."""
    import numpy as np

    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")
    suffixed = np.random.default_rng(seed).random(len(train_ds)) < suffix_fraction
    body = _working_completion if answer_format == "working" else (lambda r, i: r["answer"])
    return train_ds.map(lambda r, i: {"completion": body(r, i) + ("!" if suffixed[i] else "")},
                        with_indices=True).select_columns(["prompt", "completion"])

