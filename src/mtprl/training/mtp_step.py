"""The MTP step as a value: one micro-batch's MTP term, from plain data to the loss TRL backpropagates.

`mtp_step` is the one function a batch passes through between TRL's RL loss and the backward (verl `core_algos`
style: plain tensors and numbers in, a result out; nothing read from or written to a trainer):

    head_data (each head's tensors) -> calibrator.proxies (c_hat, v2_hat, Eq. 12) -> per head: the regime's pure
    loss (`regimes.MTP_TERMS`) and its coefficient (mtp_coef, or OCC's lambda: `calibration.LambdaCalibrator`,
    whose formula is `occ.lambda_from_stats`) -> rl_loss + sum_k coef_k * loss_k [+ the head-only term]

and returns a `StepResult`: the loss, the metrics (name -> values), the heads' expected acceptance, and what must
run after the backward (`after_backward`, occ exact only: lambda from TRL's gradient, then lambda * g_MTP added
to .grad). How a head's loss enters is one table, `COMBINE` (the coefficient's source -> a function); where a
coefficient is only known later:
- `exact`: the head's gradient is stashed now (one extra backward, `stash_exact_gradient`), its lambda follows
  after TRL's backward (`StepResult.after_backward`);
- `last_layers` with the graph cut below the last layers: lambda and the loss come together from
  `split_backward.split_backward_loss`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from ..core.calibration import LambdaCalibrator, RLGradients
from ..model.logprobs import LogProbs
from ..core.objectives import HEAD_LOSS_DIVERGENCE, head_only_loss
from ..core.regimes import HeadData, LossScaling, Regime, head_data, head_policy_loss, with_scaled_advantages
from ..core.split_backward import TrunkCut, split_backward_loss

# (mtp_grad, divergence) -> (mtp [B, K, L], head hidden, divergence [B, K, L] | None, context [B, K, L]): the heads
# re-run on this forward's trunk states (`logprobs.head_logprobs`), for the head-only term and fidelity steps.
RerunHeads = Callable[[str, "bool | str"], tuple]


def token_mask(inputs: Mapping) -> torch.Tensor:
    """The completion tokens TRL's loss counts (tool output excluded)."""
    return inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]


@dataclass(frozen=True)
class StepSettings:
    """What the step adds, as plain values."""

    regime: Regime  # the table entry (`regimes.regime_for`)
    mtp_coef: float = 0.1  # the fixed coefficient (regimes with coef == "fixed")
    head_loss: str = "none"  # mtp_head_loss, `auto` resolved: none | ce | distill | tv
    head_coef: float = 1.0  # mtp_head_coef
    accumulation: int = 1  # TRL's current gradient-accumulation steps (the head-only term is divided by it)
    training: bool = True  # a training micro-batch with grad: lambda sources that need a backward run only then
    fidelity: bool = False  # also measure every lambda source's c and v2 (occ_fidelity_every)
    # the MTP part's gradient taken apart (one extra backward) and returned instead of left in the loss
    # (`mtp_grad_clip` / `mtp_optimizer_state: separate` where the term reaches the trunk; update_geometry.py)
    keep_apart: bool = False
    unit_gradient: bool = False  # with keep_apart: also the term's trunk gradient at coefficient 1 (its own moments)
    # the first update after a rollout: what OCC's proxy lambda is there ("zero" | "carry", occ_first_update);
    # None on later updates
    first_update: str | None = None


@dataclass
class StepResult:
    """What one micro-batch's MTP step gives back to the trainer."""

    loss: torch.Tensor  # the loss to backpropagate (TRL's + the MTP term)
    metrics: dict[str, list[float]] = field(default_factory=dict)  # logged as they are
    acceptance: list[float | None] = field(default_factory=list)  # per depth, mtp/accept/k (None: not computed)
    # Run once after the backward of `loss` (occ exact), with the trainer's `MTPGradient` under keep_apart (else
    # None: lambda * g_MTP goes onto .grad); returns its metrics (mtp/lambda/k, mtp/c_exact/k, ...).
    after_backward: Callable[..., dict[str, list[float]]] | None = None
    # keep_apart: (the MTP part's gradient over main + head parameters, its trunk gradient at coefficient 1 or
    # None, the mean coefficient), all rank means; the loss then holds the RL loss alone
    mtp_gradient: tuple | None = None


def _add(metrics: dict, name: str, value: float) -> None:
    metrics.setdefault(name, []).append(float(value))


def mtp_step(rl_loss: torch.Tensor, logprobs: LogProbs, inputs: Mapping, settings: StepSettings,
             scaling: LossScaling, calibrator: LambdaCalibrator, *, rerun_heads: RerunHeads | None = None,
             cut: TrunkCut | None = None, preconditioner: list | None = None) -> StepResult:
    """TRL's loss plus the regime's MTP term for this micro-batch (summed over heads), and everything it measured.

    rl_loss: TRL's own loss of the micro-batch; logprobs: the forward it was computed from (`LogProbs`, heads
    included); inputs: TRL's micro-batch (old log-probs, masks, advantages); scaling: TRL's loss scaling as numbers;
    rerun_heads: re-runs the heads on this forward's trunk (needed by the head-only term and fidelity steps);
    cut: the graph was cut below the last layers (occ last_layers, `split_backward.TrunkCut`); preconditioner: Adam's
    1 / (sqrt(v_hat) + eps) over the main parameters on fidelity steps (`calibration.adam_preconditioner`)."""
    regime, training = settings.regime, settings.training
    old_main = inputs.get("old_per_token_logps")
    old_main = logprobs.main.detach() if old_main is None else old_main
    mask = token_mask(inputs)
    heads = head_data(logprobs.main, logprobs.mtp, old_main, inputs.get("old_mtp_logps"), mask,
                      inputs["advantages"], regime.ratio_against, logprobs.mtp_mask, logprobs.divergence)
    # Logged for every regime: the proxies are how the regimes differ.
    stats = calibrator.proxies((logprobs.main - old_main).detach(), heads, regime.proxy_reduction)
    if training:
        calibrator.update_ema(heads, stats)
    grads = RLGradients(rl_loss, logprobs.hidden) if training else None
    metrics: dict[str, list[float]] = {}
    combined = Combined(rl_loss.new_zeros(()))  # the MTP part, summed apart and added to rl_loss once
    fidelity_losses = []
    for h, s in zip(heads, stats):
        head = HeadStep(h, s, len(heads), regime, settings, scaling, calibrator, grads, cut, metrics)
        loss = COMBINE[combine_rule(regime)](head, combined)
        # fidelity measures c, v2 of the head's loss at coefficient 1 (the released code's lambda sits inside it)
        fidelity_losses.append(head_policy_loss(h, scaling) if regime.lambda_in_advantages else loss)
        _add(metrics, f"mtp/c_hat/{h.depth}", s.c_hat.item())
        _add(metrics, f"mtp/v2_hat/{h.depth}", s.v2_hat.item())
        _add(metrics, f"mtp/loss/{h.depth}", loss.item())
    term, coefs, stashes, split = combined.now, combined.coefs, combined.exact, combined.cut
    acceptance = _acceptance(logprobs, heads, calibrator, metrics)
    if training and settings.fidelity:
        if regime.mtp_grad == "detach":  # c and v2 over the main model: the head losses on the live trunk
            fidelity_losses = _joint_head_losses(logprobs, inputs, regime, scaling, rerun_heads)
        for name, value in calibrator.fidelity([h.depth for h in heads], fidelity_losses, grads,
                                               with_exact=not stashes, preconditioner=preconditioner).items():
            _add(metrics, name, value)
    if settings.head_loss != "none" and training:  # the heads always learn, whatever reaches the trunk
        head_losses = _head_only_losses(settings.head_loss, mask, rerun_heads)
        term = term + settings.head_coef * head_losses.mean() / settings.accumulation
        for k, value in enumerate(head_losses.tolist(), start=1):
            _add(metrics, f"mtp/head_loss/{k}", value)
    after_backward = mtp_gradient = None
    if settings.keep_apart and training and term.requires_grad:  # the regime's terms and the head-only term
        term, mtp_gradient = _taken_apart(term, coefs, calibrator, settings.unit_gradient)
    if stashes:
        term = term + sum(p.sum() for p in calibrator.head_params) * 0.0  # heads in this graph (DDP's check)
        after_backward = functools.partial(calibrator.add_exact_terms, stashes)
        _add(metrics, "mtp/exact_stash_bytes", sum(g.numel() * g.element_size() for s in stashes for g in s.grads))
    if split:
        total, lambdas = split_backward_loss(rl_loss + term, [loss for _, loss in split],
                                             calibrator.main_params + calibrator.head_params, cut.pairs,
                                             calibrator.split_lambda_of([depth for depth, _ in split], metrics))
        for (depth, _), lam in zip(split, lambdas):
            _add(metrics, f"mtp/lambda/{depth}", lam.item())
    else:
        total = rl_loss + term
    return StepResult(total, metrics, acceptance, after_backward, mtp_gradient)


def _taken_apart(term, coefs, calibrator: LambdaCalibrator, unit_gradient: bool):
    """(what stays in the loss beside the RL loss: a zero that keeps the heads in the graph, the MTP part's
    gradients): the MTP part `term`
    backpropagated on its own over the main and head parameters (the one extra backward), rank means."""
    params = calibrator.main_params + calibrator.head_params
    grads = calibrator.mean_across_ranks(_zero_filled(torch.autograd.grad(
        term, params, retain_graph=True, allow_unused=True), params))
    unit = None
    if unit_gradient and coefs:
        main = calibrator.main_params
        unit = calibrator.mean_across_ranks(_zero_filled(torch.autograd.grad(
            sum(loss for loss, _ in coefs), main, retain_graph=True, allow_unused=True), main))
    keep = sum(p.sum() for p in calibrator.head_params) * 0.0  # heads in this graph (DDP's check)
    return keep, (grads, unit, sum(c for _, c in coefs) / len(coefs) if coefs else None)


def _zero_filled(grads, params) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@dataclass
class Combined:
    """The MTP part of one micro-batch as its heads are added (`COMBINE`)."""

    now: torch.Tensor  # sum_k coef_k * loss_k over the heads whose coefficient is known now
    coefs: list = field(default_factory=list)  # (loss, coef) of those heads (the separate moments' unit gradient)
    exact: list = field(default_factory=list)  # occ exact: each head's stashed gradient, combined after the backward
    cut: list = field(default_factory=list)  # occ last_layers on the cut graph: (depth, loss), combined in one backward

    def add(self, loss: torch.Tensor, coef: torch.Tensor, depth: int, metrics: dict) -> None:
        self.now = self.now + coef.to(loss.dtype) * loss
        self.coefs.append((loss, float(coef)))
        _add(metrics, f"mtp/lambda/{depth}", coef)


@dataclass(frozen=True)
class HeadStep:
    """What head k's combination rule may read: its data and proxies, the step's settings, the calibrator, TRL's
    RL gradients (None outside a training micro-batch) and the graph cut (occ last_layers)."""

    data: HeadData
    stats: object  # OCCStats
    num_heads: int
    regime: Regime
    settings: StepSettings
    scaling: LossScaling
    calibrator: LambdaCalibrator
    grads: RLGradients | None
    cut: TrunkCut | None
    metrics: dict


def combine_rule(regime: Regime) -> str:
    """The `COMBINE` key of a regime: where its coefficient comes from."""
    if regime.lambda_in_advantages:
        return "advantages"
    return "fixed" if regime.coef == "fixed" else regime.lambda_source


def _fixed(head: HeadStep, into: Combined) -> torch.Tensor:
    """mtp_coef times the head's loss."""
    loss = head.regime.loss(head.data, head.scaling)
    into.add(loss, torch.tensor(float(head.settings.mtp_coef)), head.data.depth, head.metrics)
    return loss


def _in_advantages(head: HeadStep, into: Combined) -> torch.Tensor:
    """The released code: lambda known before the loss, inside the head's advantages (the loss carries it)."""
    lam = head.calibrator.advantage_lambda(head.regime, head.stats, head.data.depth, head.num_heads, head.metrics)
    loss = head.regime.loss(with_scaled_advantages(head.data, lam), head.scaling)
    into.now = into.now + loss
    into.coefs.append((loss, float(lam)))
    _add(head.metrics, f"mtp/lambda/{head.data.depth}", lam)
    return loss


def _proxy(head: HeadStep, into: Combined) -> torch.Tensor:
    """`hat` / `ema`: OCC's lambda from the log-prob proxies (no backward)."""
    loss = head.regime.loss(head.data, head.scaling)
    lam = head.calibrator.proxy_lambda(head.regime, head.stats, head.data.depth, head.metrics,
                                       head.settings.first_update)
    into.add(loss, lam, head.data.depth, head.metrics)
    return loss


def _from_gradients(head: HeadStep, into: Combined) -> torch.Tensor:
    """`hidden` (and `last_layers` where the graph is whole: fidelity steps): lambda from both losses'
    gradients at the source's inputs. Outside a training micro-batch there is no backward: lambda 0."""
    loss = head.regime.loss(head.data, head.scaling)
    if head.grads is None:
        lam = torch.zeros((), device=loss.device)
    else:
        lam = head.calibrator.lambda_from_gradients(head.regime.lambda_source, head.grads, loss, head.data.depth,
                                                    head.metrics)
    into.add(loss, lam, head.data.depth, head.metrics)
    return loss


def _exact(head: HeadStep, into: Combined) -> torch.Tensor:
    """`exact`: the head's gradient stashed now (one extra backward); lambda and lambda * g_MTP after TRL's
    backward (`StepResult.after_backward`). Outside training: lambda 0."""
    if head.grads is None:
        return _from_gradients(head, into)
    loss = head.regime.loss(head.data, head.scaling)
    into.exact.append(head.calibrator.stash_exact_gradient(head.data.depth, loss))
    return loss


def _last_layers(head: HeadStep, into: Combined) -> torch.Tensor:
    """`last_layers`: on the graph cut below the last layers (`split_backward.TrunkCut`) lambda and the loss come
    from one backward (`split_backward_loss`); where the trainer ran the forward uncut (fidelity steps, which need
    the whole trunk's gradient for the other sources) the same lambda by the gradient path."""
    if head.grads is None or head.cut is None:
        return _from_gradients(head, into)
    loss = head.regime.loss(head.data, head.scaling)
    into.cut.append((head.data.depth, loss))
    return loss


# Where a head's coefficient comes from -> how its loss enters the step (verl's one table of named functions).
COMBINE = {"fixed": _fixed, "advantages": _in_advantages, "hat": _proxy, "ema": _proxy, "hidden": _from_gradients,
           "exact": _exact, "last_layers": _last_layers}


def _acceptance(logprobs: LogProbs, heads: list[HeadData], calibrator: LambdaCalibrator,
                metrics: dict) -> list[float | None]:
    """mtp/accept/k: sum_v min(p_main, q_k) over the completion tokens head k has context for (rank-summed)."""
    if logprobs.accept is None:
        return [None] * len(heads)
    out = []
    for h in heads:
        sums = calibrator.reduce(torch.stack([(logprobs.accept[:, h.depth - 1] * h.mask).sum(),
                                              h.mask.sum().float()]), "sum")
        out.append((sums[0] / sums[1].clamp(min=1.0)).item())
        _add(metrics, f"mtp/accept/{h.depth}", out[-1])
    return out


def _joint_head_losses(logprobs: LogProbs, inputs: Mapping, regime: Regime, scaling: LossScaling,
                       rerun_heads: RerunHeads) -> list[torch.Tensor]:
    """For detached regimes (detach, distill) on a fidelity step: their head losses recomputed on the live trunk."""
    mtp, _, divergence, _ = rerun_heads("joint", regime.divergence)
    heads = head_data(logprobs.main, mtp, inputs.get("old_per_token_logps"), inputs.get("old_mtp_logps"),
                      token_mask(inputs), inputs["advantages"], regime.ratio_against, logprobs.mtp_mask, divergence)
    return [regime.loss(h, scaling) for h in heads]


def _head_only_losses(kind: str, mask: torch.Tensor, rerun_heads: RerunHeads) -> torch.Tensor:
    """`mtp_head_loss` per head [K]: the heads re-run on the trunk's states, embeddings and LM head detached
    (their gradient reaches the heads' own parameters only)."""
    mtp, _, divergence, context = rerun_heads("detach", HEAD_LOSS_DIVERGENCE.get(kind))
    return head_only_loss(kind, mtp, divergence, mask.unsqueeze(1) * context.to(mask.dtype))
