#!/usr/bin/env bash
# Pod start benchmark (`make bench`, `make bench-pods`): runtimed with imaged against
# containerd's CRI plugin (runc, Debian's CNI plugins), both on the same fixture images from
# one local registry and timed by the same CRI client, runtimed/examples/pod_latency.rs:
#   warm start  RunPodSandbox, CreateContainer, StartContainer, until the container's first
#               line is in its CRI log file; busybox is already present;
#   cold start  the same with PullImage after RunPodSandbox (the kubelet's order), busybox
#               removed before each run; the pause image stays, as on a node;
#   exec        `crictl exec CTR true` (the URL, the SPDY session, `runc exec`) and the
#               rate of 256 MiB of output through crictl exec, in a running container;
#   memory      each daemon's idle RSS, and per pod: 10 pods of one sleeping container,
#               (daemon RSS growth + the RSS of every per-pod monitor process: conmon for
#               runtimed, containerd-shim-runc-v2 for containerd) / 10.
# Each run's pod is stopped and removed outside the timed part; one untimed warm-up run
# comes first. The contenders run one after the other, each on its own bridge. Prints the
# medians of $BENCH_POD_RUNS runs (default 10) and their ratios, and writes them as JSON to
# target/bench/pods.json. Like scripts/bench.sh, everything lives on a fresh journaled ext4
# in a loop file (BENCH_LOOPFS=0: on /tmp's filesystem). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "bench-pods.sh: needs root (mounts, network namespaces, bridges)" >&2
  exit 1
fi

runs=${BENCH_POD_RUNS:-10}
pod_count=10
export BIN_DIR=target/release
client=target/release/examples/pod_latency
out_dir=target/bench

missing=()
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
command -v conmon >/dev/null || missing+=(conmon)
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

runtimed_pid=
containerd_pid=
runtimed_endpoints=()
containerd_endpoints=()
loop_device=
loop_image=
netns_before=$(ls /var/run/netns 2>/dev/null || true)
# What containerd makes outside its root and state: its shims' sockets under /run/containerd,
# and (no cgroup parent given) the parent cgroup /k8s.io. Removed at the end unless there
# before.
containerd_dirs=()
for dir in /run/containerd /sys/fs/cgroup/*/; do
  [[ $dir == */ ]] && dir+=k8s.io
  [ -e "$dir" ] || containerd_dirs+=("$dir")
done

# alive PID: whether PID is set and running.
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# monitors_left: pids of the processes whose command line names a path under $work: the
# monitors (conmon, containerd-shim-runc-v2) that a daemon stopped without teardown left.
monitors_left() {
  local dir
  for dir in /proc/[0-9]*; do
    if tr '\0' ' ' <"$dir/cmdline" 2>/dev/null | grep -q -- "$work/"; then echo "${dir#/proc/}"; fi
  done
}

# Pods first (through the CRI, while the daemons run), then whatever they left, the daemons,
# mounts, bridges and network namespaces; then lib.sh's cleanup.
bench_cleanup() {
  local status=$?
  if [ "$status" != 0 ]; then
    for log in "$work/imaged.log" "$work/runtimed.log" "$work/containerd/containerd.log"; do
      if [ -s "$log" ]; then echo "--- last lines of $log" >&2 && tail -n 20 "$log" >&2; fi
    done
  fi
  if alive "$runtimed_pid"; then "$client" "${runtimed_endpoints[@]}" teardown || true; fi
  if alive "$containerd_pid"; then "$client" "${containerd_endpoints[@]}" teardown || true; fi
  if alive "$containerd_pid"; then kill "$containerd_pid"; fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if alive "$containerd_pid"; then wait "$containerd_pid" 2>/dev/null || true; fi
  # Containers a failed teardown left: runc kills them and removes their cgroups.
  for root in "$work/runtimed-state/runtimes/runc" "$work/containerd/runc/k8s.io"; do
    [ -d "$root" ] || continue
    for id in $(runc --root "$root" list -q 2>/dev/null || true); do runc --root "$root" delete --force "$id" || true; done
  done
  for pid in $(monitors_left); do kill -9 "$pid" 2>/dev/null || true; done
  { grep -o " $work/[^ ]*" /proc/mounts || true; } | sort -r | while read -r mount; do umount -l "$mount" || true; done
  for bridge in bench0 bench1; do ip link delete "$bridge" 2>/dev/null || true; done
  for netns in $(ls /var/run/netns 2>/dev/null || true); do
    grep -qx -- "$netns" <<<"$netns_before" || ip netns delete "$netns" 2>/dev/null || true
  done
  for dir in "${containerd_dirs[@]}"; do
    if [[ $dir == /sys/fs/cgroup/* ]]; then rmdir "$dir" 2>/dev/null || true; else rm -rf "$dir"; fi
  done
  if [ -n "$loop_device" ]; then
    umount "$work" || umount -l "$work" || true
    losetup -d "$loop_device" || true
  fi
  if [ -n "$loop_image" ]; then rm -f "$loop_image"; fi
  cleanup
}
trap bench_cleanup EXIT

filesystem="$(df --output=fstype /tmp | tail -n 1) of /tmp"
if [ "${BENCH_LOOPFS:-1}" != 0 ]; then
  loop_image=$(mktemp /var/tmp/imaged-bench-pods.XXXXXX.img)
  truncate -s 4G "$loop_image"
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$loop_image"
  loop_device=$(losetup -f --show --direct-io=on "$loop_image")
  mount "$loop_device" "$work"
  filesystem="fresh journaled ext4 in a loop file"
fi

# median VALUES...: the middle value (the mean of the two middle ones for an even count).
median() {
  printf '%s\n' "$@" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ratio A B: A / B with two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# mb KB: KB in MB with one decimal.
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# rss_kb PID...: the summed VmRSS of the PIDs, in kB.
rss_kb() { for pid in "$@"; do awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"; done | awk '{ s += $1 } END { print s + 0 }'; }

# monitors PROGRAM: "COUNT KB", the number and summed VmRSS of the PROGRAM processes whose
# command line names a path under $work (this benchmark's daemons' monitors only). The
# program is argv[0]'s base name: comm is cut at 15 characters ("containerd-shim").
monitors() {
  local dir count=0 kb=0 rss argv argv0
  for dir in /proc/[0-9]*; do
    argv=$(tr '\0' ' ' <"$dir/cmdline" 2>/dev/null) || continue
    argv0=${argv%% *}
    [ "${argv0##*/}" = "$1" ] || continue
    [[ $argv == *"$work/"* ]] || continue
    rss=$(awk '/^VmRSS:/ { print $2 }' "$dir/status" 2>/dev/null) || continue
    count=$((count + 1))
    kb=$((kb + rss))
  done
  echo "$count $kb"
}

# conflist NAME BRIDGE SUBNET: a bridge network with host-local leases under $work.
conflist() {
  cat <<JSON
{"cniVersion": "1.0.0", "name": "$1", "plugins": [
  {"type": "bridge", "bridge": "$2", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$3"}]], "dataDir": "$work/cni-leases-$1"}}]}
JSON
}

# measure NAME MONITOR DAEMON_PIDS...: warm and cold start runs and the per-pod memory of
# the contender whose endpoints are in NAME_endpoints; sets warm_NAME, cold_NAME (the runs'
# seconds), pod_kb_NAME, daemon_growth_kb_NAME, monitors_NAME ("COUNT KB").
measure() {
  local name=$1 monitor=$2
  shift 2
  local -n endpoints="${name}_endpoints"
  local seconds before after monitor_count monitor_kb
  "$client" "${endpoints[@]}" pull "$pause_image" "$busybox_image"
  echo "$name: warm pod starts" >&2
  seconds=$("$client" "${endpoints[@]}" start --image "$busybox_image" \
    --log-dir "$work/pod-logs-$name" --runs "$runs")
  printf -v "warm_$name" '%s' "${seconds//$'\n'/ }"
  echo "$name: cold pod starts" >&2
  seconds=$("$client" "${endpoints[@]}" start --image "$busybox_image" \
    --log-dir "$work/pod-logs-$name" --runs "$runs" --cold)
  printf -v "cold_$name" '%s' "${seconds//$'\n'/ }"
  echo "$name: $pod_count running pods" >&2
  before=$(rss_kb "$@")
  "$client" "${endpoints[@]}" pods --image "$busybox_image" --log-dir "$work/pod-logs-$name" --count "$pod_count"
  sleep 1 # let the monitors settle after their start-up
  after=$(rss_kb "$@")
  read -r monitor_count monitor_kb < <(monitors "$monitor")
  measure_exec "$name"
  "$client" "${endpoints[@]}" teardown
  printf -v "daemon_growth_kb_$name" '%s' "$((after - before))"
  printf -v "monitors_$name" '%s %s' "$monitor_count" "$monitor_kb"
  printf -v "pod_kb_$name" '%s' "$(((after - before + monitor_kb) / pod_count))"
}

# measure_exec NAME: through the streaming server, with crictl as the client, in one of the
# running pods' containers: sets exec_NAME (seconds of each `crictl exec CTR true`) and
# bulk_NAME (MB/s of 256 MiB from `head -c` read back through crictl exec).
measure_exec() {
  local name=$1 id i start end bytes
  local -n endpoints="${name}_endpoints"
  id=$("$crictl" "${endpoints[@]}" ps -q | head -n 1)
  echo "$name: exec" >&2
  "$crictl" "${endpoints[@]}" exec "$id" true
  local times=()
  for i in $(seq 1 "$runs"); do
    start=$(date +%s.%N)
    "$crictl" "${endpoints[@]}" exec "$id" true
    end=$(date +%s.%N)
    times+=("$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.4f", b - a }')")
  done
  printf -v "exec_$name" '%s' "${times[*]}"
  start=$(date +%s.%N)
  bytes=$("$crictl" "${endpoints[@]}" exec "$id" head -c 268435456 /dev/zero | wc -c)
  end=$(date +%s.%N)
  [ "$bytes" = 268435456 ] || { echo "$name: exec carried $bytes of 268435456 bytes" >&2; exit 1; }
  printf -v "bulk_$name" '%s' "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", 256 / (b - a) }')"
}

crictl=crictl
[ -x target/tools/crictl ] && crictl=target/tools/crictl

start_registry demo
pause_image=$registry/demo/pause:latest
busybox_image=$registry/demo/busybox:latest

# runtimed and imaged (lib.sh), the pause image from the local registry.
echo "runtimed + imaged" >&2
start_imaged
mkdir -p "$work/net.d"
conflist runtimed bench0 10.89.0.0/24 >"$work/net.d/10-bench.conflist"
PAUSE_IMAGE=$pause_image start_runtimed
runtimed_pid=${pids[-1]}
runtimed_endpoints=(--runtime-endpoint "unix://$runtime_socket" --image-endpoint "unix://$socket")
sleep 2
idle_kb_runtimed=$(rss_kb "$runtimed_pid")
idle_kb_imaged=$(rss_kb "$imaged_pid")
measure runtimed conmon "$runtimed_pid" "$imaged_pid"
kill "$runtimed_pid" "$imaged_pid"
wait "$runtimed_pid" "$imaged_pid" 2>/dev/null || true
runtimed_pid=
ip link delete bench0 2>/dev/null || true

# containerd with its own root, state, socket, certs.d and net.d under $work, as in
# scripts/bench.sh, plus the CRI plugin's runtime, sandbox image and CNI settings.
echo "containerd" >&2
ctrd=$work/containerd
ctrd_sock=$ctrd/containerd.sock
mkdir -p "$ctrd/certs.d/$registry" "$ctrd/net.d"
cat >"$ctrd/certs.d/$registry/hosts.toml" <<TOML
server = "http://$registry"

[host."http://$registry"]
  capabilities = ["pull", "resolve"]
TOML
conflist containerd bench1 10.90.0.0/24 >"$ctrd/net.d/10-bench.conflist"
cat >"$ctrd/config.toml" <<TOML
version = 2
root = "$ctrd/root"
state = "$ctrd/state"

[grpc]
  address = "$ctrd_sock"

[ttrpc]
  address = "$ctrd_sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "$ctrd/opt"

# restrict_oom_score_adj: no OOM score below containerd's own, as runtimed clamps them;
# without CAP_SYS_RESOURCE (some sandboxes drop it) runc cannot set the pause process's -998.
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  sandbox_image = "$pause_image"
  restrict_oom_score_adj = true

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "$ctrd/runc"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "$ctrd/net.d"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "$ctrd/certs.d"
TOML
containerd_version=$(containerd --version | awk '{ print $3 }')
containerd --config "$ctrd/config.toml" >"$ctrd/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 1 300); do
  [ -S "$ctrd_sock" ] && ctr -a "$ctrd_sock" version >/dev/null 2>&1 && break
  sleep 0.1
done
if ! ctr -a "$ctrd_sock" version >/dev/null 2>&1; then
  echo "containerd did not start:" >&2
  cat "$ctrd/containerd.log" >&2
  exit 1
fi
containerd_endpoints=(--runtime-endpoint "unix://$ctrd_sock" --image-endpoint "unix://$ctrd_sock")
sleep 2
idle_kb_containerd=$(rss_kb "$containerd_pid")
measure containerd containerd-shim-runc-v2 "$containerd_pid"
kill "$containerd_pid"
wait "$containerd_pid" 2>/dev/null || true
containerd_pid=
ip link delete bench1 2>/dev/null || true

# Results.
# shellcheck disable=SC2086,SC2154 # the runs are space-separated on purpose; measure sets them
{
  warm_r=$(median $warm_runtimed)
  warm_c=$(median $warm_containerd)
  cold_r=$(median $cold_runtimed)
  cold_c=$(median $cold_containerd)
  exec_r=$(median $exec_runtimed)
  exec_c=$(median $exec_containerd)
}
idle_kb_both=$((idle_kb_runtimed + idle_kb_imaged))
# shellcheck disable=SC2154 # measure sets them
{
  read -r monitor_count_r monitor_kb_r <<<"$monitors_runtimed"
  read -r monitor_count_c monitor_kb_c <<<"$monitors_containerd"
  pod_r=$(mb "$pod_kb_runtimed")
  pod_c=$(mb "$pod_kb_containerd")
  growth_r=$(mb "$daemon_growth_kb_runtimed")
  growth_c=$(mb "$daemon_growth_kb_containerd")
}

printf '\n%-28s %16s %12s %16s\n' "median of $runs runs" runtimed+imaged containerd runtimed/ctrd
printf '%-28s %16s %12s %16s\n' "warm pod start, s" "$warm_r" "$warm_c" "$(ratio "$warm_r" "$warm_c")"
printf '%-28s %16s %12s %16s\n' "cold pod start, s" "$cold_r" "$cold_c" "$(ratio "$cold_r" "$cold_c")"
printf '%-28s %16s %12s %16s\n' "crictl exec true, s" "$exec_r" "$exec_c" "$(ratio "$exec_r" "$exec_c")"
# shellcheck disable=SC2154 # measure_exec sets them
printf '%-28s %16s %12s %16s\n' "exec output, MB/s" "$bulk_runtimed" "$bulk_containerd" \
  "$(ratio "$bulk_runtimed" "$bulk_containerd")"
printf '%-28s %16s %12s %16s\n' "idle RSS, MB" "$(mb "$idle_kb_both")" "$(mb "$idle_kb_containerd")" \
  "$(ratio "$idle_kb_both" "$idle_kb_containerd")"
printf '%-28s %16s %12s %16s\n' "memory per pod, MB" "$pod_r" "$pod_c" \
  "$(ratio "$pod_kb_runtimed" "$pod_kb_containerd")"
printf '\nidle RSS: runtimed %s MB, imaged %s MB, containerd %s MB\n' \
  "$(mb "$idle_kb_runtimed")" "$(mb "$idle_kb_imaged")" "$(mb "$idle_kb_containerd")"
printf '%s pods: daemons grew %s MB (runtimed+imaged) and %s MB (containerd); %s conmon, %s MB; %s containerd-shim-runc-v2, %s MB\n' \
  "$pod_count" "$growth_r" "$growth_c" "$monitor_count_r" "$(mb "$monitor_kb_r")" "$monitor_count_c" "$(mb "$monitor_kb_c")"
printf 'runs, s (runtimed+imaged | containerd): warm %s | %s; cold %s | %s\n' "$warm_runtimed" "$warm_containerd" "$cold_runtimed" "$cold_containerd"
printf 'containerd %s, runc, image %s, filesystem: %s\n' "$containerd_version" "$busybox_image" "$filesystem"

mkdir -p "$out_dir"
json=$out_dir/pods.json
list() { echo "$1" | xargs | tr ' ' ','; }
cat >"$json" <<JSON
{
  "runs": $runs,
  "containerd_version": "$containerd_version",
  "image": "$busybox_image",
  "filesystem": "$filesystem",
  "warm_start_s": {"runtimed_imaged": $warm_r, "containerd": $warm_c, "ratio": $(ratio "$warm_r" "$warm_c"),
    "runs": {"runtimed_imaged": [$(list "$warm_runtimed")], "containerd": [$(list "$warm_containerd")]}},
  "cold_start_s": {"runtimed_imaged": $cold_r, "containerd": $cold_c, "ratio": $(ratio "$cold_r" "$cold_c"),
    "runs": {"runtimed_imaged": [$(list "$cold_runtimed")], "containerd": [$(list "$cold_containerd")]}},
  "exec_true_s": {"runtimed_imaged": $exec_r, "containerd": $exec_c, "ratio": $(ratio "$exec_r" "$exec_c"),
    "runs": {"runtimed_imaged": [$(list "$exec_runtimed")], "containerd": [$(list "$exec_containerd")]}},
  "exec_output_mb_s": {"runtimed_imaged": $bulk_runtimed, "containerd": $bulk_containerd,
    "ratio": $(ratio "$bulk_runtimed" "$bulk_containerd")},
  "idle_rss_mb": {"runtimed": $(mb "$idle_kb_runtimed"), "imaged": $(mb "$idle_kb_imaged"),
    "runtimed_imaged": $(mb "$idle_kb_both"), "containerd": $(mb "$idle_kb_containerd"),
    "ratio": $(ratio "$idle_kb_both" "$idle_kb_containerd")},
  "per_pod_mb": {"pods": $pod_count, "runtimed_imaged": $pod_r, "containerd": $pod_c, "ratio": $(ratio "$pod_kb_runtimed" "$pod_kb_containerd"),
    "daemon_growth_mb": {"runtimed_imaged": $growth_r, "containerd": $growth_c},
    "monitors": {"conmon": {"count": $monitor_count_r, "mb": $(mb "$monitor_kb_r")},
                 "containerd_shim_runc_v2": {"count": $monitor_count_c, "mb": $(mb "$monitor_kb_c")}}}
}
JSON
printf 'JSON in %s\n' "$json"
