# ocore-storage-worker. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK ?= requirements.lock
# checkov (tests/deploy) pins boto3 and packaging below ours: a virtualenv of its own
TOOLS_VENV ?= .venv-tools
TOOLS_LOCK ?= requirements-tools.lock
# PEP 503 names: lower case, runs of - _ . as one -
NORMALIZE := tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/-/g' | sort -u

.PHONY: install sync tools demo doctor lint format test test-fast test-deep sysdeps bench bench-quick bench-upload clean

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes -r $(LOCK)
	@$(MAKE) --no-print-directory sync VENV=$(VENV) LOCK=$(LOCK)
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

install: $(STAMP) ## virtualenv from the lock file, exactly (packages not in it are removed)

sync: ## uninstall what the lock file does not list (pip, setuptools, wheel and this project stay)
	@extra=$$(comm -23 \
	    <($(BIN)/pip freeze --exclude-editable --disable-pip-version-check \
	        | sed -nE 's/^([A-Za-z0-9][A-Za-z0-9._-]*)[ =@].*/\1/p' | $(NORMALIZE)) \
	    <( (sed -nE 's/^([A-Za-z0-9][A-Za-z0-9._-]*)==.*/\1/p' $(LOCK); \
	        echo pip; echo setuptools; echo wheel; echo ocore-storage-worker) | $(NORMALIZE))); \
	if [ -n "$$extra" ]; then \
	    echo "removing packages not in $(LOCK):" $$extra; \
	    $(BIN)/pip uninstall -y -q --disable-pip-version-check $$extra; \
	fi

$(TOOLS_VENV)/.installed: $(TOOLS_LOCK)
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q --disable-pip-version-check --require-hashes -r $(TOOLS_LOCK)
	@touch $@

tools: $(TOOLS_VENV)/.installed ## checkov in .venv-tools from requirements-tools.lock (the Kubernetes manifests' checks)

demo: install ## run scan + orphan cleanup on the embedded default (SQLite, filesystem broker)
	$(BIN)/ocore-storage demo

doctor: install ## one line per check: Python, virtualenv, PostgreSQL, Redis, programs, destinations
	$(BIN)/ocore-storage doctor

lint: install ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

sysdeps: ## Debian packages the tests need (sshd, promtool), installed when missing
	bash scripts/install-system-deps.sh

# Branch coverage floor of make test (README, "Tests"): raise it as coverage grows.
# Test processes (pytest-xdist, --dist loadfile: a file's tests, fixtures and servers stay
# in one process; files that use Redis each flush a database of their own). 2: the cores
# of the CI machine.
TEST_PROCESSES ?= 2
COV_FLOOR ?= 84

test: install lint sysdeps tools ## the README's test command: lint, then every test, with branch coverage
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_PROCESSES) --dist loadfile --cov --cov-report= --cov-fail-under=$(COV_FLOOR)

test-fast: install tools ## tests without the slow (real worker, fault) ones
	$(BIN)/pytest -q -p no:cacheprovider -m "not slow"

test-deep: install sysdeps ## the property suite (tests/property) with many random examples, ~15 min
	OCORE_PROPERTY_PROFILE=deep $(BIN)/pytest -q -p no:cacheprovider tests/property --hypothesis-show-statistics

bench: install ## benchmarks (not part of make test); writes docs/benchmarks.md
	WITH_BENCH=1 bash scripts/install-system-deps.sh
	$(BIN)/python -m bench.run --sizes 10000,100000,1000000 --cleanup-sizes 10000,100000 --backend-sizes 10000,100000

bench-upload: install ## peak RSS of the API server for 1 and 8 concurrent 1 GiB uploads per backend (~9 min)
	WITH_BENCH=1 bash scripts/install-system-deps.sh
	$(BIN)/python -m bench.run --only upload

bench-quick: install
	WITH_BENCH=1 bash scripts/install-system-deps.sh
	$(BIN)/python -m bench.run --sizes 10000 --quick

clean:
	rm -rf $(VENV) $(TOOLS_VENV) var demo-data .mypy_cache .ruff_cache .pytest_cache
