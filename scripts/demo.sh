#!/usr/bin/env bash
# The demo: a local registry with fixture images, imaged with a throw-away root, then a
# pull with progress, the image list, the filesystem usage, and removal; then runtimed
# beside it running a pod through crictl (runp, create, start), its log, and teardown.
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

PAUSE_IMAGE=demo/pause:latest start_runtimed
cat >"$work/net.d/10-demo.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "demo", "plugins": [
  {"type": "bridge", "bridge": "rtddemo0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.236.0.0/24"}]],
            "dataDir": "$work/cni-leases"}}]}
JSON
echo "runtimed serving $runtime_socket (pods on bridge rtddemo0, 10.236.0.0/24)"
crictl() { target/tools/crictl --runtime-endpoint "unix://$runtime_socket" --image-endpoint "unix://$socket" "$@"; }
cat >"$work/pod.json" <<JSON
{"metadata": {"name": "demo", "namespace": "default", "uid": "demo-uid", "attempt": 1},
 "hostname": "demo-pod", "log_directory": "$work/pod-logs", "linux": {}}
JSON
cat >"$work/container.json" <<JSON
{"metadata": {"name": "hello"}, "image": {"image": "demo/busybox:latest"},
 "command": ["sh", "-c", "echo hello from \$(hostname), pid \$\$, uid \$(id -u); ip -4 -o addr show eth0 | cut -d' ' -f7"],
 "log_path": "hello.log", "linux": {}}
JSON
step crictl runp pod.json
pod=$(crictl runp "$work/pod.json")
echo "$pod"
step crictl pull demo/busybox:latest
crictl pull demo/busybox:latest
step crictl create POD container.json pod.json
container=$(crictl create "$pod" "$work/container.json" "$work/pod.json")
echo "$container"
step crictl start CONTAINER
crictl start "$container"
for _ in $(seq 1 100); do
  [ "$(crictl inspect -o go-template --template '{{.status.state}}' "$container")" = CONTAINER_EXITED ] && break
  sleep 0.1
done
step crictl logs CONTAINER
crictl logs "$container"
step "cat $work/pod-logs/hello.log   # the CRI log format"
cat "$work/pod-logs/hello.log"
step crictl ps -a
crictl ps -a
step crictl stopp POD '&&' crictl rmp POD
crictl stopp "$pod"
crictl rmp "$pod"
crictl pods
ip link delete rtddemo0 2>/dev/null || true
kill -TERM "$imaged_pid"
wait "$imaged_pid" && echo "imaged stopped cleanly"
