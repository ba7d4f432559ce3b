# Quick start:  make demo   (trains a GPT on 2 ranks)      make test   (the test suite)
# Both install what they need on first use (scripts/bootstrap.sh); later calls start at once.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
NP ?= 2
ARGS ?=
PYTEST_ARGS ?=
export PATH := $(VENV)/bin:$(PATH)
# Running as root (containers, CI) needs Open MPI's explicit consent.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_mpi_yield_when_idle := 1
export PYTHONUNBUFFERED := 1

.PHONY: env demo test bench clean

env:
	@bash scripts/bootstrap.sh

demo: env
	$(VENV)/bin/hvdllm launch -np $(NP) -- train configs/demo.toml $(ARGS)

# lint first (ruff: pyflakes, pycodestyle, import order; pyproject.toml), then the suite, which
# prints its slowest tests (setup.cfg: --durations)
test: env
	$(VENV)/bin/ruff check --quiet .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: env
	$(VENV)/bin/hvdllm bench dp $(ARGS)

clean:
	rm -rf runs .pytest_cache
