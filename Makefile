# farmkeys: the two commands of the README, each doing all of its own set-up.
#
#   make demo   a local demo farm on real PostgreSQL and OpenLDAP (loopback only)
#   make lab    a private slapd and PostgreSQL with two node configs, kept until Ctrl-C
#               (LAB_DIR, default lab/), to try farmkeys on by hand
#   make test   ruff, mypy and the whole test suite against the same real servers
#   make test-quick  ruff, mypy and the unit tier alone (tests/unit/): no server is
#               installed or started; seconds, not minutes
#   make bench  every benchmark (sync, cold start, propagation, failover, herd, connections,
#               HTTP crowd and slow-loris, master-key re-seal, directory, publishing), then one table of the goals
#   make soak   a randomized fault soak of serve nodes (SOAK_ARGS="--duration 1200 --seed 7")
#   make fuzz   coverage-guided fuzzing (atheris) of every parser of untrusted input
#               (FUZZ_SECONDS per target, default 60); prints the inputs tried

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The lab's servers and the demo (tools/farmkeys_lab) are not in the wheel: the demo, the
# bench, the soak and the fuzzer find them on this path (the tests: pyproject.toml).
LAB := PYTHONPATH=tools$${PYTHONPATH:+:$$PYTHONPATH}
# The demo and the lab run farmkeys as an operator installs it: its own venv, farmkeys and
# its run-time dependencies alone (no test extra), and only the servers they start.
DEMO_VENV := .venv-demo
DEMO_PY := $(DEMO_VENV)/bin/python
LAB_DIR ?= lab

.PHONY: demo lab test test-quick lint setup venv demo-venv servers lab-servers tools bench soak fuzz clean

demo: demo-venv lab-servers
	$(LAB) $(DEMO_PY) -m farmkeys_lab.demo

lab: demo-venv lab-servers
	$(LAB) $(DEMO_PY) -m farmkeys_lab up --dir $(LAB_DIR)

test: setup lint
	$(PY) -m pytest -q

# The tiers are tests/unit, tests/integration, tests/ad and tests/system (markers of the
# same names, pyproject.toml): this runs the first, which needs no server.
test-quick: venv tools lint
	$(PY) -m pytest -q -m unit

lint: venv
	$(VENV)/bin/ruff check farmkeys tools tests setup.py
	$(VENV)/bin/ruff format --check farmkeys tools tests setup.py
	$(VENV)/bin/mypy

setup: venv servers tools

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo-venv: $(DEMO_VENV)/.installed

$(DEMO_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_PY) -m pip install --quiet --upgrade pip
	$(DEMO_PY) -m pip install --quiet -e .
	touch $@

# What the demo, the lab, the tests, the soak and the bench start privately: OpenLDAP's
# slapd and a PostgreSQL cluster of their own (lab-servers: all the demo and the lab need),
# and for the tests a Samba AD domain controller (tools/farmkeys_lab). Installed from
# Debian when missing; the packages' own servers are not used, and no cluster of the
# machine's is created or started.
lab-servers:
	@if [ ! -x /usr/sbin/slapd ] || ! command -v ldapsearch >/dev/null \
	   || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "installing slapd, ldap-utils and postgresql from Debian"; \
	  mkdir -p /etc/postgresql-common/createcluster.d && \
	  { [ -e /etc/postgresql-common/createcluster.d/farmkeys.conf ] || \
	    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/farmkeys.conf; } && \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
	    slapd ldap-utils postgresql >/dev/null; \
	fi
	@# The slapd package starts a server of its own on install: ours listen on loopback only.
	@if [ -f /var/run/slapd/slapd.pid ]; then kill "$$(cat /var/run/slapd/slapd.pid)" 2>/dev/null || true; fi

servers: lab-servers
	@# Samba's AD domain controller, for the Active Directory tests (farmkeys_lab.samba provisions
	@# a domain of its own and runs it on 127.0.0.1). No recommends: they would add winbind to
	@# nsswitch.conf and PAM (libnss-winbind, libpam-winbind). The packages start smbd, nmbd and
	@# winbind of their own on install: stop those and keep them from starting at boot; this
	@# happens only right after installing, never to a Samba the machine already had.
	@if ! command -v samba-tool >/dev/null || [ ! -x /usr/sbin/samba ] \
	   || [ ! -d /usr/share/samba/setup ]; then \
	  echo "installing samba, samba-ad-dc, samba-ad-provision and samba-dsdb-modules from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends \
	    samba samba-ad-dc samba-ad-provision samba-dsdb-modules >/dev/null || exit 1; \
	  for service in samba-ad-dc smbd nmbd winbind; do \
	    if [ -d /run/systemd/system ]; then systemctl disable --now --quiet "$$service" 2>/dev/null; \
	    else update-rc.d "$$service" disable >/dev/null 2>&1; fi; \
	  done; \
	  for pidfile in /run/samba/samba.pid /run/samba/smbd.pid /run/samba/nmbd.pid \
	                 /run/samba/winbindd.pid; do \
	    if [ -f "$$pidfile" ]; then kill "$$(cat "$$pidfile")" 2>/dev/null; fi; \
	  done; \
	  true; \
	fi
	@# systemd-analyze checks deploy/systemd/ (tests/system/test_deploy.py); systemd need not run.
	@if ! command -v systemd-analyze >/dev/null; then \
	  echo "installing systemd (for systemd-analyze) from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends \
	    systemd >/dev/null; \
	fi
	@# The signed federation metadata is verified as relying parties verify it: xmlsec1
	@# (tests/integration/test_publish_signed.py) and Shibboleth SP's own metadata loader,
	@# mdquery and resolvertest (shibboleth-sp-utils; tests/system/test_shibboleth_sp.py). The
	@# utilities need no shibd or web server; the package installs a shibd service of its own:
	@# stop it and keep it from starting at boot, only right after installing it. Both
	@# install in about ten seconds, here, not while the tests run.
	@if ! command -v xmlsec1 >/dev/null; then \
	  echo "installing xmlsec1 from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    xmlsec1 >/dev/null; \
	fi
	@if ! command -v mdquery >/dev/null || ! command -v resolvertest >/dev/null; then \
	  echo "installing shibboleth-sp-utils (mdquery, resolvertest) from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends \
	    shibboleth-sp-utils >/dev/null || exit 1; \
	  if [ -d /run/systemd/system ]; then systemctl disable --now --quiet shibd 2>/dev/null; \
	  else update-rc.d shibd disable >/dev/null 2>&1; fi; \
	  if [ -f /run/shibboleth/shibd.pid ]; then kill "$$(cat /run/shibboleth/shibd.pid)" 2>/dev/null; fi; \
	  true; \
	fi
	@# keytool opens the store's .p12 files as a Java keystore does (node.pkcs12_password_file,
	@# tests/integration/test_pkcs12_password.py): a headless JRE, no browser plugin or GUI.
	@if ! command -v keytool >/dev/null; then \
	  echo "installing openjdk-17-jre-headless (for keytool) from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    openjdk-17-jre-headless >/dev/null; \
	fi

# What the unit tier checks farmkeys against, none of them a server: the age tool (the
# escrow file, tests/unit/test_escrow_file.py), openssl (PKCS#12,
# tests/unit/test_certificates.py) and Samba's Python bindings in Debian's Python (the
# security descriptor, tests/unit/test_security_descriptor.py). Installed when missing.
tools:
	@if ! command -v age >/dev/null; then \
	  echo "installing age from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq age >/dev/null; \
	fi
	@if ! command -v openssl >/dev/null; then \
	  echo "installing openssl from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; \
	fi
	@if ! /usr/bin/python3 -c "import samba.dcerpc.security, samba.ndr" 2>/dev/null; then \
	  echo "installing python3-samba (Samba's Python bindings, no server) from Debian"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    python3-samba >/dev/null; \
	fi

FUZZ_SECONDS ?= 60

# The blob, farm state, manifest, config, EncryptedPfx and escrow parsers, each for
# FUZZ_SECONDS under libFuzzer; crashing inputs are kept in .fuzz/crashes/<target>/.
fuzz: setup
	$(PY) -m pip install --quiet -e '.[fuzz]'
	$(LAB) $(PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)

# Figures, not a pass/fail: one script per goal of docs/operations.md ("Measured"), then one
# table of figure, goal and ratio (tests/bench/run.py). BENCH_ARGS=--quick for a short run.
BENCH_ARGS ?=
bench: setup
	$(LAB) $(PY) tests/bench/run.py $(BENCH_ARGS)

# Faults at random while serve nodes roll certificates over; exits 1 on a broken invariant.
SOAK_ARGS ?=
soak: setup
	$(LAB) $(PY) tests/soak/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_VENV) .demo .mypy_cache .ruff_cache .pytest_cache
