#!/usr/bin/env bash
# Builds the cargo-fuzz targets of fuzz/ and runs each for a fixed number of inputs, starting
# from seed corpora written here into a temporary directory (seeds are generated, never
# committed). Fails if any target crashes; the crashing input is kept in fuzz/artifacts/.
#
# Needs root: the layer_tar target creates device nodes and changes owners. FUZZ_RUNS sets the
# number of inputs per target (default 20000), or FUZZ_SECONDS a time per target instead;
# FUZZ_TARGETS a space-separated subset. layer_tar runs once per snapshotter in
# FUZZ_SNAPSHOTTERS (default: overlayfs native btrfs; btrfs on a loop-mounted file made here).
# `--seeds-only DIR` writes the seed corpora to DIR/<target>/ and stops (for
# scripts/fuzz-seeds.sh, which replays them as tests). A crash worth keeping goes to
# fuzz/regressions/<target>/, which those tests replay too.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

runs=${FUZZ_RUNS:-20000}
read -r -a targets <<<"${FUZZ_TARGETS:-reference manifest hosts_toml auth_challenge config_file layer_tar ocicrypt_annotations}"

# cargo-fuzz passes nightly-only flags (-Z sanitizer and coverage options) to rustc and cargo;
# RUSTC_BOOTSTRAP lets the stable toolchain accept them, so no nightly install is needed.
export RUSTC_BOOTSTRAP=1

seeds_only=
if [ "${1:-}" = --seeds-only ]; then
  seeds_only=${2:?--seeds-only needs a directory}
fi

work=$(mktemp -d /tmp/imaged-fuzz.XXXXXX)
# The targets keep their scratch trees (snapshot roots, hosts.toml roots) for the whole run and
# libFuzzer exits without destructors, so their TMPDIR is ours and goes with it.
cleanup() {
  if mountpoint -q "$work/btrfs"; then umount "$work/btrfs"; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/tmp"

seed() { # seed TARGET NAME: writes standard input as one seed of TARGET
  mkdir -p "$work/corpus/$1"
  cat >"$work/corpus/$1/$2"
}

hex64=9700f9a2f5bf4c3ab7c8c9d9b1f7e9a3c2b4d6e8f0a1b3c5d7e9f1a3b5c766bf
digest="sha256:$hex64"

# reference: the spellings the normalisation rules distinguish.
for ref in busybox busybox:1.36 library/busybox docker.io/busybox index.docker.io/foo/bar \
  quay.io/a/b localhost/app localhost:5000/app 127.0.0.1:5000/a/b:v1 '[::1]:5000/app:tag' \
  "busybox:1.36@$digest" "registry.k8s.io/pause@$digest" My.Registry/repo_x/a__b-c.d:T_1; do
  printf '%s' "$ref" | seed reference "$(printf '%s' "$ref" | tr -c 'a-zA-Z0-9' _)"
done

# manifest: first byte = content type index (see the target), then document NUL config.
config_json='{"architecture":"amd64","os":"linux","config":{"User":"1000:1000"},"rootfs":{"type":"layers","diff_ids":["'$digest'"]}}'
oci_manifest='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'$digest'","size":2},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"'$digest'","size":3,"annotations":{"a":"b"}}]}'
docker_manifest='{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"'$digest'","size":2},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"'$digest'","size":3}]}'
platform() { # platform OS ARCH [VARIANT]: one index entry
  printf '{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":7,"platform":{"os":"%s","architecture":"%s"%s}}' \
    "$digest" "$1" "$2" "${3:+,\"variant\":\"$3\"}"
}
entries="$(platform linux arm64 v8),$(platform linux amd64),$(platform linux arm v7),$(platform windows amd64)"
printf '\001%s\000%s' "$oci_manifest" "$config_json" | seed manifest oci-manifest
printf '\000%s' "$docker_manifest" | seed manifest docker-manifest-no-config
printf '\004{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[%s]}' "$entries" | seed manifest index
printf '\005{"schemaVersion":2,"manifests":[%s]}' "$entries" | seed manifest index-by-shape
printf '\000{"schemaVersion":1,"name":"x","fsLayers":[]}' | seed manifest schema1

# hosts_toml: the forms containerd documents for certs.d/<host>/hosts.toml.
seed hosts_toml mirrors <<'TOML'
server = "https://registry.example"
[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  dial_timeout = "1m30s"
[host."https://mirror.example/cache/"]
  capabilities = ["pull"]
  header = { x-token = "abc", x-list = ["a", "b"] }
[host."https://mirror.example/v2/hub"]
  override_path = true
[host."m2.example:5000"]
  ca = "ca.pem"
  client = [["client.cert", "client.key"]]
TOML
printf 'server = "https://registry.example"\ncapabilities = ["pull"]\ndial_timeout = "500ms"\n' | seed hosts_toml server-only
printf '[host."https://m"]\ncapabilities = ["pulls"]\n' | seed hosts_toml bad-capability
printf 'dial_timeout = "99999999999999999999h"\n' | seed hosts_toml huge-timeout

# auth_challenge: WWW-Authenticate values and base64 auth fields.
printf '%s' 'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:library/busybox:pull",error="insufficient_scope"' | seed auth_challenge bearer
printf '%s' 'Basic realm="Registry Realm"' | seed auth_challenge basic
printf '%s' 'bearer realm=https://a/t, scope="a\"b" ,service = x' | seed auth_challenge bearer-unquoted
printf '%s' 'dXNlcjpwYXNzAAA=' | seed auth_challenge auth-field

# config_file: a file of every section, and bad values.
seed config_file sections <<'TOML'
root = "/var/lib/imaged"
state = "/run/imaged"
address = "/run/imaged/imaged.sock"
max_concurrent_downloads = 3
image_pull_progress_timeout = "5m"
image_pull_request_timeout = "30s"
image_pull_min_rate = 1024
image_pull_min_rate_window = "1m"
max_image_layers = 500
metrics_address = "127.0.0.1:9191"
[registry]
config_path = "/etc/imaged/certs.d:/etc/containerd/certs.d"
[image_decryption]
key_model = "node"
keys_dir = "/etc/imaged/keys"
TOML
printf 'max_concurrent_downloads = 0\n' | seed config_file zero-downloads
printf 'image_pull_progress_timeout = "soon"\n' | seed config_file bad-duration
printf 'image_pull_min_rate_window = "0"\n' | seed config_file zero-rate-window
printf 'unknown_key = 1\n[registry]\nconfig_path = 7\n' | seed config_file unknown-and-mistyped

# layer_tar: layers tar writes in each format, whiteouts, links, a fifo, and escape attempts.
tree="$work/tree"
mkdir -p "$tree/etc/ssl" "$tree/usr/bin" "$tree/gone/sub" "$tree/esc" "$tree/wh"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$tree/etc/passwd"
printf 'hello\n' >"$tree/usr/bin/tool"
ln -s /usr/bin "$tree/bin"
ln "$tree/usr/bin/tool" "$tree/usr/bin/tool-link"
mkfifo "$tree/fifo"
touch "$tree/.wh.removed" "$tree/gone/.wh..wh..opq" "$tree/esc/x" "$tree/wh/.wh.tool" "$tree/wh/.wh..wh..opq"
ln -s ../../../../sentinel "$tree/up"
for format in gnu ustar pax; do
  tar -c -C "$tree" --format=$format --owner=0 --group=0 --exclude=esc --exclude=up --exclude=wh . | seed layer_tar "tree-$format"
done
# Whiteouts through the layer's own symlink.
tar -c -C "$tree" --format=pax --no-recursion --transform 's,^wh,bin,' bin wh/.wh.tool wh/.wh..wh..opq | seed layer_tar whiteout-through-own-symlink
# A symlink that points out of the layer, then a file written through it, then `..` names.
tar -c -C "$tree" --format=pax --no-recursion --transform 's,^esc,up,' up esc/x | seed layer_tar escape-symlink
tar -c -C "$tree" --format=gnu --absolute-names --no-recursion --transform 's,^esc,../../../../sentinel,' esc esc/x | seed layer_tar escape-dotdot

# ocicrypt_annotations: first byte 0 = JWE document, 1 = PKCS#7 DER, else NUL-separated raw
# jwe, pkcs7 and pubopts annotation values (see the target).
b64() { base64 -w0; }
printf '\000{"protected":"eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ","encrypted_key":"AAAA","iv":"AAAAAAAAAAAAAAAA","ciphertext":"AAAA","tag":"AAAAAAAAAAAAAAAAAAAAAA"}' | seed ocicrypt_annotations jwe-flattened
printf '\000{"protected":"eyJlbmMiOiJBMjU2R0NNIn0","recipients":[{"header":{"alg":"ECDH-ES+A256KW","epk":{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}},"encrypted_key":"AAAA"}],"iv":"AAAAAAAAAAAAAAAA","ciphertext":"","tag":""}' | seed ocicrypt_annotations jwe-general
printf '\000eyJhbGciOiJSU0ExXzUiLCJlbmMiOiJBMjU2R0NNIn0.AAAA.AAAAAAAAAAAAAAAA.AAAA.AAAA' | seed ocicrypt_annotations jwe-compact
printf '\001\x30\x80\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x03\xa0\x80\x30\x80\x02\x01\x00\x31\x00\x30\x00\x00\x00\x00\x00\x00\x00' | seed ocicrypt_annotations pkcs7-empty
pubopts=$(printf '{"cipher":"AES_256_CTR_HMAC_SHA256","hmac":"%s","cipheroptions":{}}' "$(head -c32 /dev/zero | b64)" | b64)
printf '\002%s\000%s\000%s' "$(printf '{}' | b64),!!" "$(printf 'x' | b64)" "$pubopts" | seed ocicrypt_annotations raw-values

if [ -n "$seeds_only" ]; then
  mkdir -p "$seeds_only"
  cp -r "$work/corpus/." "$seeds_only/"
  exit 0
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
cargo fuzz build
if [ -n "${FUZZ_SECONDS:-}" ]; then
  limit=(-max_total_time="$FUZZ_SECONDS")
else
  limit=(-runs="$runs")
fi
read -r -a snapshotters <<<"${FUZZ_SNAPSHOTTERS:-overlayfs native btrfs}"
# Each run: "target" or "layer_tar:<snapshotter>".
runs_of=()
for target in "${targets[@]}"; do
  if [ "$target" = layer_tar ]; then
    for snapshotter in "${snapshotters[@]}"; do runs_of+=("layer_tar:$snapshotter"); done
  else
    runs_of+=("$target")
  fi
done
failed=()
for run in "${runs_of[@]}"; do
  target=${run%%:*}
  snapshotter=${run#*:}
  [ "$snapshotter" = "$run" ] && snapshotter=overlayfs
  tmp="$work/tmp/${run/:/-}"
  mkdir -p "$tmp"
  if [ "$snapshotter" = btrfs ] && ! mountpoint -q "$work/btrfs"; then
    truncate -s 2G "$work/btrfs.img"
    mkfs.btrfs -q "$work/btrfs.img"
    mkdir -p "$work/btrfs"
    mount -o loop "$work/btrfs.img" "$work/btrfs"
  fi
  [ "$snapshotter" = btrfs ] && tmp="$work/btrfs"
  log="$work/${run/:/-}.log"
  start=$(date +%s)
  if LAYER_TAR_SNAPSHOTTER=$snapshotter TMPDIR="$tmp" cargo fuzz run "$target" "$work/corpus/$target" -- \
    "${limit[@]}" -timeout=10 >"$log" 2>&1; then
    # libFuzzer's closing lines: "#N DONE cov: .. ft: .. corp: .." and "Done N runs in S second(s)".
    stats=$(grep -m1 -o 'DONE .*' "$log" || true)
    done_line=$(grep -m1 '^Done ' "$log" || true)
    echo "$run: ok, ${done_line:-no summary}; ${stats:-no stats} (wall $(($(date +%s) - start)) s)"
  else
    echo "$run: FAILED after $(($(date +%s) - start)) s; last lines of its log:"
    tail -n 40 "$log"
    failed+=("$run")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/)"
  exit 1
fi
echo "all ${#runs_of[@]} runs went without a crash (${limit[*]} each)"
