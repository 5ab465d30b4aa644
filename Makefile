# The single entry point. `make demo` and `make test` set everything up on a machine with
# only Python >= 3.11 and make.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help venv demo test soak fuzz lint fmt protos protos-check docs up clean

help: ## Show the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt examples/tools/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]' -e examples/tools
	@touch $(STAMP)

venv: $(STAMP) ## Create .venv and install the project (pinned by constraints.txt)

demo: $(STAMP) ## Start every service on SQLite under ./.cuga, run a sample orchestration, stop
	$(BIN)/cuga demo

test: $(STAMP) ## Run the whole suite under coverage (every process it starts), print the table
	@rm -f .coverage .coverage.*
	@status=0; \
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/python -m coverage run -m pytest \
		-n $(PYTEST_WORKERS) --dist loadgroup || status=$$?; \
	$(BIN)/python -m coverage combine -q && $(BIN)/python -m coverage report || \
		{ [ $$status -ne 0 ] || status=$$?; }; \
	exit $$status

soak: $(STAMP) ## Fault and load suite at full counts: >= 20 runs per kill/drain, 12 load rounds (make test runs a quick round)
	CUGA_SOAK=1 $(BIN)/python -m pytest tests/fault -n $(PYTEST_WORKERS) --timeout 1800 -q

fuzz: $(STAMP) ## Fuzz every RPC long: >= 10k cases per service (make test runs a short round)
	CUGA_FUZZ_CASES_PER_SERVICE=10000 $(BIN)/python -m pytest tests/fuzz -p no:xdist --timeout 3600 -q

lint: $(STAMP) ## ruff, mypy (strict, our code), buf lint, buf breaking against main
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd protos && ../$(BIN)/buf lint
	cd protos && ../$(BIN)/buf breaking --against '../.git#branch=main,subdir=protos'

fmt: $(STAMP) ## Format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

protos: $(STAMP) ## Regenerate the Python stubs from protos/
	$(BIN)/python scripts/gen_protos.py

protos-check: $(STAMP) ## Fail when the committed stubs drift from protos/
	$(BIN)/python scripts/gen_protos.py --check

docs: $(STAMP) ## API reference (Python API + gRPC contract) into build/docs/; fails on a gap
	$(BIN)/python scripts/gen_docs.py --out build/docs

.PHONY: deploy-check
deploy-check: $(STAMP) ## Render every kustomize overlay (kubectl) and validate it offline
	$(BIN)/python scripts/deploy_check.py

BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

.PHONY: bench
bench: $(BENCH_STAMP) ## Benchmarks B0-B6: B0, B1, B2, B6 in interleaved rounds, ratios at equal durability (BENCH_ARGS=--rounds N|--profile|--quick)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

up: $(STAMP) ## Run all six services in the foreground (Ctrl-C stops them)
	$(BIN)/cuga up

clean: ## Remove the venv and local data
	rm -rf $(VENV) .cuga .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
