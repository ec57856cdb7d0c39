"""Whole RL steps with the live heads drafting the rollouts, against plain sampling, in one process on the same
prompts: the number users compare (FastGRPO, NeMo-RL report end-to-end step ratios, not rollout ratios).

    python benchmarks/rl_step.py [--setups smollm2,drafter] [--steps 6] [--rounds 2] [--vocab 2048] [--json PATH]
    python benchmarks/rl_step.py --smoke --setups drafter --steps 3 --rounds 1  # seconds, for the tests

A whole step is what `MTPGRPOTrainer.train` does per optimizer step: the rollout (one every
`steps_per_generation` steps, through TRL's own `_generate_single_turn`), the rewards, the old log-probs, the loss
forward and backward, the AdamW step. Arms (one trainer each, built from the same starting model with the same
seed, so the same prompts in the same order):
  off        mtp_draft_tokens 0: TRL's plain `model.generate`
  D drafts   mtp_draft_tokens D, fixed
  trimmed    D drafts from the `--vocab` most frequent tokens of the recent rollouts (mtp_draft_vocab_size)
  adaptive   mtp_draft_policy adaptive (with the trimmed vocabulary where one is given)
The first rollout cycle of every run is a warm-up and not timed; rounds run the arms in alternating order, and the
median seconds per optimizer step over the rounds is reported, with its ratio to `off` and the share of the step
spent in rollouts (time inside `_generate_single_turn`).

Setups (each skipped with a line when its model is absent):
  smollm2  SmolLM2-135M-Instruct with its warmed head (runs/smollm2-heads: `configs/smollm2_heads.yaml`), chat
           prompts of the arithmetic file, 128-token completions, 2 prompts x 8 samples per rollout, 2 optimizer
           steps per rollout, regime detach (the heads learn, the trunk sees TRL's gradient only)
  drafter  the 8-layer trunk of benchmarks/rollout.py with its two heads (acceptance ~0.8), a word-level tokenizer
           over its 64 tokens and a verifiable reward (the share of completion tokens that continue the prompt's
           cycle), 64-token completions, the same RL settings
`--smoke`: the smallest run (rollout.py's small drafter: 2 layers of width 64, 10 training steps, 16-token
completions; with `--steps 3 --rounds 1`: one timed step after the warm-up rollout), seconds on a CPU, what
tests/test_benchmarks.py runs; its numbers mean nothing.
JSON: {"rows": [{"setup", "arm", "seconds_per_step", "ratio", "rollout_share", "accept_length"}], "date", ...}.
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
from transformers import PrinterCallback, TrainerCallback

from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer

import rollout as rollout_bench  # the drafter setup (benchmarks/ is on sys.path)
from common import add_model_arguments, progress, run_setups

class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step."""

    def __init__(self):
        self.ends = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def _smollm2(args):
    from mtprl.model.loading import load_model
    from mtprl.data.scoring import TaskReward
    from mtprl.data.tasks import load_math_splits

    if not (os.path.isdir(args.smollm2_model) and os.path.isfile(args.math_file)):
        return None
    model, tok = load_model(args.smollm2_model)
    train, _ = load_math_splits(args.math_file, 256, 16, 0, prompt_format="chat")
    return model, tok, train, [TaskReward()], dict(max_completion_length=128)


def _drafter(args):
    """The drafter of benchmarks/rollout.py as an RL task: a word-level tokenizer t0..t63 (t0 pad, t1 EOS, never
    sampled) and the reward `share of completion tokens that continue the prompt's cycle`."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model, _, prompts, sampling, _ = rollout_bench._drafter(args)
    vocab = model.config.vocab_size
    word = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=word, pad_token="t0", eos_token="t1", unk_token="t0")
    model.config.pad_token_id, model.config.eos_token_id = 0, 1
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1

    def cycle_reward(prompts, completions, **kwargs):
        scores = []
        for prompt, completion in zip(prompts, completions):
            last = int(prompt.split()[-1][1:])
            ids = [int(t[1:]) for t in completion.split() if t[1:].isdigit()]
            want = [2 + (last - 2 + j) % (vocab - 2) for j in range(1, len(ids) + 1)]
            scores.append(sum(a == b for a, b in zip(ids, want)) / max(len(ids), 1))
        return scores

    train = Dataset.from_list([{"prompt": " ".join(f"t{int(t)}" for t in row)} for row in prompts.tolist()])
    return model, tok, train, [cycle_reward], dict(max_completion_length=sampling["max_new_tokens"])  # 64


SETUPS = {"smollm2": _smollm2, "drafter": _drafter}


def _arms(args, heads):
    drafts = min(args.drafts, heads)
    arms = {"off": {}, f"{drafts} drafts": dict(mtp_draft_tokens=drafts)}
    if args.vocab:
        arms["trimmed"] = dict(mtp_draft_tokens=drafts, mtp_draft_vocab_size=args.vocab)
    arms["adaptive"] = dict(mtp_draft_tokens=drafts, mtp_draft_policy="adaptive",
                            **({"mtp_draft_vocab_size": args.vocab} if args.vocab else {}))
    return arms


def _run(base, tok, train, rewards, extra, arm, args, out_dir):
    kw = dict(output_dir=out_dir, mtp_regime="detach", mtp_num_heads=base.mtp_heads.num_heads,
              per_device_train_batch_size=8, num_generations=8, steps_per_generation=2, learning_rate=1e-6,
              max_steps=args.steps, temperature=1.0, top_p=1.0, beta=0.0, report_to=[], save_strategy="no",
              logging_steps=1, use_cpu=not torch.cuda.is_available(), bf16=False, seed=0, disable_tqdm=True,
              dataloader_num_workers=0, mtp_log_acceptance=True)
    kw.update(extra)
    kw.update(arm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=copy.deepcopy(base), reward_funcs=rewards, args=MTPGRPOConfig(**kw),
                                 train_dataset=train, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    clock = StepClock()
    trainer.add_callback(clock)
    rollout_spans = []
    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            rollout_spans.append((t0, time.perf_counter()))

    trainer._generate_single_turn = timed_generate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    warm = kw["steps_per_generation"]  # the first rollout cycle: warm-up, not timed
    start, end = clock.ends[warm - 1], clock.ends[-1]
    in_rollouts = sum(max(0.0, min(b, end) - max(a, start)) for a, b in rollout_spans)
    lengths = [r["rollout/spec_accept_length"] for r in trainer.state.log_history if "rollout/spec_accept_length" in r]
    return (end - start) / (len(clock.ends) - warm), in_rollouts / (end - start), lengths[warm // 2:] or None


def run_setup(name, setup, args):
    base, tok, train, rewards, extra = setup
    base.eval()
    arms = _arms(args, base.mtp_heads.num_heads)
    seconds = {a: [] for a in arms}
    share = {a: [] for a in arms}
    accept = {a: [] for a in arms}
    for rnd in range(args.rounds):
        for arm in (list(arms) if rnd % 2 == 0 else list(arms)[::-1]):
            s, r, lengths = _run(base, tok, train, rewards, extra, arms[arm], args, f"/tmp/mtprl-rl-step/{name}-{arm}")
            seconds[arm].append(s)
            share[arm].append(r)
            accept[arm] += lengths or []
            progress(f"{name} round {rnd + 1} {arm:10s} {s:7.2f} s/step, rollout {r:.0%} of it")
    rows = []
    base_s = statistics.median(seconds["off"])
    for arm in arms:
        s = statistics.median(seconds[arm])
        row = {"setup": name, "arm": arm, "seconds_per_step": s, "ratio": base_s / s,
               "rollout_share": statistics.median(share[arm]),
               "accept_length": statistics.fmean(accept[arm]) if accept[arm] else None}
        rows.append(row)
        progress(f"{name} {arm:10s} {s:7.2f} s/step  {row['ratio']:.3f}x off  rollout {row['rollout_share']:.0%}"
                 + (f"  accept length {row['accept_length']:.2f}" if row["accept_length"] else ""))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", default="smollm2,drafter")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first rollout cycle untimed)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--drafts", type=int, default=2, help="drafts per verify (at most the model's heads)")
    p.add_argument("--vocab", type=int, default=0, help="trimmed arm: mtp_draft_vocab_size (0: no trimmed arm)")
    add_model_arguments(p)
    args = p.parse_args()
    rows = run_setups(args.setups, SETUPS, args, run_setup)
    print("\n| setup | arm | s per optimizer step | speed-up vs off | rollout share of the step | accept length |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['accept_length']:.2f}" if r["accept_length"] else "–"
        print(f"| {r['setup']} | {r['arm']} | {r['seconds_per_step']:.2f} | {r['ratio']:.3f}x | "
              f"{r['rollout_share']:.0%} | {acc} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                       "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__}, f, indent=2)
        progress(f"table written to {args.json}")


if __name__ == "__main__":
    main()
