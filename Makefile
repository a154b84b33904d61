# ocore-storage-worker. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint format test test-fast sysdeps bench bench-quick clean

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

install: $(STAMP) ## virtualenv from the lock file

demo: install ## run scan + orphan cleanup on the embedded default (SQLite, filesystem broker)
	$(BIN)/ocore-storage demo

lint: install ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

sysdeps: ## Debian packages the tests need (sshd, promtool), installed when missing
	bash scripts/install-system-deps.sh

test: install lint sysdeps ## the README's test command: lint, then every test
	$(BIN)/pytest -q -p no:cacheprovider

test-fast: install ## tests without the slow (real worker, fault) ones
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow"

bench: install ## benchmarks (not part of make test); writes docs/benchmarks.md
	WITH_BENCH=1 bash scripts/install-system-deps.sh
	$(BIN)/python -m bench.run --sizes 10000,100000,1000000

bench-quick: install
	WITH_BENCH=1 bash scripts/install-system-deps.sh
	$(BIN)/python -m bench.run --sizes 10000 --quick

clean:
	rm -rf $(VENV) var demo-data .mypy_cache .ruff_cache .pytest_cache
