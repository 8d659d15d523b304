#!/usr/bin/env bash
# API conformance: fuzz the served OpenAPI document with schemathesis (PyPI) against a real
# `cnsmctl serve` on loopback. Bounded examples per operation, a fixed seed, and a wall-clock
# bound. Fails on any 5xx, undocumented status code, wrong content type, undocumented or
# malformed response header, or a body that does not match its schema.
#
#   ci/schemathesis.sh            # from the repository root or anywhere
#
# Environment: SCHEMATHESIS_MAX_EXAMPLES (default 25), SCHEMATHESIS_SEED (default 20261127),
# SCHEMATHESIS_TIME_LIMIT seconds for the fuzzing run (default 170), SCHEMATHESIS_CHECKS (default:
# the five response checks below; e.g. "all" to explore request-side checks by hand).
# One worker: with several, hypothesis' lambda-source parsing raced inside CPython 3.11.7
# ("AST constructor recursion depth mismatch") and aborted operations.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-25}"
SEED="${SCHEMATHESIS_SEED:-20261127}"
TIME_LIMIT="${SCHEMATHESIS_TIME_LIMIT:-170}"
VENV=target/schemathesis-venv
PYTHON="${PYTHON:-python3}"

if ! command -v "$PYTHON" >/dev/null; then
  echo "schemathesis: SKIPPED: $PYTHON is not installed (API conformance not checked)" >&2
  exit 0
fi

# 1. The pinned schemathesis in a venv under target/ (reused when it has the right version).
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -qF "version $SCHEMATHESIS_VERSION"; then
  echo "== schemathesis: installing schemathesis==$SCHEMATHESIS_VERSION into $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS_VERSION"
fi

for tool in curl timeout; do
  if ! command -v "$tool" >/dev/null; then
    echo "schemathesis: error: $tool is needed" >&2
    exit 1
  fi
done

# 2. The server, on a loopback port the kernel picks, with a fresh store.
cargo build --quiet --locked -p cnsmctl
work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

target/debug/cnsmctl --data-dir "$work/data" serve --listen 127.0.0.1:0 \
  >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
base=""
for _ in $(seq 1 100); do
  base="$(sed -n 's/^listening on \(http:\/\/127\.0\.0\.1:[0-9]*\)$/\1/p' "$work/server.out")"
  [ -n "$base" ] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
  sleep 0.1
done
if [ -z "$base" ]; then
  echo "schemathesis: the server did not start:" >&2
  cat "$work/server.out" "$work/server.err" >&2
  exit 1
fi
echo "== schemathesis: server at $base"

# 3. Data for the GET routes: a machine, an instance, and one event so history has records.
api="$base/apis/statemachine.cn/v1alpha1/namespaces/shop"
curl -fsS -o /dev/null -X POST "$api/statemachines" -H 'Content-Type: application/yaml' \
  --data-binary @../shared/examples/order-processing.yaml
curl -fsS -o /dev/null -X POST "$api/instances" -H 'Content-Type: application/json' \
  -d '{"id": "o-1", "machine": "order-processing", "data": {"total": 40}, "labels": {"team": "payments"}}'
curl -fsS -o /dev/null -X POST "$api/instances/o-1/events" -H 'Content-Type: application/json' \
  -d '{"event": "complete"}'

# 4. Fuzz. Only loopback: the schema and every request go to $base, and no proxy is used.
export NO_PROXY='*' no_proxy='*'
unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy ALL_PROXY all_proxy
# The GET routes of one machine or instance read the seeded ones, so they reach the handlers'
# logic instead of answering 404; writes and lists keep generated path values.
# watch=true answers an endless Server-Sent Events stream, which a request/response fuzzer cannot
# judge (the end-to-end tests cover it), so watch is always false here.
cat >"$work/schemathesis.toml" <<'TOML'
[parameters]
"query.watch" = "false"

[[operations]]
include-method = "GET"
include-path-regex = "/namespaces/\\{ns\\}/(statemachines/\\{name\\}|instances/\\{id\\})"
parameters = { "path.ns" = "shop", "path.name" = "order-processing", "path.id" = "o-1" }
TOML
start=$SECONDS
status=0
# Run from the temporary directory so hypothesis and schemathesis leave their caches there.
(cd "$work" && HOME="$work" timeout --signal=INT --kill-after=10 "$TIME_LIMIT" \
  "$repo/$VENV/bin/schemathesis" --config-file "$work/schemathesis.toml" run "$base/openapi.json" \
  --url "$base" \
  --checks "${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance}" \
  --phases examples,coverage,fuzzing \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --generation-database none \
  --request-timeout 10 \
  --workers 1 \
  --no-color \
  --report junit --report-junit-path "$work/junit.xml") \
  || status=$?
echo "== schemathesis: finished in $((SECONDS - start)) s (exit $status)"
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "schemathesis: FAILED: the run exceeded ${TIME_LIMIT}s" >&2
fi

# 5. The server must still be up (no crash), then stop it.
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "schemathesis: FAILED: the server died during the run:" >&2
  tail -n 50 "$work/server.err" >&2
  status=1
fi
exit "$status"
