//! Telemetry of the runtime (DESIGN.md §5): one `cnsm.transition` span per attempted transition,
//! the `cnsm.*` metrics, and [`TransitionHook`]s for embedders.
//!
//! The runtime only uses the OpenTelemetry *API*: the caller hands it a tracer and a meter in
//! [`Telemetry`] (built from whatever SDK and exporters the binary wires); nothing global is
//! read or installed. With [`Telemetry::default`] everything here is off and costs one branch.
//!
//! Spans are created on the committer thread, which handles whole batches, so the parent is
//! carried with each queued request (the W3C trace context of the incoming request) and each
//! span starts at the request's receipt time and ends after the durable commit. The span's ids
//! are written into the history record (`StateChangeEvent.trace`), so a record leads to its
//! trace.
//!
//! Metrics are aggregated per batch where they can be (counters), recorded per transition where
//! they must be (histograms), with attribute sets built once per machine. Label cardinality is
//! bounded: machine names, state names, triggers and `error.type`, never instance ids.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cnsm_core::Instance;
use cnsm_core::record::{Hash32, StateChangeEvent, TraceContext};
use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status as SpanStatus, TraceContextExt,
    TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};

use crate::RuntimeError;

/// The span of one attempted transition.
pub const SPAN_TRANSITION: &str = "cnsm.transition";

/// Bucket bounds (seconds) of every duration histogram: 10 µs up to 60 s.
pub const DURATION_BUCKETS_S: [f64; 22] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// What caused an attempted transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// Instance creation (the genesis record).
    Create,
    /// An event sent by a caller.
    Event,
    /// A state timeout or a wait elapsed.
    Timer,
    /// A retry back-off ended.
    Retry,
    /// An operator control (cancel, suspend, resume, redrive).
    Control,
    /// A migration step (its lock, or its migration record).
    Migration,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Create => "create",
            Trigger::Event => "event",
            Trigger::Timer => "timer",
            Trigger::Retry => "retry",
            Trigger::Control => "control",
            Trigger::Migration => "migration",
        }
    }
}

/// What a [`TransitionHook`] sees of one attempted transition: the state context (machine,
/// revision, state, version), the trigger, and the span context (trace) of the transition.
#[derive(Debug, Clone, Copy)]
pub struct TransitionContext<'a> {
    pub namespace: &'a str,
    pub instance: &'a str,
    /// Unknown when the instance was not found.
    pub machine: Option<&'a str>,
    pub revision: Option<u32>,
    /// The state before the transition (none for creation).
    pub state: Option<&'a str>,
    /// The version before the transition (none for creation).
    pub version: Option<u64>,
    /// The event name (none for timers and creation).
    pub event: Option<&'a str>,
    pub trigger: Trigger,
    pub actor: &'a str,
    /// The trace and span ids of the transition's span (what the record will carry).
    pub trace: Option<&'a TraceContext>,
}

/// In-process observer of transitions for embedding applications, without OpenTelemetry.
///
/// Called on the committer thread: `before` once the instance is loaded and just before the
/// engine decides, `after` once the record is durable (before the caller is answered), `error`
/// when the attempt is rejected or its commit fails. Keep them quick; they are on the hot path.
pub trait TransitionHook: Send + Sync + 'static {
    fn before(&self, cx: &TransitionContext<'_>) {
        let _ = cx;
    }
    fn after(&self, cx: &TransitionContext<'_>, record: &StateChangeEvent, hash: Hash32) {
        let _ = (cx, record, hash);
    }
    fn error(&self, cx: &TransitionContext<'_>, error: &RuntimeError) {
        let _ = (cx, error);
    }
}

/// The incoming W3C trace context of a request: the parent of its transition span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub context: TraceContext,
    /// The `sampled` bit of `trace-flags`.
    pub sampled: bool,
    /// The `tracestate` header (or CloudEvents attribute), as received.
    pub tracestate: Option<String>,
}

impl TraceParent {
    /// Parses `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`; later versions may append fields)
    /// and an optional `tracestate`. `None` when the traceparent is invalid.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceParent> {
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        let [version, trace_id, span_id, flags, rest @ ..] = parts.as_slice() else {
            return None;
        };
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2) || *version == "ff" || (*version == "00" && !rest.is_empty()) {
            return None;
        }
        if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
            return None;
        }
        if trace_id.bytes().all(|b| b == b'0') || span_id.bytes().all(|b| b == b'0') {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceParent {
            context: TraceContext {
                trace_id: (*trace_id).to_owned(),
                span_id: (*span_id).to_owned(),
            },
            sampled: flags & 1 == 1,
            tracestate: tracestate
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        })
    }

    /// The `traceparent` text of a trace context (sampled).
    pub fn format(context: &TraceContext) -> String {
        format!("00-{}-{}-01", context.trace_id, context.span_id)
    }

    fn otel_context(&self) -> Option<Context> {
        let trace_id = TraceId::from_hex(&self.context.trace_id).ok()?;
        let span_id = SpanId::from_hex(&self.context.span_id).ok()?;
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = self
            .tracestate
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let cx = SpanContext::new(trace_id, span_id, flags, true, state);
        Some(Context::new().with_remote_span_context(cx))
    }
}

/// The telemetry a runtime reports to. Cheap to clone; [`Telemetry::default`] is all off.
#[derive(Clone, Default)]
pub struct Telemetry {
    tracer: Option<Arc<BoxedTracer>>,
    metrics: Option<Arc<Metrics>>,
    hooks: Vec<Arc<dyn TransitionHook>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("spans", &self.tracer.is_some())
            .field("metrics", &self.metrics.is_some())
            .field("hooks", &self.hooks.len())
            .finish()
    }
}

impl Telemetry {
    /// Spans go to `tracer` (e.g. `BoxedTracer::new(Box::new(sdk_provider.tracer("cnsm")))`).
    pub fn with_tracer(mut self, tracer: BoxedTracer) -> Telemetry {
        self.tracer = Some(Arc::new(tracer));
        self
    }

    /// Creates the `cnsm.*` instruments on `meter`.
    pub fn with_meter(mut self, meter: &Meter) -> Telemetry {
        self.metrics = Some(Arc::new(Metrics::new(meter)));
        self
    }

    /// Adds an in-process hook.
    pub fn with_hook(mut self, hook: Arc<dyn TransitionHook>) -> Telemetry {
        self.hooks.push(hook);
        self
    }

    pub fn is_enabled(&self) -> bool {
        self.tracer.is_some() || self.metrics.is_some() || !self.hooks.is_empty()
    }

    pub(crate) fn metrics_enabled(&self) -> bool {
        self.metrics.is_some()
    }

    /// The exemplars of `cnsm.transition.duration` (the trace id of the last transition per
    /// machine and bucket), for an OpenMetrics `/metrics`; `None` without metrics.
    pub fn exemplars(&self) -> Option<Arc<TransitionExemplars>> {
        self.metrics.as_ref().map(|m| Arc::clone(&m.exemplars))
    }

    /// Seeds the `cnsm.instances.active` gauge from the instances already in the store.
    pub(crate) fn seed_active(&self, instances: &[Instance]) {
        if let Some(m) = &self.metrics
            && let Ok(mut active) = m.gauges.active.lock()
        {
            for i in instances.iter().filter(|i| !i.status.is_final()) {
                *active
                    .entry((Arc::clone(&i.machine), Arc::clone(&i.state)))
                    .or_insert(0) += 1;
            }
        }
    }

    /// Starts one attempted transition. `None` (and nothing to do later) when telemetry is off.
    pub(crate) fn start(&self, start: AttemptStart<'_>) -> Option<Attempt> {
        if !self.is_enabled() {
            return None;
        }
        // Metrics alone need no names: copy them only for spans and hooks.
        let names = self.tracer.is_some() || !self.hooks.is_empty();
        let mut attempt = Attempt {
            timed: names || evaluation_sampled(),
            trigger: start.trigger,
            prev_active: false,
            received: start.received,
            queue_s: start
                .dequeued
                .saturating_duration_since(start.received)
                .as_secs_f64(),
            evaluation: Duration::ZERO,
            trace: start.parent.map(|p| Box::new(p.context.clone())),
            detail: names.then(|| {
                Box::new(AttemptDetail {
                    namespace: start.namespace.to_owned(),
                    instance: start.instance.to_owned(),
                    event: start.event.map(str::to_owned),
                    actor: start.actor.to_owned(),
                    machine: None,
                    revision: None,
                    from: None,
                    version: None,
                    span: None,
                })
            }),
        };
        if let (Some(tracer), Some(detail)) = (&self.tracer, attempt.detail.as_mut()) {
            let elapsed = Instant::now().saturating_duration_since(start.received);
            let start_time = SystemTime::now()
                .checked_sub(elapsed)
                .unwrap_or_else(SystemTime::now);
            let parent = start
                .parent
                .and_then(TraceParent::otel_context)
                .unwrap_or_default();
            let mut attributes = vec![
                KeyValue::new("cnsm.namespace", detail.namespace.clone()),
                KeyValue::new("cnsm.trigger", start.trigger.as_str()),
            ];
            // A created instance without a given id gets its generated one at commit.
            if !detail.instance.is_empty() {
                attributes.push(KeyValue::new("cnsm.instance.id", detail.instance.clone()));
            }
            if let Some(e) = &detail.event {
                attributes.push(KeyValue::new("cnsm.event.name", e.clone()));
            }
            let mut builder = SpanBuilder::from_name(SPAN_TRANSITION)
                .with_kind(SpanKind::Internal)
                .with_start_time(start_time)
                .with_attributes(attributes);
            if let Some(link) = start.link.and_then(link_of) {
                builder = builder.with_links(vec![opentelemetry::trace::Link::with_context(link)]);
            }
            let span = tracer.build_with_context(builder, &parent);
            let cx = span.span_context();
            if cx.is_valid() {
                attempt.trace = Some(Box::new(TraceContext {
                    trace_id: format!("{:032x}", cx.trace_id()),
                    span_id: format!("{:016x}", cx.span_id()),
                }));
            }
            detail.span = Some(span);
        }
        Some(attempt)
    }

    /// An attempt refused before it reached the committer (arrival checks, a full queue).
    pub(crate) fn rejected(&self, start: AttemptStart<'_>, error: &RuntimeError) {
        if let Some(attempt) = self.start(start) {
            self.failed(attempt, error);
        }
    }

    /// The instance of the attempt is loaded: records the state context, calls `before` hooks.
    pub(crate) fn loaded(&self, attempt: &mut Attempt, instance: &Instance) {
        attempt.prev_active = !instance.status.is_final();
        // Metrics alone take the machine and states from the committed record.
        let Some(detail) = attempt.detail.as_mut() else {
            return;
        };
        detail.machine = Some(Arc::clone(&instance.machine));
        detail.revision = Some(instance.revision);
        detail.from = Some(Arc::clone(&instance.state));
        detail.version = Some(instance.version);
        if let Some(span) = &mut detail.span {
            span.set_attributes([
                KeyValue::new("cnsm.machine.name", instance.machine.to_string()),
                KeyValue::new("cnsm.machine.revision", i64::from(instance.revision)),
                KeyValue::new("cnsm.state.from", instance.state.to_string()),
            ]);
        }
        if !self.hooks.is_empty() {
            let cx = attempt.context();
            for h in &self.hooks {
                h.before(&cx);
            }
        }
    }

    /// A rejected attempt (or one whose commit failed): error status, `error.type`, the error
    /// counter, the `error` hooks.
    pub(crate) fn failed(&self, mut attempt: Attempt, error: &RuntimeError) {
        let error_type = error.error_type();
        if let Some(m) = &self.metrics {
            m.errors.add(1, &[KeyValue::new("error.type", error_type)]);
        }
        if let Some(mut span) = attempt.detail.as_mut().and_then(|d| d.span.take()) {
            span.set_attribute(KeyValue::new("error.type", error_type));
            span.set_status(SpanStatus::error(error.to_string()));
            span.end();
        }
        tracing::debug!(
            namespace = attempt.detail.as_ref().map(|d| d.namespace.as_str()),
            instance = attempt.detail.as_ref().map(|d| d.instance.as_str()),
            error.type = error_type,
            trace_id = attempt.trace.as_ref().map(|t| t.trace_id.as_str()),
            span_id = attempt.trace.as_ref().map(|t| t.span_id.as_str()),
            "transition rejected: {error}"
        );
        for h in &self.hooks {
            h.error(&attempt.context(), error);
        }
    }

    /// The attempts of one durable batch, in item order (with their records), committed.
    /// `conflicts[i]` is the error of an item the store refused.
    pub(crate) fn committed(&self, batch: CommittedBatch<'_>, local: &mut LocalMetrics) {
        let now = Instant::now();
        let commit_s = batch.commit_duration.as_secs_f64();
        if let Some(m) = &self.metrics {
            m.commit_duration.record(commit_s, &[]);
            m.batch_size.record(batch.n_items as u64, &[]);
        }
        local.begin_batch();
        for (attempt, record, hash, error) in batch.items {
            let Some(mut attempt) = attempt else { continue };
            if let Some(detail) = attempt.detail.as_mut()
                && detail.instance.is_empty()
            {
                detail.instance = record.instance.to_string();
                if let Some(span) = &mut detail.span {
                    span.set_attribute(KeyValue::new("cnsm.instance.id", detail.instance.clone()));
                }
            }
            if let Some(error) = error {
                self.failed(attempt, &error);
                continue;
            }
            let machine = self
                .metrics
                .as_ref()
                .map(|_| local.machine_index(&record.machine));
            if let Some(machine) = machine {
                local.count(machine, attempt.trigger);
                if attempt.prev_active
                    && let Some(from) = &record.from
                {
                    local.active(machine, from, -1);
                }
                if !record.status.is_final() {
                    local.active(machine, &record.to, 1);
                }
            }
            let total_s = now
                .saturating_duration_since(attempt.received)
                .as_secs_f64();
            let queue_s = attempt.queue_s;
            let evaluation_s = attempt.evaluation.as_secs_f64();
            if let Some(machine) = machine {
                // Recorded by the metrics thread after the batch (see `Metrics`).
                local.samples.push(Sample {
                    machine,
                    total_s,
                    queue_s,
                    evaluation_s: attempt.timed.then_some(evaluation_s),
                    trace_id: record
                        .trace
                        .as_ref()
                        .and_then(|t| t.trace_id.as_bytes().try_into().ok()),
                    time_ms: record.time_ms,
                });
            }
            if let Some(mut span) = attempt.detail.as_mut().and_then(|d| d.span.take()) {
                let mut attrs = vec![
                    KeyValue::new("cnsm.machine.name", record.machine.to_string()),
                    KeyValue::new("cnsm.machine.revision", i64::from(record.revision)),
                    KeyValue::new("cnsm.state.to", record.to.to_string()),
                    KeyValue::new("cnsm.instance.version", record.version as i64),
                    KeyValue::new("cnsm.record.hash", hash.to_hex()),
                    KeyValue::new("cnsm.duration.queue", queue_s),
                    KeyValue::new("cnsm.duration.evaluation", evaluation_s),
                    KeyValue::new("cnsm.duration.commit", commit_s),
                    KeyValue::new("cnsm.duration.total", total_s),
                ];
                if !record.via.is_empty() {
                    let via: Vec<String> = record.via.iter().map(|v| v.to_string()).collect();
                    attrs.push(KeyValue::new("cnsm.state.via", via.join(",")));
                }
                if let Some(flag) = record.flags.last() {
                    attrs.push(KeyValue::new("feature_flag.key", flag.key.clone()));
                    if let Some(v) = &flag.variant {
                        attrs.push(KeyValue::new("feature_flag.result.variant", v.clone()));
                    }
                    attrs.push(KeyValue::new(
                        "feature_flag.result.reason",
                        flag.reason.to_lowercase(),
                    ));
                    attrs.push(KeyValue::new("feature_flag.provider.name", "cnsm"));
                }
                span.set_attributes(attrs);
                for g in &record.guards {
                    span.add_event(
                        "cnsm.guard",
                        vec![
                            KeyValue::new("cnsm.guard.state", g.state.to_string()),
                            KeyValue::new("cnsm.guard.entry", g.entry.to_string()),
                            KeyValue::new("cnsm.guard.result", g.result),
                        ],
                    );
                }
                for f in &record.flags {
                    let mut attrs = vec![
                        KeyValue::new("feature_flag.key", f.key.clone()),
                        KeyValue::new("feature_flag.result.reason", f.reason.to_lowercase()),
                        KeyValue::new("cnsm.flag.allowed", f.allowed),
                    ];
                    if let Some(v) = &f.variant {
                        attrs.push(KeyValue::new("feature_flag.result.variant", v.clone()));
                    }
                    if let Some(e) = &f.error {
                        attrs.push(KeyValue::new("error.type", e.clone()));
                    }
                    span.add_event("feature_flag.evaluation", attrs);
                }
                span.end();
            }
            tracing::debug!(
                namespace = %record.namespace,
                instance = %record.instance,
                machine = %record.machine,
                from = record.from.as_deref(),
                to = %record.to,
                version = record.version,
                trace_id = record.trace.as_ref().map(|t| t.trace_id.as_str()),
                span_id = record.trace.as_ref().map(|t| t.span_id.as_str()),
                "transition committed"
            );
            if !self.hooks.is_empty() {
                let cx = attempt.context();
                for h in &self.hooks {
                    h.after(&cx, record, hash);
                }
            }
        }
        if let Some(m) = &self.metrics {
            for (machine, trigger, n) in local.counts.drain(..) {
                let machine = &local.machines[machine as usize];
                m.transitions.add(
                    n,
                    &[
                        KeyValue::new("cnsm.machine.name", machine.to_string()),
                        KeyValue::new("cnsm.trigger", trigger.as_str()),
                    ],
                );
            }
            if !local.active_delta.is_empty()
                && let Ok(mut active) = m.gauges.active.lock()
            {
                for (machine, state, d) in local.active_delta.drain(..) {
                    let key = (Arc::clone(&local.machines[machine as usize]), state);
                    let n = active.entry(key).or_insert(0);
                    *n += d;
                }
                active.retain(|_, n| *n > 0);
            }
            m.send_samples(local);
        }
    }

    /// A timer fired `lateness` after its due time.
    pub(crate) fn timer_fired(&self, lateness: Duration) {
        if let Some(m) = &self.metrics {
            m.timer_lateness.record(lateness.as_secs_f64(), &[]);
        }
    }

    /// The timers pending in the index after a batch.
    pub(crate) fn timers_pending(&self, n: usize) {
        if let Some(m) = &self.metrics {
            m.gauges.timers_pending.store(n as u64, Ordering::Relaxed);
        }
    }
}

/// The parent link of a timer's span: the trace of the record that armed it.
fn link_of(trace: &TraceContext) -> Option<SpanContext> {
    let trace_id = TraceId::from_hex(&trace.trace_id).ok()?;
    let span_id = SpanId::from_hex(&trace.span_id).ok()?;
    let cx = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// What starts an attempt.
pub(crate) struct AttemptStart<'a> {
    pub trigger: Trigger,
    pub namespace: &'a str,
    pub instance: &'a str,
    pub event: Option<&'a str>,
    pub actor: &'a str,
    pub received: Instant,
    /// When the committer took it (one clock read per batch).
    pub dequeued: Instant,
    pub parent: Option<&'a TraceParent>,
    /// For timers: the trace of the record that armed the timer.
    pub link: Option<&'a TraceContext>,
}

/// One attempted transition in flight on the committer. Small and unboxed: with metrics only
/// it is all there is (no allocation per transition); names, state context and the span are in
/// `detail`, only with spans or hooks.
pub(crate) struct Attempt {
    /// Whether the committer times this attempt's evaluation (see [`EVALUATION_SAMPLE_EVERY`]).
    pub(crate) timed: bool,
    trigger: Trigger,
    /// Whether the instance counted in `cnsm.instances.active` before the transition.
    prev_active: bool,
    received: Instant,
    /// Receipt until the committer took it.
    queue_s: f64,
    pub(crate) evaluation: Duration,
    /// The trace context the record carries: the span's ids, or the caller's without a tracer.
    pub(crate) trace: Option<Box<TraceContext>>,
    detail: Option<Box<AttemptDetail>>,
}

/// What spans and hooks need of an attempt beyond its timing.
struct AttemptDetail {
    namespace: String,
    instance: String,
    event: Option<String>,
    actor: String,
    machine: Option<Arc<str>>,
    revision: Option<u32>,
    from: Option<Arc<str>>,
    version: Option<u64>,
    span: Option<BoxedSpan>,
}

impl Attempt {
    fn context(&self) -> TransitionContext<'_> {
        let d = self.detail.as_deref();
        TransitionContext {
            namespace: d.map_or("", |d| &d.namespace),
            instance: d.map_or("", |d| &d.instance),
            machine: d.and_then(|d| d.machine.as_deref()),
            revision: d.and_then(|d| d.revision),
            state: d.and_then(|d| d.from.as_deref()),
            version: d.and_then(|d| d.version),
            event: d.and_then(|d| d.event.as_deref()),
            trigger: self.trigger,
            actor: d.map_or("", |d| &d.actor),
            trace: self.trace.as_deref(),
        }
    }
}

/// The items of one durable batch for [`Telemetry::committed`].
pub(crate) struct CommittedBatch<'a> {
    pub n_items: usize,
    pub commit_duration: Duration,
    #[allow(clippy::type_complexity)]
    pub items: Vec<(
        Option<Attempt>,
        &'a StateChangeEvent,
        Hash32,
        Option<RuntimeError>,
    )>,
}

/// One committed transition's timings, for the histograms.
struct Sample {
    /// Index into the batch's machines.
    machine: u32,
    total_s: f64,
    queue_s: f64,
    /// `None` when the attempt was not timed (see [`EVALUATION_SAMPLE_EVERY`]).
    evaluation_s: Option<f64>,
    /// The record's trace id as its 32 hex digits (parsed off the committer, for the exemplar
    /// of its duration bucket), and its commit time.
    trace_id: Option<[u8; 32]>,
    time_ms: u64,
}

/// Most machines whose duration buckets keep exemplars (later machines get none).
pub const EXEMPLAR_MACHINES_MAX: usize = 1_000;

/// One exemplar of a `cnsm.transition.duration` bucket: the trace of the last sampled
/// transition that fell in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exemplar {
    pub trace_id: u128,
    pub value_s: f64,
    /// The record's time (milliseconds since the epoch).
    pub time_ms: u64,
}

impl Exemplar {
    /// The trace id as 32 lower-case hex digits (W3C form).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// The exemplars of `cnsm.transition.duration`: per machine (bounded by
/// [`EXEMPLAR_MACHINES_MAX`]) and per bucket (the [`DURATION_BUCKETS_S`] bounds, then +Inf),
/// the last transition with a trace id. Written by the metrics thread once per batch, read by
/// the `/metrics` renderer; fixed-size slots, so recording allocates only for a new machine.
#[derive(Debug, Default)]
pub struct TransitionExemplars {
    slots: Mutex<HashMap<Arc<str>, [Option<Exemplar>; DURATION_BUCKETS_S.len() + 1]>>,
}

impl TransitionExemplars {
    /// The index of the bucket a duration falls in (`le` is inclusive, as Prometheus counts).
    pub fn bucket_of(value_s: f64) -> usize {
        DURATION_BUCKETS_S
            .iter()
            .position(|bound| value_s <= *bound)
            .unwrap_or(DURATION_BUCKETS_S.len())
    }

    /// The exemplar of a machine's bucket (`bucket` as [`TransitionExemplars::bucket_of`]).
    pub fn get(&self, machine: &str, bucket: usize) -> Option<Exemplar> {
        let slots = self.slots.lock().ok()?;
        slots.get(machine)?.get(bucket).copied().flatten()
    }

    fn record(&self, batch: &SampleBatch) {
        if batch.samples.iter().all(|s| s.trace_id.is_none()) {
            return;
        }
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        for s in &batch.samples {
            let Some(trace_id) = s.trace_id.as_ref().and_then(trace_id_of) else {
                continue;
            };
            let machine = &batch.machines[s.machine as usize];
            if !slots.contains_key(machine) {
                if slots.len() >= EXEMPLAR_MACHINES_MAX {
                    continue;
                }
                slots.insert(Arc::clone(machine), [None; DURATION_BUCKETS_S.len() + 1]);
            }
            if let Some(buckets) = slots.get_mut(machine) {
                buckets[TransitionExemplars::bucket_of(s.total_s)] = Some(Exemplar {
                    trace_id,
                    value_s: s.total_s,
                    time_ms: s.time_ms,
                });
            }
        }
    }
}

/// A W3C trace id (32 hex digits) as a number; `None` when malformed or all zeros.
fn trace_id_of(hex: &[u8; 32]) -> Option<u128> {
    let hex = std::str::from_utf8(hex).ok()?;
    u128::from_str_radix(hex, 16).ok().filter(|id| *id != 0)
}

/// Longest list [`LocalMetrics`] merges by a linear scan; past it, entries are appended
/// unmerged (they are summed when applied), so a batch costs linear time whatever its shape.
const LOCAL_MERGE_MAX: usize = 64;

/// The committer's side of the metrics for one batch: the machines it touched (samples and
/// counts refer to them by index, so the per-transition work is a push and a short scan),
/// transition counts, `cnsm.instances.active` deltas, and the samples the metrics thread
/// records. Attribute sets are built once per machine (for recording inline when the metrics
/// thread lags).
#[derive(Default)]
pub(crate) struct LocalMetrics {
    machines: Vec<Arc<str>>,
    /// `machines` by name, for batches of many machines.
    by_name: HashMap<Arc<str>, u32>,
    samples: Vec<Sample>,
    counts: Vec<(u32, Trigger, u64)>,
    active_delta: Vec<(u32, Arc<str>, i64)>,
    machine_attrs: MachineAttrs,
}

impl LocalMetrics {
    fn begin_batch(&mut self) {
        self.machines.clear();
        self.by_name.clear();
        self.counts.clear();
        self.active_delta.clear();
    }

    fn machine_index(&mut self, machine: &Arc<str>) -> u32 {
        let n = self.machines.len();
        let found = match self.machines.last() {
            Some(last) if Arc::ptr_eq(last, machine) => Some(n - 1),
            _ if n <= LOCAL_MERGE_MAX => self.machines.iter().position(|m| m == machine),
            _ => self.by_name.get(machine).map(|i| *i as usize),
        };
        let i = found.unwrap_or_else(|| {
            self.machines.push(Arc::clone(machine));
            self.by_name.insert(Arc::clone(machine), n as u32);
            n
        });
        i as u32
    }

    fn count(&mut self, machine: u32, trigger: Trigger) {
        match self
            .counts
            .iter_mut()
            .take(LOCAL_MERGE_MAX)
            .find(|(m, t, _)| *m == machine && *t == trigger)
        {
            Some((_, _, n)) => *n += 1,
            None => self.counts.push((machine, trigger, 1)),
        }
    }

    /// Merged by the state's allocation (states of one revision share theirs), so the scan
    /// compares pointers, not names; the same name from another allocation gets its own entry
    /// and the entries are summed by name when applied.
    fn active(&mut self, machine: u32, state: &Arc<str>, delta: i64) {
        match self
            .active_delta
            .iter_mut()
            .take(LOCAL_MERGE_MAX)
            .find(|(m, s, _)| *m == machine && Arc::ptr_eq(s, state))
        {
            Some((_, _, n)) => *n += delta,
            None => self.active_delta.push((machine, Arc::clone(state), delta)),
        }
    }
}

/// Emptied sample buffers kept for reuse.
const SPARE_BUFFERS_MAX: usize = 4;

/// Batches waiting for the metrics thread before the committer records inline instead.
const PENDING_BATCHES_MAX: usize = 1024;

/// How long the metrics thread lets batches gather after a pass with work.
const METRICS_GATHER: Duration = Duration::from_millis(1);

/// The hand-off from the committer to the `cnsm-metrics` thread. A push is a short lock and no
/// system call while the thread is busy (it polls every [`METRICS_GATHER`] while there is
/// work); only a push that finds it parked wakes it.
#[derive(Default)]
struct SampleQueue {
    pending: Mutex<Vec<SampleBatch>>,
    wake: std::sync::Condvar,
    parked: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
    /// Sample buffers the metrics thread has emptied, for the committer to fill again.
    spare: Mutex<Vec<Vec<Sample>>>,
}

impl SampleQueue {
    /// Queues a batch; gives it back when the thread is too far behind (or gone).
    fn push(&self, batch: SampleBatch) -> Result<(), SampleBatch> {
        let Ok(mut pending) = self.pending.lock() else {
            return Err(batch);
        };
        if pending.len() >= PENDING_BATCHES_MAX || self.closed.load(Ordering::SeqCst) {
            return Err(batch);
        }
        pending.push(batch);
        drop(pending);
        if self.parked.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// The batches queued so far, waiting (parked) while there are none; `None` once closed.
    fn take(&self) -> Option<Vec<SampleBatch>> {
        let mut pending = self.pending.lock().ok()?;
        while pending.is_empty() {
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            // Set under the lock: a push after this sees it and wakes the thread.
            self.parked.store(true, Ordering::SeqCst);
            pending = self
                .wake
                .wait_timeout(pending, Duration::from_millis(500))
                .ok()?
                .0;
            self.parked.store(false, Ordering::SeqCst);
        }
        Some(std::mem::take(&mut *pending))
    }

    fn give_back(&self, buffer: Vec<Sample>) {
        if let Ok(mut spare) = self.spare.lock()
            && spare.len() < SPARE_BUFFERS_MAX
        {
            spare.push(buffer);
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Under the lock, so a thread about to park sees `closed` or gets the notification.
        let _pending = self.pending.lock();
        self.wake.notify_all();
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.samples.close();
    }
}

/// One batch's samples and the machines they name, as the metrics thread receives them.
struct SampleBatch {
    machines: Vec<Arc<str>>,
    samples: Vec<Sample>,
}

/// Transitions whose evaluation time is measured when only metrics are on: one in this many
/// (two clock reads cost about a fifth of an engine transition on a virtual machine). With
/// spans or hooks every attempt is timed.
pub const EVALUATION_SAMPLE_EVERY: u32 = 16;

/// Whether this attempt's evaluation is timed (metrics only: one in
/// [`EVALUATION_SAMPLE_EVERY`] per thread, starting with the first).
fn evaluation_sampled() -> bool {
    thread_local! {
        static TICK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    TICK.with(|t| {
        let n = t.get();
        t.set(if n + 1 == EVALUATION_SAMPLE_EVERY {
            0
        } else {
            n + 1
        });
        n == 0
    })
}

/// `cnsm.machine.name` attribute sets, built once per machine.
#[derive(Default)]
struct MachineAttrs(HashMap<Arc<str>, Vec<KeyValue>>);

impl MachineAttrs {
    fn get(&mut self, machine: &Arc<str>) -> &[KeyValue] {
        let map = &mut self.0;
        if !map.contains_key(machine) {
            if map.len() > 10_000 {
                map.clear();
            }
            map.insert(
                Arc::clone(machine),
                vec![KeyValue::new("cnsm.machine.name", machine.to_string())],
            );
        }
        map.get(machine).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// A (machine, state) label pair of `cnsm.instances.active`.
type MachineState = (Arc<str>, Arc<str>);

#[derive(Default)]
struct Gauges {
    active: Mutex<HashMap<MachineState, i64>>,
    timers_pending: AtomicU64,
}

struct Metrics {
    transitions: Counter<u64>,
    duration: Histogram<f64>,
    queue: Histogram<f64>,
    evaluation: Histogram<f64>,
    errors: Counter<u64>,
    timer_lateness: Histogram<f64>,
    commit_duration: Histogram<f64>,
    batch_size: Histogram<u64>,
    gauges: Arc<Gauges>,
    _observed: (ObservableGauge<i64>, ObservableGauge<u64>),
    /// The per-transition histogram records happen on a `cnsm-metrics` thread, one hand-off
    /// per batch, so the committer (the serial path) pays a `Vec` push per transition instead
    /// of three SDK records. When the hand-off queue is full the committer records inline.
    samples: Arc<SampleQueue>,
    exemplars: Arc<TransitionExemplars>,
}

/// Records a batch's samples on the three transition histograms, and the duration exemplars.
fn record_samples(
    batch: &SampleBatch,
    attrs: &mut MachineAttrs,
    histograms: &(Histogram<f64>, Histogram<f64>, Histogram<f64>),
    exemplars: &TransitionExemplars,
) {
    let (duration, queue, evaluation) = histograms;
    for s in &batch.samples {
        let attrs = attrs.get(&batch.machines[s.machine as usize]);
        duration.record(s.total_s, attrs);
        // One queue for every machine: no attributes (and the SDK's cheapest record).
        queue.record(s.queue_s, &[]);
        if let Some(e) = s.evaluation_s {
            evaluation.record(e, attrs);
        }
    }
    exemplars.record(batch);
}

impl Metrics {
    fn send_samples(&self, local: &mut LocalMetrics) {
        if local.samples.is_empty() {
            return;
        }
        // A buffer the metrics thread gave back (no allocation per batch), else a new one.
        let spare = self
            .samples
            .spare
            .lock()
            .ok()
            .and_then(|mut spare| spare.pop())
            .unwrap_or_else(|| Vec::with_capacity(local.samples.len()));
        let batch = SampleBatch {
            machines: local.machines.clone(),
            samples: std::mem::replace(&mut local.samples, spare),
        };
        if let Err(batch) = self.samples.push(batch) {
            let histograms = (
                self.duration.clone(),
                self.queue.clone(),
                self.evaluation.clone(),
            );
            record_samples(
                &batch,
                &mut local.machine_attrs,
                &histograms,
                &self.exemplars,
            );
        }
    }

    fn new(meter: &Meter) -> Metrics {
        let buckets = DURATION_BUCKETS_S.to_vec();
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(buckets.clone())
                .build()
        };
        let gauges = Arc::new(Gauges::default());
        let g = Arc::clone(&gauges);
        let active = meter
            .i64_observable_gauge("cnsm.instances.active")
            .with_description("Instances not in a final status, by machine and state")
            .with_callback(move |observer| {
                if let Ok(active) = g.active.lock() {
                    for ((machine, state), n) in active.iter() {
                        observer.observe(
                            *n,
                            &[
                                KeyValue::new("cnsm.machine.name", machine.to_string()),
                                KeyValue::new("cnsm.state", state.to_string()),
                            ],
                        );
                    }
                }
            })
            .build();
        let g = Arc::clone(&gauges);
        let pending = meter
            .u64_observable_gauge("cnsm.timers.pending")
            .with_description("Durable timers waiting in the timer index")
            .with_callback(move |observer| {
                observer.observe(g.timers_pending.load(Ordering::Relaxed), &[]);
            })
            .build();
        let duration = seconds(
            "cnsm.transition.duration",
            "Event receipt to durable commit, per committed transition",
        );
        let queue = seconds(
            "cnsm.transition.queue.duration",
            "Event receipt until the committer took it into a batch",
        );
        let evaluation = seconds(
            "cnsm.transition.evaluation.duration",
            "Engine evaluation (guards, assignments, choices) of one transition; with metrics \
             only, one in 16 transitions is timed",
        );
        let samples = Arc::new(SampleQueue::default());
        let histograms = (duration.clone(), queue.clone(), evaluation.clone());
        let exemplars = Arc::new(TransitionExemplars::default());
        let recorded = Arc::clone(&exemplars);
        let queue_of_thread = Arc::clone(&samples);
        // Ends when this `Metrics` is dropped (it closes the queue).
        let _ = std::thread::Builder::new()
            .name("cnsm-metrics".into())
            .spawn(move || {
                let mut attrs = MachineAttrs::default();
                while let Some(batches) = queue_of_thread.take() {
                    for mut batch in batches {
                        record_samples(&batch, &mut attrs, &histograms, &recorded);
                        batch.samples.clear();
                        queue_of_thread.give_back(batch.samples);
                    }
                    // Let the next batches gather: one pass per interval under load, and no
                    // wake-up per batch for the committer to pay.
                    std::thread::sleep(METRICS_GATHER);
                }
            });
        Metrics {
            samples,
            exemplars,
            duration,
            queue,
            evaluation,
            transitions: meter
                .u64_counter("cnsm.transitions")
                .with_description("Committed transitions (records), by machine and trigger")
                .build(),
            errors: meter
                .u64_counter("cnsm.transition.errors")
                .with_description("Rejected transition attempts, by error.type")
                .build(),
            timer_lateness: seconds(
                "cnsm.timer.lateness",
                "How long after its due time a timer fired",
            ),
            commit_duration: seconds(
                "cnsm.store.commit.duration",
                "One durable store commit (group commit), including its fsync",
            ),
            batch_size: meter
                .u64_histogram("cnsm.store.commit.batch_size")
                .with_description("Records per durable store commit")
                .with_boundaries(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
                ])
                .build(),
            gauges,
            _observed: (active, pending),
        }
    }
}

/// The committer's telemetry calls around engine steps (start, loaded, timed evaluation, one
/// `committed` per batch), driven by a caller that runs the engine itself: public so the
/// telemetry benchmark measures the runtime's own per-transition code. Not a stable API.
#[doc(hidden)]
pub struct CommitterTelemetry {
    telemetry: Telemetry,
    local: LocalMetrics,
    attempts: Vec<Option<Attempt>>,
}

impl CommitterTelemetry {
    pub fn new(telemetry: Telemetry) -> CommitterTelemetry {
        CommitterTelemetry {
            telemetry,
            local: LocalMetrics::default(),
            attempts: Vec::new(),
        }
    }

    /// One event taken into the current batch: `apply` is the engine step.
    pub fn transition<T>(
        &mut self,
        instance: &Instance,
        event: &str,
        received: Instant,
        dequeued: Instant,
        apply: impl FnOnce() -> T,
    ) -> T {
        let mut attempt = self.telemetry.start(AttemptStart {
            trigger: Trigger::Event,
            namespace: &instance.namespace,
            instance: &instance.id,
            event: Some(event),
            actor: "bench",
            received,
            dequeued,
            parent: None,
            link: None,
        });
        let evaluated = match attempt.as_mut() {
            Some(a) => {
                self.telemetry.loaded(a, instance);
                a.timed.then(Instant::now)
            }
            None => None,
        };
        let out = apply();
        if let (Some(a), Some(t)) = (attempt.as_mut(), evaluated) {
            a.evaluation = t.elapsed();
        }
        self.attempts.push(attempt);
        out
    }

    /// The batch's records (one per [`CommitterTelemetry::transition`], in order) committed.
    pub fn committed(&mut self, records: &[StateChangeEvent], commit_duration: Duration) {
        let attempts = std::mem::take(&mut self.attempts);
        if !self.telemetry.is_enabled() {
            return;
        }
        let batch = CommittedBatch {
            n_items: records.len(),
            commit_duration,
            items: attempts
                .into_iter()
                .zip(records)
                .map(|(a, r)| (a, r, Hash32::default(), None))
                .collect(),
        };
        self.telemetry.committed(batch, &mut self.local);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_flags_and_state() {
        let p = TraceParent::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            Some("congo=t61rcWkgMzE"),
        )
        .expect("valid");
        assert!(!p.sampled);
        assert_eq!(p.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert_eq!(
            TraceParent::format(&p.context),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceParent::parse(bad, None), None, "{bad}");
        }
    }

    #[test]
    fn one_evaluation_in_sixteen_is_timed_per_thread() {
        std::thread::spawn(|| {
            let timed: Vec<bool> = (0..2 * EVALUATION_SAMPLE_EVERY)
                .map(|_| evaluation_sampled())
                .collect();
            assert!(timed[0], "the first attempt on a thread is timed");
            assert_eq!(timed.iter().filter(|t| **t).count(), 2);
            assert!(timed[EVALUATION_SAMPLE_EVERY as usize]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn local_metrics_merge_per_machine_and_state() {
        let mut local = LocalMetrics::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let same_name: Arc<str> = Arc::from("a");
        let s: Arc<str> = Arc::from("s");
        local.begin_batch();
        let (ia, ib, isame) = (
            local.machine_index(&a),
            local.machine_index(&b),
            local.machine_index(&same_name),
        );
        assert_eq!((ia, ib, isame), (0, 1, 0));
        local.count(ia, Trigger::Event);
        local.count(isame, Trigger::Event);
        local.count(ib, Trigger::Timer);
        local.active(ia, &s, 1);
        local.active(isame, &s, -1);
        assert_eq!(local.machines.len(), 2, "machines are matched by name");
        assert_eq!(
            local.counts,
            vec![(0, Trigger::Event, 2), (1, Trigger::Timer, 1)]
        );
        assert_eq!(local.active_delta.len(), 1);
        assert_eq!(local.active_delta[0].2, 0);
        // The same name in another allocation: its own entry (summed by name when applied).
        let s_again: Arc<str> = Arc::from("s");
        local.active(ia, &s_again, 1);
        assert_eq!(local.active_delta.len(), 2);
        // Past LOCAL_MERGE_MAX distinct entries, more are appended unmerged (summed later).
        local.begin_batch();
        for i in 0..LOCAL_MERGE_MAX + 10 {
            let m: Arc<str> = Arc::from(format!("m{i}"));
            let i = local.machine_index(&m);
            local.count(i, Trigger::Event);
        }
        let i = local.machine_index(&Arc::from("m70"));
        assert_eq!(i, 70, "found by name past the scan length");
        local.count(i, Trigger::Event);
        assert_eq!(local.counts.len(), LOCAL_MERGE_MAX + 11);
        assert_eq!(local.machines.len(), LOCAL_MERGE_MAX + 10);
    }

    #[test]
    fn disabled_telemetry_starts_nothing() {
        let t = Telemetry::default();
        assert!(!t.is_enabled());
        let started = t.start(AttemptStart {
            trigger: Trigger::Event,
            namespace: "default",
            instance: "a",
            event: Some("go"),
            actor: "me",
            received: Instant::now(),
            dequeued: Instant::now(),
            parent: None,
            link: None,
        });
        assert!(started.is_none());
    }
}
