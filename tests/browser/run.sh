#!/bin/sh
# Browser end-to-end tests of Haven's web client: e2e.test.mjs (two browsers, attendance),
# flows.test.mjs (every flow of the client, with screenshots and axe-core checks) and
# media.test.mjs (simulcast, displayed sizes, speaker and modality, ICE restart through a
# UDP relay, three pages with one on a throttled link).
#
#   HAVEN_BIN=$HOME/.cache/haven-target/debug/haven tests/browser/run.sh
#
# Installs the pinned npm packages if needed, type-checks web-client/*.js, then runs the
# test inside a private network namespace where only loopback exists, so no WebRTC or
# other traffic can leave this machine. Output (screenshots, figures, logs) goes to
# $TEST_OUTPUT_DIR, by default test-output/ at the repository root.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

if [ -z "${HAVEN_BIN:-}" ]; then
  echo "run.sh: set HAVEN_BIN to the haven binary, e.g. \$HOME/.cache/haven-target/debug/haven" >&2
  exit 2
fi
# Absolute paths, because the test runs from this folder.
HAVEN_BIN=$(cd "$(dirname "$HAVEN_BIN")" && pwd)/$(basename "$HAVEN_BIN")
TEST_OUTPUT_DIR=${TEST_OUTPUT_DIR:-$root/test-output}
mkdir -p "$TEST_OUTPUT_DIR"
TEST_OUTPUT_DIR=$(cd "$TEST_OUTPUT_DIR" && pwd)
export HAVEN_BIN TEST_OUTPUT_DIR

cd "$here"
# Reinstall when a pinned package is missing (a new one was added since the last install).
for pkg in playwright-core typescript axe-core; do
  [ -d "node_modules/$pkg" ] || { npm ci --no-audit --no-fund; break; }
done

# Type-check the web client (JSDoc types, strict).
npx --no-install tsc -p tsconfig.json

# 224.0.0.0/4 on lo: multicast (mDNS) has a route instead of failing with "No such device".
exec unshare -n sh -c 'ip link set lo up && ip route add 224.0.0.0/4 dev lo && exec node --test --test-concurrency=1 --test-reporter=spec e2e.test.mjs flows.test.mjs media.test.mjs'
