#!/usr/bin/env bash
# Runs critest v1.26.1's runtime specs (everything but Image Manager and the Streaming
# group) against runtimed, with imaged as the image endpoint. The images critest runs are
# built by the fixtures crate (busybox-based stand-ins, see fixtures::catalog::critest_runtime)
# and served from a local registry that a `_default` hosts.toml mirrors every registry to.
# Pods get a bridge network (10.88.0.0/16) from Debian's CNI plugins. Prints a line per
# spec and the totals; the results go to $CRITEST_REPORT when set, critest's own output to
# target/critest-runtime.out. Fails when a spec fails. CRITEST_FOCUS=REGEX runs only the
# matching specs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
PATH="$PWD/target/tools:$PATH"

start_registry critest
start_imaged
start_runtimed
cat >"$work/net.d/10-runtimed.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "runtimed",
 "plugins": [
  {"type": "bridge", "bridge": "rtdcri0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$work/cni-leases"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
JSON
status=0
select=(-ginkgo.skip="Image Manager")
if [[ -n ${CRITEST_FOCUS:-} ]]; then
  select+=(-ginkgo.focus="$CRITEST_FOCUS")
fi
critest -runtime-endpoint "unix://$runtime_socket" -image-endpoint "unix://$socket" \
  "${select[@]}" -ginkgo.json-report="$work/critest.json" \
  -ginkgo.no-color -ginkgo.timeout=40m >"$work/critest.out" 2>&1 || status=$?
ip link delete rtdcri0 2>/dev/null || true
mkdir -p target
cp "$work/critest.out" target/critest-runtime.out
python3 - "$work/critest.json" "${CRITEST_REPORT:-}" "${CRITEST_FOCUS:-}" <<'PY'
import json, sys
HEADER = """# critest v1.26.1: runtime specs against runtimed

Written by `CRITEST_REPORT=docs/critest-runtime-results.md ./scripts/critest-runtime.sh`
(which `make test` runs too). Not run: the Image Manager specs (`scripts/critest.sh`), the
Streaming group (Exec, Attach, PortForward are not served yet); critest skips the AppArmor
and SELinux specs itself on a host without them, as here.

"""
specs = [s for suite in json.load(open(sys.argv[1])) for s in suite.get("SpecReports", [])]
ran = [s for s in specs if s["LeafNodeType"] == "It" and s["State"] != "skipped"]
lines = []
for s in sorted(ran, key=lambda s: " ".join(s["ContainerHierarchyTexts"] + [s["LeafNodeText"]])):
    name = " ".join(s["ContainerHierarchyTexts"][1:] + [s["LeafNodeText"]])
    lines.append(f"| {name} | {s['State']} |")
passed = sum(1 for s in ran if s["State"] == "passed")
print("\n".join(lines))
print(f"critest runtime specs: {passed}/{len(ran)} passed")
failed = [s["LeafNodeText"] for s in ran if s["State"] != "passed"]
focused = len(sys.argv) > 3 and sys.argv[3]
if sys.argv[2]:
    with open(sys.argv[2], "w") as out:
        out.write(HEADER + "| spec | result |\n|---|---|\n" + "\n".join(lines) + "\n")
        out.write(f"\n{passed} of {len(ran)} specs passed.\n")
if failed or (len(ran) < 68 and not focused):
    sys.exit(f"failed: {failed}")
PY
