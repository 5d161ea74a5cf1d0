# Two entry points for a fresh machine: `make quickstart` (the main job) and `make test`.
# Each creates .venv with pip when it is missing (pip takes torch from this machine's disk where it can).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Test files run in this many processes at once (pytest-xdist, a whole file per process, so a file's module
# fixtures and order stay as written). Two use a 2-core machine: a Ray test leaves a core idle about a third
# of its time (process starts, one pretraining job), and most fast tests use one core.
TEST_WORKERS ?= 2

.PHONY: quickstart test test-fast benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/fairsweep launch sweeps/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

benchmark: $(STAMP)
	$(PY) benchmarks/quickstart.py

clean:
	rm -rf fairsweep_results mlflow.db mlartifacts
