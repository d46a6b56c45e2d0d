#!/usr/bin/env bash
# Runs every check and test of Haven. Installs what it needs when missing.
#
#   ./test.sh
#
# WebRTC tests run inside a private network namespace (unshare -n), where only loopback
# exists, so no packet leaves the machine.
set -euo pipefail
cd "$(dirname "$0")"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/haven-target}"
export CARGO_TERM_COLOR=never
OUT="${TEST_OUTPUT_DIR:-$PWD/test-output}"
export TEST_OUTPUT_DIR="$OUT"
mkdir -p "$OUT"

step() { printf '\n== %s\n' "$*"; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }

# --- what the tests need -------------------------------------------------------------------
need_pkgs=()
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v unshare >/dev/null || need_pkgs+=(util-linux)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v node >/dev/null || need_pkgs+=(nodejs)
command -v npm >/dev/null || need_pkgs+=(npm)
command -v turnserver >/dev/null || need_pkgs+=(coturn)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_pkgs+=(postgresql)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "installing ${need_pkgs[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_pkgs[@]}"
fi

# --- Rust: format, lints, build --------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "build"
cargo build --workspace --quiet
cargo test --workspace --no-run --quiet
export HAVEN_BIN="$CARGO_TARGET_DIR/debug/haven"

# --- Rust tests, inside a private network namespace ----------------------------------------
# Everything Rust runs here, unit tests included: the end-to-end tests start real servers and
# WebRTC clients, which gather candidates on every interface the namespace has (only lo).
in_netns() {
  unshare -n sh -c 'ip link set lo up; ip route add 224.0.0.0/4 dev lo; exec "$@"' netns "$@"
}

# The attendance tests also run against PostgreSQL: tests/with-postgres.sh starts a throwaway
# cluster inside the namespace (the host's is not reachable there) and stops it afterwards.
step "cargo test (network namespace)"
HAVEN_IN_NETNS=1 in_netns tests/with-postgres.sh \
  cargo test --workspace --offline --quiet --no-fail-fast -- --nocapture 2>&1 \
  | tee "$OUT/cargo-test.log"

# --- browser tests -------------------------------------------------------------------------
step "browsers (network namespace)"
tests/browser/run.sh 2>&1 | tee "$OUT/browser.log"

# The figures the tests measured, then the verdict, last, where a reader looks.
step "figures"
grep -h '^figure:' "$OUT"/*.log 2>/dev/null || true
step "all tests passed"
