# offset-relay: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RELAY_DIR ?= relay
RELAY_ADDR ?= 127.0.0.1:4567

.PHONY: run test check venv deps lint clean deb

LINTED := offset_appliance tests bench fuzz

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Only what the relay needs at run time (PyNaCl, tomli-w, sdnotify), not the test tools.
$(VENV)/.stamp-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e .
	touch $@

# Identity and ticket in ./relay (made once, never overwritten), relay in the foreground.
# The ticket's address is loopback: --allow-private says so on purpose.
run: $(VENV)/.stamp-run
	mkdir -p $(RELAY_DIR)
	test -f $(RELAY_DIR)/relay.ident || $(BIN)/stmgr gen-ident --output $(RELAY_DIR)/relay.ident
	test -f $(RELAY_DIR)/relay.relay || $(BIN)/stmgr relay-ticket --address $(RELAY_ADDR) \
		--idfile $(RELAY_DIR)/relay.ident --output $(RELAY_DIR)/relay.relay --allow-private
	exec $(BIN)/strelay --idfile $(RELAY_DIR)/relay.ident --laddr $(RELAY_ADDR)

# System packages the tests need (capnp reference tool, the real-host rig, packaging tools).
deps:
	sh tools/install-deps

# Everything: the lint, then every test (integration, reliability and, as root, deploy), on
# two workers: the deployment tests (booted hosts, mostly waiting on them) on one, in their
# order, the rest of the suite beside them, a module at a time (tests/conftest.py).
test: deps lint
	$(BIN)/pytest -q --durations=20 -n 2 --dist loadscope

# The developer's fast loop: lint, types and the unit tests, without root or apt, in well
# under a minute.
check: lint
	$(BIN)/pytest -q -p no:cacheprovider -n 2 tests/unit

lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info

# Benchmarks against a real strelay on loopback (about 11 minutes on 2 cores, test 10 about 6): writes
# bench/results.json and bench/RESULTS.md and prints the table. Not part of `make test`.
.PHONY: bench
bench: venv
	$(BIN)/python -m bench

# The reliability scenarios of tests/reliability scaled up: each repeats against one relay for
# its share of OFFSET_SOAK_SECONDS (default 30 minutes; the run takes a few minutes more) and
# the fuzz targets also run under atheris. Figures: tests/reliability/soak-results.json. Then
# soak-netem.
OFFSET_SOAK_SECONDS ?= 1800
.PHONY: soak
soak: venv
	$(BIN)/pip install -q atheris
	OFFSET_SOAK_SECONDS=$(OFFSET_SOAK_SECONDS) $(BIN)/pytest -q tests/reliability
	$(MAKE) soak-netem

# The lossy, slow network of tests/deploy/test_network_faults.py held for OFFSET_NETEM_SECONDS
# (default 10 minutes): 100 tunnels and 20 idle listeners through 100 ms of delay (20 ms of
# jitter), 1 % loss and 10 % reordering both ways, on a booted host (root). Figures:
# tests/deploy/netem-results.json.
OFFSET_NETEM_SECONDS ?= 600
.PHONY: soak-netem
soak-netem: venv
	OFFSET_NETEM_SECONDS=$(OFFSET_NETEM_SECONDS) $(BIN)/pytest -q \
		tests/deploy/test_network_faults.py -k lossy_slow_network

# The relay against the original Offset binaries (a build of github freedomlayer/offset; nothing
# of it is in this repository): OFFSET_ORIGINAL_BIN is the folder holding its stmgr, strelay,
# stnode, stctrl, stindex and stverify. Files both ways, our client through its strelay, its
# nodes through ours, an idle node held across relay rekeys for OFFSET_INTEROP_HOLD seconds
# (default 660), two of its nodes paying each other through ours; then, on a booted host (root),
# its nodes kept connected and paying through the package's restart, upgrade and restart after a
# configuration change (figures: tests/deploy/original-nodes-results.json).
.PHONY: interop
interop: venv
	@test -n "$(OFFSET_ORIGINAL_BIN)" || \
		{ echo "interop: set OFFSET_ORIGINAL_BIN to the folder of the original binaries" >&2; exit 2; }
	OFFSET_ORIGINAL_BIN=$(OFFSET_ORIGINAL_BIN) $(BIN)/pytest -v -s tests/interop \
		tests/deploy/test_original_nodes.py

# The Debian package, built from a copy of the tree (dpkg-buildpackage writes beside the
# source and cleans it) with Debian's own python3 first on PATH: pybuild must not see
# another interpreter. tests/deploy builds it this way too.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' offset_appliance/__init__.py)
DEB_SRC := build/deb/offset-relay-$(VERSION)
# What goes into the package's source: the tree without local and generated files.
COPY_TREE = tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
	--exclude=./relay --exclude='*.egg-info' --exclude=__pycache__ \
	--exclude=.pytest_cache --exclude=.ruff_cache --exclude=.mypy_cache --exclude=.hypothesis . \
	| tar -xf - -C
# The release an upgrade is tested from: its version and the commit it was built from.
PREVIOUS_VERSION := 0.1.0
PREVIOUS_COMMIT := 59f5264

.PHONY: check-version source deb-chroot previous-deb apt-repo

# The version is in offset_appliance/__init__.py, pyproject.toml and packaging/debian/changelog:
# `make release` sets all three.
VERSION_PLACES := the version lives in offset_appliance/__init__.py, pyproject.toml and \
	packaging/debian/changelog; set all three with make release VERSION=X.Y.Z
check-version:
	@test "$$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)" = "$(VERSION)" || \
		{ echo "packaging/debian/changelog does not match version $(VERSION) of offset_appliance/__init__.py: $(VERSION_PLACES)" >&2; exit 1; }
	@test "$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)" = "$(VERSION)" || \
		{ echo "pyproject.toml does not match version $(VERSION) of offset_appliance/__init__.py: $(VERSION_PLACES)" >&2; exit 1; }

# A release: `make release VERSION=X.Y.Z [MESSAGE="..."]` sets the version in those three
# files (and the man pages and README), adds the changelog entry (MESSAGE, or "New upstream
# release.") and prints the next steps. Refused when the tree is not clean or VERSION is not
# greater than the current one. See README.md, "Making a release".
.PHONY: release
release: export RELEASE_VERSION = $(VERSION)
release: export RELEASE_MESSAGE = $(MESSAGE)
release:
	@test "$(origin VERSION)" = "command line" || \
		{ echo "release: say which version: make release VERSION=X.Y.Z" >&2; exit 2; }
	@tools/release "$$RELEASE_VERSION" "$$RELEASE_MESSAGE"

deb: check-version
	rm -rf build/deb
	mkdir -p $(DEB_SRC) dist
	$(COPY_TREE) $(DEB_SRC)
	cp -r packaging/debian $(DEB_SRC)/debian
	cd $(DEB_SRC) && env -u PYTHONPATH -u PYTHONHOME PATH=/usr/bin:/bin \
		dpkg-buildpackage -us -uc -b
	mv build/deb/offset-relay_$(VERSION)_all.deb dist/

# The source package (dpkg-source -b): dist/offset-relay_<version>.dsc and .tar.xz.
source: check-version
	rm -rf build/src
	mkdir -p build/src/offset-relay-$(VERSION) dist
	$(COPY_TREE) build/src/offset-relay-$(VERSION)
	cp -r packaging/debian build/src/offset-relay-$(VERSION)/debian
	cd build/src && dpkg-source -b offset-relay-$(VERSION)
	mv build/src/offset-relay_$(VERSION).dsc build/src/offset-relay_$(VERSION).tar.xz dist/

# The binary package built from the source package in a clean bookworm chroot, which has
# build-essential and only what the source's Build-Depends pull in: dist/chroot/.
deb-chroot: source
	tools/build-in-chroot dist/offset-relay_$(VERSION).dsc dist/chroot

# The previous release's package, built from its commit: dist/previous/.
previous-deb:
	tools/build-previous $(PREVIOUS_COMMIT) $(PREVIOUS_VERSION) dist/previous

# The signed apt repository dist/apt of the source package and the binary built from it.
# The signing key: APT_SIGNING_KEY=FILE (an armored secret key) or the GnuPG home
# APT_KEY_DIR (default ~/.local/share/offset-relay/apt-signing), where a key is generated
# on first use. See tools/make-apt-repo and README.md, "Publishing the package".
apt-repo: deb-chroot
	tools/make-apt-repo dist/apt dist/offset-relay_$(VERSION).dsc \
		dist/chroot/offset-relay_$(VERSION)_all.deb
