#!/usr/bin/env bash
# The demo: a local registry with a fixture image, imaged with a throw-away root, then a
# pull with progress, the image list, the filesystem usage, and removal.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${BIN_DIR:-target/release}
source scripts/lib.sh

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

start_registry demo
echo "registry with fixture images on $registry (storage under $work/registry)"
start_imaged
echo "imaged serving $socket (root $work/root)"
export IMAGED_SOCKET=$socket

step imaged pull demo/hello:latest
"$bin_dir/imaged" pull demo/hello:latest
step imaged images
"$bin_dir/imaged" images
step imaged inspect demo/hello:latest -o table
"$bin_dir/imaged" inspect demo/hello:latest -o table
step imaged fsinfo
"$bin_dir/imaged" fsinfo
step imaged rmi demo/hello:latest
"$bin_dir/imaged" rmi demo/hello:latest
step imaged images
"$bin_dir/imaged" images
step imaged fsinfo
"$bin_dir/imaged" fsinfo
kill -TERM "$imaged_pid"
wait "$imaged_pid" && echo "imaged stopped cleanly"
