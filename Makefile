# stagecoach: `make demo` runs the demo job, `make test` runs the tests. Both set up what they need.

VENV    := $(CURDIR)/.venv
CARGO   ?= cargo
# The worker links the libtorch that ships inside the venv's torch wheel.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
export STAGECOACH_PYTHON := $(VENV)/bin/python

BIN     := target/debug
DEMO    := runs/demo

.PHONY: setup build demo test lint fmt bench-cpu clean-demo

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

## The demo job: the synthetic corpus, then the tiny preset trained on its three-domain mixture.
demo: build
	@mkdir -p $(DEMO)
	@[ -d $(DEMO)/data ] || $(BIN)/stagecoach-worker demo-corpus --output $(DEMO)/data
	$(BIN)/stagecoach-worker train --config examples/single-worker.toml --metrics-out $(DEMO)/metrics.jsonl --save $(DEMO)/model

clean-demo:
	rm -rf $(DEMO)

test: setup
	$(CARGO) test --workspace

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Tokens/s of our worker against a PyTorch eager loop on the same model, batch and threads.
bench-cpu: setup
	$(CARGO) build --release -p stagecoach-worker --bins
	$(VENV)/bin/python bench/cpu.py --worker target/release/stagecoach-worker
