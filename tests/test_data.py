"""Real-model and real-data paths on tiny inputs: math dataset formats from files the tests write, chat vs plain
prompts, model loading options (dtype, attention, offline hub ids)."""

import json

import pytest
import torch
from datasets import Dataset

from mtprl.model.loading import char_tokenizer, load_base_model, load_model, tiny_model
from mtprl.data.prompts import DEFAULT_INSTRUCTION, build_prompt, prompt_text, resolve_prompt_format
from mtprl.data.scoring import TaskReward
from mtprl.data.tasks import clean_answer, detect_math_format, load_math_splits

QUESTIONS = [f"What is {a} plus {b}?" for a in range(3, 9) for b in range(2, 5)]  # 18 distinct questions


def _answer(q):
    a, b = (int(x) for x in q.rstrip("?").split()[2::2])
    return str(a + b)


FORMATS = {
    "dapo": lambda q: {"data_source": "math", "prompt": [{"role": "user", "content": q + " Answer: $Answer"}],
                       "reward_model": {"ground_truth": _answer(q), "style": "rule"}},
    "deepscaler": lambda q: {"problem": q, "answer": _answer(q), "solution": "..."},
    "aime": lambda q: {"ID": "2024-I-1", "Problem": q, "Answer": int(_answer(q))},
    "math": lambda q: {"problem": q, "solution": f"So we get $\\boxed{{{_answer(q)}}}$.", "level": "Level 1"},
    "gsm8k": lambda q: {"question": q, "answer": f"Add them: <<{_answer(q)}>>\n#### {_answer(q)}"},
}


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        ds = Dataset.from_list(rows)
        ds.to_parquet(str(path)) if suffix == ".parquet" else ds.to_csv(str(path), index=False)
    return str(path)


@pytest.mark.parametrize("fmt,suffix", [("dapo", ".parquet"), ("deepscaler", ".jsonl"), ("aime", ".csv"),
                                        ("math", ".json"), ("gsm8k", ".jsonl")])
def test_each_math_format_loads_with_the_right_answers(tmp_path, fmt, suffix):
    path = _write(tmp_path / f"{fmt}{suffix}", [FORMATS[fmt](q) for q in QUESTIONS])
    train, held_out = load_math_splits(path, train_size=100, eval_size=5, seed=1)
    assert len(held_out) == 5 and len(train) == len(QUESTIONS) - 5
    assert not set(train["question"]) & set(held_out["question"])
    for row in list(train) + list(held_out):
        question = row["question"].replace(" Answer: $Answer", "")
        assert row["answer"] == _answer(question), (fmt, row)
        assert row["task"] == f"math:{path}"
    reward = TaskReward()
    row = train[0]
    assert reward.score(f"so \\boxed{{{row['answer']}}}", row["answer"], row["task"]) == 1.0
    assert reward.score("\\boxed{1000}", row["answer"], row["task"]) == 0.0


def test_explicit_columns_test_split_and_errors_name_file_row_column(tmp_path):
    rows = [{"q": q, "gold": _answer(q)} for q in QUESTIONS]
    path = _write(tmp_path / "custom.jsonl", rows)
    with pytest.raises(ValueError, match="match no known math format"):
        load_math_splits(path, 10, 2)
    train, _ = load_math_splits(path, 10, 2, question_column="q", answer_column="gold")
    assert len(train) == 10 and train[0]["answer"] == _answer(train[0]["question"])
    with pytest.raises(ValueError, match="answer_column='nope' is not a column"):
        load_math_splits(path, 10, 2, question_column="q", answer_column="nope")
    bad = [FORMATS["math"](q) for q in QUESTIONS]
    bad[6]["solution"] = ""
    path = _write(tmp_path / "math.jsonl", bad)
    with pytest.raises(ValueError, match=r"math\.jsonl \[train\], row 7: no answer found in column 'solution'"):
        load_math_splits(path, 10, 2)
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown extension"):
        load_math_splits(str(tmp_path / "data.txt"), 10, 2)
    # A named held-out split (a directory with train/test files): eval comes from it, never from train.
    d = tmp_path / "ds"
    d.mkdir()
    _write(d / "train.jsonl", [FORMATS["gsm8k"](q) for q in QUESTIONS])
    _write(d / "test.jsonl", [FORMATS["gsm8k"](q) for q in QUESTIONS[:3]])
    train, held_out = load_math_splits(str(d), 100, 10, test_split="test")
    assert sorted(held_out["question"]) == sorted(QUESTIONS[:3]) and len(train) == len(QUESTIONS) - 3


def test_clean_answer_and_format_detection():
    assert clean_answer({"ground_truth": "34"}) == "34"
    assert clean_answer("a \\boxed{\\frac{1}{2}} b \\boxed{7}") == "7"
    assert clean_answer("step\n#### 1,234") == "1234"
    assert clean_answer("") is None and clean_answer({"style": "rule"}) is None
    assert detect_math_format(["Problem", "Answer", "ID"]) == "answer"
    assert detect_math_format(["problem", "solution"]) == "solution"


def test_chat_and_plain_prompts():
    tok = char_tokenizer()
    assert resolve_prompt_format("auto", tok) == "plain"  # the tiny preset keeps plain prompts
    assert build_prompt("2+3=?", "plain") == "2+3=?\nAnswer: "
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert resolve_prompt_format("auto", tok) == "chat"
    assert resolve_prompt_format("plain", tok) == "plain"
    chat = build_prompt("2+3=?", "chat", system_prompt="Be brief.")
    assert chat == [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"2+3=?\n\n{DEFAULT_INSTRUCTION}"}]
    assert build_prompt("2+3=?", "chat", instruction=None) == [{"role": "user", "content": "2+3=?"}]
    assert prompt_text(tok, chat) == f"<system>Be brief.\n<user>2+3=?\n\n{DEFAULT_INSTRUCTION}\n<assistant>"
    with pytest.raises(ValueError, match="prompt_format"):
        resolve_prompt_format("xml", tok)


def test_load_options_on_a_local_model_directory(tmp_path):
    tok = char_tokenizer()
    tiny_model(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"), num_heads=1, dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert next(model.mtp_heads.parameters()).dtype == torch.bfloat16
    model, _ = load_model(str(tmp_path / "m"), dtype="float32")
    assert model.dtype == torch.float32 and model.mtp_heads.num_heads == 1
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_base_model(str(tmp_path / "m"), dtype="fp8")
    with pytest.raises(OSError, match=f"model_name_or_path '{tmp_path / 'nowhere'}': no such directory"):
        load_model(str(tmp_path / "nowhere"))
