#!/usr/bin/env bash
# Runs cnsm's benchmarks and the XState side-by-side in one go; prints `bench NAME: VALUE` lines
# that BENCHMARKS.md quotes. Usage: bench/run.sh [engine|flags|durable|timers|recovery|stores|xstate|http|telemetry|snapshot|soak|migration|delivery|pg ...]
# (default: all but recovery, which builds a 3+ GB store and takes several minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
what=("$@")
if [ ${#what[@]} -eq 0 ]; then what=(engine xstate durable timers stores); fi
echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), rustc $(rustc --version | cut -d' ' -f2)"
for w in "${what[@]}"; do
  case "$w" in
    engine)   cargo bench -q -p cnsm-bench --bench engine ;;
    flags)    cargo bench -q -p cnsm-bench --bench flags ;;
    durable)  cargo bench -q -p cnsm-bench --bench durable ;;
    timers)   cargo bench -q -p cnsm-bench --bench timers ;;
    recovery) cargo bench -q -p cnsm-bench --bench recovery ;;
    telemetry) cargo bench -q -p cnsm-bench --bench telemetry ;;
    http)     cargo build -q --release -p cnsmctl && cargo bench -q -p cnsm-bench --bench http_load ;;
    migration) cargo bench -q -p cnsm-bench --bench migration ;;
    soak)     cargo bench -q -p cnsm-bench --bench retention_soak ;;
    snapshot) cargo bench -q -p cnsm-bench --bench snapshot ;;
    delivery) cargo bench -q -p cnsm-bench --bench delivery ;;
    pg)       # The HTTP load on a PostgreSQL store (a fresh database cnsm_bench on
              # CNSM_BENCH_PG, default the local server): one transaction per event (serially,
              # then concurrently on a pool of 32 connections), then batched.
              base="${CNSM_BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
              cargo build -q --release -p cnsmctl
              for mode in serial per-event batched; do
                case "$mode" in
                  serial)    env=(CNSM_BATCH_LEN_MAX=1) ;;
                  per-event) env=(CNSM_PG_TRANSACTION_PER_EVENT=1 CNSM_PG_CONNS_MAX=32) ;;
                  batched)   env=(CNSM_BATCH_LEN_MAX=2048) ;;
                esac
                psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS cnsm_bench" -c "CREATE DATABASE cnsm_bench"
                echo "# pg: $mode (${env[*]})"
                env CNSM_BENCH_STORE="$base/cnsm_bench" "${env[@]}" \
                  cargo bench -q -p cnsm-bench --bench http_load
              done
              psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS cnsm_bench" ;;
    stores)   cargo bench -q -p cnsm-bench --features sqlite --bench store_compare ;;
    xstate)
      (cd bench/xstate && npm ci --no-audit --no-fund --silent && node order.mjs 50000) ;;
    *) echo "unknown benchmark: $w" >&2; exit 2 ;;
  esac
done
