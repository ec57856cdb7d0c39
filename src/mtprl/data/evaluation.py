"""avg@k and pass@k with the paper's sampling (temperature 1.0, top-p 0.7; App. D).

avg@k: the fraction of all k samples per question that are correct (the paper's avg@32).
pass@k: the fraction of questions with at least one correct sample among its k.
A sample is correct when the task's scorer gives full credit (reasoning-gym's partial credit is not a pass).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from ..generation.draft_vocab import generated_mask
from ..model.eval_mode import evaluating
from ..io.jsonl import atomic_write_json
from ..model.logprobs import forward_logprobs
from ..generation.rollout import merged_rollout_metrics, repeat_rows, sample_with_heads
from ..generation.speculative import logits_warpers
from .prompts import prompt_text
from .scoring import TaskReward


def completion_mask(sequences, prompt_mask, eos_token_id):
    """Attention mask of prompt + completion with the tokens after the first EOS masked out (they are padding)."""
    generated = generated_mask(sequences, prompt_mask.shape[1], eos_token_id)
    return torch.cat([prompt_mask, generated.to(prompt_mask.dtype)], dim=1)


def score_completions(reward: TaskReward, rows, texts, k: int) -> list[list[float]]:
    """Per row of a dataset slice, the scores of its k completions (`texts` in row order); a scorer that raises
    scores 0 and is counted in `reward.failures`."""
    out = []
    for i in range(len(rows["prompt"])):
        task = rows["task"][i] if "task" in rows else "jsonl:"
        meta = rows["metadata"][i] if "metadata" in rows else "{}"
        scores = []
        for completion in texts[i * k:(i + 1) * k]:
            try:
                scores.append(reward.score(completion, rows["answer"][i], task, meta))
            except Exception:  # noqa: BLE001 - a failing scorer is a wrong answer, counted
                reward.failures += 1
                scores.append(0.0)
        out.append(scores)
    return out


def _sample_acceptance(model, sequences, prompt_mask, eos_token_id, temperature, top_p, draft_vocab=None):
    """Per-head sums of sum_v min(p_main, p_head) over the generated tokens (up to and including EOS), p and q
    the distributions the evaluation samples from (its temperature and top-p) and the heads drafted from
    (`draft_vocab`: the batch's trimmed draft vocabulary), as the drafting sampler uses them."""
    gen_len = sequences.shape[1] - prompt_mask.shape[1]
    mask = completion_mask(sequences, prompt_mask, eos_token_id)
    out = forward_logprobs(model, sequences, mask, gen_len, temperature=temperature, compute_accept=True,
                           accept_truncation=logits_warpers(1.0, 0, top_p), accept_draft_vocab=draft_vocab)
    keep = mask[:, -gen_len:].unsqueeze(1).float()
    return (out.accept * keep).sum(dim=(0, 2)), keep.sum()


def _sample(model, tokenizer, enc, k, draft, rollouts, **options):
    """generate(**enc, num_return_sequences=k, **options), or the same law through the heads' drafts when `draft`
    (a `mtprl.generation.rollout` policy) is given; each drafted rollout's counts are appended to `rollouts`."""
    if draft is None or getattr(model, "mtp_heads", None) is None:
        return model.generate(**enc, do_sample=True, top_k=0, num_return_sequences=k,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **options)
    ids, mask = repeat_rows(enc["input_ids"], enc["attention_mask"], k)
    out = sample_with_heads(model, ids, mask, draft, do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **options)
    rollouts.append(out)
    return out.sequences


@torch.no_grad()
def evaluate(model, tokenizer, dataset, *, k: int = 4, temperature: float = 1.0, top_p: float = 0.7,
             max_new_tokens: int = 16, batch_size: int = 64, seed: int = 0, num_examples: int = 5,
             reward: TaskReward | None = None, draft=None) -> dict:
    """avg@k / pass@k (see the module docstring). `draft`: a `mtprl.generation.rollout` policy; the heads then draft the
    samples (lossless, so the numbers keep their meaning) and the result also holds the rollout metrics."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for column in ("prompt", "answer"):
        if column not in dataset.column_names:
            raise ValueError(f"eval dataset has no {column!r} column (columns: {dataset.column_names})")
    reward = reward or TaskReward()
    device = next(model.parameters()).device
    correct, rewards, examples = [], [], []
    has_heads = getattr(model, "mtp_heads", None) is not None
    accept_sum, accept_count = None, 0.0
    rollouts = []
    n = len(dataset)
    with evaluating(model, seed):
        # trimmed drafting: until rollouts exist, the prompts' tokens
        if getattr(draft, "vocabulary", None) is not None:
            enc = tokenizer([prompt_text(tokenizer, p) for p in dataset["prompt"]], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False)
            draft.vocabulary.seed(enc["input_ids"], enc["attention_mask"])
        for start in range(0, n, batch_size):
            rows = dataset[start:start + batch_size]
            enc = tokenizer([prompt_text(tokenizer, p) for p in rows["prompt"]], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False).to(device)
            drafted_before = len(rollouts)
            out = _sample(model, tokenizer, enc, k, draft, rollouts, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            if has_heads and out.shape[1] > enc["input_ids"].shape[1]:
                draft_vocab = rollouts[-1].draft_vocab if len(rollouts) > drafted_before else None
                sums, count = _sample_acceptance(model, out, enc["attention_mask"].repeat_interleave(k, dim=0),
                                                 tokenizer.eos_token_id, temperature, top_p, draft_vocab)
                accept_sum = sums if accept_sum is None else accept_sum + sums
                accept_count += float(count)
            for i, scores in enumerate(score_completions(reward, rows, texts, k)):
                rewards.append(scores)
                correct.append([s >= 1.0 for s in scores])
                if len(examples) < num_examples:
                    examples.append({"prompt": rows["prompt"][i], "answer": rows["answer"][i],
                                     "completions": texts[i * k:(i + 1) * k], "scores": scores})
    total = max(len(correct) * k, 1)
    acceptance = {} if accept_sum is None else {
        f"mtp/accept/{i + 1}": float(v) / max(accept_count, 1.0) for i, v in enumerate(accept_sum)}
    return {**acceptance, **merged_rollout_metrics(rollouts),
        f"avg@{k}": sum(map(sum, correct)) / total,
        f"pass@{k}": sum(any(c) for c in correct) / max(len(correct), 1),
        "mean_reward": sum(map(sum, rewards)) / total,
        "k": k, "num_questions": len(correct), "temperature": temperature, "top_p": top_p,
        # mtp/accept/k above is sum_v min(p, q) under this same law (temperature, top-p), the one the samples and
        # the drafting sampler use, so it predicts rollout/spec_accept_rate/k of a drafted evaluation
        "accept_law": f"temperature {temperature}, top-p {top_p}" if acceptance else None,
        "max_new_tokens": max_new_tokens, "reward_failures": reward.failures, "examples": examples,
        # per question, in dataset order: how many of the k samples were correct (paired statistics use it)
        "correct_per_question": [sum(c) for c in correct], "questions_digest": questions_digest(dataset),
    }


def questions_digest(dataset) -> str:
    """A short hash of the eval questions in order: two runs' per-question results pair only if it matches."""
    h = hashlib.sha256()
    for prompt in dataset["prompt"]:
        h.update(json.dumps(prompt, sort_keys=True).encode())
    return h.hexdigest()[:16]


def write_eval(result: dict, path: str) -> None:
    """Atomic: a kill during the write leaves the previous file or none, never half of one."""
    atomic_write_json(path, result)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts, *, max_new_tokens: int = 64, temperature: float = 1.0,
                       top_p: float = 1.0, batch_size: int = 32, seed: int = 0, draft=None) -> list[str]:
    """One sampled completion per prompt (text, special tokens removed): the model's own text, e.g. for the
    self-distillation of fresh heads (`mtprl sft --mtp_only true`)."""
    device = next(model.parameters()).device
    from tqdm.auto import tqdm

    texts = []
    with evaluating(model, seed):
        for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", unit="batch"):
            batch = [prompt_text(tokenizer, p) for p in prompts[start:start + batch_size]]
            enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left",
                            add_special_tokens=False).to(device)
            out = _sample(model, tokenizer, enc, 1, draft, [], temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens)
            texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return texts
