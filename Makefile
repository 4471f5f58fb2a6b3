# imaged: see README.md. `make demo` shows it working; `make test` runs every test.
CARGO ?= cargo
export PATH := $(CURDIR)/target/tools:$(PATH)

.PHONY: all build deps test critest critest-runtime demo bench bench-pods fuzz clean fmt lint

all: build

deps:
	./scripts/install-deps.sh

build:
	$(CARGO) build --workspace --bins

test: deps
	$(CARGO) build --workspace --bins --tests
	$(CARGO) nextest run --workspace --no-fail-fast
	./scripts/critest.sh
	./scripts/critest-runtime.sh
	./scripts/fuzz-seeds.sh

critest: deps build
	./scripts/critest.sh

# critest's runtime specs against runtimed (also run by `make test`); prints a table.
critest-runtime: deps build
	./scripts/critest-runtime.sh
	./scripts/fuzz-seeds.sh

demo: deps
	$(CARGO) build --release -p imaged -p runtimed -p fixtures --bins
	$(CARGO) build --release -p imaged --example cri_latency
	$(CARGO) build --release -p snapshotters --example apply_bench
	./scripts/demo.sh

# Cold-pull benchmark against containerd and the raw limit (needs root); see scripts/bench.sh.
# Then the pod start benchmark against containerd; see scripts/bench-pods.sh.
bench: deps
	$(CARGO) build --release -p imaged -p runtimed -p fixtures --bins
	$(CARGO) build --release -p imaged --example cri_latency
	$(CARGO) build --release -p snapshotters --example apply_bench
	$(CARGO) build --release -p runtimed --example pod_latency
	./scripts/bench.sh
	./scripts/bench-pods.sh

# Only the pod benchmark (warm and cold pod starts, exec, memory per pod) against containerd.
bench-pods: deps
	$(CARGO) build --release -p imaged -p runtimed -p fixtures --bins
	$(CARGO) build --release -p runtimed --example pod_latency
	./scripts/bench-pods.sh

fmt:
	$(CARGO) fmt --all

# What CI refuses: unformatted code and any clippy warning.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean

# Builds every fuzz target and runs each for a short, fixed number of inputs.
fuzz:
	./scripts/fuzz-smoke.sh
