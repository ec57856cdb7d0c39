"""Tasks, answer extraction and rewards with real reasoning-gym and math-verify."""

import json

import pytest

from mtprl import load_task
from mtprl.data.scoring import TaskReward, extract_answer
from mtprl.data.tasks import load_task_splits
from mtprl.training.rewards import safe_reward

CHAIN = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}


def test_reasoning_gym_splits_are_disjoint_and_deterministic():
    train, evaluation = load_task_splits("reasoning_gym:chain_sum", 300, 50, seed=3, **CHAIN)
    assert len(train) == 300 and len(evaluation) == 50
    assert not set(train["question"]) & set(evaluation["question"])
    again = load_task("reasoning_gym:chain_sum", 300, 3, split="eval", eval_size=50, **CHAIN)
    assert again["question"] == evaluation["question"]
    assert set(train.column_names) >= {"prompt", "answer"}
    assert train[0]["prompt"].endswith("Answer: ") and train[0]["question"] in train[0]["prompt"]


def test_reasoning_gym_reward_uses_the_tasks_own_scorer():
    train = load_task("reasoning_gym:chain_sum", 20, 0, **CHAIN)
    reward = TaskReward()
    rows = train.select(range(4))
    right = reward(rows["prompt"], [f"{a}" for a in rows["answer"]], rows["answer"], task=rows["task"],
                   metadata=rows["metadata"])
    wrong = reward(rows["prompt"], [f"{int(a) + 1}" for a in rows["answer"]], rows["answer"], task=rows["task"],
                   metadata=rows["metadata"])
    assert right == [1.0] * 4 and all(w < 1.0 for w in wrong)


def test_jsonl_task_and_math_verify(tmp_path):
    path = tmp_path / "math.jsonl"
    rows = [{"question": f"What is {i}/2?", "answer": f"\\frac{{{i}}}{{2}}"} for i in range(1, 12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    train, evaluation = load_task_splits(f"jsonl:{path}", 100, 3, seed=0)
    assert len(train) == 8 and len(evaluation) == 3
    assert not set(train["question"]) & set(evaluation["question"])
    reward = TaskReward()
    assert reward(None, ["\\boxed{0.5}", "Answer: 1/2", "2"], ["\\frac{1}{2}"] * 3, task=[f"jsonl:{path}"] * 3) \
        == [1.0, 1.0, 0.0]


def test_jsonl_errors_name_the_file_row_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_task(f"jsonl:{tmp_path / 'nope.jsonl'}")
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(ValueError, match=r"row 2: missing or empty field 'answer'"):
        load_task(f"jsonl:{path}")
    path.write_text('{"question": "1+1?", "answer": "2"}\n{not json\n')
    with pytest.raises(ValueError, match="row 2: not valid JSON"):
        load_task(f"jsonl:{path}")
    with pytest.raises(ValueError, match="reasoning_gym:<name>"):
        load_task("gsm8k")
    with pytest.raises(ValueError, match="no_such_task"):
        load_task("reasoning_gym:no_such_task", 10)


@pytest.mark.parametrize("completion,expected", [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("work... Answer: 42\nmore", "42"),
    ("  17  ", "17"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ([{"role": "assistant", "content": "Answer: 9"}], "9"),
    ("", ""),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_failing_scorer_scores_zero_and_is_counted():
    reward = TaskReward()
    logged = []
    # A row whose metadata is corrupt: the scorer cannot even be called.
    out = reward(None, ["3", "4"], ["3", "4"], task=["reasoning_gym:chain_sum"] * 2, metadata=["{broken", "{}"],
                 log_metric=lambda name, value: logged.append((name, value)))
    assert out == [0.0, 1.0] and reward.failures == 1 and logged == [("rewards/failures", 1.0)]


def test_scorer_time_limit():
    import time

    reward = TaskReward(timeout_s=0.2)
    reward._scorers["jsonl:slow"] = lambda pred, answer, meta: time.sleep(5) or 1.0
    start = time.time()
    assert reward(None, ["1"], ["1"], task=["jsonl:slow"]) == [0.0]
    assert time.time() - start < 2 and reward.failures == 1


def test_safe_reward_isolates_the_failing_samples():
    def picky(prompts, completions, **kwargs):
        if "boom" in completions:
            raise KeyError("boom")
        return [1.0] * len(completions)

    logged = []
    out = safe_reward(picky)(prompts=["a", "b", "c"], completions=["ok", "boom", "fine"],
                             log_metric=lambda n, v: logged.append((n, v)))
    assert out == [1.0, 0.0, 1.0] and logged == [("rewards/failures", 1.0)]


def test_a_reward_function_failing_on_every_sample_stops_the_run_with_its_cause():
    from mtprl.data.scoring import RewardFailure

    def broken(prompts, completions, **kwargs):
        return [kwargs["ground_truth"] for _ in completions]  # a KeyError on every call

    logged = []
    with pytest.raises(RewardFailure, match="every one of the 3 samples") as caught:
        safe_reward(broken)(prompts=["a", "b", "c"], completions=["x", "y", "z"],
                            log_metric=lambda n, v: logged.append((n, v)))
    assert isinstance(caught.value.__cause__, KeyError) and logged == []
    with pytest.raises(RewardFailure, match="every one of the 2 samples"):  # the task scorer too
        TaskReward()(None, ["3", "4"], ["3", "4"], task=["reasoning_gym:chain_sum"] * 2, metadata=["{bad", "{bad"])


def test_the_first_failure_prints_its_traceback_once_and_a_recovered_batch_says_so(capsys):
    def picky(prompts, completions, **kwargs):
        if "boom" in completions:
            raise KeyError("boom")
        return [1.0] * len(completions)

    wrapped = safe_reward(picky)
    with pytest.warns(UserWarning, match="failed on 1/2 samples"):
        assert wrapped(prompts=["a", "b"], completions=["boom", "ok"]) == [0.0, 1.0]
    wrapped(prompts=["a", "b"], completions=["boom", "ok"])
    assert capsys.readouterr().err.count("Traceback") == 1

    def batch_only(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise ValueError("batch too large")
        return [1.0]

    logged = []
    with pytest.warns(UserWarning, match="without failing"):
        out = safe_reward(batch_only)(prompts=["a", "b"], completions=["x", "y"],
                                      log_metric=lambda n, v: logged.append((n, v)))
    assert out == [1.0, 1.0] and logged == [("rewards/failures", 0.0)]


def test_reward_failure_raise_stops_at_the_first_failure_as_trl_does():
    def picky(prompts, completions, **kwargs):
        raise KeyError("boom")

    assert safe_reward(picky, "raise") is picky
    from mtprl.data.scoring import RewardFailure

    with pytest.raises(RewardFailure, match="reward_failure=raise"):
        TaskReward(on_failure="raise")(None, ["3", "4"], ["3", "4"], task=["reasoning_gym:chain_sum"] * 2,
                                       metadata=["{bad", "{}"])
