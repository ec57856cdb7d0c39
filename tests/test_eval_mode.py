"""`evaluating`: eval mode and a seeded RNG inside the block, the training flag and the RNG stream back after it,
also when the block raises."""

import pytest
import torch

from mtprl.model.eval_mode import evaluating


class Boom(Exception):
    pass


@pytest.mark.parametrize("raises", [False, True])
def test_training_flag_and_rng_restored(raises):
    model = torch.nn.Linear(2, 2).train()
    torch.manual_seed(123)
    expected = torch.rand(4)  # the stream as it goes on when nothing runs in between
    torch.manual_seed(123)
    try:
        with evaluating(model, seed=7):
            assert not model.training
            inside = torch.rand(10)
            if raises:
                raise Boom
    except Boom:
        pass
    assert model.training
    assert torch.equal(torch.rand(4), expected)  # the caller's stream goes on as if the block had not run
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(10))  # seeded inside


def test_eval_model_stays_eval_and_no_seed_leaves_rng_alone():
    model = torch.nn.Linear(2, 2).eval()
    torch.manual_seed(5)
    with pytest.raises(Boom):
        with evaluating(model):
            model.train()  # whatever the body does, the flag on entry comes back
            raise Boom
    assert not model.training
    drawn_after = torch.rand(2)
    torch.manual_seed(5)
    assert torch.equal(drawn_after, torch.rand(2))  # no seed: the block neither seeds nor restores
