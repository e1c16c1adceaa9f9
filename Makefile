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

# Everything: the lint, then every test (integration, reliability and, as root, deploy).
test: deps lint
	$(BIN)/pytest -q

# The developer's fast loop: lint, types and the unit tests, without root or apt, in well
# under a minute.
check: lint
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

lint: venv
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info

# Benchmarks against a real strelay on loopback (about 3 minutes: 169 s on 2 cores): writes
# bench/results.json and bench/RESULTS.md and prints the table. Not part of `make test`.
.PHONY: bench
bench: venv
	$(BIN)/python -m bench

# The reliability scenarios of tests/reliability scaled up: each repeats against one relay for
# its share of OFFSET_SOAK_SECONDS (default 30 minutes; the run takes a few minutes more) and
# the fuzz targets also run under atheris. Figures: tests/reliability/soak-results.json.
OFFSET_SOAK_SECONDS ?= 1800
.PHONY: soak
soak: venv
	$(BIN)/pip install -q atheris
	OFFSET_SOAK_SECONDS=$(OFFSET_SOAK_SECONDS) $(BIN)/pytest -q tests/reliability

# The Debian package, built from a copy of the tree (dpkg-buildpackage writes beside the
# source and cleans it) with Debian's own python3 first on PATH: pybuild must not see
# another interpreter. tests/deploy builds it this way too.
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' offset_appliance/__init__.py)
DEB_SRC := build/deb/offset-relay-$(VERSION)

deb:
	@test "$$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)" = "$(VERSION)" || \
		{ echo "deb: packaging/debian/changelog does not match version $(VERSION)" >&2; exit 1; }
	rm -rf build/deb
	mkdir -p $(DEB_SRC) dist
	tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
		--exclude=./relay --exclude='*.egg-info' --exclude=__pycache__ \
		--exclude=.pytest_cache --exclude=.ruff_cache --exclude=.hypothesis . \
		| tar -xf - -C $(DEB_SRC)
	cp -r packaging/debian $(DEB_SRC)/debian
	cd $(DEB_SRC) && env -u PYTHONPATH -u PYTHONHOME PATH=/usr/bin:/bin \
		dpkg-buildpackage -us -uc -b
	mv build/deb/offset-relay_$(VERSION)_all.deb dist/
