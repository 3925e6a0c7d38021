# Targets for development; `make install` creates .venv with everything the others need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test soak bench lint typecheck check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python -m outbox.demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

soak: install
	HYPOTHESIS_PROFILE=soak $(BIN)/python -m pytest tests/test_store_model.py $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check outbox tests bench
	$(BIN)/ruff format --check outbox

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache .hypothesis
