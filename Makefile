# One command to run, one to test. Both install what they need into .venv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config.yaml

.PHONY: install run test lint bench check-config clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, or sentence-transformers pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[ml,test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gateway serve --config $(CONFIG)

check-config: $(STAMP)
	$(BIN)/gateway check-config --config $(CONFIG)

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check gateway plugins tests bench scripts
	$(BIN)/ruff format --check gateway plugins tests bench scripts
	$(BIN)/mypy gateway plugins

bench: $(STAMP)
	$(BIN)/python -m bench.run --rounds 3

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
