"""A few OCC steps on a small tiny-preset model under `accelerate launch` (what tests/test_multiproc.py runs).

Every rank writes what it saw, so the test can compare ranks:
  <output_dir>/rank<R>.jsonl      one line per logged step (logging_steps=1, one micro-batch per step): the
                                  rank's own mtp/lambda/k, c_hat, v2_hat, never averaged across ranks
  <output_dir>/params_rank<R>.pt  the rank's parameters at the end (main model and heads)

    accelerate launch --config_file configs/accelerate/ddp.yaml --cpu --num_processes 2 \
        tests/multiproc/occ_run.py --output_dir OUT [--max_steps 4] [--resume_from CHECKPOINT] [--variant paper]
        [--mtp_grad_clip separate] [--mtp_optimizer_state separate]
"""

import argparse
import json
import os
import warnings

import torch
from transformers import TrainerCallback

from mtprl.model.loading import char_tokenizer, tiny_model
from mtprl.data.tasks import load_task_splits
from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer


def digit_reward(completions, **kwargs):
    """Deterministic reward with spread: the fraction of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


class RankLog(TrainerCallback):
    """Each rank appends its own logged metrics (TRL logs rank-local means of `_metrics`)."""

    def __init__(self, path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and any(k.startswith("mtp/") for k in logs):
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--resume_from", default=None)
    parser.add_argument("--variant", default="paper")
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--mtp_grad_clip", default="shared")
    parser.add_argument("--mtp_optimizer_state", default="shared")
    args = parser.parse_args()

    tok = char_tokenizer()
    model = tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    train, _ = load_task_splits("reasoning_gym:chain_sum", train_size=64, eval_size=8, seed=0)
    cfg = MTPGRPOConfig(output_dir=args.output_dir, per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=6, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
                        save_strategy="steps", save_steps=args.save_steps, beta=0.0, seed=0, bf16=False,
                        max_steps=args.max_steps, steps_per_generation=2, mtp_regime="occ",
                        occ_variant=args.variant, mtp_num_heads=2, loss_type="dapo", lr_scheduler_type="constant",
                        mtp_grad_clip=args.mtp_grad_clip, mtp_optimizer_state=args.mtp_optimizer_state,
                        max_grad_norm=0.05 if args.mtp_grad_clip == "separate" else 1.0,
                        mtp_max_grad_norm=1e-3 if args.mtp_grad_clip == "separate" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[digit_reward], args=cfg, train_dataset=train,
                                 processing_class=tok)
    rank = trainer.accelerator.process_index
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, f"rank{rank}.jsonl")
    if os.path.exists(log_path):
        os.remove(log_path)
    trainer.add_callback(RankLog(log_path))
    trainer.train(resume_from_checkpoint=args.resume_from)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    torch.save({n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters()},
               os.path.join(args.output_dir, f"params_rank{rank}.pt"))
    with open(os.path.join(args.output_dir, f"setup_rank{rank}.json"), "w") as f:
        json.dump({"num_processes": trainer.accelerator.num_processes,
                   "distributed_type": str(trainer.accelerator.distributed_type),
                   "wrapped": type(trainer.model_wrapped).__name__, "steps": trainer.state.global_step}, f)
    print(f"rank {rank} of {trainer.accelerator.num_processes} ({trainer.accelerator.distributed_type}, "
          f"{type(trainer.model_wrapped).__name__}): done, {trainer.state.global_step} steps")


if __name__ == "__main__":
    main()
