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
import traceback
import warnings
from contextlib import contextmanager

from datasets import Dataset

from ..io.jsonl import read_jsonl

ANSWER_CUE = "\nAnswer: "
SPLITS = ("train", "eval")
PROMPT_FORMATS = ("auto", "chat", "plain")
# Appended to every chat question that does not carry its own answer-format instruction (DAPO rows do).
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def format_prompt(question: str) -> str:
    return question.strip() + ANSWER_CUE


def resolve_prompt_format(prompt_format: str, tokenizer=None) -> str:
    """auto: chat for a tokenizer with a chat template, plain otherwise (the tiny preset's char tokenizer)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return prompt_format


def build_prompt(question: str, prompt_format: str = "plain", system_prompt: str | None = None,
                 instruction: str | None = DEFAULT_INSTRUCTION):
    """plain: `question + "\nAnswer: "`; chat: TRL's conversational form `[{"role": "user", ...}]` (with an
    optional system message), the instruction appended to the question."""
    if prompt_format == "plain":
        return format_prompt(question)
    content = question.strip() + (f"\n\n{instruction}" if instruction else "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": content}]


def prompt_text(tokenizer, prompt) -> str:
    """The text a model is given for a prompt: chat prompts through the tokenizer's chat template."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


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


def load_task_splits(spec: str, train_size: int, eval_size: int, seed: int = 0, *, prompt_format: str = "plain",
                     system_prompt: str | None = None, **task_config):
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
    return (rows_to_dataset(train_rows, spec, prompt_format, system_prompt),
            rows_to_dataset(eval_rows, spec, prompt_format, system_prompt))


def rows_to_dataset(rows, task: str, prompt_format: str = "plain", system_prompt: str | None = None) -> Dataset:
    """`{"question", "answer", "metadata"[, "instruction"]}` rows -> the columns the trainer and the scorer use."""
    return Dataset.from_list([
        {"prompt": build_prompt(r["question"], prompt_format, system_prompt, r.get("instruction", DEFAULT_INSTRUCTION)),
         "question": r["question"], "answer": r["answer"], "task": task, "metadata": r.get("metadata", "{}")}
        for r in rows])


# ---------------------------------------------------------------------------------------------------- math datasets
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# The formats a math-RL user has, recognised by their columns (`detect_math_format`; lower-cased, so AIME's
# `Problem` / `Answer` too):
#   dapo      DAPO-Math-17k: `prompt` (chat messages, carrying their own answer instruction),
#             `reward_model.ground_truth`
#   answer    DeepScaleR, MATH-500, AIME: `problem` + `answer`
#   solution  MATH: `problem` + `solution` whose last \boxed{} is the answer
#   question  GSM8K (`answer` ends in `#### 42`) or any `question` + `answer` file
def detect_math_format(columns) -> str:
    cols = {c.lower() for c in columns}
    if {"prompt", "reward_model"} <= cols:
        return "dapo"
    if {"problem", "answer"} <= cols:
        return "answer"
    if {"problem", "solution"} <= cols:
        return "solution"
    if {"question", "answer"} <= cols:
        return "question"
    raise ValueError(f"columns {sorted(columns)} match no known math format (DAPO-Math-17k: prompt + reward_model; "
                     "DeepScaleR/MATH-500/AIME: problem + answer; MATH: problem + solution; GSM8K: question + "
                     "answer); name them with question_column / answer_column")


def clean_answer(value) -> str | None:
    """The reference answer in a cell: `ground_truth` of a dict, the last \\boxed{} of a worked solution,
    what follows GSM8K's `####`, else the text itself. None when there is none."""
    if isinstance(value, dict):
        value = value.get("ground_truth")
    if value is None:
        return None
    text = str(value).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    return text or None


def _question_text(value) -> str:
    if isinstance(value, list):  # chat messages: the last user turn
        users = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return "" if value is None else str(value)


def math_rows(data, source: str, question_column: str | None = None, answer_column: str | None = None):
    """Yield `{"question", "answer", "instruction", "metadata"}` per row of a math dataset. A row without a
    question or answer is an error naming the source, the row (1-based) and the column."""
    by_lower = {c.lower(): c for c in data.column_names}
    fmt = None if (question_column and answer_column) else detect_math_format(data.column_names)
    q_col = question_column or by_lower[{"dapo": "prompt", "question": "question"}.get(fmt, "problem")]
    a_col = answer_column or by_lower[{"dapo": "reward_model", "solution": "solution"}.get(fmt, "answer")]
    for name, col in (("question_column", q_col), ("answer_column", a_col)):
        if col not in data.column_names:
            raise ValueError(f"{source}: {name}={col!r} is not a column (columns: {data.column_names})")
    for i, row in enumerate(data):
        question = _question_text(row[q_col]).strip()
        if not question:
            raise ValueError(f"{source}, row {i + 1}: no question in column {q_col!r}")
        answer = clean_answer(row[a_col])
        if answer is None:
            raise ValueError(f"{source}, row {i + 1}: no answer found in column {a_col!r} ({str(row[a_col])[:80]!r})")
        # DAPO prompts carry their own instruction (answer on an "Answer:" line), which extract_answer reads.
        yield {"question": question, "answer": answer, "instruction": None if fmt == "dapo" else DEFAULT_INSTRUCTION,
               "metadata": "{}"}


def load_dataset_split(name: str, split: str = "train", config: str | None = None):
    """Any dataset `datasets.load_dataset` reads: a hub name, a local directory, or a parquet / json / jsonl /
    csv file."""
    from datasets import load_dataset

    ext = os.path.splitext(name)[1].lower()
    try:
        if os.path.isfile(name):
            if ext not in DATA_FILE_BUILDERS:
                raise ValueError(f"dataset file {name!r}: unknown extension {ext!r} (use one of "
                                 f"{', '.join(DATA_FILE_BUILDERS)})")
            return load_dataset(DATA_FILE_BUILDERS[ext], data_files={split: name}, split=split)
        return load_dataset(name, config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise ValueError(f"dataset {name!r} (config {config!r}, split {split!r}): {e}") from e


def load_math_splits(name: str, train_size: int, eval_size: int, seed: int = 0, *, config: str | None = None,
                     train_split: str = "train", test_split: str | None = None, question_column: str | None = None,
                     answer_column: str | None = None, prompt_format: str = "plain",
                     system_prompt: str | None = None):
    """(train, eval) from a math dataset: eval is `test_split` when given, else carved from the training split
    after a seeded shuffle; the two never share a question. Rewards: math-verify (`task` = `math:<name>`)."""
    import random

    task = f"math:{name}"
    rows = list(math_rows(load_dataset_split(name, train_split, config), f"{name} [{train_split}]", question_column,
                          answer_column))
    random.Random(seed).shuffle(rows)
    if test_split:
        eval_rows = list(math_rows(load_dataset_split(name, test_split, config), f"{name} [{test_split}]",
                                   question_column, answer_column))[:eval_size]
    else:
        eval_rows = []
    held_out = {r["question"] for r in eval_rows}
    unique = []
    for row in rows:
        if row["question"] not in held_out:
            held_out.add(row["question"])
            unique.append(row)
    if not test_split:
        if len(unique) < eval_size + 1:
            raise ValueError(f"{name}: only {len(unique)} distinct questions, cannot hold out {eval_size} for eval")
        eval_rows, unique = unique[:eval_size], unique[eval_size:]
    return (rows_to_dataset(unique[:train_size], task, prompt_format, system_prompt),
            rows_to_dataset(eval_rows, task, prompt_format, system_prompt))


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


REWARD_FAILURE_MODES = ("zero", "raise")


class RewardFailure(RuntimeError):
    """A reward function failed on every sample of a batch: a broken scorer, not an unlucky sample."""


class FailurePolicy:
    """What a reward function's failures do to the run (`reward_failure`): `zero` scores a failing sample 0
    (occasional failures: a time-out, an unparsable answer) but stops the run when *every* sample of a batch
    (two or more) fails, since then the whole run would train at reward 0; `raise` stops at the first failure,
    as TRL does. The first failure of any kind prints its traceback once."""

    def __init__(self, name: str, mode: str = "zero"):
        if mode not in REWARD_FAILURE_MODES:
            raise ValueError(f"reward_failure must be one of {', '.join(REWARD_FAILURE_MODES)}; got {mode!r}")
        self.name, self.mode, self.shown = name, mode, False

    def check(self, errors: list[BaseException], total: int) -> None:
        """The failures of one batch of `total` samples (`errors`, in sample order)."""
        if not errors:
            return
        first = errors[0]
        if self.mode == "raise":
            raise RewardFailure(f"reward function {self.name!r} raised on a sample ({type(first).__name__}: "
                                f"{first}); reward_failure=raise stops the run") from first
        if len(errors) == total and total > 1:
            raise RewardFailure(
                f"reward function {self.name!r} failed on every one of the {total} samples of a batch (first: "
                f"{type(first).__name__}: {first}): training on reward 0 would waste the run. Fix the scorer (the "
                "traceback above is its first failure), or set reward_failure=raise to stop at any failure") from first
        if not self.shown:
            self.shown = True
            warnings.warn(f"reward function {self.name!r} failed on {len(errors)}/{total} samples; they score 0 "
                          "(shown once, with the traceback below; rewards/failures counts them)")
            traceback.print_exception(first, chain=False)


class TaskReward:
    """TRL reward function: 1.0 for a correct answer, reasoning-gym's partial credit where it gives one.

    A scorer error or time-out scores 0, is counted in `self.failures` and logged through TRL's `log_metric` as
    `rewards/failures` (failures in that batch); a batch on which every sample fails stops the run
    (`FailurePolicy`, `on_failure`)."""

    __name__ = "accuracy"

    def __init__(self, timeout_s: float = 5.0, on_failure: str = "zero"):
        self.timeout_s = timeout_s
        self.failures = 0
        self._scorers = {}
        self.policy = FailurePolicy(self.__name__, on_failure)

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
        rewards, errors = [], []
        for completion, ans, t, meta in zip(completions, answer, task, metadata):
            try:
                rewards.append(self.score(completion, ans, t, meta))
            except Exception as e:  # noqa: BLE001 - a scorer failure is a 0 (FailurePolicy decides the rest)
                errors.append(e)
                rewards.append(0.0)
                if self.failures + len(errors) <= 5:
                    warnings.warn(f"reward scorer failed on task {t!r} ({type(e).__name__}: {e}); scoring 0")
        self.failures += len(errors)
        self.policy.check(errors, n)
        if log_metric is not None:
            log_metric("rewards/failures", float(len(errors)))
        return rewards


def _one_sample_calls(kwargs):
    """The batch call's keyword arguments split into one call per sample (per-sample lists sliced)."""
    n = len(kwargs["completions"])
    for i in range(n):
        yield {k: (v[i:i + 1] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}


def _call_one(func, one):
    """One sample's reward, or the exception its call raised."""
    try:
        return func(log_metric=None, **one)[0]
    except Exception as e:  # noqa: BLE001
        return e


async def _call_one_async(func, one):
    try:
        return (await func(log_metric=None, **one))[0]
    except Exception as e:  # noqa: BLE001
        return e


def _scored_alone(results, policy, batch_error, log_metric):
    """The rewards of a batch whose call raised, each sample scored alone (`results`: reward or exception);
    the failures score 0 and are logged, and `policy` decides whether the run goes on."""
    errors = [r for r in results if isinstance(r, Exception)]
    if not errors:
        warnings.warn(f"reward function {policy.name!r} raised on the batch ({type(batch_error).__name__}: "
                      f"{batch_error}) but scored each of the {len(results)} samples alone without failing")
    policy.check(errors, len(results))
    if log_metric is not None:
        log_metric("rewards/failures", float(len(errors)))
    return [0.0 if isinstance(r, Exception) else r for r in results]


def _scored(rewards, log_metric):
    if log_metric is not None:
        log_metric("rewards/failures", 0.0)
    return rewards


def safe_reward(func, on_failure: str = "zero"):
    """Wrap a TRL reward function so that an occasional exception does not stop training: if the batch call
    raises, each sample is scored alone and the ones that still raise get 0 (`rewards/failures`), unless every
    sample of the batch fails (`FailurePolicy`). on_failure="raise": the function as it is (TRL's behaviour).
    An async reward function (TRL runs those concurrently on its event loop) stays async."""
    from trl.trainer.utils import is_async_callable

    if isinstance(func, TaskReward):
        func.policy = FailurePolicy(func.__name__, on_failure)
        return func
    if on_failure == "raise":
        return func
    if getattr(func, "_mtprl_safe", False):
        return func
    policy = FailurePolicy(getattr(func, "__name__", repr(func)), on_failure)

    if is_async_callable(func):
        @functools.wraps(func)
        async def wrapper(*args, log_metric=None, **kwargs):
            try:
                rewards = await func(*args, log_metric=log_metric, **kwargs)
            except Exception as batch_error:  # noqa: BLE001
                results = [await _call_one_async(func, one) for one in _one_sample_calls(kwargs)]
                return _scored_alone(results, policy, batch_error, log_metric)
            return _scored(rewards, log_metric)
    else:
        @functools.wraps(func)
        def wrapper(*args, log_metric=None, **kwargs):
            try:
                rewards = func(*args, log_metric=log_metric, **kwargs)
            except Exception as batch_error:  # noqa: BLE001
                results = [_call_one(func, one) for one in _one_sample_calls(kwargs)]
                return _scored_alone(results, policy, batch_error, log_metric)
            return _scored(rewards, log_metric)

    wrapper._mtprl_safe = True
    return wrapper
