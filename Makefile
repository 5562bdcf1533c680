# Two commands do all the set-up: `make run` runs the main job, `make test` runs the tests.
# Each creates the virtualenv (.venv) when it is missing and reuses it when it is there; a
# changed pyproject.toml reinstalls the package into it.
#
#   make run ARGS="-- --model tiny --steps 300"   flags for launch.py (and, after --, the trainer)
#   make test PYTEST_ADDOPTS="-m 'not chaos'"     pytest reads its extra flags from the environment
#   make run TORCH_INDEX=URL                      torch from that wheel index (the CUDA build you
#                                                 use) instead of the default build
#   make lint                                     ruff and mypy, as CI runs them

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint

run: $(STAMP)
	$(BIN)/python launch.py --nproc 2 --max-restarts 5 $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy runcontract trainer supervisor tools rosetrainer launch.py

# torch is pinned first and alone: left to the package's own `torch>=2.4,<3`, pip would pick
# whatever build the index offers first, a multi-GB CUDA build on many machines.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@
