"""The model and the data of a command: `TaskArguments` (the model, the task or dataset, the evaluation; every
command's fields, and what a run records in run_info.json), and loading from them: `load_for_task` (the model with
its heads), `task_splits` (train / held-out questions as prompts), `task_benchmarks` (every `eval_datasets`
benchmark). `mtprl.cli` parses the fields; `mtprl.analysis.probe` rebuilds a run's task from its run_info.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..io.callbacks import phase


def _json_field(value, name):
    """A field that holds JSON: a dict straight from the YAML, or a JSON string from the command line."""
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} must be a JSON object, got {value!r} ({e.msg})") from e
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return parsed


@dataclass
class TaskArguments:
    """The model, the data and the evaluation; shared by every command."""

    model_name_or_path: str = field(default="tiny", metadata={
        "help": "'tiny' (the project's preset, fresh weights), an mtprl checkpoint, or anything from_pretrained "
                "accepts: a hub id or a local directory."})
    gguf_file: str | None = field(default=None, metadata={
        "help": "A GGUF file inside model_name_or_path, read by transformers' GGUF reader as float weights."})
    dtype: str = field(default="auto", metadata={"help": "auto | bfloat16 | float16 | float32"})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2"})
    task: str = field(default="reasoning_gym:chain_sum", metadata={
        "help": "reasoning_gym:<name> or jsonl:<path with question/answer rows>; dataset_name replaces it."})
    task_config: str = field(default='{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}',
                             metadata={"help": "JSON object of reasoning-gym task options."})
    dataset_name: str | None = field(default=None, metadata={
        "help": "Any dataset datasets.load_dataset reads (hub name, local directory, parquet/json/jsonl/csv "
                "file); DAPO-Math-17k, DeepScaleR/MATH-500/AIME, MATH and GSM8K columns are recognised. Rewards "
                "go through math-verify."})
    dataset_config: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split the training questions come from."})
    dataset_test_split: str | None = field(default=None, metadata={
        "help": "Held-out split; when unset the held-out questions are carved from the training split."})
    question_column: str | None = field(default=None, metadata={"help": "Column of the question (with answer_column "
                                                                       "it overrides the format detection)."})
    answer_column: str | None = field(default=None, metadata={"help": "Column of the reference answer."})
    prompt_format: str = field(default="auto", metadata={
        "help": "auto (chat for a tokenizer with a chat template) | chat (TRL's conversational prompts) | plain."})
    system_prompt: str | None = field(default=None, metadata={"help": "Chat prompts: an optional system message."})
    train_size: int = field(default=4000, metadata={"help": "Training questions."})
    eval_size: int = field(default=200, metadata={"help": "Held-out questions (never in the training split)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the question pool and of the split."})
    eval_k: int = field(default=4, metadata={"help": "Samples per question for avg@k / pass@k."})
    eval_max_new_tokens: int = field(default=8, metadata={"help": "Generation budget at evaluation."})
    eval_datasets: str = field(default="{}", metadata={
        "help": "Benchmarks evaluated besides the held-out split: JSON {name: dataset} or {name: {path, config, "
                "split, question_column, answer_column, size}}; avg@k / pass@k per benchmark and their average."})
    eval_before: bool = field(default=False, metadata={"help": "train: evaluate the starting model too."})
    eval_after: bool = field(default=True, metadata={"help": "sft/train: evaluate the final model."})
    eval_output: str | None = field(default=None, metadata={
        "help": "eval: where to write the JSON (default <model>/evals/eval-<time>.json: a run's eval.json, the "
                "training's final evaluation, is replaced only when named here)."})
    overwrite: bool = field(default=False, metadata={"help": "sft: train again even if output_dir holds a model."})

    def task_options(self) -> dict:
        return _json_field(self.task_config, "task_config")

    def benchmark_specs(self) -> dict[str, dict]:
        specs = {}
        for name, spec in _json_field(self.eval_datasets, "eval_datasets").items():
            spec = {"path": spec} if isinstance(spec, str) else dict(spec)
            if "path" not in spec:
                raise ValueError(f"eval_datasets[{name!r}] needs a 'path' (dataset name, directory or file)")
            specs[name] = spec
        return specs

    def load_kwargs(self) -> dict:
        return {"dtype": self.dtype, "attn_implementation": self.attn_implementation, "gguf_file": self.gguf_file}


# The TaskArguments a run records in run_info.json, so that `mtprl eval` of the run evaluates what it trained on.
RUN_TASK_FIELDS = ("task", "task_config", "dataset_name", "dataset_config", "dataset_train_split",
                   "dataset_test_split", "question_column", "answer_column", "prompt_format", "system_prompt",
                   "train_size", "eval_size", "task_seed", "eval_k", "eval_max_new_tokens", "eval_datasets")


def load_for_task(task_args: TaskArguments, num_heads=None, init="copy_last_layer", seed=0,
                  trust_remote_code=False):
    """The model `model_name_or_path` names and its tokenizer, with `num_heads` MTP heads (`loading.load_model`)."""
    from ..model.loading import load_model

    what = task_args.model_name_or_path + (f" ({task_args.gguf_file})" if task_args.gguf_file else "")
    phase(f"loading model {what}")
    return load_model(task_args.model_name_or_path, num_heads, init, seed=seed,
                      **({} if task_args.model_name_or_path == "tiny" else
                         dict(task_args.load_kwargs(), trust_remote_code=trust_remote_code)))


def task_splits(task_args: TaskArguments, tokenizer=None):
    """(train, eval) of the task or of `dataset_name`, prompts in the format the tokenizer calls for."""
    from .prompts import resolve_prompt_format
    from .tasks import load_math_splits, load_task_splits

    fmt = resolve_prompt_format(task_args.prompt_format, tokenizer)
    prompts = {"prompt_format": fmt, "system_prompt": task_args.system_prompt}
    source = task_args.dataset_name or task_args.task
    phase(f"loading {source} ({task_args.train_size} train / {task_args.eval_size} eval questions, {fmt} prompts)")
    if task_args.dataset_name:
        return load_math_splits(task_args.dataset_name, task_args.train_size, task_args.eval_size, task_args.task_seed,
                                config=task_args.dataset_config, train_split=task_args.dataset_train_split,
                                test_split=task_args.dataset_test_split, question_column=task_args.question_column,
                                answer_column=task_args.answer_column, **prompts)
    return load_task_splits(task_args.task, task_args.train_size, task_args.eval_size, task_args.task_seed,
                            **prompts, **task_args.task_options())


def task_benchmarks(task_args: TaskArguments, tokenizer) -> dict:
    """name -> held-out dataset of every `eval_datasets` benchmark (its rows up to `size`, default eval_size)."""
    from .prompts import resolve_prompt_format
    from .tasks import load_dataset_split, math_rows, rows_to_dataset

    fmt = resolve_prompt_format(task_args.prompt_format, tokenizer)
    out = {}
    for name, spec in task_args.benchmark_specs().items():
        split = spec.get("split", "test")
        data = load_dataset_split(spec["path"], split, spec.get("config"))
        rows = list(math_rows(data, f"{spec['path']} [{split}]", spec.get("question_column"),
                              spec.get("answer_column")))[: spec.get("size", task_args.eval_size)]
        out[name] = rows_to_dataset(rows, f"math:{spec['path']}", fmt, task_args.system_prompt)
    return out

