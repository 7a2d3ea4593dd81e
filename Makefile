# Two entry points: `make demo` (whole pipeline on ../shared/data/cifar10) and `make test` (full CPU suite).
# Each installs what it needs into .venv first (torch pinned to the CPU build: see pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo demo-time test install install-test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/vitpipe run demo

# The demo as a fresh clone meets it (new store, empty torch extension cache), each stage's seconds and the total
# next to a bare-loop throughput measured in the same run (benchmarks/demo_time.py).
demo-time: $(VENV)/.installed
	$(BIN)/python benchmarks/demo_time.py

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/model_speed.py
	$(BIN)/python benchmarks/data_speed.py
	$(BIN)/python benchmarks/data_scale.py
	$(BIN)/python benchmarks/step_overhead.py
	$(BIN)/python benchmarks/fewshot_speed.py

clean:
	rm -rf runs build *.egg-info .pytest_cache
