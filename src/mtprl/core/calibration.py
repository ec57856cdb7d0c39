"""`LambdaCalibrator`: every way OCC's lambda is obtained during training, in one object.

The formula itself is `occ.lambda_from_stats` (Eq. 13); what changes between lambda sources (`regimes.LAMBDA_SOURCES`)
is where c and v2 come from:
- `hat`: the paper's log-prob proxies, `occ.occ_statistics` (batch reduction; the released code's token
  reduction for `occ_variant: reference`), summed across data-parallel ranks;
- `ema`: their running average (`occ.ema_statistics`), updated on every training micro-batch whatever the regime;
- `hidden`, `last_layers`, `exact`: gradients of the RL loss and of the head's loss with respect to the trunk's
  output states, the last decoder layers, or every main-model parameter (`occ.gradient_statistics`), averaged
  across ranks as DDP averages .grad. `exact` costs one extra backward: the head loss is backpropagated on its
  own (`stash_exact_gradient` returns the stash) and after TRL's backward `add_exact_terms(stashes)` reads g_RL off
  .grad, computes lambda and adds lambda * g_MTP to .grad (the step result hands that call to the trainer);
  `last_layers` with the graph cut gets its lambda from `split_backward.split_backward_loss` (`last_layers_lambda`).
Every lambda goes through one non-finite guard (`finite_or_zero`); `fidelity` measures every source's c and v2 on
the same micro-batch. Methods that start a backward say so in their name (`..._from_gradients`, `stash_...`).
Metrics are returned (or written into the `metrics` dict the caller passes), never buffered here. Nothing here
knows TRL: `reduce` is the accelerator's all-reduce (identity on one process).

The `ema` state is not saved with checkpoints: it is an average over the last ~1/(1 - beta) micro-batches (10 at
the default beta), which one rollout's updates rebuild after a resume; saving it would tie checkpoints to one
lambda source.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .occ import OCCStats, ema_statistics, gradient_statistics, lambda_from_stats, loss_gradients, occ_statistics
from .regimes import GRADIENT_SOURCES, HeadData, Regime
from .shard_stats import global_dot, global_sq_norm


@dataclass(frozen=True)
class CalibrationSettings:
    lambda_plus: float = 1.0
    eps: float = 1e-8
    clip: bool = False
    ema_beta: float = 0.9

    @classmethod
    def from_config(cls, args) -> "CalibrationSettings":
        return cls(args.occ_lambda_plus, args.occ_eps, args.occ_clip, args.occ_ema_beta)


@dataclass
class RLGradients:
    """One micro-batch's RL loss and the trunk's output states, with d rl_loss / d X computed once per lambda
    source's inputs X and shared by every head (`LambdaCalibrator.gradient_stats` fills `cache`)."""

    rl_loss: torch.Tensor
    hidden: torch.Tensor | None
    cache: dict = field(default_factory=dict)


@dataclass
class ExactStash:
    """occ exact: head k's MTP gradient, stashed until TRL's backward of the RL loss has run."""

    depth: int
    params: list  # main-model parameters, then head parameters
    grads: list  # g_MTP over `params` (rank mean)
    dot_before: torch.Tensor  # <.grad before TRL's backward, g_MTP> over the main model (rank mean)


def _grad_dot(params, grads) -> torch.Tensor:
    """<p.grad, g> summed over `params` (float64; a parameter without .grad counts 0; shard-correct); `grads` may
    run on past them (the heads' part of a stash), which is not summed."""
    return global_dot([p.grad for p in params], grads[:len(params)]).to(grads[0].device if grads else None)


def _identity_reduce(tensor, reduction):
    return tensor


class LambdaCalibrator:
    """lambda_k for each micro-batch (see the module doc). `main_params` / `head_params`: the trainable
    parameters of the main model and of the heads; `last_params`: those of the last decoder layers (`last_layers`
    source and fidelity); `reduce(tensor, "sum" | "mean")`: across data-parallel ranks."""

    def __init__(self, settings: CalibrationSettings, main_params, head_params, last_params=(),
                 reduce: Callable = _identity_reduce, num_processes: int = 1):
        self.settings = settings
        self.main_params, self.head_params = list(main_params), list(head_params)
        self.last_params = list(last_params)
        last_ids = {id(p) for p in self.last_params}
        self._last_index = [i for i, p in enumerate(self.main_params) if id(p) in last_ids]
        self.reduce, self.num_processes = reduce, num_processes
        self.ema: dict[int, OCCStats] = {}  # head depth -> running average of the proxies (`ema` source)
        self.carried: dict[int, torch.Tensor] = {}  # head depth -> the last lambda (occ_first_update: carry)
        self._previous_g_mtp: dict[int, list] = {}  # head depth -> g_MTP of the last fidelity micro-batch (cross-fit)

    # ------------------------------------------------------------------------------------- the proxies
    def proxies(self, delta_rl, heads: list[HeadData], reduction: str = "batch") -> list[OCCStats]:
        """Per head, the proxies of c and v2 from log-prob changes (Eq. 12), summed across ranks so that every
        rank computes the same lambda. delta_rl = logp - logp_old of the main head [B, L]."""
        out = []
        for h in heads:
            stats = occ_statistics(delta_rl, (h.logq - h.old_logq).detach(), h.mask, reduction=reduction,
                                   eps=self.settings.eps, clip=self.settings.clip)
            out.append(OCCStats(*self.reduce(torch.stack(list(stats)), "sum")))
        return out

    def update_ema(self, heads: list[HeadData], stats: list[OCCStats]) -> None:
        """The running average sees every training micro-batch, whichever the regime (before its lambda)."""
        for h, s in zip(heads, stats):
            self.ema[h.depth] = ema_statistics(self.ema.get(h.depth), s, self.settings.ema_beta)

    def lambda_from(self, stats: OCCStats, depth: int, metrics: dict, reduction: str = "batch",
                    lambda_plus_scale: float = 1.0):
        """Eq. 13 with this run's lambda_plus, eps and clip, through the non-finite guard (which counts into
        `metrics`)."""
        s = self.settings
        lam = lambda_from_stats(stats, reduction=reduction, lambda_plus=s.lambda_plus * lambda_plus_scale,
                                eps=s.eps, clip=s.clip)
        return self.finite_or_zero(lam, depth, stats, metrics)

    # ------------------------------------------------------------------------------------- one head's lambda
    def advantage_lambda(self, regime: Regime, stats: OCCStats, depth: int, num_heads: int,
                         metrics: dict) -> torch.Tensor:
        """The released code's lambda, which goes inside the head's advantages (lambda_plus shared by K)."""
        return self.lambda_from(stats, depth, metrics, regime.proxy_reduction, lambda_plus_scale=1.0 / num_heads)

    def proxy_lambda(self, regime: Regime, stats: OCCStats, depth: int, metrics: dict,
                     first_update: str | None = None) -> torch.Tensor:
        """lambda of the sources that need no backward: `hat` (this micro-batch's proxies) and `ema`.
        first_update: this is the first update after a rollout and `occ_first_update` says what it gets ("zero":
        the proxies' own 0; "carry": the last lambda before it); None: a later update (its lambda is kept)."""
        if first_update == "carry" and depth in self.carried:
            return self.carried[depth]
        if regime.lambda_source == "ema":
            lam = self.lambda_from(self.ema.get(depth, stats), depth, metrics)
        else:
            lam = self.lambda_from(stats, depth, metrics, regime.proxy_reduction)
        if first_update is None:
            self.carried[depth] = lam.detach()
        return lam

    def lambda_from_gradients(self, source: str, grads: "RLGradients", head_loss, depth: int,
                              metrics: dict) -> torch.Tensor:
        """lambda of the `hidden` or (uncut) `last_layers` source: backpropagates both losses to the source's
        inputs (`gradient_stats`)."""
        return self.lambda_from(self.gradient_stats(source, grads, head_loss), depth, metrics)

    # ------------------------------------------------------------------------------------- gradient sources
    def mean_across_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Parameter gradients averaged over data-parallel ranks (what DDP does to .grad), so c and v2 are the
        global ones and every rank gets one lambda. One flat all-reduce; nothing to do on one process."""
        if self.num_processes == 1 or not tensors:
            return tensors
        flat = self.reduce(torch.cat([t.reshape(-1) for t in tensors]), "mean")
        return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def gradient_stats(self, source: str, grads: RLGradients, head_loss) -> OCCStats:
        """c and v2 of the `hidden`, `last_layers` or `exact` source (occ.py) for one head loss. d rl_loss / d X
        is computed once per micro-batch (`grads.cache`) and shared by every head."""
        if source == "hidden":
            if grads.hidden is None:
                raise RuntimeError("the hidden lambda source needs the trunk's output states of this forward (one "
                                   "forward chunk per micro-batch)")
            inputs = [grads.hidden]
        else:
            inputs = self.main_params if source == "exact" else self.last_params
        if source not in grads.cache:
            grads.cache[source] = loss_gradients(grads.rl_loss, inputs)
            if source != "hidden":
                grads.cache[source] = self.mean_across_ranks(grads.cache[source])
        g_mtp = loss_gradients(head_loss, inputs)
        if source == "hidden":  # per-token states: ranks hold disjoint tokens, so their sums add up
            stats = gradient_statistics(grads.cache[source], g_mtp)
            return OCCStats(*self.reduce(torch.stack(list(stats)), "sum"))
        return gradient_statistics(grads.cache[source], self.mean_across_ranks(g_mtp))

    def last_layers_lambda(self, depth, g_rl, g_head, metrics: dict):
        """lambda from c and v2 over the last layers' parameters (rank means), for `split_backward_loss`; g_rl
        and g_head are over `main_params + head_params` (None: no gradient)."""
        def last(grads):  # no gradient = zeros (a last-layer parameter neither loss reaches)
            return self.mean_across_ranks([torch.zeros_like(self.main_params[i]) if grads[i] is None else grads[i]
                                           for i in self._last_index])
        stats = gradient_statistics(last(g_rl), last(g_head))
        return self.lambda_from(stats, depth, metrics)

    def split_lambda_of(self, depths: list[int], metrics: dict):
        """`split_backward_loss`'s lambda_of(k, g_rl, g_head) for the heads of these depths, in that order."""
        return functools.partial(self._split_lambda, depths, metrics)

    def _split_lambda(self, depths, metrics, k, g_rl, g_head):
        return self.last_layers_lambda(depths[k], g_rl, g_head, metrics)

    def stash_exact_gradient(self, depth, head_loss) -> ExactStash:
        """occ exact, step 1 of 2: backpropagate head k's loss on its own (the one extra backward) and return its
        gradient g_MTP over the main model and the heads (one extra copy of the gradients). TRL's backward of
        the RL loss then runs as usual; `add_exact_terms` reads g_RL off .grad and adds lambda * g_MTP."""
        params = self.main_params + self.head_params
        grads = self.mean_across_ranks(loss_gradients(head_loss, params))
        before = _grad_dot(self.main_params, grads)  # .grad may already hold earlier micro-batches' gradients
        return ExactStash(depth, params, grads, self.reduce(before, "mean"))

    def add_exact_terms(self, stashes: list[ExactStash], into=None) -> dict[str, list[float]]:
        """occ exact, step 2 of 2 (after TRL's backward of the RL loss): c = <g_RL, g_MTP> with g_RL = .grad now
        minus .grad before, v2 = ||g_MTP||^2 over the main model, then .grad += lambda * g_MTP (heads included),
        in place, or into `into` (an `update_geometry.MTPGradient`, the MTP gradient kept apart). Returns mtp/lambda/k, mtp/c_exact/k, mtp/v2_exact/k. Under DDP both gradients are rank means
        (.grad is averaged on the synchronising micro-batch and the dot is averaged otherwise; <mean a, b> = mean
        <a, b>), so every rank adds the same lambda * g_MTP."""
        n_main = len(self.main_params)
        metrics: dict[str, list[float]] = {}
        lambdas = []
        for d in stashes:  # every head's c from TRL's gradient alone, before any lambda * g_MTP is added
            after = self.reduce(_grad_dot(self.main_params, d.grads), "mean")
            c = (after - d.dot_before).float()
            v2 = global_sq_norm(d.grads[:n_main]).float().to(c.device)
            lam = self.lambda_from(OCCStats(c, v2), d.depth, metrics)
            lambdas.append(lam)
            for name, value in ((f"mtp/lambda/{d.depth}", lam), (f"mtp/c_exact/{d.depth}", c),
                                (f"mtp/v2_exact/{d.depth}", v2)):
                metrics.setdefault(name, []).append(value.item())
        for d, lam in zip(stashes, lambdas):
            if into is not None:  # the MTP gradient kept apart (`update_geometry.MTPGradient`), not on .grad
                into.add([lam * g for g in d.grads], unit=d.grads[:n_main], coef=lam.item())
                continue
            for p, g in zip(d.params, d.grads):
                if p.grad is None:
                    p.grad = (lam * g).to(p.dtype)
                else:
                    p.grad.add_(g.to(p.grad.dtype), alpha=lam.item())
        return metrics

    # ------------------------------------------------------------------------------------- fidelity, guard
    def fidelity(self, depths, losses, grads: RLGradients, with_exact: bool = True,
                 preconditioner: list | None = None) -> dict[str, float]:
        """Every lambda source's c and v2 for each head's loss (coefficient 1) on this micro-batch: hidden,
        last_layers, exact (unless it comes from `add_exact_terms` this step), and the running average; with the
        exact gradients also Adam's geometry (`adam_geometry`) and the cross-fitted c (`cross_fitted_c`)."""
        metrics = {}
        sources = [s for s in GRADIENT_SOURCES if with_exact or s != "exact"]
        for depth, loss in zip(depths, losses):
            for source in sources:
                est = self.gradient_stats(source, grads, loss)
                metrics[f"mtp/c_{source}/{depth}"] = est.c_hat.item()
                metrics[f"mtp/v2_{source}/{depth}"] = est.v2_hat.item()
            metrics[f"mtp/c_ema/{depth}"] = self.ema[depth].c_hat.item()
            metrics[f"mtp/v2_ema/{depth}"] = self.ema[depth].v2_hat.item()
            if with_exact:
                metrics.update(self.exact_geometry(depth, grads, loss, preconditioner))
        return metrics

    def exact_geometry(self, depth, grads: RLGradients, head_loss, preconditioner: list | None) -> dict[str, float]:
        """What the exact c and v2 leave out, from the exact gradients over the main model (one more backward of the
        head loss): Adam's geometry c_P = <g_RL, P g_MTP>, v2_P = <g_MTP, P g_MTP> with P = 1 / (sqrt(v_hat) + eps)
        the optimizer's preconditioner (`adam_preconditioner`; skipped before its first step), and the cross-fitted
        c = <g_RL of this micro-batch, g_MTP of the previous fidelity micro-batch> (the same-batch product carries
        the two gradients' shared sampling noise)."""
        g_rl = grads.cache["exact"]
        g_mtp = self.mean_across_ranks(loss_gradients(head_loss, self.main_params))
        out = {}
        if preconditioner is not None:
            out.update({f"mtp/c_adam/{depth}": float(global_dot(g_rl, g_mtp, preconditioner)),
                        f"mtp/v2_adam/{depth}": float(global_dot(g_mtp, g_mtp, preconditioner))})
        previous = self._previous_g_mtp.get(depth)
        if previous is not None:
            out[f"mtp/c_cross/{depth}"] = float(global_dot(g_rl, previous))
        self._previous_g_mtp[depth] = [g.detach() for g in g_mtp]
        return out

    def finite_or_zero(self, coef, depth, stats, metrics: dict):
        """A NaN/inf lambda (NaN log-probs upstream) must not poison the weights: use 0 for this micro-batch,
        count it (mtp/lambda_nonfinite/k into `metrics`), and say why."""
        if torch.isfinite(coef):
            return coef
        warnings.warn(f"OCC lambda for head {depth} is {coef.item()} (c_hat={stats.c_hat.item()}, "
                      f"v2_hat={stats.v2_hat.item()}); using 0 for this micro-batch")
        metrics.setdefault(f"mtp/lambda_nonfinite/{depth}", []).append(1.0)
        return torch.zeros_like(coef)


def adam_preconditioner(optimizer, params) -> list | None:
    """P = 1 / (sqrt(v_hat) + eps) per parameter from an Adam-family optimizer's `exp_avg_sq` (bias-corrected with
    its step count and beta2); None before its first step or for an optimizer without second moments."""
    out = []
    for p in params:
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
        beta2, eps = group["betas"][1], group["eps"]
        step = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** step)
        out.append(1.0 / (v_hat.sqrt() + eps))
    return out
