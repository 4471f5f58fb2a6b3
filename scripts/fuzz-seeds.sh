#!/usr/bin/env bash
# Replays every fuzz target's seeds and saved crashes as ordinary tests (fuzz/tests/seeds.rs),
# on the stable toolchain and without libFuzzer, so a target that no longer runs fails
# `make test`. The fuzz crate is a workspace of its own; its build goes to fuzz/target.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/imaged-fuzz-seeds.XXXXXX)
trap 'rm -rf "$work"' EXIT
./scripts/fuzz-smoke.sh --seeds-only "$work/seeds"
mkdir -p "$work/tmp"
# The targets keep their scratch trees for the process's life; TMPDIR puts them in $work.
FUZZ_SEEDS="$work/seeds" TMPDIR="$work/tmp" \
  cargo test --manifest-path fuzz/Cargo.toml --test seeds -- --test-threads 2
