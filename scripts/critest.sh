#!/usr/bin/env bash
# Runs the Image Manager specs of critest (cri-tools v1.26.1) against imaged. The images
# critest pulls are built by the fixtures crate and served from a local registry that a
# `_default` hosts.toml mirrors every registry to. "public image with digest" pins an
# upstream manifest digest no local build can reproduce, so it is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
PATH="$PWD/target/tools:$PATH"

start_registry critest
start_imaged
start_runtimed
# critest asks the runtime endpoint for its Version before any spec.
critest -runtime-endpoint "unix://$runtime_socket" -image-endpoint "unix://$socket" \
  -ginkgo.focus='Image Manager' -ginkgo.skip='public image with digest' \
  -ginkgo.json-report="$work/critest.json" -ginkgo.no-color
python3 - "$work/critest.json" <<'PY'
import json, sys
specs = [s for suite in json.load(open(sys.argv[1])) for s in suite.get("SpecReports", [])]
ran = [s for s in specs if s["State"] != "skipped" and s["LeafNodeType"] == "It"]
failed = [s["LeafNodeText"] for s in ran if s["State"] != "passed"]
print(f"critest Image Manager: {len(ran) - len(failed)}/{len(ran)} specs passed")
if failed or len(ran) < 6:
    sys.exit(f"failed: {failed}")
PY
