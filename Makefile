# stagecoach: `make demo` runs the demo job, `make test` runs the tests. Both set up what they need.

VENV    := $(CURDIR)/.venv
CARGO   ?= cargo
# The worker links the libtorch that ships inside the venv's torch wheel.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
export STAGECOACH_PYTHON := $(VENV)/bin/python

BIN     := target/debug
DEMO    := runs/demo

.PHONY: setup build demo demo-secure demo-single test lint fmt bench-cpu clean-demo

# Debian packages the tests start for real (package:binary): etcd, Prometheus, a one-host
# Slurm cluster, headless Chromium.
SERVICES := etcd-server:etcd prometheus:prometheus prometheus:promtool \
            slurmctld:/usr/sbin/slurmctld slurmd:/usr/sbin/slurmd slurm-client:/usr/bin/sbatch \
            munge:/usr/sbin/munged chromium:/usr/bin/chromium

setup:
	@scripts/setup.sh $(SERVICES)
	@scripts/setup-deploy.sh

build: setup
	$(CARGO) build --workspace --bins

## The demo job: the synthetic corpus, then a coordinator and two workers training the tiny
## preset data-parallel through examples/demo.toml's five stages (state in runs/demo/state).
## A corpus from before the `long` domain existed is written again.
demo: build
	@mkdir -p $(DEMO)
	@[ -d $(DEMO)/data/long ] || { rm -rf $(DEMO)/data; $(BIN)/stagecoach-worker demo-corpus --output $(DEMO)/data; }
	@scripts/demo.sh $(BIN) $(DEMO)

## The demo job over mutual TLS with tokens: `stagecoach certs init` writes a CA, certificates
## and tokens into $(DEMO)/certs; one worker joins with its certificate, the other with a token.
demo-secure: build
	@mkdir -p $(DEMO)
	@[ -d $(DEMO)/data/long ] || { rm -rf $(DEMO)/data; $(BIN)/stagecoach-worker demo-corpus --output $(DEMO)/data; }
	@scripts/demo.sh $(BIN) $(DEMO) --secure

## One worker alone, no coordinator.
demo-single: build
	@mkdir -p $(DEMO)
	@[ -d $(DEMO)/data/long ] || { rm -rf $(DEMO)/data; $(BIN)/stagecoach-worker demo-corpus --output $(DEMO)/data; }
	$(BIN)/stagecoach-worker train --config examples/single-worker.toml --metrics-out $(DEMO)/metrics.jsonl --save $(DEMO)/model

clean-demo:
	rm -rf $(DEMO)

## A seeded random fault campaign against the real binaries (scripts/faults.py; not part of
## `make test`): workers, the coordinator and etcd killed, a worker stopped past its lease,
## poison after a stage change; one row per trial, checked against a fault-free run, and a
## summary. `make faults FAULTS_ARGS="--seed 7 --trials 9 --out faults.md"` passes options.
.PHONY: faults
faults: setup
	$(CARGO) build --workspace --bins
	$(VENV)/bin/python scripts/faults.py --bin-dir $(BIN) $(FAULTS_ARGS)

# The end-to-end tests start the binaries, so they are built first. scripts/test.sh builds the
# tests in the same build and runs TEST_JOBS (default 3) test binaries at a time;
# `make test TEST_ARGS=name` runs the tests whose name contains `name`.
test: setup
	$(CARGO) build --workspace --bins
	CARGO=$(CARGO) scripts/test.sh $(TEST_ARGS)
	bench/gpu/run.sh --dry-run --bin $(BIN)/stagecoach-worker

## The alert rules alone: promtool's checks and unit tests (also run by `make test`, in
## tests/tests/alerts.rs, with the live alert and dashboard tests).
.PHONY: rules
rules: setup
	cd deploy/prometheus && promtool check config prometheus.yml && promtool test rules tests/*.yml

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Tokens/s of our worker against a PyTorch eager loop on the same model, batch and threads.
bench-cpu: setup
	$(CARGO) build --release -p stagecoach-worker --bins
	$(VENV)/bin/python bench/cpu.py --worker target/release/stagecoach-worker

## All-reduce bandwidth of the CPU collective (TCP ring on loopback, 2 and 4 ranks) next to memcpy.
## `make bench-allreduce MACHINE="8-core workstation"` names the machine in the results.
.PHONY: bench-allreduce
bench-allreduce: setup
	$(CARGO) build --release -p stagecoach-worker --bin bench_allreduce
	target/release/bench_allreduce --output bench/results/allreduce-cpu.md $(if $(MACHINE),--machine "$(MACHINE)")

## Checkpoint blocking time: asynchronous save vs a synchronous save of the same state (tiny and
## smollm2-135m, CPU). `make bench-checkpoint MACHINE="8-core workstation"` names the machine.
.PHONY: bench-checkpoint
bench-checkpoint: setup
	$(CARGO) build --release -p stagecoach-worker --bin bench_checkpoint
	target/release/bench_checkpoint --output bench/results/checkpoint-cpu.md $(if $(MACHINE),--machine "$(MACHINE)")

## RPC latency and step time with TLS (token, mutual) against plain text, the same binaries.
## `make bench-tls MACHINE="8-core workstation"` names the machine in the results.
.PHONY: bench-tls
bench-tls: build
	$(VENV)/bin/python bench/tls.py --bin-dir $(BIN) $(if $(MACHINE),--machine "$(MACHINE)")

## How many data-parallel ranks one coordinator holds: bench/scale.py runs stagecoach-bench (N
## simulated ranks over the real Workers protocol, no model) against the release coordinator for
## N = 64, 1024, 4096, 16384 and prints one row each (formation time, steps/s, Work latency,
## leases lost, CPU, peak RSS, store bytes per step; bench/README.md). SCALE_COORDINATOR names
## another coordinator binary (an older build); `make bench-scale SCALE_ARGS="--ranks 64 1024"`.
SCALE_COORDINATOR ?= target/release/stagecoach-coordinator
.PHONY: bench-scale
bench-scale: setup
	$(CARGO) build --release -p stagecoach-coordinator -p stagecoach-bench --bins
	$(VENV)/bin/python bench/scale.py --coordinator $(SCALE_COORDINATOR) --bench target/release/stagecoach-bench $(SCALE_ARGS)

## The embedded state store's memory and compaction cost as a ledger grows (10,000 to 400,000
## steps) against the same state in an in-memory map, each in its own process.
## `make bench-store MACHINE="8-core workstation"` names the machine in the results.
.PHONY: bench-store
bench-store: setup
	$(CARGO) build --release -p stagecoach-coordinator --bin bench_store
	target/release/bench_store --output bench/results/store-cpu.md $(if $(MACHINE),--machine "$(MACHINE)")

## Every CPU benchmark; each prints ratios against a reference run in the same invocation.
.PHONY: bench
bench: bench-cpu bench-allreduce bench-checkpoint bench-tls bench-store

## The container images from deploy/image/Dockerfile, with podman or docker: `stagecoach` (the
## workers, on a CUDA base) and `stagecoach-control` (the coordinator and the CLI), tagged
## $(IMAGE_TAG); their sizes are printed at the end. `make image IMAGE_REPO=registry.example/ml/`
## prefixes the names.
IMAGE_TAG  ?= 0.1.0
IMAGE_REPO ?=
.PHONY: image
image:
	@engine=$$(command -v podman || command -v docker) || { \
	  echo "make image: neither podman nor docker is installed here: install one (apt-get install podman, or Docker Engine) and run make image again (deploy/README.md)" >&2; exit 1; }; \
	$$engine info >/dev/null 2>&1 || { \
	  echo "make image: $$engine is installed but cannot build here ($$engine info fails: no daemon or container runtime reachable); start it (or use a machine that has one) and run make image again" >&2; exit 1; }; \
	for pair in worker:stagecoach control:stagecoach-control; do \
	  target=$${pair%%:*}; name=$(IMAGE_REPO)$${pair#*:}:$(IMAGE_TAG); \
	  echo "make image: $$engine build --target $$target -t $$name (context: the files git tracks or would)"; \
	  git ls-files -z --cached --others --exclude-standard | tar --null -T - -c | \
	    $$engine build -f deploy/image/Dockerfile --target $$target -t $$name - || exit 1; \
	done; \
	for name in stagecoach stagecoach-control; do \
	  echo "make image: $(IMAGE_REPO)$$name:$(IMAGE_TAG) is $$($$engine image inspect --format '{{.Size}}' $(IMAGE_REPO)$$name:$(IMAGE_TAG)) bytes"; \
	done

## The binary bench/gpu/run.sh carries to the GPU machine (see bench/gpu/README.md).
.PHONY: gpu-binary
gpu-binary: setup
	$(CARGO) build --release -p stagecoach-worker --bin stagecoach-worker
	mkdir -p .gpu && cp target/release/stagecoach-worker .gpu/ && strip .gpu/stagecoach-worker
