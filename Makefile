# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# `make test-fast` skips the tests marked slow: the tier to run after each change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1
# Run-time built extensions (DeepSpeed ops) next to the environment whose headers built them:
# checkouts with their own environments do not rebuild or lock each other's builds.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
BENCH_DEVICE ?= cpu

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. DeepSpeed's
# run-time built ops are built here rather than in the first (possibly killed) job.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -c "from llip_scale.engine import prebuild_ops; print('built:', *prebuild_ops())"
	touch $(STAMP)

demo: venv
	$(PY) -m llip_scale.demo $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# Benchmarks; record the printed numbers in benchmarks/RESULTS.md.
bench: venv
	$(PY) tools/profile_pooler.py --device $(BENCH_DEVICE) --out benchmarks/pairs_$(BENCH_DEVICE)
	$(PY) tools/bench_loader.py --json benchmarks/loader_cpu.json
	$(PY) tools/bench_train.py --json benchmarks/train_cpu.json
	$(PY) tools/bench_eval.py --json benchmarks/eval_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info
