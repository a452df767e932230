# Vantage: every target does its own set-up. `make run` and `make test` are all a fresh
# Debian machine with Python 3.11+ needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test fuzz scenario lint native proto proto-check lock system-deps bench bench-deps bench-scale bench-spool bench-verdict dist image clean help
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

# The probe path, compiled with mypyc into extension modules beside the sources (see
# vantage/native.py; keep this list in step with COMPILED there). Needs a C compiler and
# Python's headers, installed here when missing. Rebuilt whenever one of them changes.
NATIVE := agent/buffer.py agent/probes/http.py agent/probes/network.py agent/scheduler.py \
	coordinator/engine.py coordinator/judgement.py coordinator/views.py vantage/results.py vantage/wire.py
native: build/native.stamp  ## compile the probe path with mypyc (run, test and bench do it)
build/native.stamp: $(VENV)/.installed $(NATIVE) vantage/native.py
	@include=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	if ! command -v gcc >/dev/null || [ ! -e "$$include/Python.h" ]; then \
	  echo "installing Debian packages: gcc python3-dev"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends gcc python3-dev >/dev/null; \
	fi
	@mkdir -p build
	@echo "compiling with mypyc: $(NATIVE)"
	@$(PY) -m vantage.native >build/native.log 2>&1 || { cat build/native.log; exit 1; }
	@touch $@

# Debian packages the tests use: promtool (prometheus); the multi-region test bed's
# targets, resolvers, faults and network (nginx, dnsmasq, nftables, iproute2); curl for
# the JSON API over TLS as operators call it; the deploy files' own tools (systemd-analyze,
# cloud-init schema, mmdebstrap + podman for the container image).
SYSTEM_TOOLS := promtool:prometheus mosquitto:mosquitto nginx:nginx dnsmasq:dnsmasq-base nft:nftables ip:iproute2 curl:curl \
	systemd-analyze:systemd cloud-init:cloud-init mmdebstrap:mmdebstrap podman:podman
system-deps:  ## install the Debian packages the tests need
	@missing=$$(for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; \
	  command -v $$tool >/dev/null || [ -x /usr/sbin/$$tool ] || echo $${pair#*:}; done); \
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
bench: build/native.stamp bench-deps  ## HTTP probes/s: one agent + coordinator vs blackbox_exporter
	$(PY) tests/bench/bench_http.py $(BENCH_ARGS)

bench-scale: build/native.stamp  ## one coordinator under 100 agents x 10,000 checks (100,000 results/s offered)
	$(PY) tests/bench/bench_scale.py $(BENCH_ARGS)

bench-spool: build/native.stamp  ## the agent's result spool: segment log vs a SQLite prototype
	$(PY) tests/bench/bench_spool.py $(BENCH_ARGS)

bench-verdict: $(VENV)/.installed  ## verdict engine scores from the seeded simulator (writes docs/verdict-scores.md)
	$(PY) tests/bench/bench_verdict.py $(BENCH_ARGS)

# A wheel and sdist to install without this repository (`pip install -c constraints.txt
# vantage-*.whl`; README: Running an agent on a VPS). The wheel is built from the sdist, so
# it holds what the packages declare (vantage_proto, openapi.yaml, py.typed: see
# package-data in pyproject.toml) and never the mypyc extensions beside the sources or
# leftovers in build/: pure Python, for any machine. --no-isolation builds with this venv's
# setuptools rather than whichever one an isolated build would download.
DIST ?= dist
dist: $(VENV)/.installed  ## build the wheel and sdist into dist/ (DIST=DIR for another)
	$(PY) -m build --quiet --no-isolation --outdir $(DIST) .

# The container image (deploy/container/Containerfile; README: In a container), built
# with podman; it compiles the probe path with mypyc itself. A machine whose pip trusts
# a CA bundle of its own (PIP_CERT) lends it to the build's pip as a build secret, kept in
# no layer. IMAGE_FLAGS adds `podman build` flags, e.g. --isolation chroot where podman
# cannot start containers, or --build-arg BASE=IMAGE for another Debian 12 base.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' vantage/__init__.py)
IMAGE ?= localhost/vantage:$(VERSION)
IMAGE_FLAGS ?=
comma := ,
image:  ## build the container image localhost/vantage:VERSION with podman (IMAGE_FLAGS=...)
	podman build -f deploy/container/Containerfile --build-arg VERSION=$(VERSION) \
	  $(if $(PIP_CERT),--secret id=pip-ca$(comma)src=$(PIP_CERT)) -t $(IMAGE) $(IMAGE_FLAGS) .

run: build/native.stamp  ## start a coordinator and three agents (eu, us, ap) on this machine
	deploy/examples/run-local.sh

# Inputs per fuzz target (tests/fuzz/): `make test` spends about a minute on them,
# `make fuzz` searches much longer (FUZZ_EXAMPLES=... to choose).
TEST_FUZZ_EXAMPLES ?= 1500
FUZZ_EXAMPLES ?= 20000
test: build/native.stamp system-deps  ## install what the tests need and run them all
	FUZZ_EXAMPLES=$(TEST_FUZZ_EXAMPLES) $(BIN)/pytest

fuzz: build/native.stamp  ## a long fuzz run over the coordinator's message handling
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/fuzz -o timeout=0 --hypothesis-show-statistics

# Outage scenarios on the multi-region test bed (tests/testbed/; needs root), e.g.
# make scenario S="../shared/scenarios/03-regional-blackhole.yaml tests/scenarios/*.yaml"
S ?=
SCENARIO_ARGS ?=
scenario: build/native.stamp system-deps  ## play scenario files on the test bed: S="FILE ..." (root)
	@[ -n "$(S)" ] || { echo 'usage: make scenario S="FILE ..." [SCENARIO_ARGS="--jobs 2 --keep-logs"]'; exit 2; }
	$(PY) -m tests.testbed $(SCENARIO_ARGS) $(S)

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

clean:  ## remove the virtual environment, compiled modules and caches
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache
	find . -name '*.so' -not -path './.venv/*' -delete
