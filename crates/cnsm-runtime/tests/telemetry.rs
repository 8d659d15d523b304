//! Spans, hooks and the audit log of the runtime, observed with the OpenTelemetry SDK's
//! in-memory span exporter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cnsm_core::record::{Hash32, StateChangeEvent};
use cnsm_runtime::audit::{AuditLog, AuditSink};
use cnsm_runtime::telemetry::Trigger;
use cnsm_runtime::{
    Control, ControlRequest, CreateInstance, EventRequest, Runtime, RuntimeError, RuntimeOptions,
    Telemetry, TraceParent, TransitionContext, TransitionHook, VirtualClock,
};
use cnsm_store::Store;
use cnsm_store::embedded::EmbeddedStore;
use opentelemetry::global::BoxedTracer;
use opentelemetry::trace::{SpanId, Status, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};

const MACHINE: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: order}
spec:
  initialState: pending
  states:
  - name: pending
    type: task
    timeoutSeconds: 60
    onTimeout: expired
    onEvent:
    - event: pay
      target: paid
      guard: "event.amount >= 10"
    - event: pay
      target: pending
  - {name: paid, type: final}
  - {name: expired, type: final}
"#;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

struct Setup {
    runtime: Runtime,
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    hook: Arc<Recorder>,
    clock: Arc<VirtualClock>,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
}

impl TransitionHook for Recorder {
    fn before(&self, cx: &TransitionContext<'_>) {
        self.push(format!(
            "before {} {} {:?}",
            cx.instance,
            cx.trigger.as_str(),
            cx.state
        ));
    }
    fn after(&self, cx: &TransitionContext<'_>, record: &StateChangeEvent, _hash: Hash32) {
        self.push(format!(
            "after {} {} -> {} v{}",
            cx.instance,
            cx.trigger.as_str(),
            record.to,
            record.version
        ));
    }
    fn error(&self, cx: &TransitionContext<'_>, error: &RuntimeError) {
        self.push(format!("error {} {}", cx.instance, error.error_type()));
    }
}

impl Recorder {
    fn push(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

async fn setup(extra: Option<Arc<dyn TransitionHook>>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let hook = Arc::new(Recorder::default());
    let mut telemetry = Telemetry::default()
        .with_tracer(BoxedTracer::new(Box::new(provider.tracer("cnsm"))))
        .with_hook(hook.clone());
    if let Some(extra) = extra {
        telemetry = telemetry.with_hook(extra);
    }
    let clock = Arc::new(VirtualClock::new(1_764_236_096_000));
    let options = RuntimeOptions::default()
        .with_clock(clock.clone())
        .with_telemetry(telemetry);
    let runtime = Runtime::open_shared(Arc::clone(&store), options).unwrap();
    runtime.apply_yaml(MACHINE, None).await.unwrap();
    Setup {
        runtime,
        exporter,
        provider,
        hook,
        clock,
        store,
        _dir: dir,
    }
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn transitions(exporter: &InMemorySpanExporter) -> Vec<SpanData> {
    exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.name == "cnsm.transition")
        .collect()
}

#[tokio::test]
async fn transition_span_has_the_design_attributes_and_the_incoming_parent() {
    let s = setup(None).await;
    s.runtime
        .create_instance(CreateInstance::new("default", "order").id("o-1"))
        .await
        .unwrap();
    let parent = TraceParent::parse(PARENT, Some("vendor=abc")).unwrap();
    let done = s
        .runtime
        .send(
            "default",
            "o-1",
            EventRequest::new("pay")
                .payload(serde_json::json!({"amount": 12}))
                .traced(parent),
        )
        .await
        .unwrap();
    let _ = s.provider.force_flush();
    let spans = transitions(&s.exporter);
    assert_eq!(spans.len(), 2, "create + pay: {spans:#?}");
    let pay = spans
        .iter()
        .find(|sp| attr(sp, "cnsm.event.name").as_deref() == Some("pay"))
        .expect("the pay span");
    // Parent: the incoming traceparent.
    assert_eq!(
        pay.span_context.trace_id(),
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
    );
    assert_eq!(
        pay.parent_span_id,
        SpanId::from_hex("00f067aa0ba902b7").unwrap()
    );
    assert!(pay.parent_span_is_remote);
    assert_eq!(pay.span_context.trace_state().header(), "vendor=abc");
    for (key, value) in [
        ("cnsm.machine.name", "order"),
        ("cnsm.machine.revision", "1"),
        ("cnsm.instance.id", "o-1"),
        ("cnsm.state.from", "pending"),
        ("cnsm.state.to", "paid"),
        ("cnsm.event.name", "pay"),
        ("cnsm.instance.version", "1"),
        ("cnsm.trigger", "event"),
    ] {
        assert_eq!(attr(pay, key).as_deref(), Some(value), "{key}");
    }
    assert!(attr(pay, "cnsm.duration.total").is_some());
    assert_eq!(pay.status, Status::Unset);
    // The guard evaluations are span events.
    let guards: Vec<_> = pay
        .events
        .iter()
        .filter(|e| e.name == "cnsm.guard")
        .collect();
    assert_eq!(guards.len(), 1);
    assert!(
        guards[0]
            .attributes
            .iter()
            .any(|kv| kv.key.as_str() == "cnsm.guard.result" && kv.value.to_string() == "true")
    );
    // The record (and so the API answer) carries the span's own ids.
    let trace = done.record.trace.expect("trace in the record");
    assert_eq!(trace.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(
        trace.span_id,
        format!("{:016x}", pay.span_context.span_id())
    );
    // ... durably: it is part of the sealed, hash-chained record.
    let history = s.runtime.history("default", "o-1", 0, 10).await.unwrap();
    assert_eq!(history[1].record.trace.as_ref(), Some(&trace));
    assert!(s.store.verify().unwrap().is_ok());
    s.runtime.shutdown();
}

#[tokio::test]
async fn rejected_attempts_get_error_status_and_type() {
    let s = setup(None).await;
    s.runtime
        .create_instance(CreateInstance::new("default", "order").id("o-2"))
        .await
        .unwrap();
    // TransitionFailure: no transition for the event.
    let e = s
        .runtime
        .send("default", "o-2", EventRequest::new("ship"))
        .await
        .unwrap_err();
    assert_eq!(e.error_type(), "TransitionFailure");
    // RaceCondition: expected version matched on arrival but another event in the same batch
    // moved the instance first is hard to force here; StaleState comes from the arrival check
    // (before the queue), RaceCondition from the committer. Exercise the committer path with two
    // requests that share an expected version, submitted together.
    let (a, b) = tokio::join!(
        s.runtime.send(
            "default",
            "o-2",
            EventRequest::new("pay")
                .payload(serde_json::json!({"amount": 1}))
                .expected_version(0)
        ),
        s.runtime.send(
            "default",
            "o-2",
            EventRequest::new("pay")
                .payload(serde_json::json!({"amount": 1}))
                .expected_version(0)
        ),
    );
    let types: Vec<&str> = [&a, &b]
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.error_type()))
        .collect();
    assert_eq!(
        a.is_ok() as u8 + b.is_ok() as u8,
        1,
        "one wins, the other loses: {types:?}"
    );
    let loser = types[0];
    assert!(loser == "RaceCondition" || loser == "StaleState", "{loser}");
    let _ = s.provider.force_flush();
    let spans = transitions(&s.exporter);
    let failed: Vec<_> = spans
        .iter()
        .filter(|sp| matches!(sp.status, Status::Error { .. }))
        .collect();
    let failed_types: Vec<String> = failed
        .iter()
        .filter_map(|sp| attr(sp, "error.type"))
        .collect();
    assert!(failed_types.contains(&"TransitionFailure".to_owned()));
    if loser == "RaceCondition" {
        assert!(
            failed_types.contains(&"RaceCondition".to_owned()),
            "{failed_types:?}"
        );
    }
    let ship = failed
        .iter()
        .find(|sp| attr(sp, "cnsm.event.name").as_deref() == Some("ship"))
        .unwrap();
    assert_eq!(attr(ship, "cnsm.state.from").as_deref(), Some("pending"));
    // Refused on arrival (before the committer): NotFound and StaleState still get their span.
    let e = s
        .runtime
        .send("default", "nobody", EventRequest::new("pay"))
        .await
        .unwrap_err();
    assert_eq!(e.error_type(), "NotFound");
    let e = s
        .runtime
        .send(
            "default",
            "o-2",
            EventRequest::new("pay").expected_version(0),
        )
        .await
        .unwrap_err();
    assert_eq!(e.error_type(), "StaleState");
    let _ = s.provider.force_flush();
    let types: Vec<String> = transitions(&s.exporter)
        .iter()
        .filter(|sp| matches!(sp.status, Status::Error { .. }))
        .filter_map(|sp| attr(sp, "error.type"))
        .collect();
    assert!(types.contains(&"NotFound".to_owned()), "{types:?}");
    assert!(types.contains(&"StaleState".to_owned()), "{types:?}");
    s.runtime.shutdown();
}

#[tokio::test]
async fn timer_firings_are_their_own_spans_linked_to_the_arming_trace() {
    let s = setup(None).await;
    s.runtime
        .create_instance(CreateInstance::new("default", "order").id("o-3"))
        .await
        .unwrap();
    let parent = TraceParent::parse(PARENT, None).unwrap();
    let stay = s
        .runtime
        .send(
            "default",
            "o-3",
            EventRequest::new("pay")
                .payload(serde_json::json!({"amount": 1}))
                .traced(parent),
        )
        .await
        .unwrap();
    assert_eq!(&*stay.instance.state, "pending");
    s.clock.advance_ms(61_000);
    assert_eq!(s.runtime.fire_due_timers().await.unwrap(), 1);
    let _ = s.provider.force_flush();
    let spans = transitions(&s.exporter);
    let timer = spans
        .iter()
        .find(|sp| attr(sp, "cnsm.trigger").as_deref() == Some("timer"))
        .expect("a timer span");
    assert_eq!(attr(timer, "cnsm.state.to").as_deref(), Some("expired"));
    // Its own trace (a root span), linked to the transition that armed the timer.
    assert_eq!(timer.parent_span_id, SpanId::INVALID);
    let armed = stay.record.trace.unwrap();
    assert!(
        timer
            .links
            .iter()
            .any(|l| format!("{:016x}", l.span_context.span_id()) == armed.span_id),
        "links: {:?}",
        timer.links
    );
    s.runtime.shutdown();
}

#[tokio::test]
async fn hooks_see_before_after_and_error() {
    let s = setup(None).await;
    s.runtime
        .create_instance(CreateInstance::new("default", "order").id("o-4"))
        .await
        .unwrap();
    s.runtime
        .send(
            "default",
            "o-4",
            EventRequest::new("pay").payload(serde_json::json!({"amount": 50})),
        )
        .await
        .unwrap();
    let _ = s
        .runtime
        .send("default", "o-4", EventRequest::new("pay"))
        .await;
    assert_eq!(
        s.hook.calls(),
        vec![
            "after o-4 create -> pending v0".to_owned(),
            "before o-4 event Some(\"pending\")".to_owned(),
            "after o-4 event -> paid v1".to_owned(),
            "before o-4 event Some(\"paid\")".to_owned(),
            "error o-4 TransitionFailure".to_owned(),
        ]
    );
    assert_eq!(Trigger::Retry.as_str(), "retry");
    s.runtime.shutdown();
}

#[tokio::test]
async fn audit_log_writes_each_committed_transition_once_and_failures_live() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let sink = AuditSink::File {
        path: path.clone(),
        max_bytes: 0,
        keep: 3,
    };
    // The audit log needs the store before the runtime exists; open both over one store.
    let data = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(data.path()).unwrap());
    let audit = AuditLog::start(Arc::clone(&store), sink.clone(), 1024).unwrap();
    let options = RuntimeOptions::default()
        .with_telemetry(Telemetry::default().with_hook(Arc::new(audit.clone())));
    let runtime = Runtime::open_shared(Arc::clone(&store), options).unwrap();
    runtime.subscribe(Arc::new(audit.clone()));
    runtime.apply_yaml(MACHINE, None).await.unwrap();
    for i in 0..5 {
        let id = format!("a-{i}");
        runtime
            .create_instance(CreateInstance::new("default", "order").id(&id))
            .await
            .unwrap();
        runtime
            .send(
                "default",
                &id,
                EventRequest::new("pay")
                    .payload(serde_json::json!({"amount": 20}))
                    .traced(TraceParent::parse(PARENT, None).unwrap()),
            )
            .await
            .unwrap();
    }
    let rejected = runtime
        .send("default", "a-0", EventRequest::new("pay"))
        .await;
    assert!(rejected.is_err());
    audit.sync().unwrap();
    runtime.shutdown();
    audit.stop();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let committed: Vec<_> = lines
        .iter()
        .filter(|l| l["event"]["outcome"] == "success")
        .collect();
    let failed: Vec<_> = lines
        .iter()
        .filter(|l| l["event"]["outcome"] == "failure")
        .collect();
    assert_eq!(committed.len(), 10);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["error"]["type"], "TransitionFailure");
    let pay = committed
        .iter()
        .find(|l| l["state_change"]["event"] == "pay")
        .unwrap();
    assert_eq!(pay["trace"]["id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(pay["state_change"]["from"], "pending");
    assert_eq!(pay["state_change"]["to"], "paid");
    assert_eq!(pay["event"]["category"][0], "configuration");
    // Each commit position once, in order.
    let seqs: Vec<u64> = committed
        .iter()
        .map(|l| l["event"]["sequence"].as_u64().unwrap())
        .collect();
    let mut sorted = seqs.clone();
    sorted.dedup();
    assert_eq!(seqs, sorted);
    assert_eq!(seqs.len(), 10);

    // A torn last line (a crash mid-write) is cut, and the lost line written again, once.
    let whole = std::fs::read(&path).unwrap();
    let cut = whole.len() - 40;
    std::fs::write(&path, &whole[..cut]).unwrap();
    let again = AuditLog::start(Arc::clone(&store), sink, 16).unwrap();
    again.sync().unwrap();
    again.stop();
    let text2 = std::fs::read_to_string(&path).unwrap();
    let committed2: Vec<u64> = text2
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["event"]["outcome"] == "success")
        .map(|l| l["event"]["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(committed2, seqs, "no line lost, none duplicated");
}

#[tokio::test]
async fn audit_file_rotates_and_resumes_from_the_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let data = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(data.path()).unwrap());
    let sink = AuditSink::File {
        path: path.clone(),
        max_bytes: 1,
        keep: 2,
    };
    let audit = AuditLog::start(Arc::clone(&store), sink.clone(), 64).unwrap();
    let runtime = Runtime::open_shared(Arc::clone(&store), RuntimeOptions::default()).unwrap();
    runtime.subscribe(Arc::new(audit.clone()));
    runtime.apply_yaml(MACHINE, None).await.unwrap();
    runtime
        .create_instance(CreateInstance::new("default", "order").id("r-1"))
        .await
        .unwrap();
    audit.sync().unwrap();
    let cursor = audit.cursor();
    assert!(cursor > 0);
    audit.stop();
    // Rotated right after the committed line: the current file is empty, `.1` has it.
    assert_eq!(std::fs::read(&path).unwrap().len(), 0);
    assert!(dir.path().join("audit.jsonl.1").exists());
    let again = AuditLog::start(Arc::clone(&store), sink, 64).unwrap();
    assert_eq!(again.cursor(), cursor, "resumed from the rotated file");
    again.stop();
    runtime.shutdown();
}

/// Metrics on, read by hand: the exporter, the provider to flush, and the telemetry.
fn metered() -> (
    opentelemetry_sdk::metrics::InMemoryMetricExporter,
    opentelemetry_sdk::metrics::SdkMeterProvider,
    Telemetry,
) {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    let exporter = InMemoryMetricExporter::default();
    let reader = PeriodicReader::builder(exporter.clone())
        .with_interval(Duration::from_secs(3600))
        .build();
    let provider = SdkMeterProvider::builder().with_reader(reader).build();
    let telemetry = Telemetry::default().with_meter(&provider.meter("cnsm"));
    (exporter, provider, telemetry)
}

/// Sums the data points of metric `name` whose attributes include `filter` (all when empty).
fn metric_value(
    exporter: &opentelemetry_sdk::metrics::InMemoryMetricExporter,
    name: &str,
    filter: &[(&str, &str)],
) -> f64 {
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
    let matches = |attrs: Vec<&opentelemetry::KeyValue>| {
        filter.iter().all(|(k, v)| {
            attrs
                .iter()
                .any(|kv| kv.key.as_str() == *k && kv.value.to_string() == *v)
        })
    };
    let finished = exporter.get_finished_metrics().unwrap();
    let Some(last) = finished.last() else {
        return 0.0;
    };
    let mut total = 0.0;
    for sm in last.scope_metrics() {
        for m in sm.metrics().filter(|m| m.name() == name) {
            match m.data() {
                AggregatedMetrics::U64(MetricData::Sum(s)) => {
                    for p in s
                        .data_points()
                        .filter(|p| matches(p.attributes().collect()))
                    {
                        total += p.value() as f64;
                    }
                }
                AggregatedMetrics::I64(MetricData::Gauge(g)) => {
                    for p in g
                        .data_points()
                        .filter(|p| matches(p.attributes().collect()))
                    {
                        total += p.value() as f64;
                    }
                }
                AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                    for p in h
                        .data_points()
                        .filter(|p| matches(p.attributes().collect()))
                    {
                        total += p.count() as f64;
                    }
                }
                _ => {}
            }
        }
    }
    total
}

#[tokio::test]
async fn metrics_count_transitions_errors_and_active_instances() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    // One instance from before telemetry was on: the active gauge is seeded with it.
    let before = Runtime::open_shared(Arc::clone(&store), RuntimeOptions::default()).unwrap();
    before.apply_yaml(MACHINE, None).await.unwrap();
    before
        .create_instance(CreateInstance::new("default", "order").id("old"))
        .await
        .unwrap();
    before.shutdown();

    let (exporter, provider, telemetry) = metered();
    let exemplars = telemetry.exemplars().expect("metrics are on");
    let runtime = Runtime::open_shared(
        Arc::clone(&store),
        RuntimeOptions::default().with_telemetry(telemetry),
    )
    .unwrap();
    for id in ["m-1", "m-2"] {
        runtime
            .create_instance(CreateInstance::new("default", "order").id(id))
            .await
            .unwrap();
    }
    // Traced by its caller: with metrics only, the record carries the caller's trace and
    // the duration keeps it as an exemplar.
    let paid = runtime
        .send(
            "default",
            "m-1",
            EventRequest::new("pay")
                .payload(serde_json::json!({"amount": 99}))
                .traced(TraceParent::parse(PARENT, None).unwrap()),
        )
        .await
        .unwrap();
    let trace_id = paid.record.trace.as_ref().expect("traced").trace_id.clone();
    assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    let _ = runtime
        .send("default", "m-2", EventRequest::new("ship"))
        .await
        .unwrap_err();
    let _ = runtime
        .send(
            "default",
            "m-2",
            EventRequest::new("pay").expected_version(7),
        )
        .await
        .unwrap_err();
    // Histograms are recorded by the metrics thread just after each batch: wait for them.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        exporter.reset();
        provider.force_flush().unwrap();
        if metric_value(&exporter, "cnsm.transition.duration", &[]) >= 3.0
            || std::time::Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = |name: &str, filter: &[(&str, &str)]| metric_value(&exporter, name, filter);
    assert_eq!(v("cnsm.transitions", &[]), 3.0, "2 creates + 1 event");
    assert_eq!(v("cnsm.transitions", &[("cnsm.trigger", "create")]), 2.0);
    assert_eq!(
        v(
            "cnsm.transition.duration",
            &[("cnsm.machine.name", "order")]
        ),
        3.0
    );
    assert_eq!(v("cnsm.transition.queue.duration", &[]), 3.0);
    // Metrics only: one attempt in EVALUATION_SAMPLE_EVERY is timed, the first one included.
    let timed = v(
        "cnsm.transition.evaluation.duration",
        &[("cnsm.machine.name", "order")],
    );
    assert!((1.0..=3.0).contains(&timed), "{timed} timed evaluations");
    assert_eq!(
        v(
            "cnsm.transition.errors",
            &[("error.type", "TransitionFailure")]
        ),
        1.0
    );
    assert_eq!(
        v("cnsm.transition.errors", &[("error.type", "StaleState")]),
        1.0
    );
    // old + m-2 wait in `pending`; m-1 is final (`paid`) and no longer active.
    assert_eq!(
        v(
            "cnsm.instances.active",
            &[("cnsm.machine.name", "order"), ("cnsm.state", "pending")]
        ),
        2.0
    );
    assert_eq!(v("cnsm.instances.active", &[("cnsm.state", "paid")]), 0.0);
    assert!(v("cnsm.store.commit.duration", &[]) >= 3.0);
    // Recorded by the metrics thread right after the batch's histograms.
    let exemplar = exemplar_of(&exemplars, "order", &trace_id).await;
    let exemplar = exemplar.expect("the traced transition's exemplar");
    assert_eq!(exemplar.time_ms, paid.record.time_ms);
    runtime.shutdown();
}

/// The exemplar carrying `trace_id` in any of a machine's duration buckets, waited for (the
/// metrics thread records it just after the batch's histograms), or `None` after 5 s.
async fn exemplar_of(
    exemplars: &cnsm_runtime::telemetry::TransitionExemplars,
    machine: &str,
    trace_id: &str,
) -> Option<cnsm_runtime::telemetry::Exemplar> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found = (0..=cnsm_runtime::telemetry::DURATION_BUCKETS_S.len())
            .filter_map(|b| exemplars.get(machine, b))
            .find(|e| e.trace_id_hex() == trace_id);
        if found.is_some() || std::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A request whose deadline passes while its event waits is refused as `Timeout`: not applied,
/// its span in error with `error.type=Timeout`, counted by `cnsm.transition.errors`. A traced
/// transition leaves its trace id as the exemplar of its `cnsm.transition.duration` bucket.
#[tokio::test]
async fn timed_out_requests_are_timeout_errors_and_durations_keep_exemplars() {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let spans = InMemorySpanExporter::default();
    let tracer = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let metrics = InMemoryMetricExporter::default();
    let reader = PeriodicReader::builder(metrics.clone())
        .with_interval(Duration::from_secs(3600))
        .build();
    let meters = SdkMeterProvider::builder().with_reader(reader).build();
    let telemetry = Telemetry::default()
        .with_tracer(BoxedTracer::new(Box::new(tracer.tracer("cnsm"))))
        .with_meter(&meters.meter("cnsm"));
    let exemplars = telemetry.exemplars().expect("metrics are on");
    let runtime = Runtime::open_shared(
        Arc::clone(&store),
        RuntimeOptions::default().with_telemetry(telemetry),
    )
    .unwrap();
    runtime.apply_yaml(MACHINE, None).await.unwrap();
    runtime
        .create_instance(CreateInstance::new("default", "order").id("t-1"))
        .await
        .unwrap();

    // A deadline that has already passed: the caller gets Timeout, the event is not applied.
    let late = EventRequest::new("pay")
        .payload(serde_json::json!({"amount": 99}))
        .deadline(std::time::Instant::now());
    let error = runtime.send("default", "t-1", late).await.unwrap_err();
    assert_eq!(error.error_type(), "Timeout", "{error}");
    // The next event queues behind it, so the committer has refused it by then.
    let outcome = runtime
        .send(
            "default",
            "t-1",
            EventRequest::new("pay")
                .payload(serde_json::json!({"amount": 5}))
                .traced(TraceParent::parse(PARENT, None).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(
        outcome.record.version, 1,
        "the timed-out event was not applied"
    );
    assert_eq!(&*outcome.instance.state, "pending");
    let timed_out: Vec<SpanData> = transitions(&spans)
        .into_iter()
        .filter(|s| attr(s, "error.type").as_deref() == Some("Timeout"))
        .collect();
    assert_eq!(timed_out.len(), 1, "one span per attempt");
    assert!(matches!(timed_out[0].status, Status::Error { .. }));

    let trace_id = outcome
        .record
        .trace
        .as_ref()
        .expect("traced")
        .trace_id
        .clone();
    assert_eq!(trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    // Histograms and exemplars are recorded by the metrics thread just after each batch.
    let exemplar = exemplar_of(&exemplars, "order", &trace_id).await;
    let exemplar = exemplar.expect("an exemplar with the transition's trace id");
    assert_eq!(exemplar.time_ms, outcome.record.time_ms);
    let bucket = cnsm_runtime::telemetry::TransitionExemplars::bucket_of(exemplar.value_s);
    assert_eq!(
        exemplars.get("order", bucket).map(|e| e.trace_id_hex()),
        Some(trace_id)
    );
    // Creates and controls past their deadline: refused as Timeout, counted and spanned the
    // same way, nothing applied.
    let error = runtime
        .create_instance(
            CreateInstance::new("default", "order")
                .id("t-late")
                .deadline(std::time::Instant::now()),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RuntimeError::Timeout(_)), "{error:?}");
    assert!(matches!(
        runtime.instance("default", "t-late").await,
        Err(RuntimeError::NotFound(_))
    ));
    let error = runtime
        .control(
            "default",
            "t-1",
            ControlRequest::new(Control::Suspend).deadline(std::time::Instant::now()),
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RuntimeError::Timeout(_)), "{error:?}");
    let t1 = runtime.instance("default", "t-1").await.unwrap();
    assert_eq!(t1.version, 1, "the timed-out suspend was not applied");
    // The callers got Timeout at once (their deadline had passed); the committer refuses the
    // queued commands, and ends their spans, when it takes them.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let timed_out = loop {
        let timed_out: Vec<String> = transitions(&spans)
            .into_iter()
            .filter(|s| attr(s, "error.type").as_deref() == Some("Timeout"))
            .filter_map(|s| attr(&s, "cnsm.trigger"))
            .collect();
        if timed_out.len() >= 3 || std::time::Instant::now() > deadline {
            break timed_out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(timed_out, ["event", "create", "control"]);
    metrics.reset();
    meters.force_flush().unwrap();
    assert_eq!(
        metric_value(
            &metrics,
            "cnsm.transition.errors",
            &[("error.type", "Timeout")]
        ),
        3.0
    );
    runtime.shutdown();
}

/// Controls move `cnsm.instances.active` like events: a suspended instance still counts once in
/// its state, a cancelled one no longer counts.
#[tokio::test]
async fn controls_keep_the_active_gauge_exact() {
    use opentelemetry_sdk::metrics::InMemoryMetricExporter;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let (exporter, provider, telemetry) = metered();
    let runtime =
        Runtime::open_shared(store, RuntimeOptions::default().with_telemetry(telemetry)).unwrap();
    runtime.apply_yaml(MACHINE, None).await.unwrap();
    for id in ["c-1", "c-2"] {
        runtime
            .create_instance(CreateInstance::new("default", "order").id(id))
            .await
            .unwrap();
    }
    let pending = |exporter: &InMemoryMetricExporter| {
        exporter.reset();
        provider.force_flush().unwrap();
        metric_value(
            exporter,
            "cnsm.instances.active",
            &[("cnsm.machine.name", "order"), ("cnsm.state", "pending")],
        )
    };
    assert_eq!(pending(&exporter), 2.0);
    for (action, expected) in [
        (Control::Suspend, 2.0),
        (Control::Resume, 2.0),
        (Control::Cancel, 1.0),
    ] {
        runtime
            .control("default", "c-1", ControlRequest::new(action))
            .await
            .unwrap();
        assert_eq!(pending(&exporter), expected, "after {action:?}");
    }
    runtime.shutdown();
}
