#!/usr/bin/env bash
# The GPU rows of the benchmarks, in one command of a few minutes, on a lent GPU machine as this workplace lends
# them: no network, its own CUDA torch (2.11) and transformers (5.17), accelerate, peft; no trl, datasets,
# reasoning-gym, math-verify, vllm; at most 64 MiB travels with a call.
#
# Here, first (CPU machine, package index):
#   make setup && .venv/bin/mtprl sft --config configs/tiny_sft.yaml   # runs/tiny-sft (the demo's warm start)
#   bash benchmarks/gpu_wheels.sh            # our pinned pure-Python dependencies as wheels in .whl/ (~32 MB)
# Then on the GPU machine, in the repository root (the device tool: carry .whl and runs/tiny-sft):
#   bash benchmarks/gpu.sh                   # results in ${OUT:-runs/gpu}: rollout.json, bench_bf16.json, logs
#
# What it runs: (a) benchmarks/rollout.py (plain generate vs the heads drafting 0/1/2 tokens and adaptive) on the
# drafter and tiny setups at batch 1, 8, 32, sampling in bf16 (the drafter is trained in float32 first);
# (b) benchmarks/step_time.py --bf16 on a 16-layer, 1024-wide tiny-preset model (training step per regime, peak
# memory; --whole_steps 0: rollouts are (a)'s business); (d) `mtprl train` for a few steps in bf16 on the GPU per
# regime (frozen heads drafting included), with the separate clip and moments, with a LoRA trunk, and, where the
# machine has 2 or more GPUs, under FSDP2 and DeepSpeed ZeRO-2 through accelerate launch (skipped with a line on one). vLLM rows (benchmarks/vllm_check.py) run only where vllm
# is importable: it cannot travel (its wheels are far over 64 MiB).
#
# Checking the script here, without a GPU (what tests/test_benchmarks.py runs, under a minute):
#   bash benchmarks/gpu.sh --device cpu --dry-run
# --device cpu: no GPU (CUDA_VISIBLE_DEVICES empty), Python from .venv (unless PY is set), and the steps that need the
#   lent machine skipped, each with a line saying so: nvidia-smi and the install of .whl over the machine's packages.
# --dry-run: every benchmark at its smallest size (seconds; rollout.py and step_time.py on small models, the tiny
#   setup on the untrained preset when runs/tiny-sft is absent), same code paths (bf16 included); numbers meaningless.
# Without flags the GPU run is as it always was.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=gpu
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs cpu or gpu}; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) echo "gpu.sh: unknown argument $1 (usage: bash benchmarks/gpu.sh [--device cpu|gpu] [--dry-run])" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cpu|gpu) ;; *) echo "gpu.sh: --device $DEVICE: choose cpu or gpu" >&2; exit 2 ;; esac
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
  if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
  echo "== skipped (--device cpu): nvidia-smi, the GPU's name and memory (needs the lent GPU machine)"
else
  PY=${PY:-python3}  # the machine's own Python with its CUDA torch
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt" || true
fi

if [ "$DEVICE" = cpu ]; then
  echo "== skipped (--device cpu): installing .whl into /tmp/mtprl-site (the lent machine's step; $PY has our pins)"
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
elif [ -d .whl ]; then  # our pins over the machine's packages, without touching its torch
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mtprl-site .whl/*.whl
  export PYTHONPATH=/tmp/mtprl-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi

# Sizes: the GPU rows, or (--dry-run) each benchmark's smallest.
ROLLOUT_SIZE=(--batches 1,8,32 --repeats 3)
STEP_SIZE=(--hidden 1024 --layers 16 --heads 1 --batch 32 --completion 128 --repeats 5)
VLLM_SIZE=()
if [ "$DRY_RUN" = 1 ]; then
  ROLLOUT_SIZE=(--smoke --batches 1 --repeats 1)
  if [ ! -d runs/tiny-sft ]; then
    echo "== dry run: runs/tiny-sft absent, the tiny setup runs on the untrained preset"
    ROLLOUT_SIZE+=(--tiny_model tiny)
  fi
  STEP_SIZE=(--hidden 32 --layers 2 --heads 1 --batch 4 --completion 4 --repeats 1)
  VLLM_SIZE=(--steps 2)
  echo "== dry run: every benchmark at its smallest size (numbers meaningless)"
fi
$PY -c "import torch, transformers, trl, mtprl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'transformers', transformers.__version__, 'trl', trl.__version__)" | tee "$OUT/versions.txt"

# (d) training on the GPU as users run it: `mtprl train` in bf16 per regime, a LoRA trunk, and (2+ GPUs) FSDP2 and
# ZeRO-2 through accelerate launch. Each row writes $OUT/train_<row>.log and metrics; train_rows.txt says what ran.
TRAIN_STEPS=4
REGIME_ROWS=(none frozen detach ce policy occ)
EXTRA_ROWS=1
if [ "$DRY_RUN" = 1 ]; then TRAIN_STEPS=1; REGIME_ROWS=(frozen); EXTRA_ROWS=0; fi  # the rows' code path, once
TRAIN_MODEL=runs/tiny-sft
[ -d "$TRAIN_MODEL" ] || TRAIN_MODEL=tiny
TRAIN=(--config configs/tiny.yaml --model_name_or_path "$TRAIN_MODEL" --max_steps "$TRAIN_STEPS" --train_size 256
  --eval_size 8 --eval_k 2 --eval_before false --eval_after false --save_strategy no --logging_steps 1)
if [ "$DEVICE" = gpu ]; then TRAIN+=(--use_cpu false --bf16 true); else TRAIN+=(--use_cpu true --bf16 true); fi
train_row() {  # name, then mtprl train arguments; a failing row is recorded and the script goes on
  local name=$1; shift
  if $PY -m mtprl.cli train "${TRAIN[@]}" --output_dir "runs/gpu-train/$name" "$@" >"$OUT/train_$name.log" 2>&1; then
    echo "$name: ok $(grep -c '"loss"' "runs/gpu-train/$name/metrics.jsonl" 2>/dev/null || echo 0) logged steps" | tee -a "$OUT/train_rows.txt"
    tail -n 2 "runs/gpu-train/$name/metrics.jsonl" >>"$OUT/train_metrics.jsonl" 2>/dev/null || true
  else
    echo "$name: FAILED (tail of $OUT/train_$name.log below)" | tee -a "$OUT/train_rows.txt"; tail -n 5 "$OUT/train_$name.log"
  fi
}
echo "== (d) mtprl train in bf16 per regime, LoRA, and sharded (2+ GPUs)"
: >"$OUT/train_rows.txt"
for regime in "${REGIME_ROWS[@]}"; do
  extra=(); [ "$regime" = frozen ] && extra=(--mtp_draft_tokens 2)
  train_row "bf16-$regime" --mtp_regime "$regime" ${extra[@]+"${extra[@]}"}
done
if [ "$EXTRA_ROWS" = 1 ]; then
  train_row bf16-occ-exact --mtp_regime occ --occ_variant exact
  train_row bf16-ce-separate --mtp_regime ce --mtp_coef 3 --mtp_grad_clip separate --mtp_optimizer_state separate
fi
if $PY -c "import peft" 2>/dev/null && [ "$TRAIN_MODEL" != tiny ]; then
  train_row lora-occ --mtp_regime occ --use_peft true --lora_r 8 --lora_alpha 16 --lora_target_modules q_proj v_proj
else
  echo "lora-occ: skipped (needs peft and a base checkpoint on disk: runs/tiny-sft)" | tee -a "$OUT/train_rows.txt"
fi
GPUS=0
[ "$DEVICE" = gpu ] && GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$GPUS" -ge 2 ]; then
  for acc in fsdp deepspeed_zero2; do
    name=sharded-$acc
    if [ "$acc" = deepspeed_zero2 ] && ! $PY -c "import deepspeed" 2>/dev/null; then
      echo "$name: skipped (deepspeed is not installed)" | tee -a "$OUT/train_rows.txt"; continue
    fi
    if $PY -m accelerate.commands.launch --config_file "configs/accelerate/$acc.yaml" -m mtprl.cli train "${TRAIN[@]}" \
        --output_dir "runs/gpu-train/$name" --mtp_regime occ >"$OUT/train_$name.log" 2>&1; then
      echo "$name: ok" | tee -a "$OUT/train_rows.txt"
    else
      echo "$name: FAILED" | tee -a "$OUT/train_rows.txt"; tail -n 5 "$OUT/train_$name.log"
    fi
  done
else
  echo "sharded (FSDP2, ZeRO-2): skipped ($GPUS GPU(s) here; they need 2 or more)" | tee -a "$OUT/train_rows.txt"
fi

echo "== (a) rollout throughput: generate vs the heads drafting"
$PY benchmarks/rollout.py --setups drafter,tiny "${ROLLOUT_SIZE[@]}" --dtype bfloat16 --json "$OUT/rollout.json" \
  2>&1 | tee "$OUT/rollout.log"

echo "== (b) training step time per regime, bf16"
$PY benchmarks/step_time.py --bf16 "${STEP_SIZE[@]}" \
  --whole_steps 0 --regimes none,detach,ce,policy,occ,occ-exact,occ-last_layers \
  --json "$OUT/bench_bf16.json" 2>&1 | tee "$OUT/bench_bf16.log"

if $PY -c "import vllm" 2>/dev/null; then
  echo "== (c) OCC with vLLM rollouts (colocate)"
  $PY benchmarks/vllm_check.py --model "${MODEL:-runs/smollm2-135m-instruct}" --use_vllm true \
    ${VLLM_SIZE[@]+"${VLLM_SIZE[@]}"} --json "$OUT/vllm.json" 2>&1 | tee "$OUT/vllm.log"
else
  echo "== (c) skipped: vllm is not installed on this machine"
fi
