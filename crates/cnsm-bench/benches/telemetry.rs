//! The cost of telemetry.
//!
//! 1. Engine apply path (no I/O, one core) as the committer runs it (batches of 256, one clock
//!    read per batch), through the runtime's own committer telemetry code
//!    (`CommitterTelemetry`), with telemetry off and with metrics only: the per-transition
//!    cost on the committer (the serial path) and the CPU of all threads, the `cnsm-metrics`
//!    thread's histogram records on the OpenTelemetry SDK with the Prometheus reader
//!    `cnsmctl serve` uses included.
//! 2. The durable runtime (embedded store, every transition fsynced in its group commit), with
//!    telemetry off, metrics only, spans at 100 % and spans at 1 % (plus metrics): the real
//!    `Telemetry` of the runtime, spans through the SDK's batch processor into an exporter
//!    that discards them (what leaves the process is the exporter's business).
//!
//! Run: `cargo bench -p cnsm-bench --bench telemetry` (`CNSM_BENCH_SECONDS`, default 5, per
//! durable case; `CNSM_BENCH_CLIENTS`, default 256; `CNSM_BENCH_ROUNDS`, rounds with the cases
//! interleaved, default 5 for the apply path and 2 for the durable cases;
//! `CNSM_BENCH_ONLY=apply|durable`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnsm_bench::{COUNTER, ORDER_PROCESSING, machine, report};
use cnsm_core::Instance;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use cnsm_core::record::StateChangeEvent;
use cnsm_runtime::telemetry::CommitterTelemetry;
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeOptions, Telemetry};
use cnsm_store::embedded::EmbeddedStore;
use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use serde_json::{Value, json};

#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

fn genesis(machine: &Machine) -> Instance {
    let mut data = serde_json::Map::new();
    data.insert("total".into(), json!(40));
    let record = machine
        .create(NewInstance {
            namespace: "shop",
            id: "o-1",
            data,
            labels: BTreeMap::new(),
            now_ms: 1,
            actor: "bench",
        })
        .expect("create");
    let hash = record.seal().hash;
    Instance::from_genesis(&record, hash).expect("genesis")
}

/// Events per batch, as the committer takes them under load.
const BATCH: usize = 256;

/// Orders through the engine the way the committer takes them: events in batches of
/// [`BATCH`], each record kept until its batch commits, one clock read per batch for the
/// dequeue time. Every case goes through the runtime's own committer telemetry calls
/// ([`CommitterTelemetry`]: start, loaded, the sampled evaluation timing, one `committed` per
/// batch that hands the samples to the `cnsm-metrics` thread); with telemetry off they return
/// at once, as in the runtime. Returns (transitions/s, process CPU seconds per transition).
fn apply_path(machine: &Machine, n_orders: usize, telemetry: &Telemetry) -> Run {
    let mut committer = CommitterTelemetry::new(telemetry.clone());
    let mut batch: Vec<StateChangeEvent> = Vec::with_capacity(BATCH);
    let start_instance = genesis(machine);
    let events: [(&str, Value); 4] = [
        ("complete", Value::Null),
        ("pay", json!({"amount": 40})),
        ("ship", Value::Null),
        ("deliver", Value::Null),
    ];
    let actor: Arc<str> = Arc::from("bench");
    let cpu = process_cpu_s();
    let thread_cpu = thread_cpu_s();
    let started = Instant::now();
    let mut dequeued = started;
    let mut n = 0u64;
    for i in 0..n_orders {
        let mut instance = start_instance.clone();
        for (name, payload) in &events {
            let input = Input::new(
                Trigger::Event { name, payload },
                2 + i as u64,
                actor.clone(),
            );
            // Stamped by the request's task in the runtime, not by the committer.
            let received = dequeued;
            let record = committer.transition(&instance, name, received, dequeued, || {
                machine.apply(&instance, &input).expect("transition")
            });
            instance
                .apply_record(&record, instance.last_hash)
                .expect("applies");
            batch.push(record);
            if batch.len() == BATCH {
                committer.committed(&batch, Duration::from_micros(250));
                batch.clear();
                dequeued = Instant::now();
            }
            n += 1;
        }
        black_box(&instance);
    }
    committer.committed(&batch, Duration::from_micros(250));
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let thread_cpu = (thread_cpu_s() - thread_cpu) / n as f64;
    // Let the metrics thread finish the hand-offs before reading the process's CPU time.
    std::thread::sleep(Duration::from_millis(200));
    (rate, thread_cpu, (process_cpu_s() - cpu) / n as f64)
}

/// CPU seconds of this process, all threads: the sum of each thread's time on a CPU in
/// `/proc/self/task/*/schedstat` (nanoseconds).
fn process_cpu_s() -> f64 {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .map(|t| schedstat_s(&t.path().join("schedstat")))
                .sum()
        })
        .unwrap_or(0.0)
}

/// CPU seconds of the calling thread (the committer's part), from `/proc/thread-self/schedstat`.
fn thread_cpu_s() -> f64 {
    schedstat_s(std::path::Path::new("/proc/thread-self/schedstat"))
}

/// The first field of a `schedstat` file: time spent on a CPU, in nanoseconds.
fn schedstat_s(path: &std::path::Path) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        * 1e-9
}

/// One run: transitions/s, then CPU seconds per transition of the committer's thread and of
/// the whole process.
type Run = (f64, f64, f64);

/// The best rate and the lowest CPU figures of some runs.
fn best(runs: &[Run]) -> Run {
    runs.iter()
        .fold((0.0, f64::MAX, f64::MAX), |(r, t, c), (r2, t2, c2)| {
            (r.max(*r2), t.min(*t2), c.min(*c2))
        })
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("CNSM_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    }
}

/// Durable transitions/s with `n_clients` clients for `seconds`.
async fn durable(telemetry: Telemetry, n_clients: usize, seconds: u64) -> f64 {
    let dir = bench_dir();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let runtime =
        Runtime::open(store, RuntimeOptions::default().with_telemetry(telemetry)).unwrap();
    runtime.apply_yaml(COUNTER, None).await.unwrap();
    for i in 0..n_clients {
        let mut data = serde_json::Map::new();
        data.insert("n".into(), 0.into());
        runtime
            .create_instance(
                CreateInstance::new("bench", "counter")
                    .id(format!("c-{i}"))
                    .data(data),
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..n_clients {
        let runtime = runtime.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("c-{c}");
            let parent = cnsm_runtime::TraceParent::parse(
                &format!("00-{:032x}-{:016x}-01", c + 1, c + 1),
                None,
            )
            .expect("traceparent");
            let mut n = 0u64;
            while Instant::now() < deadline {
                runtime
                    .send(
                        "bench",
                        &id,
                        EventRequest::new("inc").traced(parent.clone()),
                    )
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    runtime.shutdown();
    rate
}

fn meter_provider() -> SdkMeterProvider {
    // The reader `cnsmctl serve` uses for /metrics.
    let reader = opentelemetry_prometheus::exporter()
        .with_registry(prometheus::Registry::new())
        .scope_info_enabled(false)
        .without_target_info()
        .build()
        .expect("prometheus reader");
    SdkMeterProvider::builder().with_reader(reader).build()
}

fn tracer_provider(ratio: f64) -> SdkTracerProvider {
    // Not parent-based: the sampled incoming parent would otherwise force 100 %.
    SdkTracerProvider::builder()
        .with_sampler(Sampler::TraceIdRatioBased(ratio))
        .with_batch_exporter(Discard)
        .build()
}

fn selected(name: &str) -> bool {
    std::env::var("CNSM_BENCH_ONLY").map_or(true, |only| only == name)
}

fn main() {
    if selected("apply") {
        apply_cases();
    }
    if selected("durable") {
        durable_cases();
    }
}

fn apply_cases() {
    let order = machine(ORDER_PROCESSING);
    let n_orders = 500_000;
    let meters = meter_provider();
    let off = Telemetry::default();
    let metrics = Telemetry::default().with_meter(&meters.meter("cnsm"));
    apply_path(&order, n_orders / 10, &off);
    apply_path(&order, n_orders / 10, &metrics);
    // Interleaved rounds, best of each case, so drift on a shared machine hits both.
    let rounds: usize = std::env::var("CNSM_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (mut off_runs, mut metrics_runs) = (Vec::new(), Vec::new());
    // `CNSM_BENCH_CASE=off|metrics` runs one case alone (for a profiler).
    let case = std::env::var("CNSM_BENCH_CASE").ok();
    for _ in 0..rounds {
        if case.as_deref() != Some("metrics") {
            off_runs.push(apply_path(&order, n_orders, &off));
        }
        if case.as_deref() != Some("off") {
            metrics_runs.push(apply_path(&order, n_orders, &metrics));
        }
    }
    if case.is_some() {
        return;
    }
    let (plain, plain_thread, plain_cpu) = best(&off_runs);
    let (with_metrics, metrics_thread, metrics_cpu) = best(&metrics_runs);
    report(
        "telemetry.apply.off",
        plain,
        "transitions/s",
        &format!(
            "(engine apply path as the committer runs it, no I/O, one core; {:.0} ns CPU per \
             transition)",
            plain_thread * 1e9
        ),
    );
    report(
        "telemetry.apply.metrics",
        with_metrics,
        "transitions/s",
        &format!(
            "({:.1} % fewer transitions/s; this rate is also slowed when the cnsm-metrics \
             thread has no core of its own)",
            (1.0 - with_metrics / plain) * 100.0,
        ),
    );
    report(
        "telemetry.apply.metrics_cost",
        (metrics_thread / plain_thread - 1.0) * 100.0,
        "% of the engine apply path",
        &format!(
            "(the committer thread's CPU per transition: {:.0} ns off, {:.0} ns with metrics, \
             +{:.0} ns)",
            plain_thread * 1e9,
            metrics_thread * 1e9,
            (metrics_thread - plain_thread) * 1e9
        ),
    );
    report(
        "telemetry.apply.metrics_cpu",
        (metrics_cpu - plain_cpu) * 1e9,
        "ns/transition",
        &format!(
            "(CPU of all threads, the cnsm-metrics thread's histogram records included: \
             {:.0} ns off, {:.0} ns with metrics)",
            plain_cpu * 1e9,
            metrics_cpu * 1e9
        ),
    );
}

fn durable_cases() {
    let seconds: u64 = std::env::var("CNSM_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let n_clients: usize = std::env::var("CNSM_BENCH_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rounds: usize = std::env::var("CNSM_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let cases = ["off", "metrics", "spans_100", "spans_1"];
    let mut results: Vec<(&str, f64)> = cases.iter().map(|c| (*c, 0.0)).collect();
    for round in 0..rounds {
        // Interleaved, and the order reversed every other round, so drift on a shared machine
        // spreads over every case.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..4).collect()
        } else {
            (0..4).rev().collect()
        };
        for index in order {
            let case = cases[index];
            let meters = meter_provider();
            let tracer = match case {
                "spans_100" => Some(tracer_provider(1.0)),
                "spans_1" => Some(tracer_provider(0.01)),
                _ => None,
            };
            let mut telemetry = Telemetry::default();
            if case != "off" {
                telemetry = telemetry.with_meter(&meters.meter("cnsm"));
            }
            if let Some(tp) = &tracer {
                telemetry = telemetry.with_tracer(BoxedTracer::new(Box::new(tp.tracer("cnsm"))));
            }
            let rate = rt.block_on(durable(telemetry, n_clients, seconds));
            if let Some(tp) = tracer {
                let _ = tp.shutdown();
            }
            // The best round of each case.
            results[index].1 = results[index].1.max(rate);
        }
    }
    let off = results[0].1;
    for (case, rate) in &results {
        report(
            &format!("telemetry.durable.{case}.clients_{n_clients}"),
            *rate,
            "transitions/s",
            &format!(
                "({:.0} % of off; best of {rounds} interleaved rounds; fsynced group commits)",
                rate / off * 100.0
            ),
        );
    }
}
