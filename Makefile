# Vantage: every target does its own set-up. `make run` and `make test` are all a fresh
# Debian machine with Python 3.11+ needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint proto proto-check lock system-deps bench bench-deps bench-verdict clean help
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# Debian's python3 needs the python3-venv package for `-m venv`; install it when missing.
$(BIN)/activate:
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "installing Debian package python3-venv"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv >/dev/null && \
	  $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

# Runtime and development dependencies, pinned by constraints.txt (see `make lock`).
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/activate
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Debian packages the tests use: promtool (prometheus).
SYSTEM_TOOLS := promtool:prometheus
system-deps:  ## install the Debian packages the tests need
	@missing=$$(for pair in $(SYSTEM_TOOLS); do command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Debian packages the benchmark drives: nginx (target), blackbox_exporter (reference), wrk.
BENCH_TOOLS := nginx:nginx prometheus-blackbox-exporter:prometheus-blackbox-exporter wrk:wrk
bench-deps:  ## install the Debian packages the benchmark needs
	@missing=$$(for pair in $(BENCH_TOOLS); do tool=$${pair%%:*}; \
	  command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || echo $${pair#*:}; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

BENCH_ARGS ?=
bench: $(VENV)/.installed bench-deps  ## HTTP probes/s: one agent + coordinator vs blackbox_exporter
	$(PY) tests/bench/bench_http.py $(BENCH_ARGS)

bench-verdict: $(VENV)/.installed  ## verdict engine scores from the seeded simulator (writes docs/verdict-scores.md)
	$(PY) tests/bench/bench_verdict.py $(BENCH_ARGS)

run: $(VENV)/.installed  ## start a coordinator and three agents (eu, us, ap) on this machine
	deploy/examples/run-local.sh

test: $(VENV)/.installed system-deps  ## install what the tests need and run them all
	$(BIN)/pytest

lint: $(VENV)/.installed  ## ruff and mypy (strict) on the packages
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

proto: $(VENV)/.installed  ## regenerate vantage_proto from proto/
	$(PY) proto/generate.py

proto-check: $(VENV)/.installed  ## fail when the generated code is stale
	$(PY) proto/generate.py --check

lock: | $(BIN)/activate  ## re-pin constraints.txt from pyproject.toml
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile -q --all-extras --strip-extras --no-header -o constraints.txt pyproject.toml

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
