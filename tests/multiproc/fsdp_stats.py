"""The gradient statistics under FSDP2 sharding, against one unsharded process (what tests/test_multiproc.py runs).

Two gloo processes shard a tiny-preset model with MTP heads by calling torch's `fully_shard` directly (every
decoder layer, every head, then the root: accelerate turns an FSDP config into DDP on the CPU, so this is the only
way to get DTensor gradients here). Both ranks take the same micro-batch, backpropagate an RL (DAPO) loss and then
the heads' CE loss, and read the global statistics off the sharded `.grad`s with `mtprl.core.shard_stats`:
c = <g_RL, g_MTP> and v2 = ||g_MTP||^2 over the main model, the clip norms ||g_RL||, ||g_MTP|| over main model and
heads, and the Adam-weighted c_P with a fixed positive weight. Rank 0 also computes them on an unsharded copy of the
same model from the same batch. Every rank writes `<output_dir>/stats_rank<R>.json` with the sharded values, the
deliberately local-only ones (the sum over the rank's own shard, no all-reduce) and, on rank 0, the unsharded ones.
(torch 2.13's FSDP2 averages the reduce-scatter on gloo too, so no force-sum workaround is applied: a gradient off by
the world size would show as a factor 2 in every norm.)

    python -m torch.distributed.run --nproc_per_node 2 tests/multiproc/fsdp_stats.py --output_dir OUT
"""

import argparse
import copy
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from mtprl.model.logprobs import add_mtp_forward
from mtprl.model.loading import char_tokenizer, tiny_model
from mtprl.model.mtp import attach_mtp_heads, get_mtp_heads
from mtprl.core.objectives import mtp_ce_loss, policy_loss
from mtprl.core.shard_stats import global_dot, global_norm, global_sq_norm


def micro_batch(tokenizer, seed=0):
    """8 rows of prompt + completion with a crafted mask and fixed advantages (the same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tokenizer), (8, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[:2, :3] = 0  # two left-padded rows
    advantages = torch.randn(8, generator=g)
    return ids, mask, advantages


def losses(model, ids, mask, advantages, keep=8):
    out = model(input_ids=ids, attention_mask=mask, mtp_logprobs={"logits_to_keep": keep})
    completion_mask = mask[:, -keep:].float()
    rl = policy_loss(out.main, out.main.detach(), advantages, completion_mask,
                     loss_type="dapo")
    mtp = mtp_ce_loss(out.mtp, out.mtp_mask.float()).sum()
    return rl, mtp


def two_gradients(model, ids, mask, advantages):
    """(g_RL, g_MTP) over every parameter: two backwards of the same forward's losses, read off .grad."""
    params = list(model.parameters())
    rl, mtp = losses(model, ids, mask, advantages)
    rl.backward(retain_graph=True)
    g_rl = [None if p.grad is None else p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    mtp.backward()
    g_mtp = [None if p.grad is None else p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    return g_rl, g_mtp


def statistics(model, g_rl, g_mtp, local_only=False):
    head_ids = {id(p) for p in get_mtp_heads(model).parameters()}
    main = [i for i, p in enumerate(model.parameters()) if id(p) not in head_ids]
    a, b = [g_rl[i] for i in main], [g_mtp[i] for i in main]
    # a fixed positive per-coordinate weight stands in for Adam's 1 / (sqrt(v_hat) + eps)
    weight = [None if x is None else torch.full_like(x, 0.5) + x.abs() for x in b]
    return {"c": float(global_dot(a, b, local_only=local_only)),
            "v2": float(global_sq_norm(b, local_only=local_only)),
            "c_adam": float(global_dot(a, b, weight, local_only=local_only)),
            "grad_norm/rl": float(global_norm(g_rl, local_only=local_only)),
            "grad_norm/mtp": float(global_norm(g_mtp, local_only=local_only))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = char_tokenizer()
    # 2 layers of the tiny preset; hidden 36 and 3 heads of 12 make the layers' shapes odd, so shards are uneven
    model = tiny_model(tok, seed=0, hidden_size=36, intermediate_size=70, num_hidden_layers=2,
                       num_attention_heads=3, num_key_value_heads=1)
    attach_mtp_heads(model, num_heads=2)
    add_mtp_forward(model, temperature=1.0)
    ids, mask, advantages = micro_batch(tok)
    out = {"world_size": world}
    if rank == 0:
        reference = copy.deepcopy(model)
        out["unsharded"] = statistics(reference, *two_gradients(reference, ids, mask, advantages))
    for layer in model.model.layers:
        fully_shard(layer)
    for head in get_mtp_heads(model).layers:
        fully_shard(head)
    fully_shard(model)
    g_rl, g_mtp = two_gradients(model, ids, mask, advantages)  # FSDP2 averages over ranks: the same batch's gradient
    out["sharded_types"] = sorted({type(g).__name__ for g in g_rl if g is not None})
    out["sharded_local_sizes"] = [g.to_local().numel() for g in g_rl if isinstance(g, DTensor)][:6]
    out["sharded"] = statistics(model, g_rl, g_mtp)
    out["local_only"] = statistics(model, g_rl, g_mtp, local_only=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, f"stats_rank{rank}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
