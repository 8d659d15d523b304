#!/usr/bin/env bash
# Restate side by side: starts restate-server (data in a temp dir, loopback ports) and the Counter
# endpoint (counter.mjs on Node), registers the endpoint through the admin API, waits until the
# ingress serves it, then runs cnsm's http_load generator against Restate's ingress
# (CNSM_BENCH_TARGET=restate). Every process it started is stopped by pid on exit.
# Usage: bench/restate/run.sh   (env passed on to the generator: CNSM_HTTP_SECS, CNSM_BENCH_OPEN_RATE)
set -euo pipefail
cd "$(dirname "$0")"
SCARF_ANALYTICS=false npm ci --no-audit --no-fund --silent

tmp="$(mktemp -d "${TMPDIR:-/tmp}/cnsm-bench-restate.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'; }
ingress="$(free_port)"; admin="$(free_port)"; fabric="$(free_port)"
while [ "$admin" = "$ingress" ]; do admin="$(free_port)"; done
while [ "$fabric" = "$ingress" ] || [ "$fabric" = "$admin" ]; do fabric="$(free_port)"; done

cat > "$tmp/restate.toml" <<EOF
cluster-name = "cnsm-bench"
node-name = "cnsm-bench"
base-dir = "$tmp/data"
listen-mode = "tcp"
bind-address = "127.0.0.1:$fabric"
advertised-address = "http://127.0.0.1:$fabric/"
disable-telemetry = true
log-filter = "warn"

[admin]
bind-address = "127.0.0.1:$admin"

[ingress]
bind-address = "127.0.0.1:$ingress"
EOF

server=node_modules/@restatedev/restate-server-linux-x64/bin/restate-server
"$server" --no-logo --config-file "$tmp/restate.toml" > "$tmp/server.log" 2>&1 &
pids+=($!); server_pid=$!
node counter.mjs 0 > "$tmp/endpoint.log" 2>&1 &
pids+=($!); endpoint_pid=$!

wait_for() { # what, command...: retry for 60 s
  local what="$1"; shift
  for _ in $(seq 600); do
    if "$@" > /dev/null 2>&1; then return 0; fi
    kill -0 "$server_pid" 2>/dev/null || { cat "$tmp/server.log" >&2; echo "restate-server exited" >&2; return 1; }
    kill -0 "$endpoint_pid" 2>/dev/null || { cat "$tmp/endpoint.log" >&2; echo "endpoint exited" >&2; return 1; }
    sleep 0.1
  done
  echo "timed out waiting for $what" >&2; cat "$tmp/server.log" >&2; return 1
}
wait_for "the endpoint" grep -q '^listening on ' "$tmp/endpoint.log"
endpoint_port="$(sed -n 's/^listening on //p' "$tmp/endpoint.log" | head -1)"
wait_for "the admin API" curl -sf "http://127.0.0.1:$admin/health"
wait_for "the ingress" curl -sf "http://127.0.0.1:$ingress/restate/health"
curl -sf -X POST "http://127.0.0.1:$admin/deployments" -H 'content-type: application/json' \
  -d "{\"uri\": \"http://127.0.0.1:$endpoint_port\"}" > "$tmp/deployment.json"
# Registered and routed: an event for an instance that was never created reaches the handler.
probe() {
  curl -s -X POST "http://127.0.0.1:$ingress/Counter/ready-probe/event" \
    -H 'content-type: application/json' -d '{"event":"inc"}' | grep -q 'instance ready-probe not found'
}
wait_for "the Counter object on the ingress" probe
echo "# restate-server $("$server" --version | cut -d' ' -f2) pid $server_pid (ingress 127.0.0.1:$ingress), endpoint node pid $endpoint_pid, SDK $(node -p 'require("./node_modules/@restatedev/restate-sdk/package.json").version')"

cd ../..
CNSM_BENCH_TARGET=restate CNSM_BENCH_TARGET_URL="http://127.0.0.1:$ingress" \
  CNSM_BENCH_TARGET_PIDS="$server_pid,$endpoint_pid" \
  cargo bench -q -p cnsm-bench --bench http_load
