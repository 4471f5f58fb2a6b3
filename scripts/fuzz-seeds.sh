#!/usr/bin/env bash
# Replays every fuzz target's seeds and saved crashes as ordinary tests (fuzz/tests/seeds.rs),
# on the stable toolchain and without libFuzzer, so a target that no longer runs fails
# `make test`. The fuzz crate is a workspace of its own; its build goes to fuzz/target.
# The layer target runs once per snapshotter, btrfs on a loop-mounted file made here.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/imaged-fuzz-seeds.XXXXXX)
cleanup() {
  if mountpoint -q "$work/btrfs"; then umount "$work/btrfs"; fi
  rm -rf "$work"
}
trap cleanup EXIT
./scripts/fuzz-smoke.sh --seeds-only "$work/seeds"
mkdir -p "$work/tmp"
# The targets keep their scratch trees for the process's life; TMPDIR puts them in $work.
FUZZ_SEEDS="$work/seeds" TMPDIR="$work/tmp" \
  cargo test --manifest-path fuzz/Cargo.toml --test seeds -- --test-threads 2
mkdir -p "$work/tmp-native"
LAYER_TAR_SNAPSHOTTER=native FUZZ_SEEDS="$work/seeds" TMPDIR="$work/tmp-native" \
  cargo test --manifest-path fuzz/Cargo.toml --test seeds -- --exact layer_tar
truncate -s 1G "$work/btrfs.img"
mkfs.btrfs -q "$work/btrfs.img"
mkdir "$work/btrfs"
mount -o loop "$work/btrfs.img" "$work/btrfs"
LAYER_TAR_SNAPSHOTTER=btrfs FUZZ_SEEDS="$work/seeds" TMPDIR="$work/btrfs" \
  cargo test --manifest-path fuzz/Cargo.toml --test seeds -- --exact layer_tar
