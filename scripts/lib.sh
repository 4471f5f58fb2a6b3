# Shared helpers for the demo and critest scripts: a fixture registry, an imaged daemon and
# a runtimed daemon, all under a temporary directory and all stopped on exit.

bin_dir=${BIN_DIR:-target/debug}
work=$(mktemp -d /tmp/imaged.XXXXXX)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  # Snapshot directories are owned by root with odd modes; remove them as a whole.
  rm -rf "$work"
}
trap cleanup EXIT

# start_registry SET: starts a docker-registry holding the fixture SET; sets $registry.
start_registry() {
  "$bin_dir/fixtures" registry --dir "$work/registry" --set "$1" >"$work/fixtures.out" 2>"$work/fixtures.err" &
  pids+=($!)
  # Building and pushing the set takes tens of seconds on a busy two-core machine.
  for _ in $(seq 1 1800); do
    registry=$(sed -n 's/^ADDR //p' "$work/fixtures.out")
    [ -n "$registry" ] && return 0
    sleep 0.1
  done
  echo "fixture registry did not start:" >&2
  cat "$work/fixtures.err" >&2
  return 1
}

# start_imaged: starts imaged with every registry mirrored to $registry and $IMAGED_EXTRA
# added to its config; sets $socket.
start_imaged() {
  mkdir -p "$work/certs.d/_default"
  cat >"$work/certs.d/_default/hosts.toml" <<TOML
# Every registry is served by the local fixture registry.
server = "http://$registry"
TOML
  cat >"$work/imaged.toml" <<TOML
root = "$work/root"
state = "$work/state"
${IMAGED_EXTRA:-}

[registry]
config_path = "$work/certs.d"
TOML
  socket="$work/state/imaged.sock"
  IMAGED_LOG=${IMAGED_LOG:-warn} "$bin_dir/imaged" serve --config "$work/imaged.toml" 2>"$work/imaged.log" &
  imaged_pid=$!
  pids+=($imaged_pid)
  for _ in $(seq 1 300); do
    [ -S "$socket" ] && return 0
    sleep 0.1
  done
  echo "imaged did not start:" >&2
  cat "$work/imaged.log" >&2
  return 1
}

# start_runtimed: starts runtimed next to imaged, with its own root and state under $work,
# CNI configurations read from $work/net.d and $PAUSE_IMAGE (default: the kubelet's) as
# the pause image; sets $runtime_socket.
start_runtimed() {
  mkdir -p "$work/net.d"
  cat >"$work/runtimed.toml" <<TOML
pause_image = "${PAUSE_IMAGE:-registry.k8s.io/pause:3.10}"
${RUNTIMED_EXTRA:-}

[cni]
conf_dir = "$work/net.d"
TOML
  runtime_socket="$work/runtimed-state/runtimed.sock"
  RUNTIMED_LOG=${RUNTIMED_LOG:-warn} "$bin_dir/runtimed" serve --config "$work/runtimed.toml" \
    --root "$work/runtimed-root" \
    --state "$work/runtimed-state" --image-service-endpoint "unix://$socket" \
    2>"$work/runtimed.log" &
  pids+=($!)
  for _ in $(seq 1 300); do
    [ -S "$runtime_socket" ] && return 0
    sleep 0.1
  done
  echo "runtimed did not start:" >&2
  cat "$work/runtimed.log" >&2
  return 1
}
