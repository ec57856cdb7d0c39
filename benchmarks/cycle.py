"""Where a verify cycle's time goes: the sampler's cycle against its floor, with a breakdown, in one process.

    python benchmarks/cycle.py [--setups smollm2,drafter] [--batches 1,8] [--drafts 1,2] [--vocab 2048] [--json PATH]
    python benchmarks/cycle.py --smoke --setups drafter --batches 1 --drafts 1 --repeats 1  # seconds, for the tests

The floor of a cycle with D drafts is what it cannot avoid: one trunk forward over D+1 new tokens against a KV
cache with the target's LM-head rows (the verify), plus D head steps (a head layer over the sampler's chunk of 2D
tokens, and one row of the LM head: its full 49k rows for SmolLM2, or the trimmed `--vocab`), each timed alone
here on the same model, batch and cache length.
The cycle is `speculative_generate`'s own (loop seconds / cycles), run with every component wrapped by a timer:
trunk forwards, head layers, LM-head logits (draft and verify), softmax/warpers, the accept step; what remains is
the sampler's bookkeeping (cache masks, gathers, scatters, Python). Cycle / floor is the sampler's overhead.
Setups: those of benchmarks/rollout.py (smollm2, drafter, tiny), each skipped with a line when its model is absent.
`--smoke`: the smallest run (rollout.py's small drafter: 2 layers of width 64, 10 training steps, 16 new tokens),
seconds on a CPU, what tests/test_benchmarks.py runs; its numbers mean nothing.
JSON: {"rows": [{"setup", "batch", "drafts", "vocab", "cycle_ms", "floor_ms", "overhead", "verify_alone_ms",
"head_step_alone_ms", "plain_step_alone_ms", "breakdown_ms": {component: ms}}], "date", ...}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import warnings
from collections import defaultdict

import torch
from transformers import DynamicCache

from mtprl.generation import speculative
from mtprl.model.mtp import decoder_of, get_mtp_heads

import rollout as rollout_bench  # its setups, prompts, calibrated vocabulary (benchmarks/ is on sys.path)
from common import add_model_arguments, progress, run_setups

def _median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def floor_seconds(model, ids, drafts, cache_len, draft_vocab, repeats):
    """Timed alone: (the verify: a trunk forward over D+1 cached tokens and its LM-head rows, one head step, a
    plain step: the same over 1 token). The cycle's floor is verify + D * head step."""
    decoder, heads = decoder_of(model), get_mtp_heads(model)
    embed, rotary = model.get_input_embeddings(), getattr(decoder, "rotary_emb", None)
    batch = ids.shape[0]
    context = torch.randint(2, model.config.vocab_size, (batch, cache_len))
    cache = DynamicCache()
    decoder(input_ids=context, past_key_values=cache, use_cache=True)
    new = torch.randint(2, model.config.vocab_size, (batch, drafts + 1))
    pos = torch.arange(cache_len, cache_len + drafts + 1).expand(batch, -1)

    def trunk(width=drafts + 1):  # the verify: decoder over `width` new tokens, the target's LM-head rows
        h = decoder(input_ids=new[:, :width], position_ids=pos[:, :width], past_key_values=cache,
                    use_cache=True).last_hidden_state
        speculative._lm_logits(model, h)
        cache.crop(-width)  # back to the context alone

    head_cache = DynamicCache()
    h_ctx = torch.randn(batch, cache_len, embed.weight.shape[1])
    emb_ctx = embed(context)
    pe = rotary(emb_ctx, torch.arange(cache_len).expand(batch, -1)) if rotary is not None else None
    heads.layers[0](emb_ctx, h_ctx, position_embeddings=pe, attention_mask=None,
                    position_ids=torch.arange(cache_len).expand(batch, -1), past_key_values=head_cache, use_cache=True)
    width = 2 * drafts
    chunk = torch.randint(2, model.config.vocab_size, (batch, width))
    h = torch.randn(batch, width, embed.weight.shape[1])
    cpos = torch.arange(cache_len, cache_len + width).expand(batch, -1)
    logits = speculative._draft_logits_fn(model, draft_vocab)
    warpers = speculative.logits_warpers(1.0, 0, 1.0)

    def head_step():
        emb = embed(chunk)
        cpe = rotary(emb, cpos) if rotary is not None else None
        out = heads.layers[0](emb, h, position_embeddings=cpe, attention_mask=None, position_ids=cpos,
                              past_key_values=head_cache, use_cache=True)
        head_cache.crop(-width)
        torch.multinomial(speculative.processed_probs(logits(out[:, -1]), warpers), 1)

    return (_median_seconds(trunk, repeats), _median_seconds(head_step, repeats),
            _median_seconds(lambda: trunk(1), repeats))


class Timers:
    """Wraps the sampler's components; `seconds[name]` accumulates their wall time while enabled."""

    def __init__(self, model):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.on = False
        decoder, heads = decoder_of(model), get_mtp_heads(model)
        self._patched = [(decoder, "forward", "trunk"), *[(layer, "forward", "head layers") for layer in heads.layers],
                         (speculative, "_lm_logits", "LM head"), (speculative, "processed_probs", "softmax + warpers"),
                         (speculative, "accept_drafts", "accept")]
        self._originals = []
        for owner, attr, name in self._patched:
            original = getattr(owner, attr)
            self._originals.append((owner, attr, original))
            setattr(owner, attr, self._timed(original, name))
        original_fn = speculative._draft_logits_fn  # trimmed drafts use their own [V_d, H] copy of the LM head
        self._originals.append((speculative, "_draft_logits_fn", original_fn))
        speculative._draft_logits_fn = lambda model, ids: self._timed(original_fn(model, ids), "LM head")

    def _timed(self, fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1
        return wrapper

    def restore(self):
        for owner, attr, original in self._originals:
            setattr(owner, attr, original)


def run_setup(name, setup, args):
    model, tok, prompts, sampling, eos = setup
    model.eval()
    vocabulary = (rollout_bench._calibrated_vocabulary(model, tok, prompts, sampling, eos, args, torch.device("cpu"))
                  if args.vocab else None)
    rows = []
    for batch in args.batches:
        ids, mask = rollout_bench._encode(tok, prompts, batch, torch.device("cpu"))
        opts = dict(sampling, do_sample=True, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        for drafts in args.drafts:
            if drafts > model.mtp_heads.num_heads:
                continue
            for vocab_name, draft_vocab in (("full", None), ("trimmed", None if vocabulary is None
                                                             else vocabulary.ids())):
                if vocab_name == "trimmed" and draft_vocab is None:
                    continue
                cache_len = ids.shape[1] + sampling["max_new_tokens"] // 2  # the mean cache length of a rollout
                trunk_s, head_s, plain_s = floor_seconds(model, ids, drafts, cache_len, draft_vocab, args.repeats)
                floor = trunk_s + drafts * head_s
                timers = Timers(model)
                try:
                    speculative.speculative_generate(model, ids, mask, num_draft_tokens=drafts, draft_vocab=draft_vocab,
                                                     **opts)  # warm-up
                    cycles, loop = 0, 0.0
                    timers.on = True
                    for _ in range(args.repeats):
                        out = speculative.speculative_generate(model, ids, mask, num_draft_tokens=drafts,
                                                               draft_vocab=draft_vocab, **opts)
                        cycles += out.verify_forwards - 1
                        loop += out.loop_seconds
                    timers.on = False
                finally:
                    timers.restore()
                prefill = out.prefill_seconds * args.repeats  # the prefill's trunk forward is not part of the loop
                parts = dict(timers.seconds)
                parts["trunk"] = max(parts.get("trunk", 0.0) - prefill, 0.0)
                cycle = loop / max(cycles, 1)
                per_cycle = {k: v / max(cycles, 1) for k, v in parts.items()}
                per_cycle["bookkeeping"] = max(cycle - sum(per_cycle.values()), 0.0)
                row = {"setup": name, "batch": batch, "drafts": drafts, "vocab": vocab_name,
                       "cycle_ms": 1000 * cycle, "floor_ms": 1000 * floor, "overhead": cycle / floor,
                       "verify_alone_ms": 1000 * trunk_s, "head_step_alone_ms": 1000 * head_s,
                       "plain_step_alone_ms": 1000 * plain_s,
                       "breakdown_ms": {k: 1000 * v for k, v in per_cycle.items()}}
                rows.append(row)
                shares = ", ".join(f"{k} {v / cycle:.0%}" for k, v in sorted(per_cycle.items(), key=lambda kv: -kv[1]))
                progress(f"{name} batch {batch} D={drafts} {vocab_name}: cycle {1000 * cycle:.1f} ms, floor "
                         f"{1000 * floor:.1f} ms (verify {1000 * trunk_s:.1f} + {drafts} x head {1000 * head_s:.1f}) "
                         f"-> {cycle / floor:.2f}x; a plain 1-token step alone {1000 * plain_s:.1f} ms; "
                         f"cycle = {shares}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="smollm2,drafter")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--drafts", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=0, help="also the trimmed draft vocabulary of this size")
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--tiny_model", default="runs/tiny-sft")
    add_model_arguments(p)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.drafts = [int(d) for d in args.drafts.split(",")]
    warnings.filterwarnings("ignore")
    rows = run_setups(args.setups, rollout_bench.SETUPS, args, run_setup)
    parts = sorted({k for r in rows for k in r["breakdown_ms"]})
    print("\n| setup | batch | drafts | draft vocab | plain step alone (ms) | cycle (ms) | floor (ms) | cycle / floor "
          "| " +
          " | ".join(parts) + " |")
    print("|---" * (8 + len(parts)) + "|")
    for r in rows:
        print(f"| {r['setup']} | {r['batch']} | {r['drafts']} | {r['vocab']} | {r['plain_step_alone_ms']:.1f} | "
              f"{r['cycle_ms']:.1f} | "
              f"{r['floor_ms']:.1f} | {r['overhead']:.2f}x | " +
              " | ".join(f"{r['breakdown_ms'].get(k, 0.0):.1f}" for k in parts) + " |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                       "torch": torch.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
