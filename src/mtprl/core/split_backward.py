"""`occ_variant: last_layers` at the cost of one backward: cut the trunk's graph below its last n layers.

The `last_layers` estimator needs the RL loss's and each head loss's gradients over the last n decoder layers
(and the final norm) *separately*, for c and v2; everything below those layers only ever needs their
lambda-weighted sum. So during the loss forward the autograd graph is cut at x, the input of the last n
layers (`TrunkCut`: the layers above see a detached copy `x_cut` of x). Above the cut every loss is
backpropagated on its own -- lm_head, the last n layers, the heads: a small part of the model --, lambda_k
follows from the two gradients, and `split_backward_loss` returns a loss whose one ordinary backward (TRL's)
puts g_RL + sum_k lambda_k g_k on every parameter above the cut and sends <x, dL/dx_cut> down through the rest
of the trunk once. Without the cut the estimator backpropagates each loss through the last layers *and* the
main backward repeats them (1.21x a detach step on the 29M benchmark); with it the extra work is one head
loss's backward through the last n layers.

The gradient is exactly that of rl_loss + sum_k lambda_k head_k with lambda_k held constant (tested against
autograd on the uncut model), and lambda_k equals `occ.parameter_statistics` over `last_layer_params`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


class TrunkCut:
    """While open, cut the autograd graph at the input of `layer` on every forward that builds a graph.

    `pairs` holds (x, x_cut) per forward: x is the layer's input as the lower trunk computed it, x_cut the
    detached leaf the layer actually received. Forwards without grad (rollout, old log-probs) are not cut."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handle = None

    def __enter__(self) -> "TrunkCut":
        self._handle = self.layer.register_forward_pre_hook(self._cut, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _cut(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        if args:
            x, rest = args[0], args[1:]
        elif "hidden_states" in kwargs:
            x, rest = kwargs["hidden_states"], None
        else:
            raise RuntimeError(f"{type(module).__name__} got no hidden_states to cut the graph at")
        if not x.requires_grad:
            return None
        x_cut = x.detach().requires_grad_()
        self.pairs.append((x, x_cut))
        if rest is None:
            return args, {**kwargs, "hidden_states": x_cut}
        return (x_cut, *rest), kwargs


def _add_scaled(total: torch.Tensor | None, scale: torch.Tensor, grad: torch.Tensor | None):
    if grad is None:
        return total
    scaled = scale.to(grad.dtype) * grad
    return scaled if total is None else total + scaled


def split_backward_loss(rl_loss: torch.Tensor, head_losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                        pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                        lambda_of: Callable[[int, Sequence[torch.Tensor | None], Sequence[torch.Tensor | None]],
                                            torch.Tensor]):
    """The loss to backpropagate instead of rl_loss + sum_k lambda_k head_losses[k], and the lambdas.

    params: every trainable parameter (main model and heads); those below the cut get no gradient here.
    pairs: `TrunkCut.pairs` of the forward the losses came from.
    lambda_of(k, g_rl, g_head): lambda of head_losses[k] from the two losses' gradients over `params` (None: no gradient above
    the cut), e.g. c and v2 over the last layers' entries.

    Returns (loss, lambdas). The loss's value is rl + sum_k lambda_k head_k; its gradient is, for a parameter
    above the cut, g_RL + sum_k lambda_k g_k (through the term <p, G_p>), and below it the chain rule through
    <x, G_x> with G_x = dL/dx_cut. Each loss is backpropagated once above the cut; the lower trunk once, by
    the caller's backward of the returned loss.
    """
    inputs = list(params) + [x_cut for _, x_cut in pairs]
    n = len(params)
    g_rl = torch.autograd.grad(rl_loss, inputs, retain_graph=True, allow_unused=True)
    totals = list(g_rl)
    lambdas = []
    value = rl_loss.detach()
    for k, loss in enumerate(head_losses):
        g_head = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        lam = lambda_of(k, g_rl[:n], g_head[:n]).detach()
        lambdas.append(lam)
        totals = [_add_scaled(t, lam, g) for t, g in zip(totals, g_head)]
        value = value + lam.to(value.dtype) * loss.detach()
    surrogate = value.new_zeros(())
    for p, g in zip(params, totals[:n]):
        if g is not None:
            surrogate = surrogate + (p * g).sum()
    for (x, _), g in zip(pairs, totals[n:]):
        if g is not None:
            surrogate = surrogate + (x * g.to(x.dtype)).sum()
    # straight-through: the value of the real loss, the gradient of the surrogate
    return value + (surrogate - surrogate.detach()).to(value.dtype), lambdas
