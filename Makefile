# dvmm build.
#
#   make demo    set up, then run the embedded default (`dvmmctl demo`)
#   make test    set up, then every test: Rust (cargo test), ruff, mypy, pytest
#                (test-rust / test-python run one side)
#   make lint    cargo fmt --check, cargo clippy -D warnings, ruff, mypy
#   make fuzz    longer fuzzing runs of the wire, handshake, peer and API parsers
#   make setup   apt packages (only the missing ones), the .venv, Python tools,
#                the native extension (maturin develop --release), the guest
#   make perf    set up, then the performance suite (perf/README.md); QUICK=1: short;
#                LINUX=1: also the Linux boot milestones (~35-50 min more)
#   make test-linux  set up, then boot Debian's cloud kernel (fetched with apt into
#                build/linux/) with a tiny initramfs and check the console's
#                milestones; NODES="1 2" boots on 1 then 2 nodes (default 1)
#   make clean   remove the venv, the built extension and the guest build
#
# Everything Python lives in .venv. Steps are skipped when already done
# (stamp files in .venv/.stamps, apt checks with dpkg-query), so a second
# `make setup` takes seconds.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

ROOT   := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV   := $(ROOT)/.venv
PY     := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
PYTHON ?= python3

# rustup puts cargo in ~/.cargo/bin, which a non-login shell may not have on PATH.
CARGO_HOME_BIN := $(wildcard $(HOME)/.cargo/bin)
export PATH := $(VENV)/bin:$(if $(CARGO_HOME_BIN),$(CARGO_HOME_BIN):)$(PATH)

# Debian packages: qemu for the guest's QEMU baseline tests; libclang/clang
# for bindgen (userfaultfd-sys); iproute2/nftables for multi-node tests in
# network namespaces; tcpdump for the traffic-capture test (tests/test_capture.py).
APT_PACKAGES := qemu-system-x86 libclang-dev clang gcc make iproute2 nftables util-linux tcpdump

# What dvmmd needs at run time (pyproject.toml's dependencies), pinned here:
# cryptography for certificates and the data path's X25519 keys; prometheus-client
# for the daemon's metrics endpoint (dvmmd/daemon/metrics.py).
PY_DEPS := cryptography==50.0.2 prometheus-client==0.26.0

# Python tools (pinned).
PY_TOOLS := \
	maturin==1.16.0 \
	pytest==9.2.0 \
	pytest-benchmark==5.3.1 \
	hypothesis==6.170.17 \
	mypy==2.4.1 \
	ruff==0.17.6

RUST_INPUTS := $(shell find $(ROOT)/rust/src -name '*.rs' 2>/dev/null) \
	$(wildcard $(ROOT)/rust/build.rs) $(ROOT)/rust/Cargo.toml $(wildcard $(ROOT)/rust/Cargo.lock) \
	$(ROOT)/pyproject.toml
# Rebuild when the built extension is gone, even if the stamp is there.
NATIVE_SO := $(wildcard $(ROOT)/dvmmd/_native*.so)

# `cargo test` links libpython (no extension-module feature): use the venv's
# interpreter, and find libpython at run time when it is not in ld.so's path.
CARGO_ENV = PYO3_PYTHON=$(PY) \
	LD_LIBRARY_PATH="$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}"

.PHONY: help setup apt venv guest demo test test-rust test-python test-linux lint fuzz perf install-systemd clean distclean FORCE

help:
	@sed -n '2,20p' $(ROOT)/Makefile | sed 's/^# \{0,1\}//'

# ------------------------------------------------------------------ setup

setup: apt $(STAMPS)/native guest

apt:
	@if ! command -v dpkg-query >/dev/null; then \
	  echo "setup: not a Debian system: install $(APT_PACKAGES) by hand"; exit 0; \
	fi; \
	missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q 'install ok installed' \
	    || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	  echo "setup: installing Debian packages:$$missing"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)

$(STAMPS)/pydeps: $(ROOT)/Makefile | $(PY)
	$(PY) -m pip install -q $(PY_DEPS) $(PY_TOOLS)
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/native: $(STAMPS)/pydeps $(RUST_INPUTS) $(if $(NATIVE_SO),,FORCE)
	@command -v cargo >/dev/null || { echo "setup: cargo not found: install a Rust toolchain (rustup)"; exit 1; }
	cd $(ROOT) && VIRTUAL_ENV=$(VENV) $(VENV)/bin/maturin develop --release
	@touch $@

guest:
	$(MAKE) -C $(ROOT)/guest

# ------------------------------------------------------------------ demo

demo: setup
	$(VENV)/bin/dvmmctl demo

# ------------------------------------------------------------------ tests

# Every suite runs even when an earlier one fails (one CI run shows all the
# failures); the target fails at the end if any did.
test: setup
	@cd $(ROOT); failed=""; \
	step() { echo "== make test: $$*"; "$$@" || failed="$$failed [$$*]"; }; \
	step env -C rust $(CARGO_ENV) cargo test --release; \
	step $(VENV)/bin/ruff check dvmmd tests perf; \
	step $(VENV)/bin/mypy; \
	step $(VENV)/bin/pytest -v; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: every suite passed"

test-rust: setup
	cd $(ROOT)/rust && $(CARGO_ENV) cargo test --release

test-python: setup
	cd $(ROOT) && $(VENV)/bin/ruff check dvmmd tests perf
	cd $(ROOT) && $(VENV)/bin/mypy
	cd $(ROOT) && $(VENV)/bin/pytest -v

# An unmodified Linux (issue 13): not part of `make test` (a boot takes minutes where
# CPL0 is emulated). The kernel package and the initramfs are cached in build/linux/.
NODES ?= 1
test-linux: setup
	cd $(ROOT) && $(PY) tests/linux/linux_boot.py prepare
	cd $(ROOT) && for n in $(NODES); do $(PY) tests/linux/linux_boot.py boot --nodes $$n || exit 1; done

lint: setup
	cd $(ROOT)/rust && cargo fmt --check
	cd $(ROOT)/rust && $(CARGO_ENV) cargo clippy --all-targets -- -D warnings
	cd $(ROOT) && $(VENV)/bin/ruff check dvmmd tests perf
	cd $(ROOT) && $(VENV)/bin/ruff format --check dvmmd tests perf
	cd $(ROOT) && $(VENV)/bin/mypy

# Longer fuzzing of every parser a peer or a client reaches (`make test` runs a
# short pass of the same targets). CASES=N sets the Rust cases per property.
fuzz: setup
	cd $(ROOT)/rust && PROPTEST_CASES=$(or $(CASES),50000) $(CARGO_ENV) cargo test --release --test wire_fuzz
	cd $(ROOT) && DVMM_FUZZ_LONG=1 $(VENV)/bin/pytest -q -k fuzz

# ------------------------------------------------------------------ perf

PERF_TOOLS := matplotlib==3.10.9 py-spy==0.4.3

$(STAMPS)/perfdeps: $(STAMPS)/pydeps $(ROOT)/Makefile
	$(PY) -m pip install -q $(PERF_TOOLS)
	@# linux-perf: the worker's native profile (perf record -g); optional.
	@command -v perf >/dev/null || { sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-perf \
	  || echo "perf: linux-perf not installed; the native worker profile will be skipped"; }
	@touch $@

# LINUX=1 adds the opt-in `linux` stage (Debian's kernel booted under QEMU, dvmm 1 and
# 2 nodes; perf/README.md "Linux boot milestones").
perf: setup $(STAMPS)/perfdeps
	cd $(ROOT) && $(PY) -m perf.run $(if $(QUICK),--quick) $(if $(LINUX),--with linux)

# ------------------------------------------------------------------ install

#   make install-systemd   install dvmmd system-wide with its unit (systemd/README.md)
PREFIX ?= /usr/local
install-systemd:
	python3 -m pip install --prefix $(PREFIX) .
	install -D -m 0644 systemd/dvmmd.service /etc/systemd/system/dvmmd.service
	install -d -m 0750 /etc/dvmmd
	test -e /etc/dvmmd/dvmmd.toml || install -m 0640 systemd/dvmmd.toml.example /etc/dvmmd/dvmmd.toml
	test -e /etc/dvmmd/secret || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/dvmmd/secret)
	systemctl daemon-reload

# ------------------------------------------------------------------ clean

clean:
	rm -rf $(VENV) $(ROOT)/guest/build $(ROOT)/dvmmd/_native*.so \
	  $(ROOT)/.pytest_cache $(ROOT)/.mypy_cache $(ROOT)/.ruff_cache

distclean: clean
	rm -rf $(ROOT)/rust/target

FORCE:
