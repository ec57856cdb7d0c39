"""Scoring a completion against its reference answer: the answer read out of the completion (`extract_answer`),
reasoning-gym's own `score_answer` for its tasks, math-verify for jsonl / math datasets, each under a time limit.

`TaskReward` is the TRL reward function over those scorers: a scorer that raises or runs past its time limit gives 0
for that sample, is counted in `rewards/failures`, and training goes on, unless every sample of a batch fails
(`FailurePolicy`, the `reward_failure` setting). Wrapping any other reward function the same way is
`mtprl.training.rewards.safe_reward`.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import traceback
import warnings
from contextlib import contextmanager

def last_boxed(text: str) -> str | None:
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
    boxed = last_boxed(text)
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
