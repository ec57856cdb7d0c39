"""Optimizer-step time and memory per MTP regime, on one model and one batch, in one process.

    python benchmarks/step_time.py [--model tiny|PATH] [--batch 32] [--completion 32] [--repeats 20] [--json PATH]

Training step = TRL's loss (+ the regime's MTP term) forward, backward, AdamW step, on the same rollout batch
for every regime; regimes are interleaved inside every repeat so that machine noise hits them alike, and the
median over repeats is reported with its ratio to `detach`. Memory: bytes of tensors saved for backward in the
forward (CPU and GPU), plus peak allocated memory on a GPU. Whole step (rollout included): wall time per
optimizer step of `trainer.train` over a few steps, each regime in turn, repeated in alternating order.
It prints one progress line per phase and the table; `--json PATH` also writes the table for other tools:
{"regimes": {"<name>": {"train_step_ms", "whole_step_ms", "saved_mb", "stashed_grad_mb", "extra_state_mb",
"peak_gpu_mb"}},
"params", "device", ...}. Arms: every regime (occ = the paper's proxy), and occ's other variants as occ-<variant>
(occ-exact, occ-hidden, occ-last_layers, occ-ema, occ-reference), and the geometry remedies (detach-separate_clip,
ce-separate_clip, ce-separate_state, ce-separate_both; "extra state" = the separate Adam moments' bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
import warnings

import torch
from datasets import Dataset

import mtprl
from transformers import PrinterCallback

from mtprl.model.loading import load_model
from mtprl.core.regimes import OCC_VARIANTS, REGIMES
from mtprl.data.scoring import TaskReward
from mtprl.data.tasks import load_task_splits
from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer

# Every regime (occ = its paper variant), then occ's other variants as "occ-<variant>".
# The two remedies of docs/guide-geometry.md on CE (its term reaches the trunk: the separate clip keeps the MTP
# gradient apart through the exact source's stash, one extra backward; separate moments add one pair of trunk
# moments) and the separate clip under detach (a clip per parameter group, no extra backward).
ARMS = ({name: {} for name in REGIMES} | {f"occ-{v}": {"occ_variant": v} for v in OCC_VARIANTS if v != "paper"}
        | {"detach-separate_clip": {"mtp_grad_clip": "separate"}, "ce-separate_clip": {"mtp_grad_clip": "separate"},
           "ce-separate_state": {"mtp_optimizer_state": "separate"},
           "ce-separate_both": {"mtp_grad_clip": "separate", "mtp_optimizer_state": "separate"}})
DEFAULT_ARMS = "none,detach,ce,policy,occ,occ-exact,occ-hidden,occ-last_layers,occ-ema"


def _trainer(model, tok, dataset, regime, extra, args, output_dir, **overrides):
    kw = dict(output_dir=output_dir, mtp_regime=regime.split("-")[0], mtp_num_heads=model.mtp_heads.num_heads,
              per_device_train_batch_size=args.batch, num_generations=8, max_completion_length=args.completion,
              steps_per_generation=2, learning_rate=1e-5, report_to=[], save_strategy="no", logging_steps=1,
              use_cpu=not torch.cuda.is_available(), bf16=args.bf16, beta=0.0, mtp_log_acceptance=False, seed=0)
    kw.update(extra)
    kw.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[TaskReward()], args=MTPGRPOConfig(**kw),
                                 train_dataset=dataset, processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # TRL's per-step log dicts would bury the table
    return trainer


def progress(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _rollout_batch(model, tok, dataset, args, device):
    """One fixed batch: real prompts, completions sampled from the model, old log-probs a small step away."""
    prompts = dataset["prompt"][: args.batch]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(device)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, max_new_tokens=args.completion, min_new_tokens=args.completion,
                             pad_token_id=tok.pad_token_id)
    completion = out[:, enc["input_ids"].shape[1]:]
    mask = torch.ones_like(completion)
    ids = torch.cat([enc["input_ids"], completion], 1)
    with torch.no_grad():
        lp = mtprl.forward_logprobs(model, ids, torch.cat([enc["attention_mask"], mask], 1), completion.shape[1])
    g = torch.Generator(device="cpu").manual_seed(0)
    noise = lambda t: (0.05 * torch.rand(t.shape, generator=g)).to(device)  # noqa: E731
    return {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"], "completion_ids": completion,
            "completion_mask": mask, "advantages": torch.randn(args.batch, generator=g).to(device),
            "num_items_in_batch": mask.sum(), "old_per_token_logps": lp.main - noise(lp.main),
            "old_mtp_logps": lp.mtp - noise(lp.mtp)}


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (activations kept alive until backward)."""

    def __init__(self):
        self.total = 0

    def __enter__(self):
        def pack(t):
            self.total += t.numel() * t.element_size()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--hidden", type=int, default=None, help="tiny preset: override hidden_size (x3 intermediate)")
    p.add_argument("--layers", type=int, default=None, help="tiny preset: override num_hidden_layers")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--whole_steps", type=int, default=4, help="optimizer steps per regime for the whole-step time")
    p.add_argument("--regimes", default=DEFAULT_ARMS, help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--json", default=None, help="also write the table as JSON to this path")
    p.add_argument("--bf16", action="store_true", help="model and heads in bfloat16, TRL's bf16 autocast (GPU)")
    args = p.parse_args()
    arms = [a.strip() for a in args.regimes.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or "detach" not in arms:
        p.error(f"--regimes: unknown {unknown} (choose from {', '.join(ARMS)}; detach is the baseline and required)")
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.model == "tiny" and (args.hidden or args.layers):
        from mtprl.model.loading import TINY_CONFIG, char_tokenizer, tiny_model

        tok = char_tokenizer()
        sizes = {"hidden_size": args.hidden or TINY_CONFIG["hidden_size"],
                 "num_hidden_layers": args.layers or TINY_CONFIG["num_hidden_layers"]}
        sizes["intermediate_size"] = 3 * sizes["hidden_size"]
        base = tiny_model(tok, **sizes)
        mtprl.attach_mtp_heads(base, args.heads)
    else:
        base, tok = load_model(args.model, num_heads=args.heads)
    base.to(device=device, dtype=torch.bfloat16 if args.bf16 else None)
    train, _ = load_task_splits("reasoning_gym:chain_sum", 256, 8, 0, min_terms=2, max_terms=3, min_digits=1,
                                max_digits=1)
    batch = _rollout_batch(base, tok, train, args, device)
    params = sum(p.numel() for p in base.parameters())
    progress(f"device={device} model={args.model} params={params / 1e6:.2f}M heads={args.heads} batch={args.batch} "
             f"completion={args.completion} prompt={batch['prompt_ids'].shape[1]} "
             f"layers={base.config.num_hidden_layers}")

    setups = {}
    progress(f"building {len(arms)} trainers: {', '.join(arms)}")
    for name in arms:
        extra = ARMS[name]
        model = copy.deepcopy(base)
        trainer = _trainer(model, tok, train, name, extra, args, f"/tmp/mtprl-bench/{name}")
        # update_on steps the run's optimizer and scheduler: warm-up, memory, then the timed repeats
        trainer.create_optimizer_and_scheduler(num_training_steps=args.repeats + 2)
        trainer.model.train()
        setups[name] = trainer

    def step(trainer, measure=None):
        """One optimizer step on the fixed batch through the trainer's public `update_on` (the run's optimizer,
        clip and accumulation); under `measure` (SavedBytes) also the bytes occ exact stashes (its MTP gradient,
        held until after TRL's backward), as the update reports them."""
        with measure if measure is not None else contextlib.nullcontext():
            result = trainer.update_on([batch])
        if measure is not None:
            measure.stash = max(result.metrics.get("mtp/exact_stash_bytes") or [0])

    times = {name: [] for name in setups}
    saved, peak, stash, extra_state = {}, {}, {}, {}
    for name, trainer in setups.items():  # warm-up, and memory
        step(trainer)
        meter = SavedBytes()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step(trainer, meter)
        saved[name] = meter.total
        stash[name] = getattr(meter, "stash", 0)
        moments = trainer.mtp_moments
        extra_state[name] = 0 if moments is None else sum(t.numel() * t.element_size()
                                                          for t in moments.exp_avg + moments.exp_avg_sq)
        peak[name] = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
    progress(f"timing training steps: {args.repeats} repeats x {len(setups)} regimes")
    for _ in range(args.repeats):
        for name, trainer in setups.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(trainer)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)

    # Whole optimizer step, rollout included: trainer.train over a few steps, regimes in alternating order.
    # --whole_steps 0 skips it (those columns then read "–").
    whole = {name: [] for name in setups}
    order = list(setups)
    if args.whole_steps:
        progress(f"timing whole steps (rollout included): {args.whole_steps} steps x {len(setups)} regimes x 2 rounds")
    for rnd in range(2 if args.whole_steps else 0):
        for name in order if rnd == 0 else order[::-1]:
            extra = ARMS[name]
            trainer = _trainer(copy.deepcopy(base), tok, train, name, extra, args, f"/tmp/mtprl-bench/w-{name}",
                               max_steps=args.whole_steps, disable_tqdm=True)
            t0 = time.perf_counter()
            trainer.train()
            whole[name].append((time.perf_counter() - t0) / args.whole_steps)

    med = {n: statistics.median(t) for n, t in times.items()}
    wmed = {n: statistics.median(t) if t else float("nan") for n, t in whole.items()}
    print(f"\n| regime | training step (ms, median of {args.repeats}) | / detach | whole step incl. rollout (ms) "
          f"| / detach | saved for backward (MB) | stashed gradients (MB) | extra state (MB) | peak GPU memory (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in setups:
        gpu = "–" if peak[name] != peak[name] else f"{peak[name] / 2**20:.0f}"
        whole_ms = "–" if wmed[name] != wmed[name] else f"{1000 * wmed[name]:.0f}"
        whole_ratio = "–" if wmed[name] != wmed[name] else f"{wmed[name] / wmed['detach']:.3f}"
        print(f"| {name} | {1000 * med[name]:.1f} | {med[name] / med['detach']:.3f} | {whole_ms} | "
              f"{whole_ratio} | {saved[name] / 2**20:.1f} | {stash[name] / 2**20:.1f} | {extra_state[name] / 2**20:.1f} | "
              f"{gpu} |")
    main_mb = sum(p.numel() * p.element_size() for n, p in base.named_parameters()
                  if not n.startswith("mtp_heads.")) / 2**20
    print(f"\nmain-model gradients: {main_mb:.1f} MB (occ-exact stashes one copy of them plus the heads')")
    layers = base.config.num_hidden_layers
    if {"none", "policy", "occ"} <= set(med):
        print(f"\njoint MTP / none (training step): policy {med['policy'] / med['none']:.3f}, occ "
              f"{med['occ'] / med['none']:.3f}; one extra decoder layer per head over {layers} trunk layers would "
              f"be about {1 + args.heads / layers:.3f}")
    if args.json:
        table = {name: {"train_step_ms": 1000 * med[name],
                        "whole_step_ms": None if wmed[name] != wmed[name] else 1000 * wmed[name],
                        "saved_mb": saved[name] / 2**20, "stashed_grad_mb": stash[name] / 2**20,
                        "extra_state_mb": extra_state[name] / 2**20,
                        "peak_gpu_mb": None if peak[name] != peak[name] else peak[name] / 2**20} for name in setups}
        with open(args.json, "w") as f:
            json.dump({"regimes": table, "params": params, "device": str(device), "model": args.model,
                       "heads": args.heads, "batch": args.batch, "completion": args.completion,
                       "layers": layers, "repeats": args.repeats, "baseline": "detach"}, f, indent=2)
        progress(f"table written to {args.json}")


if __name__ == "__main__":
    main()
