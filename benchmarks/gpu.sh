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
# memory; --whole_steps 0: rollouts are (a)'s business). vLLM rows (benchmarks/vllm_check.py) run only where vllm
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
