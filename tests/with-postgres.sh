#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL cluster for the attendance ledger's tests.
#
#   tests/with-postgres.sh cargo test ...
#
# Sets HAVEN_TEST_DATABASE_URL for the command. If it is already set, the command runs as is
# against that database. The cluster listens on 127.0.0.1 only (trust authentication, data in
# a temporary directory) and is stopped and deleted when the command ends. Without Debian's
# PostgreSQL binaries the command still runs and the PostgreSQL tests say loudly that they
# were skipped.
set -euo pipefail

if [ -n "${HAVEN_TEST_DATABASE_URL:-}" ]; then
  exec "$@"
fi

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "with-postgres: no PostgreSQL binaries under /usr/lib/postgresql; PostgreSQL tests skip" >&2
  exec "$@"
fi

# PostgreSQL refuses to run as root; run it as the postgres user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

dir=$(mktemp -d)
chmod 700 "$dir"
[ "$(id -u)" = 0 ] && chown postgres "$dir"

# A free port on loopback: the first one nothing answers on.
port=55432
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done

stop() {
  as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap stop EXIT

as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200" start >/dev/null \
  || { cat "$dir/server.log" >&2; exit 1; }

export HAVEN_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
echo "with-postgres: PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2
"$@"
