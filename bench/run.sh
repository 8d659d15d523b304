#!/usr/bin/env bash
# Runs cnsm's benchmarks and the XState side-by-side in one go; prints `bench NAME: VALUE` lines
# that BENCHMARKS.md quotes. Usage: bench/run.sh [engine|flags|durable|timers|recovery|stores|xstate|http|telemetry|snapshot|soak|migration|delivery|pg|restate|dbos ...]
# (default: all but recovery, which builds a 3+ GB store and takes several minutes).
# restate / dbos: cnsm's HTTP load (embedded store / PostgreSQL, one transaction per event), then
# the same generator against Restate / DBOS in the same invocation, then the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
what=("$@")

# The value of `bench NAME: VALUE ...` in a file of bench output.
value() { sed -n "s/^bench $2: \([0-9.]*\) .*/\1/p" "$1" | tail -1; }

# cnsm's lines are in $1, the peer's in $2 (prefix $3, shown as $4): throughput and latency ratios.
ratios() {
  local cnsm_rate peer_rate
  cnsm_rate="$(value "$1" http.events_per_s)"; peer_rate="$(value "$2" "$3.events_per_s")"
  awk -v c="$cnsm_rate" -v p="$peer_rate" -v n="$3" -v s="$4" 'BEGIN {
    printf "bench %s.ratio.events_per_s: %.2f x (cnsm %.0f/s / %s %.0f/s, best closed-loop rates)\n", n, c / p, c, s, p }'
  for q in p50 p99; do
    awk -v c="$(value "$1" "http.open_half.$q")" -v p="$(value "$2" "$3.open_half.$q")" -v n="$3" -v s="$4" -v q="$q" 'BEGIN {
      printf "bench %s.ratio.open_half.%s: %.2f x (%s %.2f ms / cnsm %.2f ms, open loop at the same rate: half of cnsm'"'"'s best)\n", n, q, p / c, s, p, c }'
  done
}

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
    snapshot) cargo build -q --release -p cnsmctl && cargo bench -q -p cnsm-bench --bench snapshot ;;
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
    restate)  # cnsm (embedded store) then Restate (bench/restate), same generator and workload.
              cnsm_out="$(mktemp)"; peer_out="$(mktemp)"
              cargo build -q --release -p cnsmctl
              cargo bench -q -p cnsm-bench --bench http_load | tee "$cnsm_out"
              CNSM_BENCH_OPEN_RATE="$(awk -v r="$(value "$cnsm_out" http.events_per_s)" 'BEGIN { print r / 2 }')" \
                bench/restate/run.sh | tee "$peer_out"
              ratios "$cnsm_out" "$peer_out" restate Restate
              rm -f "$cnsm_out" "$peer_out" ;;
    dbos)     # cnsm on PostgreSQL, one transaction per event, concurrent on 20 connections as
              # DBOS's pool (a fresh database cnsm_bench), then DBOS (bench/dbos, database
              # dbos_bench) on the same server, same generator.
              base="${CNSM_BENCH_PG:-postgres://postgres@127.0.0.1:5432}"
              cnsm_out="$(mktemp)"; peer_out="$(mktemp)"
              cargo build -q --release -p cnsmctl
              psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS cnsm_bench" -c "CREATE DATABASE cnsm_bench"
              echo "# pg: CNSM_PG_TRANSACTION_PER_EVENT=1 CNSM_PG_CONNS_MAX=20"
              CNSM_BENCH_STORE="$base/cnsm_bench" CNSM_PG_TRANSACTION_PER_EVENT=1 CNSM_PG_CONNS_MAX=20 \
                cargo bench -q -p cnsm-bench --bench http_load | tee "$cnsm_out"
              psql -q "$base/postgres" -c "DROP DATABASE IF EXISTS cnsm_bench"
              CNSM_BENCH_OPEN_RATE="$(awk -v r="$(value "$cnsm_out" http.events_per_s)" 'BEGIN { print r / 2 }')" \
                bench/dbos/run.sh | tee "$peer_out"
              ratios "$cnsm_out" "$peer_out" dbos DBOS
              rm -f "$cnsm_out" "$peer_out" ;;
    *) echo "unknown benchmark: $w" >&2; exit 2 ;;
  esac
done
