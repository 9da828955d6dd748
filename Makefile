# The README's commands. `make setup` creates .venv in the repository root.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/recsys demo

test: setup
	$(BIN)/ruff check recsys features serving tests benchmarks
	$(BIN)/mypy recsys features serving
	$(BIN)/python -m pytest -q -n 2

lint: setup
	$(BIN)/ruff check recsys features serving tests benchmarks
	$(BIN)/ruff format --check recsys features serving tests benchmarks
	$(BIN)/mypy recsys features serving

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info
