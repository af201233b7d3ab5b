# The two commands of the README. Both work from a fresh clone with only python3 installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# msads (Microsoft's SDK, used only to check our payloads against its models) declares enum34,
# pytest and Sphinx as runtime requirements; its models need none of them, so it goes in --no-deps.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps 'msads==13.0.30.1'
	touch $@ $(VENV)/.installed

## make demo: set up and run one full cycle on the built-in sandbox (no account, no network)
demo: $(VENV)/.installed
	$(BIN)/leadloop demo --out demo-output

## make test: set up with the test extras and run the test suite
test: $(VENV)/.installed-test
	$(BIN)/ruff check leadloop tests bench
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check leadloop tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) demo-output example-output .pytest_cache .mypy_cache
