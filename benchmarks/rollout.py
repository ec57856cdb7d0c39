"""Rollout throughput: completion tokens per second of TRL's plain `model.generate` path against the heads drafting
(`mtprl.speculative_generate` with 0, 1, 2 drafts and the adaptive policy), in one process on the same prompts.

    python benchmarks/rollout.py [--setups tiny,drafter,smollm2] [--batches 1,8,32] [--repeats 5] [--json PATH]
    python benchmarks/rollout.py --smoke --setups drafter,tiny --tiny_model tiny --batches 1 --repeats 1  # seconds

Setups (each skipped with a line when its model is absent):
  tiny     the demo's warm start (runs/tiny-sft: `mtprl sft --config configs/tiny_sft.yaml`), the demo's chain-sum
           prompts and settings (6 new tokens, temperature 1, top-p 1); `--tiny_model tiny`: the untrained preset
  drafter  drafting cheap and right: an 8-layer trunk (hidden 256) and two heads trained together here for a few
           hundred steps on a noisy cycle language (acceptance ~0.8), 64 new tokens, no EOS
  smollm2  SmolLM2-135M-Instruct with its warmed head (runs/smollm2-heads: `configs/smollm2_heads.yaml`), chat
           prompts of the arithmetic file, up to 128 new tokens
Methods are interleaved inside every repeat (machine noise hits them alike); the median per method is reported with
its ratio to `generate`. Per drafting method also: the measured acceptance length (tokens per verify forward), the
relative cost of one verify cycle (seconds per cycle / plain sampler's), and the ideal ratio = accept length / cost
(what the sampler would give if the prefill were free). The adaptive policy first measures every draft count twice
(its exploration: each count twice, not timed), then is timed like the others.
`--smoke` (with `--batches 1 --repeats 1`): the smallest run, seconds on a CPU, what tests/test_benchmarks.py runs
so the script cannot rot unseen: the drafter shrinks to 2 layers of width 64 trained for 10 steps and 16 new
tokens; its numbers mean nothing.
JSON: {"rows": [{"setup", "batch", "method", "tokens_per_s", "ratio", "accept_length", "cycle_cost", "ideal",
"draft_tokens"}], "device", "date", ...}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings

import torch

import mtprl
from mtprl.generation.draft_vocab import DraftVocabulary, generated_mask
from mtprl.generation.rollout import AdaptiveDraft, _bucket, sample_with_heads
from mtprl.generation.speculative import expected_accept_length, speculative_generate

from common import progress, run_setups


def _tiny(args):
    from mtprl.model.loading import load_model
    from mtprl.data.prompts import prompt_text
    from mtprl.data.tasks import load_task_splits

    if args.tiny_model != "tiny" and not os.path.isdir(args.tiny_model):
        return None
    model, tok = load_model(args.tiny_model)  # "tiny": the untrained preset (one fresh head)
    train, _ = load_task_splits("reasoning_gym:chain_sum", 256, 16, 0, min_terms=2, max_terms=3, min_digits=1,
                                max_digits=1)
    prompts = [prompt_text(tok, p) for p in train["prompt"]]
    return model, tok, prompts, dict(max_new_tokens=6, temperature=1.0, top_p=1.0), tok.eos_token_id


def _smollm2(args):
    from mtprl.model.loading import load_model
    from mtprl.data.prompts import prompt_text
    from mtprl.data.tasks import load_math_splits

    if not (os.path.isdir(args.smollm2_model) and os.path.isfile(args.math_file)):
        return None
    model, tok = load_model(args.smollm2_model)
    train, _ = load_math_splits(args.math_file, 256, 16, 0, prompt_format="chat")
    prompts = [prompt_text(tok, p) for p in train["prompt"]]
    return model, tok, prompts, dict(max_new_tokens=128, temperature=1.0, top_p=1.0), tok.eos_token_id


def _drafter(args):
    """An 8-layer trunk with two heads trained jointly (main CE + heads CE) on a noisy cycle language (`--smoke`:
    2 layers of width 64, 10 training steps, 16 new tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab, noise = 64, 0.05
    smoke = getattr(args, "smoke", False)  # cycle.py and rl_step.py build this setup from their own arguments
    layers, hidden, steps, new_tokens = (2, 64, min(args.drafter_steps, 10), 16) if smoke else (
        8, 256, args.drafter_steps, 64)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    mtprl.attach_mtp_heads(model, num_heads=2)
    g = torch.Generator().manual_seed(0)

    def batch(n, length):
        start = torch.randint(0, vocab - 2, (n, 1), generator=g)
        ids = 2 + (start + torch.arange(length)) % (vocab - 2)
        flip = torch.rand(n, length, generator=g) < noise
        return torch.where(flip, torch.randint(2, vocab, (n, length), generator=g), ids)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    progress(f"drafter: training the {layers}-layer trunk and its 2 heads for {steps} steps")
    for _ in range(steps):
        ids = batch(16, 64)
        out = mtprl.forward_logprobs(model, ids, None, 60)
        loss = -out.main.mean() - out.mtp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        ids = batch(32, 64)
        accept = mtprl.forward_logprobs(model, ids, None, 60, compute_accept=True).accept.mean(dim=(0, 2))
    progress(f"drafter: expected acceptance per head {[round(a, 3) for a in accept.tolist()]}")

    class Tok:
        pad_token_id, eos_token_id = 0, None

    prompts = batch(256, 12)
    return model, Tok(), prompts, dict(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0), None


SETUPS = {"tiny": _tiny, "drafter": _drafter, "smollm2": _smollm2}


def _encode(tok, prompts, batch, device):
    if isinstance(prompts, torch.Tensor):
        ids = prompts[:batch].to(device)
        return ids, torch.ones_like(ids)
    enc = tok(prompts[:batch], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _completion_tokens(sequences, prompt_len, pad_token_id, eos_token_id):
    """Generated tokens up to and including each row's EOS (what TRL keeps)."""
    gen = sequences[:, prompt_len:]
    if eos_token_id is None:
        return gen.numel()
    is_eos = gen == eos_token_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    return int((~after).sum())


def _calibrated_vocabulary(model, tok, prompts, sampling, eos, args, device):
    """The `--vocab` most frequent tokens of the model's own completions (plain `generate`) of the last
    `--calibration` prompts, which the timed batches (the first prompts) never use: what `mtp_draft_vocab_size`
    holds after a few rollouts in RL."""
    ids, mask = _encode(tok, prompts[-args.calibration:], args.calibration, device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                             max_new_tokens=sampling["max_new_tokens"], temperature=sampling["temperature"],
                             top_p=sampling["top_p"], pad_token_id=tok.pad_token_id, eos_token_id=eos)
    vocabulary = DraftVocabulary(args.vocab, model.get_output_embeddings().weight.shape[0])
    vocabulary.observe(out[:, ids.shape[1]:], generated_mask(out, ids.shape[1], eos))
    return vocabulary


def _predicted_accept_length(model, out, prompt_len, eos, top_p, draft_vocab):
    """Tokens per verify predicted from the heads' expected acceptance (`mtp/accept/k` under the sampler's law and
    draft vocabulary) over the completion tokens the sampler wrote: (1 + a_1 + a_1 a_2 + ... from the mean
    acceptances, the sampler's walk over the per-position acceptances: `speculative.expected_accept_length`)."""
    from mtprl.generation.speculative import logits_warpers

    seqs = out.sequences
    gen = generated_mask(seqs, prompt_len, eos)
    mask = torch.cat([(seqs[:, :prompt_len] != -1).long(), gen.long()], 1)
    with torch.no_grad():
        accept = mtprl.forward_logprobs(model, seqs, mask, seqs.shape[1] - prompt_len, compute_accept=True,
                                        accept_truncation=logits_warpers(1.0, 0, top_p),
                                        accept_draft_vocab=draft_vocab).accept
    keep = gen.unsqueeze(1).float()
    rates = ((accept * keep).sum(dim=(0, 2)) / keep.sum(dim=(0, 2)).clamp(min=1)).tolist()
    total, run = 1.0, 1.0
    for a in rates[: out.num_draft_tokens]:
        run *= a
        total += run
    return total, expected_accept_length(accept, gen.sum(1), out.num_draft_tokens)


def run_setup(name, setup, args, device):
    model, tok, prompts, sampling, eos = setup
    model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    heads = model.mtp_heads.num_heads
    drafts = [d for d in (0, 1, 2) if d <= heads]
    vocabulary = _calibrated_vocabulary(model, tok, prompts, sampling, eos, args, device) if args.vocab else None
    if vocabulary is not None:
        progress(f"{name}: draft vocabulary of {args.vocab} tokens from {args.calibration} calibration completions")
    rows = []
    for batch in args.batches:
        ids, mask = _encode(tok, prompts, batch, device)
        pad = tok.pad_token_id
        opts = dict(sampling, do_sample=True, eos_token_id=eos, pad_token_id=pad)
        adaptive = AdaptiveDraft(max(drafts), vocabulary=copy.deepcopy(vocabulary))
        explore = 0
        while any(not adaptive._explored((_bucket(batch), d)) for d in range(max(drafts) + 1)) and explore < 64:
            sample_with_heads(model, ids, mask, adaptive, **opts)  # the policy's exploration: untimed
            explore += 1

        def plain():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                                 max_new_tokens=sampling["max_new_tokens"], temperature=sampling["temperature"],
                                 top_p=sampling["top_p"], pad_token_id=pad, eos_token_id=eos)
            return out, None

        methods = {"generate": plain}
        for d in drafts:
            methods[f"drafts={d}"] = lambda d=d: (None, speculative_generate(model, ids, mask, num_draft_tokens=d,
                                                                             **opts))
        if vocabulary is not None:
            for d in drafts[1:]:
                methods[f"drafts={d}/trim"] = lambda d=d: (None, speculative_generate(
                    model, ids, mask, num_draft_tokens=d, draft_vocab=vocabulary.ids(), **opts))
        methods["adaptive"] = lambda: (None, sample_with_heads(model, ids, mask, adaptive, **opts))
        times = {m: [] for m in methods}
        tokens = {m: [] for m in methods}
        stats = {m: [] for m in methods}
        with torch.no_grad():
            for rep in range(args.repeats + 1):
                for m, fn in methods.items():
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    seqs, out = fn()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - t0
                    if rep == 0:
                        continue  # warm-up round
                    seqs = seqs if out is None else out.sequences
                    times[m].append(elapsed)
                    tokens[m].append(_completion_tokens(seqs, ids.shape[1], pad, eos))
                    if out is not None:
                        stats[m].append(out)
        tps = {m: sum(tokens[m]) / sum(times[m]) for m in methods}
        base_cycle = statistics.median(o.loop_seconds / max(o.verify_forwards - 1, 1) for o in stats["drafts=0"])
        for m in methods:
            row = {"setup": name, "batch": batch, "method": m, "tokens_per_s": tps[m],
                   "ratio": tps[m] / tps["generate"], "median_seconds": statistics.median(times[m])}
            if stats[m]:
                outs = stats[m]
                accept = sum(o.committed_tokens for o in outs) / sum(o.row_cycles for o in outs)
                cycle = statistics.median(o.loop_seconds / max(o.verify_forwards - 1, 1) for o in outs)
                row.update(accept_length=accept, cycle_cost=cycle / base_cycle, ideal=accept / (cycle / base_cycle),
                           draft_tokens=statistics.mean(o.num_draft_tokens for o in outs),
                           prefill_share=sum(o.prefill_seconds for o in outs) / sum(o.seconds for o in outs))
                if outs[-1].num_draft_tokens and m != "adaptive":
                    row["predicted_accept_length"], row["walk_accept_length"] = _predicted_accept_length(
                        model, outs[-1], ids.shape[1], eos, sampling["top_p"], outs[-1].draft_vocab)
            rows.append(row)
            predicted = "" if "predicted_accept_length" not in row else (
                f" (predicted {row['predicted_accept_length']:.2f} mean, {row['walk_accept_length']:.2f} walk)")
            extra = "" if not stats[m] else (f"  accept length {row['accept_length']:.2f}{predicted}  cycle cost "
                                             f"{row['cycle_cost']:.2f}  ideal {row['ideal']:.2f}x  drafts "
                                             f"{row['draft_tokens']:.1f}  prefill {row['prefill_share']:.0%}")
            progress(f"{name} batch {batch:3d} {m:10s} {tps[m]:9.1f} tok/s  {row['ratio']:.3f}x{extra}")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="tiny,drafter,smollm2")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny_model", default="runs/tiny-sft")
    p.add_argument("--smollm2_model", default="runs/smollm2-heads")
    p.add_argument("--math_file", default="runs/data/arith_gsm8k.jsonl")
    p.add_argument("--drafter_steps", type=int, default=300)
    p.add_argument("--smoke", action="store_true", help="smallest drafter (2 layers, width 64, 10 steps, 16 new "
                   "tokens): a run of seconds for the tests, numbers meaningless")
    p.add_argument("--vocab", type=int, default=0, help="also draft from this many most frequent tokens (trimmed)")
    p.add_argument("--calibration", type=int, default=64, help="completions the trimmed vocabulary is counted on")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (sampling; GPU rows use bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warnings.filterwarnings("ignore")
    rows = run_setups(args.setups, SETUPS, args, run_setup, device)
    print("\n| setup | batch | method | tokens/s | / generate | accept length (predicted) | cycle cost | ideal | "
          "drafts |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        predicted = (f" ({r['predicted_accept_length']:.2f} / {r['walk_accept_length']:.2f})"
                     if "predicted_accept_length" in r else "")
        extra = (f"{r['accept_length']:.2f}{predicted} | {r['cycle_cost']:.2f} | {r['ideal']:.2f}x | "
                 f"{r['draft_tokens']:.1f}" if "accept_length" in r else "– | – | – | –")
        print(f"| {r['setup']} | {r['batch']} | {r['method']} | {r['tokens_per_s']:.0f} | {r['ratio']:.3f} | {extra} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "device": str(device), "threads": torch.get_num_threads(),
                       "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "torch": torch.__version__}, f,
                      indent=2)
        progress(f"table written to {args.json}")


if __name__ == "__main__":
    main()
