#!/usr/bin/env bash
# DBOS side by side: installs the pinned Python environment into bench/dbos/temp/.venv (never
# system-wide), creates a fresh database dbos_bench on the PostgreSQL server of CNSM_BENCH_PG
# (default the local one), starts the DBOS app (app.py, uvicorn on a loopback port) and runs
# cnsm's http_load generator against it (CNSM_BENCH_TARGET=dbos). The app is stopped by its pid
# and the database dropped on exit.
# Usage: bench/dbos/run.sh   (env passed on to the generator: CNSM_HTTP_SECS, CNSM_BENCH_OPEN_RATE)
set -euo pipefail
cd "$(dirname "$0")"
base="${CNSM_BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
python="${PYTHON:-python3}"

if [ ! -x temp/.venv/bin/python ]; then "$python" -m venv temp/.venv; fi
temp/.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt

log="$(mktemp "${TMPDIR:-/tmp}/cnsm-bench-dbos.XXXXXX")"
app_pid=""
cleanup() {
  if [ -n "$app_pid" ]; then
    kill "$app_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$app_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$app_pid" 2>/dev/null || true
  fi
  psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS dbos_bench WITH (FORCE)" || true
  rm -f "$log"
}
trap cleanup EXIT

psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS dbos_bench WITH (FORCE)" -c "CREATE DATABASE dbos_bench"
# SQLAlchemy names the driver in the URL: postgres://... -> postgresql+psycopg://...
url="postgresql+psycopg://${base#*://}/dbos_bench"
DBOS_BENCH_DATABASE_URL="$url" DBOS_BENCH_PORT=0 temp/.venv/bin/python app.py > "$log" 2>&1 &
app_pid=$!
for _ in $(seq 600); do
  grep -q '^listening on ' "$log" && break
  kill -0 "$app_pid" 2>/dev/null || { cat "$log" >&2; echo "the DBOS app exited" >&2; exit 1; }
  sleep 0.1
done
addr="$(sed -n 's/^listening on //p' "$log" | head -1)"
[ -n "$addr" ] || { cat "$log" >&2; echo "timed out waiting for the DBOS app" >&2; exit 1; }
echo "# dbos $(temp/.venv/bin/pip show dbos | sed -n 's/^Version: //p') app pid $app_pid on $addr, $(temp/.venv/bin/python --version), $(psql -Atq "$base/postgres" -c 'SHOW server_version')"

cd ../..
CNSM_BENCH_TARGET=dbos CNSM_BENCH_TARGET_URL="$addr" CNSM_BENCH_TARGET_PIDS="$app_pid" \
  cargo bench -q -p cnsm-bench --bench http_load
