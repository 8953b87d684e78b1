# rmiot — every target does its own set-up, idempotently, and is quick when
# everything is already there. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
EXT    := core_ext/_frame$(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
PROTOS := $(wildcard proto/*.proto)
PB2    := $(PROTOS:.proto=_pb2.py)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup system venv run test lint typecheck pytest bench bench-decode bench-ingest \
        bench-security bench-registry bench-durability bench-federation bench-transports bench-query \
        bench-alarms bench-interop bench-fuzz clean

help:
	@echo "make run    - install what is missing, start database, broker and platform (Ctrl-C stops)"
	@echo "make test   - install what is missing, lint, type-check, run the whole test suite"
	@echo "make bench  - every benchmark (bench-ingest, bench-security, bench-registry, ...)"

## set-up ---------------------------------------------------------------------

setup: system venv $(EXT) $(PB2)

system:
	@bash deploy/setup-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q -U pip setuptools wheel 'Cython>=3.0,<4'
	@RMIOT_NO_EXT=$(if $(wildcard core_ext/_frame.pyx),0,1) \
	  $(BIN)/python -m pip install -q --no-build-isolation -e '.[dev]'
	@touch $@

# The compiled twin, rebuilt when its sources change.
$(EXT): $(wildcard core_ext/*.pyx core_ext/*.pxd) setup.py | $(VENV)/.installed
	@if [ -f core_ext/_frame.pyx ]; then $(BIN)/python setup.py -q build_ext --inplace; fi

# gRPC stubs: generated through the rmiot/proto symlink so imports read rmiot.proto.*
proto/%_pb2.py: proto/%.proto | $(VENV)/.installed
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I. --python_out=. \
	  --grpc_python_out=. --mypy_out=quiet:. --mypy_grpc_out=quiet:. rmiot/$<

## the two commands -------------------------------------------------------------

# A simulated city feeds the platform (SIMULATE= runs it alone) over RMF TCP,
# MQTT and HTTP: the demo turns the MQTT and HTTP device adapters on
# (DEVICE_TRANSPORTS= leaves them as the configuration says).
SIMULATE ?= small
DEVICE_TRANSPORTS ?= on
run: setup
	@$(if $(DEVICE_TRANSPORTS),RMIOT_MQTT_ENABLED=true RMIOT_HTTP_ENABLED=true) \
	  $(BIN)/rmiot run $(if $(SIMULATE),--simulate $(SIMULATE))

test: setup lint typecheck pytest

lint: setup
	@$(BIN)/ruff check .
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/cython-lint --max-line-length 100 core_ext/*.pyx

typecheck: setup
	@$(BIN)/mypy

pytest: setup
	@$(BIN)/python -m pytest $(PYTEST_ARGS)

## benchmarks -------------------------------------------------------------------

bench: bench-ingest bench-security bench-registry bench-durability bench-transports \
       bench-query bench-alarms bench-interop bench-fuzz

# Issue 3's figures; the last line is one JSON object.
bench-ingest: setup
	@$(BIN)/python benches/bench_ingest.py

# Issue 6's figures: authorisation, interceptor overhead, audit chain.
bench-security: setup
	@$(BIN)/python benches/bench_security.py

# Issue 5's figures: bulk import, device lookup, change visibility.
bench-registry: setup
	@$(BIN)/python benches/bench_registry.py

# Issue 12's figures: failover RPO/RTO, async replication lag, restore speed.
bench-durability: setup
	@$(BIN)/python benches/bench_durability.py

# Issue 4's figures in one run: MQTT, CoAP, HTTP and gRPC push against TCP,
# then the uplink's catch-up after an outage (bench-federation: the same).
bench-transports: setup
	@$(BIN)/python benches/bench_transports.py

bench-federation: bench-transports

# Issue 7's figures: query tiers on a district's dataset (built on first run).
bench-query: setup
	@$(BIN)/python benches/bench_query.py

# Issue 11's figures: HL7 ORU^R01 over MLLP, FHIR Observation search p99; last line JSON.
bench-interop: setup
	@$(BIN)/python benches/bench_interop.py

# Issue 8's figures: alarm latency (TCP frame -> Watch) and rule cost; last line JSON.
bench-alarms: setup
	@$(BIN)/python benches/bench_alarms.py

# Issue 9's figure: the district-wide dispatch query (dispatch_p99_ms) on the query
# issue's dataset.
bench-ops: setup
	@$(BIN)/python benches/bench_ops.py

bench-decode: setup
	@$(BIN)/python benches/bench_decode.py

bench-fuzz: setup
	@$(BIN)/python benches/bench_fuzz.py

clean:
	rm -rf build core_ext/*.so core_ext/*.c proto/*_pb2*.py proto/*_pb2.pyi $(VENV)/.installed
