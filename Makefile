# farmkeys: the two commands of the README, each doing all of its own set-up.
#
#   make demo   a local demo farm on real PostgreSQL and OpenLDAP (loopback only)
#   make test   ruff, mypy and the whole test suite against the same real servers
#   make bench  the propagation and failover benchmark (prints figures)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PG_VERSION ?= 15

.PHONY: demo test lint setup servers bench clean

demo: setup
	$(PY) -m farmkeys._demo

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check farmkeys tests
	$(VENV)/bin/ruff format --check farmkeys tests
	$(VENV)/bin/mypy

setup: $(VENV)/.installed servers

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# OpenLDAP's slapd (the tests and the demo start private ones) and a running PostgreSQL.
servers:
	@if [ ! -x /usr/sbin/slapd ] || ! command -v ldapsearch >/dev/null; then \
	  echo "installing slapd and ldap-utils from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq slapd ldap-utils >/dev/null; \
	fi
	@# The package's own slapd is not needed: ours listen on loopback only.
	@if [ -f /var/run/slapd/slapd.pid ]; then kill "$$(cat /var/run/slapd/slapd.pid)" 2>/dev/null || true; fi
	@if ! pg_isready -q -h 127.0.0.1 -p 5432; then \
	  echo "starting PostgreSQL $(PG_VERSION)"; \
	  pg_ctlcluster --skip-systemctl-redirect $(PG_VERSION) main start; \
	  for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; \
	fi

# Figures, not a pass/fail: propagation to N nodes and failover time.
bench: setup
	$(PY) tests/bench/bench_propagation.py

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache
