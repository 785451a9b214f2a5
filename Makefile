# `make run` and `make test` each create .venv on first use.  torch goes in first, and only when the
# environment has none, so pip never replaces a torch that is already there (a CUDA build on a GPU box:
# make VENV_FLAGS=--system-site-packages to see it) and never pulls a CUDA build onto a CPU machine.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl

.PHONY: run test bench gpu-check clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q -U pip
	@echo "installing torch $(TORCH_VERSION) (CPU) unless one is there, then qam_ray and its dependencies ..."
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --progress-bar on torch==$(TORCH_VERSION)
	$(PY) -m pip install --progress-bar on -e ".[dev]"
	touch $@

# The main job: a real small sweep (2 seeds, generated data, local Ray, MLflow in ./mlflow.db), then its table.
run: $(VENV)/.installed
	$(PY) experiments/sweep.py --preset quickstart
	$(PY) experiments/analyze.py --sweep qam-quickstart --out results/quickstart

test: $(VENV)/.installed
	$(PY) -m pytest -v --durations=15  # one line per test as it runs; the slowest listed at the end

bench: $(VENV)/.installed
	$(PY) experiments/benchmark.py --size full --steps 10 --repeats 3 --json results/benchmark_cpu.json

# GPU numbers (experiments/gpu_check.sh): needs only torch, numpy and pytest, so no venv is built; the venv's
# Python when there is one, else python3.  `make gpu-check DEVICE=cpu SMOKE=1` is the CI smoke run.
DEVICE ?= cuda
SMOKE ?= 0
gpu-check:
	DEVICE=$(DEVICE) SMOKE=$(SMOKE) PYTHON=$$(test -x $(PY) && echo $(PY) || echo python3) bash experiments/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
