# `make test` sets up a fresh machine from nothing and runs everything CI runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
APT_PACKAGES := redis-server haproxy nginx wrk libpython3.11
APT_PROBE := redis-server haproxy nginx wrk

.PHONY: test lint unit demo bench bench-headline setup servers clean

# Three processes, a test module each at a time (module fixtures stay in one): the suite mostly waits on
# the real servers it starts, so it runs in a third of the time even on two cores.
test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -n 3 --dist loadfile

lint: $(STAMPS)/venv
	$(VENV)/bin/ruff check sidecar tests bench
	$(VENV)/bin/mypy

setup: $(STAMPS)/apt $(STAMPS)/venv servers

servers: $(STAMPS)/apt
	bash scripts/setup-servers.sh

demo: setup
	$(PY) bench/demo.py

bench: setup
	$(PY) bench/proxy_overhead.py
	$(PY) bench/cold_start.py

# The headline table (docs/benchmarks.md, "Headline"); about 10 minutes. HEADLINE_ARGS=--seconds 5 for a smoke run.
HEADLINE_ARGS ?=
bench-headline: setup
	$(PY) bench/headline.py $(HEADLINE_ARGS)

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@missing=0; for c in $(APT_PROBE); do command -v $$c >/dev/null || missing=1; done; \
	  ldconfig -p | grep -q 'libpython3.11.so.1.0' || missing=1; \
	  if [ $$missing = 1 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	  fi
	@touch $@

# constraints.txt pins every package to the versions the tests passed with: left free, a fresh
# resolve once paired grpcio-tools' newest (protobuf 7) with a years-old tritonclient.
$(STAMPS)/venv: pyproject.toml constraints.txt
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) .venv-triton .venv-kserve $(STAMPS) *.egg-info
