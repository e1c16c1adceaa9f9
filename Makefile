# offset-relay: the two set-up commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RELAY_DIR ?= relay
RELAY_ADDR ?= 127.0.0.1:4567

.PHONY: run test venv deps lint clean

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Identity and ticket in ./relay (made once, never overwritten), relay in the foreground.
run: venv
	mkdir -p $(RELAY_DIR)
	test -f $(RELAY_DIR)/relay.ident || $(BIN)/stmgr gen-ident --output $(RELAY_DIR)/relay.ident
	test -f $(RELAY_DIR)/relay.relay || $(BIN)/stmgr relay-ticket --address $(RELAY_ADDR) \
		--idfile $(RELAY_DIR)/relay.ident --output $(RELAY_DIR)/relay.relay
	exec $(BIN)/strelay --idfile $(RELAY_DIR)/relay.ident --laddr $(RELAY_ADDR)

# System packages the tests need (capnp reference tool, the real-host rig, packaging tools).
deps:
	sh tools/install-deps

test: deps venv
	$(BIN)/ruff check offset_appliance tests bench
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check offset_appliance tests bench
	$(BIN)/ruff format --check offset_appliance tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info
