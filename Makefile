# Two entry points for a fresh machine: `make repro` (the study) and `make test`.
# Both bootstrap a .venv (CPU torch, pinned packages) and the default dataset when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
# The machine's pip config lists index folders that do not exist for every package: hide that noise.
PIP_QUIET := 2> >(grep -v "is neither a file nor a directory" >&2)

.PHONY: venv data test lint repro fanout fanout-threads grid levers schedule bench bench-gpu clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt $(PIP_QUIET)
	$(PY) -m pip install -q -c constraints.txt --no-deps --no-build-isolation -e . $(PIP_QUIET)
	@touch $@

data:
	@if [ -d $(FASHION_DIR) ]; then :; \
	elif command -v apt-get >/dev/null; then \
		echo "Installing Debian's dataset-fashion-mnist into $(FASHION_DIR)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	else echo "warning: $(FASHION_DIR) is missing and apt-get is unavailable; the data loader will try to download it" >&2; fi

# pytest-xdist over the cores, one test file per worker at a time (a module-scoped fixture is built once), in
# tests/conftest.py's order: longest first, which xdist would otherwise replace by the number of tests per file
test: venv data lint
	$(PY) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder tests

lint: venv
	$(VENV)/bin/ruff check hiap_core tests
	$(VENV)/bin/ruff format --check hiap_core tests

# DVC stages call papermill and python: the venv's bin comes first on PATH.
repro: venv data
	$(PY) -m hiap_core.train.params params.yaml
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# The stale training stages WORKERS at a time through submitit (hiap_core/fanout.py; THREADS per run, GPUS="0 1"
# for one run per GPU), then `dvc repro` for the rest. On 2 cores it gains little over `make repro`: 2 runs x 1
# thread against 1 x 2 threads, 1.08x (1.03x before; reports/benchmarks/fanout_threads.json).
WORKERS ?= 2
fanout: venv data
	$(PY) -m hiap_core.train.params params.yaml
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m hiap_core.fanout --workers $(WORKERS) $(if $(THREADS),--threads $(THREADS)) $(if $(GPUS),--gpus $(GPUS))
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# 2 fine-tunes at a time with 1 thread each against 1 with 2 threads, over the same 8 HiAP runs (about 30 min on
# 2 cores, on a quiet machine): reports/benchmarks/fanout_threads.json
fanout-threads: venv data
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro --single-item teacher_logits
	$(PY) -m hiap_core.measure.fanout_threads

# The fine-tune recipe grid (a frozen stage, about 40 fine-tunes): then copy its picks into params.yaml `recipes`.
# `dvc unfreeze` cannot rewrite a dvc.yaml with ${} variables, so the stage is thawed in the text for the run.
grid: venv data
	sed -i 's/^    frozen: true  # recipe_grid$$/    frozen: false  # recipe_grid/' dvc.yaml
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro recipe_grid; status=$$?; \
	sed -i 's/^    frozen: false  # recipe_grid$$/    frozen: true  # recipe_grid/' dvc.yaml; exit $$status

# The search's levers on validation (reports/tables/search_levers.md): 9 settings x 3 budgets, about 1-2 min a run.
levers: venv data
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro --single-item teacher_logits
	$(PY) -m hiap_core.train.search_levers

# How the gaps move with schedule length (reports/schedule/): HiAP, Uniform-Ratio and two-phase at 0.33 and 0.20 of
# MACs with 2, 4 and 8 epochs, 3 seeds; the 2-epoch runs are the study's own (`make repro` first).
schedule: venv data
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro --single-item teacher_logits
	$(PY) -m hiap_core.report.schedule

bench: venv data
	$(PY) -m hiap_core.measure.bench

# On a GPU machine: needs only torch (CUDA), timm, pandas, safetensors and tqdm, not the venv (PYTHON=python);
# its ONNX Runtime part runs where onnxruntime and onnxscript are installed, and is skipped (said in the JSON) elsewhere.
bench-gpu:
	$(PYTHON) -m hiap_core.measure.gpu_bench --out reports/benchmarks/gpu.json

clean-venv:
	rm -rf $(VENV)
