#!/usr/bin/env bash
# Pull benchmark (`make bench`): cold pulls of two ~500 MB images, each in a gzip and a zstd
# variant (the mixed shape: thousands of small files, a few large shared objects and
# incompressible data; the large-files shape: toolchain binaries and shared libraries), by
# imaged, by containerd 2.2.7 with parallel unpack (its fastest configuration) and by
# Debian's containerd 1.6 (CRI PullImage timed from request to answer by the same client,
# imaged/examples/cri_latency.rs, and 1.6's `ctr images pull`), and the raw limit (the same
# layer blobs decompressed and extracted from local disk, all layers in parallel, right after
# imaged's pull in each run, so that the ratio of the two within a run is also reported), with
# the CPU seconds (user + sys) of imaged, containerd 2.2.7 and the raw limit; then a 10-way
# concurrent pull, imaged's idle RSS, the round-trip times of a warm PullImage and of
# ListImages over 1,000 stored images (imaged and containerd, over one connection each), the
# latencies of ImageStatus (200 calls at a time), ListImages and ImageFsInfo while the gzip
# variant pulls cold into that store, next to the same calls idle, and
# imaged's cold pulls of an image twice the size (peak RSS must not grow with it), and layer
# application alone (snapshotters/examples/apply_bench.rs: the same tars applied by the
# overlay snapshotter and by `tar -x`, all layers at once). Every cold run starts from an
# empty store with the page cache dropped; the median of $BENCH_RUNS runs is reported.
# Prints a table and writes it as JSON to target/bench/pull.json.
#
# Every store, registry and extraction lives on a fresh journaled ext4 filesystem in a loop
# file (as /var/lib sits on a journaled filesystem on a node): ext4 without a journal, which
# some VM images use for /, scans for recently freed inodes on every file it creates within
# a minute of a mass deletion, so each contender would pay for the previous one's cleanup.
# BENCH_LOOPFS=0 runs on the filesystem of /tmp instead.
#
# BENCH_SNAPSHOTTER=native|btrfs compares imaged and containerd with that snapshotter
# instead (btrfs on a loop-mounted btrfs), next to imaged with overlayfs on the same
# filesystem; only the cold pulls run, and the table goes to target/bench/pull-<name>.json.
#
# Needs root. Environment: BENCH_RUNS (default 5), BENCH_SCALE (image size factor,
# default 1 = about 500 MB uncompressed; the larger image is twice that), BENCH_VARIANTS
# (default "gzip zstd large-gzip large-zstd").
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "bench.sh: needs root (overlay snapshots, dropping the page cache)" >&2
  exit 1
fi

runs=${BENCH_RUNS:-5}
read -r -a variants <<<"${BENCH_VARIANTS:-gzip zstd large-gzip large-zstd}"
scale=${BENCH_SCALE:-1}
snapshotter=${BENCH_SNAPSHOTTER:-overlayfs}
case $snapshotter in
  overlayfs | native | btrfs) ;;
  *)
    echo "bench.sh: BENCH_SNAPSHOTTER is overlayfs, native or btrfs, not $snapshotter" >&2
    exit 1
    ;;
esac
export IMAGED_EXTRA="snapshotter = \"$snapshotter\""
export BIN_DIR=target/release
crictl=target/tools/crictl
latency=target/release/examples/cri_latency
apply_bench=target/release/examples/apply_bench
out_dir=target/bench
image_dir=$out_dir/image
started=$EPOCHREALTIME

missing=()
command -v containerd >/dev/null || missing+=(containerd)
command -v libdeflate-gunzip >/dev/null || missing+=(libdeflate-tools)
command -v zstd >/dev/null || missing+=(zstd)
# containerd decompresses gzip with igzip when it finds it: its fastest configuration.
command -v igzip >/dev/null || missing+=(isal)
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi
[ -x "$crictl" ] || ./scripts/install-deps.sh
containerd22_bin=/usr/local/lib/containerd-2.2.7/bin
../shared/tools/containerd/install "$containerd22_bin" >&2

# shellcheck source=scripts/lib.sh
source scripts/lib.sh

containerd_pid=
loop_device=
loop_image=
# Unmounts whatever a daemon left mounted under $work and the loop filesystem, then
# lib.sh's cleanup.
bench_cleanup() {
  if [ -n "$containerd_pid" ]; then kill "$containerd_pid" 2>/dev/null || true; fi
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  { grep -o " $work/[^ ]*" /proc/mounts || true; } | sort -r | while read -r mount; do umount -l "$mount" || true; done
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
  loop_image=$(mktemp /var/tmp/imaged-bench.XXXXXX.img)
  truncate -s 16G "$loop_image"
  if [ "$snapshotter" = btrfs ]; then
    mkfs.btrfs -q -f "$loop_image"
    filesystem="fresh btrfs in a loop file"
  else
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$loop_image"
    filesystem="fresh journaled ext4 in a loop file"
  fi
  loop_device=$(losetup -f --show --direct-io=on "$loop_image")
  mount "$loop_device" "$work"
fi

# wipe DIR...: removes each DIR; btrfs subvolumes in it (read-only ones too, which rm cannot
# empty) are deleted first, deepest first.
wipe() {
  local dir
  for dir in "$@"; do
    if [ "$snapshotter" = btrfs ] && [ -d "$dir" ]; then
      find "$dir" -depth -type d -inum 256 -exec btrfs subvolume delete -c {} + >/dev/null
    fi
    rm -rf "$dir"
  done
}

# elapsed SINCE: seconds from SINCE ($EPOCHREALTIME) to now.
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }

# median VALUES...: the middle value (the mean of the two middle ones for an even count).
median() {
  printf '%s\n' "$@" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ratio A B: A / B with two decimals.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# cpu_seconds PID: user + sys seconds of PID and of the children it waited for (containerd
# runs igzip or pigz, when installed, to decompress).
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13 + $14 + $15) / hz }' "/proc/$1/stat"
}

# peak_rss_mb PID: VmHWM of PID in MB.
peak_rss_mb() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
}

stop_pid() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# The registry: plain docker-registry with its access log in a file, for counting GETs.
port=$(awk 'BEGIN { srand(); print 20000 + int(rand() * 20000) }')
registry=127.0.0.1:$port
cat >"$work/registry.yml" <<YAML
version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $registry
YAML
docker-registry serve "$work/registry.yml" >"$work/registry-access.log" 2>"$work/registry.log" &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fsS "http://$registry/v2/" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://$registry/v2/" >/dev/null

echo "building and pushing the benchmark images (scale $scale) to $registry..." >&2
for shape in mixed large-files; do
  "$BIN_DIR/fixtures" bench-image --dir "$image_dir" --registry "$registry" --scale "$scale" --shape "$shape"
done >"$work/images.txt"
declare -A ref compressed_mb uncompressed_mb
while read -r _ image_ref _ compressed uncompressed; do
  variant=${image_ref##*/bench/}
  variant=${variant%%:*}
  ref[$variant]=$image_ref
  compressed_mb[$variant]=$(awk -v b="$compressed" 'BEGIN { printf "%.1f", b / 1e6 }')
  uncompressed_mb[$variant]=$(awk -v b="$uncompressed" 'BEGIN { printf "%.1f", b / 1e6 }')
done <"$work/images.txt"

# The containerd instances, each with its own root, state, socket and certs.d under $work:
# "16" is Debian's 1.6 (config version 2), "22" is 2.2.7 (version 3) pulling through its
# transfer service with five layers unpacking at once.
declare -A ctrd_dir=([16]=$work/containerd [22]=$work/containerd22)
declare -A ctrd_bin=([16]=/usr/bin [22]=$containerd22_bin)
for version in 16 22; do
  dir=${ctrd_dir[$version]}
  mkdir -p "$dir/certs.d/$registry" "$dir/net.d"
  cat >"$dir/certs.d/$registry/hosts.toml" <<TOML
server = "http://$registry"

[host."http://$registry"]
  capabilities = ["pull", "resolve"]
TOML
done
cat >"${ctrd_dir[16]}/config.toml" <<TOML
version = 2
root = "${ctrd_dir[16]}/root"
state = "${ctrd_dir[16]}/state"

[grpc]
  address = "${ctrd_dir[16]}/containerd.sock"

[ttrpc]
  address = "${ctrd_dir[16]}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "${ctrd_dir[16]}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "$snapshotter"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "${ctrd_dir[16]}/certs.d"
TOML
cat >"${ctrd_dir[22]}/config.toml" <<TOML
version = 3
root = "${ctrd_dir[22]}/root"
state = "${ctrd_dir[22]}/state"

[grpc]
  address = "${ctrd_dir[22]}/containerd.sock"

[ttrpc]
  address = "${ctrd_dir[22]}/containerd.sock.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "${ctrd_dir[22]}/opt"
  [plugins."io.containerd.nri.v1.nri"]
    disable = true
  [plugins."io.containerd.transfer.v1.local"]
    max_concurrent_downloads = 3
    max_concurrent_unpacks = 5
    config_path = "${ctrd_dir[22]}/certs.d"
    # Without this the transfer service unpacks into overlayfs only.
    [[plugins."io.containerd.transfer.v1.local".unpack_config]]
      platform = "linux/amd64"
      snapshotter = "$snapshotter"
  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "$snapshotter"
    use_local_image_pull = false
    [plugins."io.containerd.cri.v1.images".registry]
      config_path = "${ctrd_dir[22]}/certs.d"
  [plugins."io.containerd.cri.v1.runtime".cni]
    conf_dir = "${ctrd_dir[22]}/net.d"
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
TOML
containerd_version=$(containerd --version | awk '{ print $3 }')
containerd22_version=$("$containerd22_bin/containerd" --version | awk '{ print $3 }')

# start_containerd VERSION: starts containerd VERSION (16 or 22) on an empty root; sets
# $ctrd (its directory), $ctrd_sock and $containerd_pid.
start_containerd() {
  ctrd=${ctrd_dir[$1]}
  ctrd_sock=$ctrd/containerd.sock
  local bin=${ctrd_bin[$1]}
  wipe "$ctrd/root" "$ctrd/state"
  PATH=$bin:$PATH "$bin/containerd" --config "$ctrd/config.toml" >"$ctrd/containerd.log" 2>&1 &
  containerd_pid=$!
  for _ in $(seq 1 300); do
    [ -S "$ctrd_sock" ] && "$bin/ctr" -a "$ctrd_sock" version >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "containerd $1 did not start:" >&2
  cat "$ctrd/containerd.log" >&2
  return 1
}

stop_containerd() {
  stop_pid "$containerd_pid"
  containerd_pid=
  { grep -o " $ctrd/[^ ]*" /proc/mounts || true; } | sort -r | while read -r mount; do umount -l "$mount" || true; done
  wipe "$ctrd/root" "$ctrd/state"
}

# fresh_imaged: imaged (release) with an empty root.
fresh_imaged() {
  wipe "$work/root" "$work/state"
  start_imaged
}

stop_imaged() {
  stop_pid "$imaged_pid"
  wipe "$work/root" "$work/state"
}

# Cold-pull results per "contender variant": space-separated values of each run.
declare -A seconds rss cpu
record() { seconds[$1]+="$2 "; }

# cri_pull CONTENDER VARIANT PID SOCKET: a timed CRI pull of VARIANT through SOCKET, with the
# CPU seconds and peak RSS of PID (the daemon) recorded under "CONTENDER VARIANT".
cri_pull() {
  local before
  before=$(cpu_seconds "$3")
  record "$1 $2" "$("$latency" --socket "$4" once "${ref[$2]}")"
  cpu["$1 $2"]+="$(awk -v a="$before" -v b="$(cpu_seconds "$3")" 'BEGIN { printf "%.2f", b - a }') "
  rss["$1 $2"]+="$(peak_rss_mb "$3") "
}

# raw_extract VARIANT: every layer blob of VARIANT decompressed into tar -x at once.
raw_extract() {
  local blobs=("$image_dir/blobs/$1"/*) n raw_pids=()
  for n in "${!blobs[@]}"; do
    if [[ $1 == *gzip ]]; then
      (libdeflate-gunzip -c "${blobs[$n]}" | tar -x -C "$work/raw/$n") &
    else
      (zstd -q -d -c "${blobs[$n]}" | tar -x -C "$work/raw/$n") &
    fi
    raw_pids+=($!)
  done
  for n in "${raw_pids[@]}"; do wait "$n"; done
}

for variant in "${variants[@]}"; do
  image=${ref[$variant]}
  for run in $(seq 1 "$runs"); do
    echo "run $run/$runs, $variant: imaged" >&2
    fresh_imaged
    drop_caches
    cri_pull imaged "$variant" "$imaged_pid" "$socket"
    stop_imaged

    # The raw limit runs right after imaged, so the two share the host's state (CPU steal
    # on a shared hypervisor comes and goes over seconds): see paired_ratios.
    echo "run $run/$runs, $variant: raw limit" >&2
    rm -rf "$work/raw"
    blobs=("$image_dir/blobs/$variant"/*)
    for n in "${!blobs[@]}"; do mkdir -p "$work/raw/$n"; done
    drop_caches
    # bash's time counts the CPU of every process it waited for, pipelines in subshells too.
    TIMEFORMAT='%3R %3U %3S'
    { time raw_extract "$variant" 2>"$work/raw.err"; } 2>"$work/raw.time"
    read -r raw_wall raw_user raw_sys <"$work/raw.time"
    record "raw $variant" "$raw_wall"
    cpu["raw $variant"]+="$(awk -v u="$raw_user" -v s="$raw_sys" 'BEGIN { printf "%.2f", u + s }') "
    rm -rf "$work/raw"

    if [ "$snapshotter" != overlayfs ]; then
      echo "run $run/$runs, $variant: imaged with overlayfs" >&2
      IMAGED_EXTRA= fresh_imaged
      drop_caches
      record "overlayfs $variant" "$("$latency" --socket "$socket" once "$image")"
      stop_imaged
    fi

    for version in 22 16; do
      echo "run $run/$runs, $variant: containerd $version CRI" >&2
      start_containerd "$version"
      drop_caches
      cri_pull "cri$version" "$variant" "$containerd_pid" "$ctrd_sock"
      stop_containerd
    done

    echo "run $run/$runs, $variant: ctr" >&2
    start_containerd 16
    drop_caches
    t0=$EPOCHREALTIME
    ctr -a "$ctrd_sock" -n k8s.io images pull --snapshotter "$snapshotter" --plain-http "$image" >/dev/null
    record "ctr $variant" "$(elapsed "$t0")"
    stop_containerd

  done
done

# cold_medians VARIANT: sets imaged_s, cri22_s, cri16_s, ctr_s, raw_s (wall seconds), cpu_s,
# cri22_cpu_s, raw_cpu_s (CPU seconds), rss_mb, cri22_rss_mb and cri16_rss_mb (peak RSS) and
# paired_ratio (imaged / raw limit within each run) to the medians of VARIANT's cold pulls.
cold_medians() {
  # shellcheck disable=SC2086 # the values are space-separated on purpose
  {
    imaged_s=$(median ${seconds["imaged $1"]})
    cri22_s=$(median ${seconds["cri22 $1"]})
    cri16_s=$(median ${seconds["cri16 $1"]})
    ctr_s=$(median ${seconds["ctr $1"]})
    raw_s=$(median ${seconds["raw $1"]})
    cpu_s=$(median ${cpu["imaged $1"]})
    cri22_cpu_s=$(median ${cpu["cri22 $1"]})
    raw_cpu_s=$(median ${cpu["raw $1"]})
    paired_ratio=$(median $(paired_ratios "$1"))
    rss_mb=$(median ${rss["imaged $1"]})
    cri22_rss_mb=$(median ${rss["cri22 $1"]})
    cri16_rss_mb=$(median ${rss["cri16 $1"]})
  }
}

# paired_ratios VARIANT: imaged / raw limit within each run of VARIANT, space-separated; a
# pair run seconds apart is steadier than the ratio of medians.
paired_ratios() {
  local imaged raw i
  read -r -a imaged <<<"${seconds["imaged $1"]}"
  read -r -a raw <<<"${seconds["raw $1"]}"
  for i in "${!imaged[@]}"; do printf '%s ' "$(ratio "${imaged[$i]}" "${raw[$i]}")"; done
}

# json_list VALUES...: the values as a JSON list.
json_list() { printf '[%s]' "$(echo "$@" | tr ' ' ',')"; }

# runs_json CONTENDER VARIANT: the recorded wall seconds of each run as a JSON list.
# shellcheck disable=SC2086 # the values are space-separated on purpose
runs_json() { json_list ${seconds["$1 $2"]}; }

if [ "$snapshotter" != overlayfs ]; then
  mkdir -p "$out_dir"
  json=$out_dir/pull-$snapshotter.json
  printf '{\n  "snapshotter": "%s",\n  "scale": %s,\n  "runs": %s,\n  "containerd_versions": ["%s", "%s"],\n  "filesystem": "%s",\n  "variants": {\n' \
    "$snapshotter" "$scale" "$runs" "$containerd22_version" "$containerd_version" "$filesystem" >"$json"
  printf '\nsnapshotter %s on %s (containerd %s and %s with the same snapshotter)\n' \
    "$snapshotter" "$filesystem" "$containerd22_version" "$containerd_version"
  format='%-10s %9s %12s %8s %8s %8s %10s %16s %10s %11s %9s %7s\n'
  # shellcheck disable=SC2059 # the format is built once for the header and the rows
  printf "$format" variant imaged_s overlayfs_s cri22_s cri16_s raw_s imaged/cri22 imaged/overlayfs imaged/raw \
    paired/raw rss_MB cpu_s
  first=1
  for variant in "${variants[@]}"; do
    cold_medians "$variant"
    # shellcheck disable=SC2086 # the values are space-separated on purpose
    overlay_s=$(median ${seconds["overlayfs $variant"]})
    # shellcheck disable=SC2059
    printf "$format" "$variant" "$imaged_s" "$overlay_s" "$cri22_s" "$cri16_s" "$raw_s" \
      "$(ratio "$imaged_s" "$cri22_s")" "$(ratio "$imaged_s" "$overlay_s")" "$(ratio "$imaged_s" "$raw_s")" \
      "$paired_ratio" "$rss_mb" "$cpu_s"
    [ $first = 1 ] || printf ',\n' >>"$json"
    first=0
    printf '    "%s": {"imaged_s": %s, "imaged_overlayfs_s": %s, "containerd22_cri_s": %s, "containerd16_cri_s": %s, "raw_s": %s, "imaged_over_containerd22_cri": %s, "imaged_over_imaged_overlayfs": %s, "imaged_over_raw_paired": %s, "imaged_peak_rss_mb": %s, "imaged_cpu_s": %s, "containerd22_cpu_s": %s}' \
      "$variant" "$imaged_s" "$overlay_s" "$cri22_s" "$cri16_s" "$raw_s" "$(ratio "$imaged_s" "$cri22_s")" \
      "$(ratio "$imaged_s" "$overlay_s")" "$paired_ratio" "$rss_mb" "$cpu_s" "$cri22_cpu_s" >>"$json"
  done
  printf '\n  },\n  "total_s": %s\n}\n' "$(elapsed "$started")" >>"$json"
  exit 0
fi

# 10 concurrent pulls of one image into a fresh imaged; each blob should be fetched once.
echo "10-way concurrent pull (gzip)" >&2
fresh_imaged
drop_caches
log_mark=$(wc -l <"$work/registry-access.log")
t0=$EPOCHREALTIME
concurrent_pids=()
for _ in $(seq 1 10); do
  "$crictl" --image-endpoint "unix://$socket" pull "${ref[gzip]}" >/dev/null &
  concurrent_pids+=($!)
done
for pid in "${concurrent_pids[@]}"; do wait "$pid"; done
concurrent_seconds=$(elapsed "$t0")
sleep 0.5 # the access log line is written when the response completes
blob_gets=$(tail -n +"$((log_mark + 1))" "$work/registry-access.log" | grep -c '"GET /v2/bench/gzip/blobs/sha256:' || true)
distinct_blobs=$(tail -n +"$((log_mark + 1))" "$work/registry-access.log" |
  grep -o '"GET /v2/bench/gzip/blobs/sha256:[0-9a-f]*' | sort -u | wc -l)
stop_imaged

# Idle RSS: a release imaged on an empty store, two seconds after start.
fresh_imaged
sleep 2
idle_rss_mb=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$imaged_pid/status")
stop_imaged

# Round trips over 1,000 small stored images: a warm PullImage (the registry should see
# one manifest request per pull) and ListImages, for imaged and containerd alike.
echo "pushing 1000 small images" >&2
"$BIN_DIR/fixtures" many-images --registry "$registry" --count 1000
many=$registry/bench/many
# latency SOCKET NAME: fills the store behind SOCKET, then times warm pulls and listings;
# sets warm_NAME, list_NAME ("p50 p99") and manifests_NAME (requests per warm pull).
latency_of() {
  "$latency" --socket "$1" populate --prefix "$many" --count 1000
  local mark
  mark=$(wc -l <"$work/registry-access.log")
  local warm
  warm=$("$latency" --socket "$1" warm "$many:7" --calls 200)
  sleep 0.5
  local requests
  requests=$(tail -n +"$((mark + 1))" "$work/registry-access.log" | grep -c '/v2/bench/many/manifests/' || true)
  printf -v "warm_$2" '%s %s' "$(awk '{ print $2 }' <<<"$warm")" "$(awk '{ print $4 }' <<<"$warm")"
  printf -v "manifests_$2" '%s' "$(awk -v r="$requests" 'BEGIN { printf "%.2f", r / 201 }')"
  local list
  list=$("$latency" --socket "$1" list --calls 1000)
  printf -v "list_$2" '%s %s' "$(awk '{ print $2 }' <<<"$list")" "$(awk '{ print $4 }' <<<"$list")"
}
echo "round trips: imaged" >&2
fresh_imaged
latency_of "$socket" imaged
# ImageStatus (200 calls at a time), ListImages and ImageFsInfo while bench/gzip pulls cold
# into the store of 1,000 images, next to the same calls idle.
echo "round trips under load: imaged" >&2
load_out=$("$latency" --socket "$socket" load "${ref[gzip]}" --status "$many:7" --concurrency 200)
read -r _ _ idle_status_p50 _ idle_status_p99 _ idle_list_p50 _ idle_list_p99 _ idle_fsinfo_p50 _ idle_fsinfo_p99 _ _ \
  <<<"$(grep '^idle ' <<<"$load_out")"
read -r _ _ load_status_p50 _ load_status_p99 _ load_list_p50 _ load_list_p99 _ load_fsinfo_p50 _ load_fsinfo_p99 _ load_calls _ load_pull_s \
  <<<"$(grep '^load ' <<<"$load_out")"
stop_imaged
echo "round trips: containerd $containerd22_version" >&2
start_containerd 22
latency_of "$ctrd_sock" containerd
stop_containerd

# Peak RSS must not grow with the image: cold pulls of an image twice the size.
double=$((scale * 2))
echo "building and pushing the benchmark image at scale $double..." >&2
"$BIN_DIR/fixtures" bench-image --dir "$image_dir" --registry "$registry" --scale "$double" >"$work/images-double.txt"
declare -A double_seconds double_rss double_mb
while read -r _ image_ref _ _ uncompressed; do
  variant=${image_ref##*/bench/}
  variant=${variant%%-x*}
  double_mb[$variant]=$(awk -v b="$uncompressed" 'BEGIN { printf "%.1f", b / 1e6 }')
  for run in $(seq 1 "$runs"); do
    echo "run $run/$runs, $variant at scale $double: imaged" >&2
    fresh_imaged
    drop_caches
    double_seconds[$variant]+="$("$latency" --socket "$socket" once "$image_ref") "
    double_rss[$variant]+="$(peak_rss_mb "$imaged_pid") "
    stop_imaged
  done
done <"$work/images-double.txt"

# Layer application alone: the gzip variant's tars, decompressed beforehand onto tmpfs (which
# dropping the page cache leaves alone), applied all at once by each side.
echo "layer application alone: snapshotter and tar -x" >&2
tars=$(mktemp -d /dev/shm/imaged-bench-tars.XXXXXX)
blobs=("$image_dir/blobs/gzip"/*)
for n in "${!blobs[@]}"; do libdeflate-gunzip -c "${blobs[$n]}" >"$tars/$n.tar"; done
mkdir -p "$work/apply"
apply_line=$("$apply_bench" --parallel --runs "$runs" --dir "$work/apply" "$tars"/*.tar | tail -n 1)
rm -rf "$tars"
read -r apply_s apply_tar_s apply_ratio < <(sed -E 's/^median: snapshotter ([0-9.]+) s, tar -x ([0-9.]+) s, ratio ([0-9.]+)$/\1 \2 \3/' <<<"$apply_line")

# Results.
mkdir -p "$out_dir"
json=$out_dir/pull.json
{
  printf '{\n  "scale": %s,\n  "runs": %s,\n  "containerd_versions": ["%s", "%s"],\n  "filesystem": "%s",\n' \
    "$scale" "$runs" "$containerd22_version" "$containerd_version" "$filesystem"
  printf '  "variants": {\n'
}>"$json"
format='%-10s %7s %7s %8s %8s %8s %7s %7s %12s %12s %10s %11s %6s %10s %8s %7s %7s %9s\n'
# shellcheck disable=SC2059 # the format is built once for the header and the rows
printf "\n$format" variant MB_tar MB_blob imaged_s cri22_s cri16_s ctr_s raw_s imaged/cri22 imaged/cri16 \
  imaged/raw paired/raw cpu_s raw_cpu_s cpu/raw rss_MB x2_s x2_rss_MB
first=1
for variant in "${variants[@]}"; do
  cold_medians "$variant"
  x2_s=null x2_rss_mb=null x2_mb=null
  if [ -n "${double_seconds[$variant]:-}" ]; then
    # shellcheck disable=SC2086 # the values are space-separated on purpose
    {
      x2_s=$(median ${double_seconds[$variant]})
      x2_rss_mb=$(median ${double_rss[$variant]})
    }
    x2_mb=${double_mb[$variant]}
  fi
  # shellcheck disable=SC2059
  printf "$format" "$variant" "${uncompressed_mb[$variant]}" "${compressed_mb[$variant]}" "$imaged_s" \
    "$cri22_s" "$cri16_s" "$ctr_s" "$raw_s" "$(ratio "$imaged_s" "$cri22_s")" "$(ratio "$imaged_s" "$cri16_s")" \
    "$(ratio "$imaged_s" "$raw_s")" "$paired_ratio" "$cpu_s" "$raw_cpu_s" "$(ratio "$cpu_s" "$raw_cpu_s")" \
    "$rss_mb" "${x2_s/null/-}" "${x2_rss_mb/null/-}"
  [ $first = 1 ] || printf ',\n' >>"$json"
  first=0
  printf '    "%s": {"image": "%s", "uncompressed_mb": %s, "compressed_mb": %s, "imaged_s": %s, "containerd22_cri_s": %s, "containerd16_cri_s": %s, "ctr_s": %s, "raw_s": %s, "imaged_over_containerd22_cri": %s, "imaged_over_containerd16_cri": %s, "imaged_over_raw": %s, "imaged_over_raw_paired": %s, "imaged_cpu_s": %s, "containerd22_cpu_s": %s, "raw_cpu_s": %s, "imaged_cpu_over_raw": %s, "imaged_peak_rss_mb": %s, "containerd22_peak_rss_mb": %s, "containerd16_peak_rss_mb": %s, "double": {"uncompressed_mb": %s, "imaged_s": %s, "imaged_peak_rss_mb": %s}, "runs_s": {"imaged": %s, "containerd22_cri": %s, "containerd16_cri": %s, "ctr": %s, "raw": %s}, "paired_ratios": %s}' \
    "$variant" "${ref[$variant]}" "${uncompressed_mb[$variant]}" "${compressed_mb[$variant]}" \
    "$imaged_s" "$cri22_s" "$cri16_s" "$ctr_s" "$raw_s" \
    "$(ratio "$imaged_s" "$cri22_s")" "$(ratio "$imaged_s" "$cri16_s")" "$(ratio "$imaged_s" "$raw_s")" \
    "$paired_ratio" "$cpu_s" "$cri22_cpu_s" "$raw_cpu_s" "$(ratio "$cpu_s" "$raw_cpu_s")" \
    "$rss_mb" "$cri22_rss_mb" "$cri16_rss_mb" "$x2_mb" "$x2_s" "$x2_rss_mb" \
    "$(runs_json imaged "$variant")" "$(runs_json cri22 "$variant")" "$(runs_json cri16 "$variant")" \
    "$(runs_json ctr "$variant")" "$(runs_json raw "$variant")" \
    "$(json_list $(paired_ratios "$variant"))" >>"$json"
done
read -r warm_imaged_p50 warm_imaged_p99 <<<"$warm_imaged"
read -r warm_containerd_p50 warm_containerd_p99 <<<"$warm_containerd"
read -r list_imaged_p50 list_imaged_p99 <<<"$list_imaged"
read -r list_containerd_p50 list_containerd_p99 <<<"$list_containerd"
total_s=$(elapsed "$started")
{
  printf '\n  },\n  "concurrent_10": {"seconds": %s, "blob_gets": %s, "distinct_blobs": %s},\n' \
    "$concurrent_seconds" "$blob_gets" "$distinct_blobs"
  printf '  "imaged_idle_rss_mb": %s,\n' "$idle_rss_mb"
  printf '  "apply_only_gzip_layers": {"snapshotter_s": %s, "tar_x_s": %s, "ratio": %s},\n' \
    "$apply_s" "$apply_tar_s" "$apply_ratio"
  printf '  "warm_pull_ms": {"imaged": {"p50": %s, "p99": %s, "manifest_requests_per_pull": %s}, "containerd": {"p50": %s, "p99": %s, "manifest_requests_per_pull": %s}},\n' \
    "$warm_imaged_p50" "$warm_imaged_p99" "$manifests_imaged" "$warm_containerd_p50" "$warm_containerd_p99" "$manifests_containerd"
  printf '  "list_images_1000_ms": {"imaged": {"p50": %s, "p99": %s}, "containerd": {"p50": %s, "p99": %s}},\n' \
    "$list_imaged_p50" "$list_imaged_p99" "$list_containerd_p50" "$list_containerd_p99"
  printf '  "under_load_ms": {"status": {"idle_p50": %s, "idle_p99": %s, "load_p50": %s, "load_p99": %s}, "list": {"idle_p50": %s, "idle_p99": %s, "load_p50": %s, "load_p99": %s}, "fs_info": {"idle_p50": %s, "idle_p99": %s, "load_p50": %s, "load_p99": %s}, "status_calls": %s, "pull_s": %s},\n' \
    "$idle_status_p50" "$idle_status_p99" "$load_status_p50" "$load_status_p99" \
    "$idle_list_p50" "$idle_list_p99" "$load_list_p50" "$load_list_p99" \
    "$idle_fsinfo_p50" "$idle_fsinfo_p99" "$load_fsinfo_p50" "$load_fsinfo_p99" "$load_calls" "$load_pull_s"
  printf '  "total_s": %s\n}\n' "$total_s"
} >>"$json"

printf '\nx2_s, x2_rss_MB: imaged cold pull of the same image at scale %s (%s MB tar)\n' "$double" "${double_mb[gzip]}"
printf 'cri22: containerd %s CRI with max_concurrent_unpacks = 5; cri16, ctr: containerd %s\n' \
  "$containerd22_version" "$containerd_version"
cri22_cpus=()
for variant in "${variants[@]}"; do
  cold_medians "$variant"
  cri22_cpus+=("$variant $cri22_cpu_s s")
done
printf 'paired/raw: the median of imaged / raw limit within each run (the raw limit runs right after imaged)\n'
printf 'cpu_s, raw_cpu_s: user + sys seconds of imaged and of the raw limit (containerd %s: %s)\n' \
  "$containerd22_version" "$(IFS=,; echo "${cri22_cpus[*]}" | sed 's/,/, /g')"
printf '10-way concurrent pull of bench/gzip: %ss, %s blob GETs for %s distinct blobs\n' \
  "$concurrent_seconds" "$blob_gets" "$distinct_blobs"
printf 'imaged idle RSS: %s MB\n' "$idle_rss_mb"
printf 'layer application alone (all gzip layers at once): snapshotter %ss, tar -x %ss, ratio %s\n' \
  "$apply_s" "$apply_tar_s" "$apply_ratio"
printf 'filesystem: %s\n' "$filesystem"
printf '\n%-34s %9s %9s %12s %12s %12s\n' "round trip, ms (one connection)" imaged_p50 imaged_p99 containerd_p50 containerd_p99 p99_ratio
printf '%-34s %9s %9s %12s %12s %12s\n' "warm PullImage (1000 images)" "$warm_imaged_p50" "$warm_imaged_p99" \
  "$warm_containerd_p50" "$warm_containerd_p99" "$(ratio "$warm_imaged_p99" "$warm_containerd_p99")"
printf '%-34s %9s %9s %12s %12s %12s\n' "ListImages (1000 images)" "$list_imaged_p50" "$list_imaged_p99" \
  "$list_containerd_p50" "$list_containerd_p99" "$(ratio "$list_imaged_p99" "$list_containerd_p99")"
printf 'manifest requests per warm pull: imaged %s, containerd %s\n' "$manifests_imaged" "$manifests_containerd"
printf '\n%-34s %9s %9s %12s %12s\n' "imaged while bench/gzip pulls, ms" idle_p50 idle_p99 load_p50 load_p99
printf '%-34s %9s %9s %12s %12s\n' "ImageStatus (200 at a time)" "$idle_status_p50" "$idle_status_p99" "$load_status_p50" "$load_status_p99"
printf '%-34s %9s %9s %12s %12s\n' "ListImages (1000 images)" "$idle_list_p50" "$idle_list_p99" "$load_list_p50" "$load_list_p99"
printf '%-34s %9s %9s %12s %12s\n' "ImageFsInfo" "$idle_fsinfo_p50" "$idle_fsinfo_p99" "$load_fsinfo_p50" "$load_fsinfo_p99"
printf '%s status calls during a %ss cold pull\n' "$load_calls" "$load_pull_s"
printf 'whole benchmark: %ss; JSON in %s\n' "$total_s" "$json"
