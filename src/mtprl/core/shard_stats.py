"""Global dot products and norms of gradients that may be sharded: the one reduction every gradient statistic uses.

c = <g_RL, g_MTP>, v2 = ||g_MTP||^2, Adam's c_P / v2_P, the clip norms and ||delta theta|| are sums over every
coordinate of the model. Where a gradient is a plain tensor (one process, or DDP after its all-reduce: every rank
holds the same full gradient) the local sum is the global one. Under FSDP2 a gradient is a DTensor whose local
part is one shard: the global sum is the sum of the local-shard sums, all-reduced once over the mesh dimensions
the tensor is sharded on, and not over a dimension it is replicated on (HSDP's replicate dimension holds copies, so
summing there would count every coordinate once per replica). A `Partial` placement (a gradient whose reduction
is still pending) is refused: its local parts are not yet the gradient.

Sums accumulate in float64 per mesh group and are all-reduced once per group, whatever the number of tensors.
`local_only=True` is the deliberately wrong variant (the sum over this rank's shard alone), kept so the multi-process
test shows that the all-reduce is what makes the statistics right (tests/multiproc/fsdp_stats.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch has no FSDP2
    DTensor = ()


def _local_and_groups(t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The tensor's local values and the process groups its shards are spread over (() for a plain tensor)."""
    if not isinstance(t, DTensor):
        return t, ()
    groups = []
    for dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise ValueError("a gradient with a Partial placement (its reduction still pending) has no global dot "
                             "product yet; read it after the optimizer-step boundary's reduce-scatter")
        if placement.is_shard():
            groups.append(t.device_mesh.get_group(dim))
    return t.to_local(), tuple(groups)


def global_dot(a, b, weight=None, *, local_only: bool = False) -> torch.Tensor:
    """sum over every coordinate of a_i * b_i (* weight_i) for parallel lists of tensors (None in either: skipped),
    in float64, exact under FSDP2 sharding (see the module doc). Returns a 0-dim float64 tensor on the CPU."""
    weight = [None] * len(a) if weight is None else weight
    if not (len(a) == len(b) == len(weight)):
        raise ValueError(f"global_dot needs parallel lists, got {len(a)}, {len(b)} and {len(weight)} tensors")
    partial: dict[tuple, torch.Tensor] = {}  # shard groups -> the local sum over the tensors sharded over them
    for x, y, w in zip(a, b, weight):
        if x is None or y is None:
            continue
        x, groups = _local_and_groups(x.detach())
        y, _ = _local_and_groups(y.detach())
        term = x.double() * y.double()
        if w is not None:
            term = term * _local_and_groups(w.detach())[0].double()
        total = term.sum()
        partial[groups] = partial[groups] + total if groups in partial else total
    out = torch.zeros((), dtype=torch.float64)
    for groups, total in partial.items():
        if not local_only:
            for group in groups:
                dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        out = out + total.cpu()
    return out


def global_sq_norm(tensors, *, local_only: bool = False) -> torch.Tensor:
    """sum ||t||^2 over tensors (None skipped), float64, exact under FSDP2 sharding."""
    tensors = list(tensors)
    return global_dot(tensors, tensors, local_only=local_only)


def global_norm(tensors, *, local_only: bool = False) -> torch.Tensor:
    """sqrt(sum ||t||^2) over tensors (None skipped), float64, exact under FSDP2 sharding."""
    return global_sq_norm(tensors, local_only=local_only).sqrt()
