# Everything installs from nothing into .venv: torch is pinned to the CPU wheel on local disk.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/flashcomm demo

test: setup
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache
