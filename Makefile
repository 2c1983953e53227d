# One-command tooling: every target creates .venv and installs buzon with its dev tools first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck pytest bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard src/buzon/*.c)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/buzon demo

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: install
	$(BIN)/buzon bench --json bench-results.json

docs: install
	$(BIN)/python -m buzon.docgen docs

clean:
	$(BIN)/buzon clean || true
