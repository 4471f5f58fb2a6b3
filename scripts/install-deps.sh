#!/bin/sh
# Installs what the build, the tests and the demo need, when missing: libisal-dev (ISA-L, which
# imaged links for gzip), a registry, skopeo, htpasswd, openssl, the CNI plugins with iproute2
# and iptables (runtimed's network tests), runc, crun and conmon, btrfs-progs (mkfs.btrfs, for
# the btrfs snapshotter's tests), and crictl/critest from the shared cri-tools folder.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
missing=""
for pair in docker-registry:docker-registry skopeo:skopeo htpasswd:apache2-utils openssl:openssl \
  ip:iproute2 iptables:iptables busybox:busybox runc:runc crun:crun conmon:conmon \
  mkfs.btrfs:btrfs-progs; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
[ -x /usr/lib/cni/bridge ] || missing="$missing containernetworking-plugins"
# imaged inflates gzip layers with ISA-L: the library to link against (and run with).
dpkg -s libisal-dev >/dev/null 2>&1 || missing="$missing libisal-dev"
if [ -n "$missing" ]; then
  echo "installing:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The Debian package starts a registry on :5000 we do not use; tests start their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi
# crictl and critest come from the shared cri-tools folder next to the checkout.
found=""
for tools in "${CRI_TOOLS_DIR:-}" "$here/../shared/tools/cri-tools" /work/shared/tools/cri-tools; do
  if [ -n "$tools" ] && [ -x "$tools/install" ]; then
    "$tools/install" "$here/target/tools" >/dev/null
    found=yes
    break
  fi
done
if [ -z "$found" ] && ! command -v critest >/dev/null 2>&1; then
  echo "cri-tools not found: set CRI_TOOLS_DIR to the folder holding crictl.xz, critest.xz and install" >&2
  exit 1
fi
modprobe overlay 2>/dev/null || true
# crun refuses a hybrid cgroup layout (v1 controllers plus a cgroup2 mount) whose cgroup2
# hierarchy holds controllers ("cgroups in hybrid mode not supported"); some VM images leave
# hugetlb there. Each such controller gets a v1 hierarchy beside the others, the layout
# systemd's hybrid mode makes.
if [ -f /sys/fs/cgroup/unified/cgroup.controllers ]; then
  for controller in $(cat /sys/fs/cgroup/unified/cgroup.controllers); do
    mkdir -p "/sys/fs/cgroup/$controller"
    mount -t cgroup -o "$controller" cgroup "/sys/fs/cgroup/$controller" || true
  done
fi
