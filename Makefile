# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if needed
# and installs what it needs. torch comes as its CPU build from PyTorch's CPU wheel index, as
# PyTorch's install instructions say (PyPI's Linux torch pulls ~16 CUDA packages); a CPU wheel
# pip already finds locally (find-links) wins, and an unreachable index costs a few retries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
CIFAR100 ?= data/cifar-100-python
PIP := $(BIN)/python -m pip install -q -c constraints.txt
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test lint bench clean cifar100

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files make a re-run install nothing unless pyproject.toml or constraints.txt changed.
$(VENV)/.train: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) --retries 2 --extra-index-url $(TORCH_INDEX) torch==2.13.0
	$(PIP) -e '.[train]'
	touch $@

$(VENV)/.dev: $(VENV)/.train
	$(PIP) -e '.[train,dev]'
	touch $@

demo: $(VENV)/.train
	$(BIN)/lowbit demo

test: $(VENV)/.dev cifar100
	LOWBIT_DATA=$(DATA) LOWBIT_CIFAR100=$(CIFAR100) $(BIN)/python -m pytest -q

# CIFAR-100 in the official format, rebuilt once from $(DATA)'s lossless copy (~1 min) into
# $(CIFAR100) (git-ignored); without it the CIFAR-100 tests skip, saying so.
cifar100:
	@if [ -d $(CIFAR100) ]; then :; \
	elif [ -x $(DATA)/cifar100-unpack ]; then $(DATA)/cifar100-unpack $(dir $(CIFAR100)) \
		|| echo "warning: could not unpack CIFAR-100: its tests skip"; \
	else echo "no $(DATA)/cifar100-unpack: the CIFAR-100 tests skip"; fi

lint: $(VENV)/.dev
	$(BIN)/ruff check .

bench: $(VENV)/.train
	LOWBIT_DATA=$(DATA) $(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) reports .pytest_cache
