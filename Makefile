# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if needed
# and installs what it needs; torch is pinned (constraints.txt) to the local CPU build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files make a re-run install nothing unless pyproject.toml or constraints.txt changed.
$(VENV)/.train: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[train]'
	touch $@

$(VENV)/.dev: $(VENV)/.train
	$(PIP) -e '.[train,dev]'
	touch $@

demo: $(VENV)/.train
	$(BIN)/lowbit demo

test: $(VENV)/.dev
	LOWBIT_DATA=$(DATA) $(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check .

bench: $(VENV)/.train
	LOWBIT_DATA=$(DATA) $(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) reports .pytest_cache
