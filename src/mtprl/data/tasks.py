"""Verifiable tasks, loaded as questions and reference answers.

`load_task("reasoning_gym:<name>", size, seed)` draws procedurally generated questions from reasoning-gym;
`load_task("jsonl:<path>")` reads `{"question", "answer"}` rows; `load_math_splits` reads a math dataset (DAPO-Math,
DeepScaleR, MATH, GSM8K, AIME; any file or hub dataset `datasets` reads). Each gives a `datasets.Dataset` with
`prompt` (the question as `mtprl.data.prompts.build_prompt` asks it) and `answer`, plus what the scorer needs
(`task`, `metadata`; the scoring is `mtprl.data.scoring`). Train and eval splits are carved from one deduplicated
pool, so they never share a question.
"""

from __future__ import annotations

import json
import os
import warnings

from datasets import Dataset

from ..io.jsonl import read_jsonl
from .prompts import DEFAULT_INSTRUCTION, build_prompt
from .scoring import last_boxed

SPLITS = ("train", "eval")


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
    boxed = last_boxed(text)
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
