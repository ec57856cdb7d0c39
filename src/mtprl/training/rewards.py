"""Reward functions made failure-safe for the trainer: `safe_reward` wraps any TRL reward function (sync or async)
so that an occasional exception scores 0 for the samples it hits (`rewards/failures`) instead of stopping the run,
while a batch on which every sample fails stops it (`mtprl.data.scoring.FailurePolicy`, `reward_failure`).
`MTPGRPOTrainer` wraps every reward function it is given."""

from __future__ import annotations

import functools
import warnings

from ..data.scoring import FailurePolicy, TaskReward


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
