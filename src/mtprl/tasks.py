"""Verifiable tasks and their rewards.

`load_task("reasoning_gym:<name>", size, seed)` draws procedurally generated questions from reasoning-gym;
`load_task("jsonl:<path>")` reads `{"question", "answer"}` rows. Both give a `datasets.Dataset` with `prompt`
(the question plus an answer cue, plain text) and `answer`, plus what the scorer needs. Train and eval splits
are carved from one deduplicated pool, so they never share a question.

Rewards: reasoning-gym's own `score_answer` for its tasks, math-verify for jsonl/math. A scorer that raises
or runs past its time limit gives 0 for that sample, is counted in `rewards/failures`, and training goes on.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import threading
import warnings
from contextlib import contextmanager

from datasets import Dataset

from .jsonl import read_jsonl

ANSWER_CUE = "\nAnswer: "
SPLITS = ("train", "eval")


def format_prompt(question: str) -> str:
    return question.strip() + ANSWER_CUE


# ---------------------------------------------------------------------------------------------------- loading

def _reasoning_gym_rows(name: str, pool: int, seed: int, config: dict):
    import reasoning_gym

    try:
        data = reasoning_gym.create_dataset(name, size=pool, seed=seed, **config)
    except Exception as e:  # unknown task name or bad config: say which
        raise ValueError(f"reasoning_gym task {name!r} with config {config}: {e}") from e
    for entry in data:
        yield {"question": entry["question"], "answer": str(entry["answer"]),
               "metadata": json.dumps(entry.get("metadata", {}), default=str)}


def _jsonl_rows(path: str):
    for lineno, row in read_jsonl(path, "jsonl task file"):
        for fieldname in ("question", "answer"):
            value = row.get(fieldname)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"{path}, row {lineno}: missing or empty field {fieldname!r}")
        yield {"question": str(row["question"]), "answer": str(row["answer"]), "metadata": "{}"}


def load_task_splits(spec: str, train_size: int, eval_size: int, seed: int = 0, **task_config):
    """(train, eval) datasets with disjoint questions. For reasoning-gym the pool is generated with `seed`;
    for jsonl the file is split in order after a seeded shuffle."""
    kind, _, name = spec.partition(":")
    if kind not in ("reasoning_gym", "jsonl") or not name:
        raise ValueError(f"task must be 'reasoning_gym:<name>' or 'jsonl:<path>', got {spec!r}")
    if kind == "reasoning_gym":
        # Procedural tasks repeat questions; draw a larger pool so both splits fill up after deduplication.
        rows = _reasoning_gym_rows(name, 10 * (train_size + eval_size) + 100, seed, task_config)
    else:
        import random

        rows = list(_jsonl_rows(name))
        random.Random(seed).shuffle(rows)
    unique, seen = [], set()
    for row in rows:
        if row["question"] not in seen:
            seen.add(row["question"])
            unique.append(row)
    if len(unique) < eval_size + 1:
        raise ValueError(f"{spec}: only {len(unique)} distinct questions, cannot hold out {eval_size} for eval")
    eval_rows = unique[:eval_size]
    train_rows = unique[eval_size:eval_size + train_size]
    if kind == "reasoning_gym" and len(train_rows) < train_size:
        warnings.warn(f"{spec}: only {len(train_rows)} distinct training questions (asked for {train_size})")

    def build(part):
        return Dataset.from_list([{"prompt": format_prompt(r["question"]), "question": r["question"],
                                   "answer": r["answer"], "task": spec, "metadata": r["metadata"]} for r in part])

    return build(train_rows), build(eval_rows)


def load_task(spec: str, size: int | None = None, seed: int = 0, *, split: str = "train", eval_size: int = 200,
              **task_config) -> Dataset:
    """One split of a task (see `load_task_splits`). `size` defaults to the whole jsonl file / 1000 rows."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if size is None:
        size = 10**9 if spec.startswith("jsonl:") else 1000
    if spec.startswith("jsonl:") and split == "eval":
        eval_size = min(eval_size, size)
    train, evaluation = load_task_splits(spec, size if split == "train" else 0, eval_size, seed, **task_config)
    return train if split == "train" else evaluation


# ---------------------------------------------------------------------------------------------------- answers

def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(completion) -> str:
    """The answer in a completion: the last `\\boxed{...}`, else what follows the last `Answer:`, else the
    bare completion (its first non-empty line)."""
    if isinstance(completion, list):  # conversational: the last message's content
        completion = completion[-1]["content"] if completion else ""
    text = str(completion)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    match = list(re.finditer(r"answer\s*:", text, flags=re.IGNORECASE))
    if match:
        text = text[match[-1].end():]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


# ---------------------------------------------------------------------------------------------------- rewards

class RewardTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float | None):
    """SIGALRM-based limit; only possible on the main thread (TRL calls sync rewards there)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise RewardTimeout(f"scorer ran past {seconds}s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def math_verify_score(prediction: str, answer: str) -> float:
    from math_verify import parse, verify

    gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$")
    pred = parse(prediction if "$" in prediction or "\\boxed" in prediction else f"${prediction}$")
    return float(verify(gold, pred))


class TaskReward:
    """TRL reward function: 1.0 for a correct answer, reasoning-gym's partial credit where it gives one.

    Never raises: a scorer error or time-out scores 0, is counted in `self.failures` and logged through TRL's
    `log_metric` as `rewards/failures` (failures in that batch)."""

    __name__ = "accuracy"

    def __init__(self, timeout_s: float = 5.0):
        self.timeout_s = timeout_s
        self.failures = 0
        self._scorers = {}

    def _scorer(self, task: str):
        if task not in self._scorers:
            kind, _, name = task.partition(":")
            if kind == "reasoning_gym":
                import reasoning_gym

                data = reasoning_gym.create_dataset(name, size=1, seed=0)
                self._scorers[task] = lambda pred, answer, meta: float(
                    data.score_answer(answer=pred, entry={"answer": answer, "metadata": meta}))
            else:
                self._scorers[task] = lambda pred, answer, meta: math_verify_score(pred, answer)
        return self._scorers[task]

    def score(self, completion, answer: str, task: str = "jsonl:", metadata: str = "{}") -> float:
        pred = extract_answer(completion)
        with _time_limit(self.timeout_s):
            return self._scorer(task)(pred, answer, json.loads(metadata or "{}"))

    def __call__(self, prompts, completions, answer, task=None, metadata=None, log_metric=None, **kwargs):
        n = len(completions)
        task = task or ["jsonl:"] * n
        metadata = metadata or ["{}"] * n
        rewards, failed = [], 0
        for completion, ans, t, meta in zip(completions, answer, task, metadata):
            try:
                rewards.append(self.score(completion, ans, t, meta))
            except Exception as e:  # noqa: BLE001 - any scorer failure is a 0, never a crash
                failed += 1
                rewards.append(0.0)
                if self.failures + failed <= 5:
                    warnings.warn(f"reward scorer failed on task {t!r} ({type(e).__name__}: {e}); scoring 0")
        self.failures += failed
        if log_metric is not None:
            log_metric("rewards/failures", float(failed))
        return rewards


def safe_reward(func):
    """Wrap a TRL reward function so that an exception never stops training: if the batch call raises, each
    sample is scored alone and the ones that still raise get 0. Failures are logged as `rewards/failures`."""
    if isinstance(func, TaskReward) or getattr(func, "_mtprl_safe", False):
        return func

    @functools.wraps(func)
    def wrapper(*args, log_metric=None, **kwargs):
        try:
            rewards = func(*args, log_metric=log_metric, **kwargs)
            if log_metric is not None:
                log_metric("rewards/failures", 0.0)
            return rewards
        except Exception as batch_error:  # noqa: BLE001
            prompts, completions = kwargs["prompts"], kwargs["completions"]
            rewards, failed = [], 0
            for i in range(len(completions)):
                one = {k: (v[i:i + 1] if isinstance(v, list) and len(v) == len(completions) else v)
                       for k, v in kwargs.items()}
                try:
                    rewards.append(func(log_metric=None, **one)[0])
                except Exception:  # noqa: BLE001
                    failed += 1
                    rewards.append(0.0)
            warnings.warn(f"reward function {getattr(func, '__name__', func)!r} raised "
                          f"({type(batch_error).__name__}: {batch_error}); {failed}/{len(prompts)} samples scored 0")
            if log_metric is not None:
                log_metric("rewards/failures", float(failed))
            return rewards

    wrapper._mtprl_safe = True
    return wrapper
