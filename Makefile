# Two entry points for a fresh machine: `make quickstart` (the main job) and `make test`.
# Each creates .venv with pip when it is missing (pip takes torch from this machine's disk where it can).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-fast benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/fairsweep launch sweeps/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

benchmark: $(STAMP)
	$(PY) benchmarks/quickstart.py

clean:
	rm -rf fairsweep_results mlflow.db mlartifacts
