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

.PHONY: venv package-path demo test test-fast lint bench clean

venv: $(STAMP)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. DeepSpeed's
# run-time built ops are built here rather than in the first (possibly killed) job.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(MAKE) --no-print-directory package-path
	$(PY) -c "from llip_scale.train.engine import prebuild_ops; print('built:', *prebuild_ops())"
	touch $(STAMP)

# The editable install maps kernels/, launchers/ and configs/ into the package with an import
# hook that Python asks only after its search of sys.path. From a folder holding a checkout
# named llip_scale, that search finds ./llip_scale (no __init__.py: an empty namespace package)
# and the hook is never asked. A folder on sys.path with a link to the package makes the search
# find the real one; the hook still serves the mapped folders.
package-path:
	mkdir -p $(VENV)/package && ln -sfn $(CURDIR)/llip_scale $(VENV)/package/llip_scale
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'llip_scale_package.pth').write_text('$(abspath $(VENV))/package\n')"

demo: venv
	$(PY) -m llip_scale.demo $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: venv
	$(PY) -m ruff check .

# Benchmarks; record the printed numbers in benchmarks/RESULTS.md.
bench: venv
	$(PY) tools/profile_pooler.py --device $(BENCH_DEVICE) --out benchmarks/pairs_$(BENCH_DEVICE)
	$(PY) tools/bench_loader.py --json benchmarks/loader_cpu.json
	$(PY) tools/bench_train.py --json benchmarks/train_cpu.json
	$(PY) tools/bench_eval.py --json benchmarks/eval_cpu.json
	$(PY) tools/bench_accum.py --repeats 3 --json benchmarks/accum_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info
