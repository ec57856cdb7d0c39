"""The OCC estimators beyond the paper (occ.py), each against a hand computation on a tiny model: gradients
taken with .backward() into .grad (a second code path to the estimators' autograd.grad), log-softmax by hand."""

import pytest
import torch

import mtprl
from mtprl.model.logprobs import forward_logprobs
from mtprl.model.loading import char_tokenizer, tiny_model
from mtprl.model.mtp import decoder_of, last_layer_params
from mtprl.core.occ import OCCStats, ema_statistics, hidden_state_statistics, parameter_statistics


def _model(layers=3):
    tok = char_tokenizer()
    model = tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=layers)
    mtprl.attach_mtp_heads(model, 1)
    return model


def _batch(seed=0, batch=4, length=12, keep=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    w_rl = torch.randn(batch, keep, generator=g)
    w_mtp = torch.randn(batch, keep, generator=g)
    return ids, mask, keep, w_rl, w_mtp


def _losses(model, ids, mask, keep, w_rl, w_mtp):
    """Two scalar losses of the one forward: weighted main log-probs (the RL side), weighted head log-probs."""
    out = forward_logprobs(model, ids, mask, keep, return_hidden=True)
    return (w_rl * out.main).sum(), (w_mtp * out.mtp[:, 0]).sum(), out


def _grads(loss, params):
    for p in params:
        p.grad = None
    loss.backward(retain_graph=True)
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def test_hidden_estimator_is_the_dot_of_gradients_at_the_trunk_output():
    model = _model()
    ids, mask, keep, w_rl, w_mtp = _batch()
    rl, mtp, out = _losses(model, ids, mask, keep, w_rl, w_mtp)
    got = hidden_state_statistics(rl, mtp, out.hidden)
    # By hand: the trunk output as a leaf, LM head and log-softmax written out, the head called directly.
    h = decoder_of(model)(input_ids=ids, attention_mask=mask).last_hidden_state.detach().requires_grad_()
    weight, T = model.lm_head.weight, ids.shape[1]
    targets = ids[:, -keep:]
    main = torch.log_softmax(h[:, T - keep - 1: T - 1] @ weight.t(), -1).gather(-1, targets.unsqueeze(-1))[..., 0]
    main = main.masked_fill(mask[:, -keep:] == 0, 0.0)
    states = model.mtp_heads(h, ids, mask, model.get_input_embeddings(), decoder_of(model).rotary_emb)[0]
    head = torch.log_softmax(states[:, T - 2 - keep: T - 2] @ weight.t(), -1).gather(-1, targets.unsqueeze(-1))[..., 0]
    head = head.masked_fill(mask[:, -keep:] == 0, 0.0)
    (g_rl,) = _grads((w_rl * main).sum(), [h])
    (g_mtp,) = _grads((w_mtp * head).sum(), [h])
    assert got.c_hat.item() == pytest.approx((g_rl * g_mtp).sum().item(), rel=1e-5)
    assert got.v2_hat.item() == pytest.approx((g_mtp * g_mtp).sum().item(), rel=1e-5)
    assert got.v2_hat.item() > 0


@pytest.mark.parametrize("n", [1, 2])
def test_last_layers_estimator_is_exact_over_those_layers_only(n):
    model = _model(layers=3)
    ids, mask, keep, w_rl, w_mtp = _batch(seed=1)
    params = last_layer_params(model, n)
    decoder = decoder_of(model)
    expected = {id(p) for m in [*decoder.layers[-n:], decoder.norm] for p in m.parameters()}
    assert {id(p) for p in params} == expected
    rl, mtp, _ = _losses(model, ids, mask, keep, w_rl, w_mtp)
    got = parameter_statistics(rl, mtp, params)
    g_rl, g_mtp = _grads(rl, params), _grads(mtp, params)
    c = sum((a * b).sum() for a, b in zip(g_rl, g_mtp))
    v2 = sum((b * b).sum() for b in g_mtp)
    assert got.c_hat.item() == pytest.approx(c.item(), rel=1e-5)
    assert got.v2_hat.item() == pytest.approx(v2.item(), rel=1e-5)
    # over all main-model parameters it is the exact statistic, and larger in v2 than over a subset
    main = [p for name, p in model.named_parameters() if not name.startswith("mtp_heads.")]
    _, c_all, v2_all = mtprl.exact_occ_coefficient(rl, mtp, main)
    assert v2_all.item() > got.v2_hat.item()


def test_last_layer_params_rejects_a_count_outside_the_trunk():
    model = _model(layers=3)
    for bad in (0, 4, True, 1.5):
        with pytest.raises(ValueError, match="occ_last_layers must be an integer in 1..3"):
            last_layer_params(model, bad)


def test_ema_statistics_follow_the_recursion():
    values = [(0.5, 2.0), (-1.0, 4.0), (0.25, 1.0)]
    beta, state = 0.8, None
    c_hand = v_hand = None
    for c, v in values:
        state = ema_statistics(state, OCCStats(torch.tensor(c), torch.tensor(v)), beta)
        c_hand = c if c_hand is None else beta * c_hand + (1 - beta) * c
        v_hand = v if v_hand is None else beta * v_hand + (1 - beta) * v
        assert state.c_hat.item() == pytest.approx(c_hand) and state.v2_hat.item() == pytest.approx(v_hand)
    with pytest.raises(ValueError, match="beta"):
        ema_statistics(None, state, 1.0)
