# Roundtable: `make run` starts the suite and a discussion you can watch; `make test` checks everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
LLM ?= sim
TOPIC ?=

.PHONY: run test lint protos check-protos setup clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(INSTALLED)

## Starts simulator, agents, session and monitor on loopback, then runs a demo discussion.
run: setup
	$(BIN)/roundtable up --llm $(LLM) --demo $(if $(TOPIC),"$(TOPIC)")

## Regenerates services/gen from protos/.
protos: setup
	$(BIN)/python scripts/gen_protos.py 2>/dev/null

## Fails when the committed generated code differs from what protos/ generates.
check-protos: protos
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  changed=$$(git status --porcelain -- services/gen); \
	  if [ -n "$$changed" ]; then echo "services/gen is stale; run 'make protos' and commit:"; echo "$$changed"; exit 1; fi; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup check-protos lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) var logs .pytest_cache .mypy_cache .ruff_cache
