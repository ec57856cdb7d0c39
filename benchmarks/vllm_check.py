"""OCC with TRL's vLLM rollouts against OCC with transformers rollouts, on a GPU (run by benchmarks/gpu.sh).

    python benchmarks/vllm_check.py --model runs/smollm2-135m-instruct --use_vllm true --json out/vllm.json

Checks, per run:
- the old MTP log-probs come from the rollout-time forward TRL runs for its old (importance-sampling)
  log-probs: mtprl's trainer raises if TRL's `old_per_token_logps` did not come from a forward through the
  heads, and this script counts the forwards through the heads during rollouts: one per rollout, no second;
- lambda statistics (|lambda|, c_hat, v2_hat) over the run, to compare vLLM with transformers generation.
The MTP heads stay on the training side: vLLM generates with the main model only.
With `--use_vllm true` (the default) and vllm not importable, it exits at once (status 2, before loading torch or
the model) with a line naming vllm: benchmarks/gpu.sh runs it only where vllm is installed.
"""

import argparse
import importlib.util
import json
import statistics
import sys
import warnings


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/smollm2-135m-instruct")
    p.add_argument("--use_vllm", default="true")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    use_vllm = args.use_vllm.lower() == "true"
    if use_vllm and importlib.util.find_spec("vllm") is None:
        print("vllm_check.py: vllm is not installed (`pip install vllm` on a GPU machine), and --use_vllm true "
              "needs it; --use_vllm false runs the transformers-rollout side alone", file=sys.stderr)
        sys.exit(2)

    import torch

    from mtprl.model.loading import load_model
    from mtprl.data.scoring import TaskReward
    from mtprl.data.tasks import load_task_splits
    from mtprl.training.trainer import MTPGRPOConfig, MTPGRPOTrainer

    model, tok = load_model(args.model, num_heads=1, dtype="bfloat16")
    train, _ = load_task_splits("reasoning_gym:chain_sum", 512, 8, 0, min_terms=2, max_terms=3, min_digits=1,
                                max_digits=2)
    cfg = MTPGRPOConfig(output_dir=f"runs/vllm-check-{'vllm' if use_vllm else 'hf'}", mtp_regime="occ",
                        mtp_num_heads=1, per_device_train_batch_size=32, num_generations=8, steps_per_generation=4,
                        max_completion_length=64, learning_rate=1e-6, max_steps=args.steps, bf16=True,
                        logging_steps=1, save_strategy="no", report_to=[], beta=0.0, seed=0, use_vllm=use_vllm,
                        vllm_mode="colocate", vllm_gpu_memory_utilization=0.3, vllm_importance_sampling_correction=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MTPGRPOTrainer(model=model, reward_funcs=[TaskReward()], args=cfg, train_dataset=train,
                                 processing_class=tok)

    counts = {"rollouts": 0, "head_forwards_in_rollouts": 0}
    generate, forward = trainer._generate_and_score_completions, trainer._get_per_token_logps_and_entropies
    in_rollout = [False]

    def counting_generate(inputs):
        counts["rollouts"] += 1
        in_rollout[0] = True
        try:
            return generate(inputs)
        finally:
            in_rollout[0] = False

    def counting_forward(model, *a, **kw):
        if in_rollout[0] and getattr(trainer.accelerator.unwrap_model(model), "mtp_heads", None) is not None:
            counts["head_forwards_in_rollouts"] += 1
        return forward(model, *a, **kw)

    trainer._generate_and_score_completions = counting_generate
    trainer._get_per_token_logps_and_entropies = counting_forward
    trainer.train()

    rows = [r for r in trainer.state.log_history if "mtp/lambda/1" in r]
    stats = {key: statistics.median(abs(r[key]) for r in rows) for key in ("mtp/lambda/1", "mtp/c_hat/1",
                                                                          "mtp/v2_hat/1")}
    result = {"use_vllm": use_vllm, "steps": len(rows), **counts, "median_abs": stats,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
              "one_forward_per_rollout": counts["head_forwards_in_rollouts"] == counts["rollouts"]}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
