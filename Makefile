# `make run` and `make test` each create .venv on first use.  torch goes in first, and only when the
# environment has none, so pip never replaces a torch that is already there (a CUDA build on a GPU box:
# make VENV_FLAGS=--system-site-packages to see it) and never pulls a CUDA build onto a CPU machine.
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl

DATA_DIR ?= data/generated
RUN_ENV ?= cube-single-play-singletask-task2-v0
RUN_STEPS ?= 3000

.PHONY: run test bench clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(DATA_DIR)/cube-single-play-v0.npz: | $(VENV)/.installed
	$(PY) experiments/generate_data.py --env cube-single --type play --episodes 40 --seed 0 --workers 2 --out $(DATA_DIR)

run: $(VENV)/.installed $(DATA_DIR)/cube-single-play-v0.npz
	$(PY) experiments/train.py --env $(RUN_ENV) --dataset-dir $(DATA_DIR) --steps $(RUN_STEPS) \
	    --log-every 250 --eval-episodes 20 --set "actor_hidden_dims=(256,256)" --set "value_hidden_dims=(256,256)" \
	    --set num_qs=4 --out runs/quickstart

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) experiments/benchmark.py --size full --steps 20 --json results/benchmark_cpu.json

clean-venv:
	rm -rf $(VENV)
