# Quick start: `make serve` (set up, train a small LMA model on synthetic data, export, serve)
# and `make test` (set up, run the whole test suite).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
ARTIFACTS ?= artifacts
PORT ?= 8000

.PHONY: setup serve test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q -e '.[train,export,serve,dev,loadtest]'
	touch $@

setup: $(VENV)/.installed
	$(BIN)/python -m lma.ops.build --quiet || true
	$(BIN)/python -m lma.ort_ops --quiet || true

serve: setup
	bash scripts/quickstart.sh $(ARTIFACTS) $(PORT)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
