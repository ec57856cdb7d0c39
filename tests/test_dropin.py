"""MTPGRPOTrainer as a drop-in for TRL's GRPOTrainer: the constructor surface TRL 1.16 offers."""

import asyncio
import json
import warnings

import pytest
from test_trainer import COMMON, _dataset, _small_model, digit_reward

from mtprl.tasks import safe_reward
from mtprl.trainer import MTPGRPOConfig, MTPGRPOTrainer


async def async_digit_reward(completions, **kwargs):
    await asyncio.sleep(0)
    return digit_reward(completions)


async def async_picky(prompts, completions, **kwargs):
    if any("b" in c for c in completions):
        raise ValueError("cannot score b")
    return [1.0] * len(completions)


def test_async_reward_stays_async_and_failure_safe():
    wrapped = safe_reward(async_picky)
    assert asyncio.iscoroutinefunction(wrapped)
    logged = {}
    out = asyncio.run(wrapped(prompts=["p"] * 3, completions=["a", "b", "c"],
                              log_metric=lambda k, v: logged.__setitem__(k, v)))
    assert out == [1.0, 0.0, 1.0] and logged == {"rewards/failures": 1.0}
    assert asyncio.run(safe_reward(async_digit_reward)(prompts=["p"], completions=["12ab"])) == [0.5]


def test_training_with_an_async_reward_function(tmp_path):
    """The un-awaited coroutine bug: TRL must see an async callable and await it on its event loop."""
    model, tok = _small_model()
    args = MTPGRPOConfig(**dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=1, mtp_regime="none",
                                max_steps=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[async_digit_reward, digit_reward], args=args,
                                 train_dataset=_dataset(), processing_class=tok)
    trainer.train()
    row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    # both functions scored the same completions: their means agree
    assert row["rewards/async_digit_reward/mean"] == pytest.approx(row["rewards/digit_reward/mean"])


def test_reward_funcs_are_optional_as_in_trl(tmp_path):
    model, tok = _small_model()
    args = MTPGRPOConfig(**dict(COMMON, output_dir=str(tmp_path / "run"), mtp_num_heads=1, max_steps=1))
    # no reward source at all: TRL's own error, not a TypeError about a missing argument
    with pytest.raises(ValueError, match="reward"):
        MTPGRPOTrainer(model=model, args=args, train_dataset=_dataset(), processing_class=tok)
