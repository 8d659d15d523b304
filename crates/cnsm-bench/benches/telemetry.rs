//! The cost of telemetry.
//!
//! 1. Engine apply path (no I/O, one core), plain vs. plus the metric work the runtime's
//!    committer does per transition: three `Instant::now()` reads, a sample pushed, the
//!    `cnsm.transitions` counter added once per 256 transitions, and one hand-off per 256 to a
//!    thread that makes the three histogram records (`cnsm.transition.duration` with the
//!    machine's attribute set, `.queue.duration` and `.evaluation.duration` without) on the
//!    OpenTelemetry SDK with the Prometheus reader `cnsmctl serve` uses. The metrics thread's
//!    own cost per transition is reported separately.
//! 2. The durable runtime (embedded store, every transition fsynced in its group commit), with
//!    telemetry off, metrics only, spans at 100 % and spans at 1 % (plus metrics): the real
//!    `Telemetry` of the runtime, spans through the SDK's batch processor into an exporter
//!    that discards them (what leaves the process is the exporter's business).
//!
//! Run: `cargo bench -p cnsm-bench --bench telemetry` (`CNSM_BENCH_SECONDS`, default 5, per
//! durable case; `CNSM_BENCH_CLIENTS`, default 256; `CNSM_BENCH_ROUNDS`, default 2, durable
//! rounds with the cases interleaved; `CNSM_BENCH_ONLY=apply|durable`).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnsm_bench::{ORDER_PROCESSING, machine, report};
use cnsm_core::Instance;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeOptions, Telemetry};
use cnsm_store::embedded::EmbeddedStore;
use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use serde_json::{Value, json};

const COUNTER: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: counter, namespace: bench}
spec:
  initialState: counting
  states:
  - name: counting
    type: task
    timeoutSeconds: 86400
    onEvent:
    - event: inc
      target: counting
      assign: {n: "data.n + 1"}
"#;

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

struct Instruments {
    duration: opentelemetry::metrics::Histogram<f64>,
    queue: opentelemetry::metrics::Histogram<f64>,
    evaluation: opentelemetry::metrics::Histogram<f64>,
    transitions: opentelemetry::metrics::Counter<u64>,
    attrs: Vec<KeyValue>,
    counter_attrs: Vec<KeyValue>,
}

fn instruments(provider: &SdkMeterProvider) -> Instruments {
    let meter = provider.meter("cnsm");
    let buckets = cnsm_runtime::telemetry::DURATION_BUCKETS_S.to_vec();
    let h = |name: &'static str| {
        meter
            .f64_histogram(name)
            .with_unit("s")
            .with_boundaries(buckets.clone())
            .build()
    };
    Instruments {
        duration: h("cnsm.transition.duration"),
        queue: h("cnsm.transition.queue.duration"),
        evaluation: h("cnsm.transition.evaluation.duration"),
        transitions: meter.u64_counter("cnsm.transitions").build(),
        attrs: vec![KeyValue::new("cnsm.machine.name", "order-processing")],
        counter_attrs: vec![
            KeyValue::new("cnsm.machine.name", "order-processing"),
            KeyValue::new("cnsm.trigger", "event"),
        ],
    }
}

/// One transition's timings, as the committer hands them to the metrics thread.
struct Sample {
    machine: Arc<str>,
    total_s: f64,
    queue_s: f64,
    evaluation_s: f64,
}

/// What the runtime's `cnsm-metrics` thread does with a batch.
fn record_batch(m: &Instruments, batch: &[Sample]) {
    for s in batch {
        black_box(&s.machine);
        m.duration.record(s.total_s, &m.attrs);
        m.queue.record(s.queue_s, &[]);
        m.evaluation.record(s.evaluation_s, &[]);
    }
}

/// Orders through the engine; with `metrics`, the committer's per-transition metric work too
/// (clock reads, a sample pushed, one hand-off per 256 to a thread that records them).
fn apply_path(machine: &Machine, n_orders: usize, metrics: Option<&Arc<Instruments>>) -> f64 {
    let (tx, worker) = match metrics {
        Some(m) => {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Sample>>(256);
            let m = Arc::clone(m);
            let worker = std::thread::spawn(move || {
                while let Ok(batch) = rx.recv() {
                    record_batch(&m, &batch);
                }
            });
            (Some(tx), Some(worker))
        }
        None => (None, None),
    };
    let machine_name: Arc<str> = Arc::from("order-processing");
    let mut samples = Vec::new();
    let start_instance = genesis(machine);
    let events: [(&str, Value); 4] = [
        ("complete", Value::Null),
        ("pay", json!({"amount": 40})),
        ("ship", Value::Null),
        ("deliver", Value::Null),
    ];
    let actor: Arc<str> = Arc::from("bench");
    let started = Instant::now();
    let mut n = 0u64;
    let mut pending = 0u64;
    for i in 0..n_orders {
        let mut instance = start_instance.clone();
        for (name, payload) in &events {
            let received = metrics.map(|_| Instant::now());
            let input = Input::new(
                Trigger::Event { name, payload },
                2 + i as u64,
                actor.clone(),
            );
            let evaluated = metrics.map(|_| Instant::now());
            let record = machine.apply(&instance, &input).expect("transition");
            instance
                .apply_record(&record, instance.last_hash)
                .expect("applies");
            if let (Some(m), Some(received), Some(evaluated)) = (metrics, received, evaluated) {
                let now = Instant::now();
                samples.push(Sample {
                    machine: Arc::clone(&machine_name),
                    total_s: now.duration_since(received).as_secs_f64(),
                    queue_s: evaluated.duration_since(received).as_secs_f64(),
                    evaluation_s: now.duration_since(evaluated).as_secs_f64(),
                });
                pending += 1;
                if pending == 256 {
                    m.transitions.add(pending, &m.counter_attrs);
                    pending = 0;
                    let batch = std::mem::take(&mut samples);
                    if let Some(tx) = &tx
                        && let Err(
                            std::sync::mpsc::TrySendError::Full(batch)
                            | std::sync::mpsc::TrySendError::Disconnected(batch),
                        ) = tx.try_send(batch)
                    {
                        record_batch(m, &batch);
                    }
                }
            }
            n += 1;
        }
        black_box(&instance);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    drop(tx);
    if let Some(w) = worker {
        let _ = w.join();
    }
    rate
}

fn best_of(rounds: usize, f: impl Fn() -> f64) -> f64 {
    (0..rounds).map(|_| f()).fold(0.0, f64::max)
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
    let n_orders = 100_000;
    let meters = meter_provider();
    let inst = Arc::new(instruments(&meters));
    apply_path(&order, n_orders / 10, None);
    apply_path(&order, n_orders / 10, Some(&inst));
    let plain = best_of(3, || apply_path(&order, n_orders, None));
    let with_metrics = best_of(3, || apply_path(&order, n_orders, Some(&inst)));
    report(
        "telemetry.apply.off",
        plain,
        "transitions/s",
        "(engine apply path, no I/O, one core)",
    );
    report(
        "telemetry.apply.metrics",
        with_metrics,
        "transitions/s",
        &format!(
            "(+ the committer's per-transition metric work: {:.1} % cost, {:.0} ns per transition)",
            (1.0 - with_metrics / plain) * 100.0,
            (1.0 / with_metrics - 1.0 / plain) * 1e9
        ),
    );
    // The metrics thread's own work, per transition, measured alone.
    let batch: Vec<Sample> = (0..400_000)
        .map(|i| Sample {
            machine: Arc::from("order-processing"),
            total_s: 0.000_3 + f64::from(i % 100) * 1e-6,
            queue_s: 0.000_1,
            evaluation_s: 0.000_002,
        })
        .collect();
    let started = Instant::now();
    record_batch(&inst, &batch);
    let per = started.elapsed().as_secs_f64() / batch.len() as f64;
    report(
        "telemetry.apply.metrics_thread",
        per * 1e9,
        "ns/transition",
        "(the three histogram records, on the cnsm-metrics thread, off the committer)",
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
