"""Eval mode and, optionally, a seeded RNG for the length of a `with` block, restored on exit whatever happens."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def evaluating(model, seed: int | None = None):
    """`model.eval()` inside the block, its training flag back on exit. With `seed`: torch's RNG (CPU and, when
    CUDA is available, every CUDA device's) seeded with it on entry and put back on exit, so sampling inside is
    reproducible and the caller's random stream goes on as if the block had not run. Exception-safe."""
    was_training = model.training
    cpu_state = cuda_state = None
    if seed is not None:
        cpu_state = torch.random.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        yield model
    finally:
        if cpu_state is not None:
            torch.random.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        model.train(was_training)
