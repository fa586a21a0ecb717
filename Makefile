# Quick start: `make demo` runs the demo, `make test` runs the whole suite.
# Each target creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench,sync]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m localstore demo --dir data/demo

# The whole suite, soak tests included. Exit code 5 (no tests collected) is a failure.
# tests/secrets_sweep.py runs pytest -q with a sentinel master key and Postgres password,
# then fails if either appears in the output, the logs or any file the run wrote.
test: $(STAMP)
	$(PY) tests/secrets_sweep.py

# Skips the long soak tests (with the same secrets sweep).
test-quick: $(STAMP)
	$(PY) tests/secrets_sweep.py -m 'not soak'

bench: $(STAMP)
	$(PY) benchmarks/run.py all --quick

lint: $(STAMP)
	$(PY) -m pip install --quiet mypy ruff
	$(PY) -m ruff check localstore sync tests benchmarks examples
	$(PY) -m mypy localstore sync

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache
