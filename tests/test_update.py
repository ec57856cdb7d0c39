"""`update_on` mirrors transformers' training loop around the optimizer step (issue 42): the same callbacks in the
same order, the scheduler stepped only where the step was not skipped, the same per-step metrics. If a
transformers upgrade adds an event around the step, or the loop changes what it calls, these fail."""

import torch
from conftest import _mtp_trainer
from transformers import TrainerCallback

# events that belong to the loop around the step, not to the step (update_on runs one rollout's steps only)
OUTSIDE_THE_STEP = {"on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
                    "on_step_begin", "on_step_end", "on_substep_end", "on_log", "on_save", "on_evaluate",
                    "on_prediction_step", "on_predict", "on_push_begin"}


class Recorder(TrainerCallback):
    """Every callback event transformers defines, recorded with the step counter it saw."""

    def __init__(self):
        self.events = []


for _name in [n for n in vars(TrainerCallback) if n.startswith("on_")]:
    setattr(Recorder, _name, lambda self, args, state, control, _n=_name, **kw: self.events.append(
        (_n, state.global_step)))


def _step_events(recorder):
    return [e for e in recorder.events if e[0] not in OUTSIDE_THE_STEP]


def test_update_on_calls_what_the_training_loop_calls_around_the_step(tmp_path):
    loop = _mtp_trainer(tmp_path, "loop", mtp_regime="ce", max_steps=2, steps_per_generation=2)
    seen = Recorder()
    loop.add_callback(seen)
    loop.train()
    trained = _step_events(seen)
    assert [e for e, _ in trained] == ["on_pre_optimizer_step", "on_optimizer_step"] * 2, trained
    loop_keys = {k for row in loop.state.log_history for k in row}

    mirror = _mtp_trainer(tmp_path, "mirror", mtp_regime="ce", max_steps=2, steps_per_generation=2)
    mirror.create_optimizer_and_scheduler(num_training_steps=2)
    seen = Recorder()
    mirror.add_callback(seen)
    result = mirror.update_on(mirror.draw_rollout(0, seed=0))
    assert _step_events(seen) == trained  # same events, same order, same step counters
    assert result.optimizer_steps == 2 and mirror.state.global_step == 2
    assert mirror.lr_scheduler.last_epoch == loop.lr_scheduler.last_epoch == 2
    assert all(p.grad is None for p in mirror.model.parameters())  # zeroed as the loop does
    step_keys = {"grad_norm", "clip_factor", "update_norm", "grad_norm/rl", "grad_norm/mtp"}
    assert step_keys & set(result.metrics) == step_keys & loop_keys == {"grad_norm", "clip_factor", "update_norm"}


def test_a_skipped_step_leaves_the_scheduler_where_it_was(tmp_path, monkeypatch):
    """transformers steps the scheduler only `if not accelerator.optimizer_step_was_skipped` (fp16 overflow);
    update_on reads the same flag."""
    trainer = _mtp_trainer(tmp_path, mtp_regime="ce", max_steps=2, steps_per_generation=2)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    batches = trainer.draw_rollout(0, seed=0)
    monkeypatch.setattr(type(trainer.accelerator), "optimizer_step_was_skipped", property(lambda self: True))
    trainer.update_on(batches)
    assert trainer.lr_scheduler.last_epoch == 0 and trainer.state.global_step == 2


def test_the_optimizer_is_the_runs_own_with_the_one_step(tmp_path):
    """The wrapped optimizer keeps the run's state and checkpoint format; its step is `optimizer_step`."""
    from mtprl.training.optimizer_step import StepOptimizer

    trainer = _mtp_trainer(tmp_path, mtp_regime="ce", max_steps=1, steps_per_generation=2)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    opt = trainer.optimizer
    assert isinstance(opt, StepOptimizer) and isinstance(opt.optimizer, torch.optim.AdamW)
    assert opt.state_dict().keys() == opt.optimizer.state_dict().keys()
    assert opt.param_groups is opt.optimizer.param_groups
    assert trainer.create_optimizer() is opt  # created once, wrapped once
