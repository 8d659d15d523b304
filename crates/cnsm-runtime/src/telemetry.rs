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
    /// Every trigger, in [`Trigger::index`] order.
    pub const ALL: [Trigger; 6] = [
        Trigger::Create,
        Trigger::Event,
        Trigger::Timer,
        Trigger::Retry,
        Trigger::Control,
        Trigger::Migration,
    ];

    /// The position of the trigger in [`Trigger::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

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
    #[inline]
    pub(crate) fn start(&self, start: AttemptStart<'_>) -> Option<Attempt> {
        if !self.is_enabled() {
            return None;
        }
        if self.tracer.is_none() && self.hooks.is_empty() {
            // Metrics alone need no names, no span and no detail.
            return Some(Attempt {
                timed: evaluation_sampled(),
                trigger: start.trigger,
                prev_active: false,
                received: start.received,
                evaluation: Duration::ZERO,
                trace: start.parent.map(|p| Box::new(p.context.clone())),
                detail: None,
            });
        }
        self.start_detailed(start)
    }

    /// [`Telemetry::start`] with spans or hooks: the names, the state context, the span.
    fn start_detailed(&self, start: AttemptStart<'_>) -> Option<Attempt> {
        let mut attempt = Attempt {
            timed: true,
            trigger: start.trigger,
            prev_active: false,
            received: start.received,
            evaluation: Duration::ZERO,
            trace: start.parent.map(|p| Box::new(p.context.clone())),
            detail: Some(Box::new(AttemptDetail {
                namespace: start.namespace.to_owned(),
                instance: start.instance.to_owned(),
                event: start.event.map(str::to_owned),
                actor: start.actor.to_owned(),
                machine: None,
                revision: None,
                from: None,
                version: None,
                span: None,
            })),
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
    #[inline]
    pub(crate) fn loaded(&self, attempt: &mut Attempt, instance: &Instance) {
        attempt.prev_active = !instance.status.is_final();
        // Metrics alone take the machine and states from the committed record.
        if attempt.detail.is_some() {
            self.loaded_detailed(attempt, instance);
        }
    }

    /// [`Telemetry::loaded`] with spans or hooks: the state context, the `before` hooks.
    fn loaded_detailed(&self, attempt: &mut Attempt, instance: &Instance) {
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
    /// `batch.conflicts` are the items the store refused, with their errors.
    ///
    /// With metrics only, the per-transition work here is a few increments into slots that
    /// [`LocalMetrics`] keeps across batches and one small sample pushed; the durations are
    /// computed by the `cnsm-metrics` thread from the batch's instants.
    pub(crate) fn committed(&self, batch: CommittedBatch<'_>, local: &mut LocalMetrics) {
        let committed_at = Instant::now();
        let commit_s = batch.commit_duration.as_secs_f64();
        if let Some(m) = &self.metrics {
            m.commit_duration.record(commit_s, &[]);
            m.batch_size.record(batch.n_items as u64, &[]);
        }
        if let Some(m) = &self.metrics
            && self.tracer.is_none()
            && self.hooks.is_empty()
            && batch.conflicts.is_empty()
        {
            // Metrics only and nothing refused: count and sample each transition, no more.
            for (attempt, record) in batch.attempts.iter().zip(batch.records) {
                if let Some(attempt) = attempt {
                    local.transition(attempt, record);
                    log_committed(record);
                }
            }
            local.publish(m, batch.dequeued, committed_at);
            return;
        }
        let mut conflicts = batch.conflicts.into_iter().peekable();
        for (index, (attempt, record)) in batch.attempts.into_iter().zip(batch.records).enumerate()
        {
            let Some(mut attempt) = attempt else { continue };
            if let Some(detail) = attempt.detail.as_mut()
                && detail.instance.is_empty()
            {
                detail.instance = record.instance.to_string();
                if let Some(span) = &mut detail.span {
                    span.set_attribute(KeyValue::new("cnsm.instance.id", detail.instance.clone()));
                }
            }
            if conflicts.peek().is_some_and(|(i, _)| *i == index)
                && let Some((_, error)) = conflicts.next()
            {
                self.failed(attempt, &error);
                continue;
            }
            if self.metrics.is_some() {
                local.transition(&attempt, record);
            }
            if let Some(mut span) = attempt.detail.as_mut().and_then(|d| d.span.take()) {
                let total_s = committed_at
                    .saturating_duration_since(attempt.received)
                    .as_secs_f64();
                let queue_s = batch
                    .dequeued
                    .saturating_duration_since(attempt.received)
                    .as_secs_f64();
                let evaluation_s = attempt.evaluation.as_secs_f64();
                let mut attrs = vec![
                    KeyValue::new("cnsm.machine.name", record.machine.to_string()),
                    KeyValue::new("cnsm.machine.revision", i64::from(record.revision)),
                    KeyValue::new("cnsm.state.to", record.to.to_string()),
                    KeyValue::new("cnsm.instance.version", record.version as i64),
                    KeyValue::new("cnsm.record.hash", (batch.hash_of)(index).to_hex()),
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
            log_committed(record);
            if !self.hooks.is_empty() {
                let hash = (batch.hash_of)(index);
                let cx = attempt.context();
                for h in &self.hooks {
                    h.after(&cx, record, hash);
                }
            }
        }
        if let Some(m) = &self.metrics {
            local.publish(m, batch.dequeued, committed_at);
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

/// The debug log line of a committed transition (with its trace, so logs join traces).
#[inline]
fn log_committed(record: &StateChangeEvent) {
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
    /// When the request arrived (its queue wait ends when its batch is taken, see
    /// [`CommittedBatch::dequeued`]).
    received: Instant,
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
    /// Notes the instance as it was before the attempt (whether it counted in
    /// `cnsm.instances.active`), for steps that call no [`Telemetry::loaded`] (controls,
    /// migrations, erasures: no state context, no `before` hook).
    pub(crate) fn note_instance(&mut self, instance: &Instance) {
        self.prev_active = !instance.status.is_final();
    }

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

/// One durable batch for [`Telemetry::committed`].
pub(crate) struct CommittedBatch<'a> {
    pub n_items: usize,
    pub commit_duration: Duration,
    /// When the committer took the batch: the end of every item's queue wait (an attempt
    /// received after it, a timer's, waited for nothing).
    pub dequeued: Instant,
    /// One per record, in item order (`None`: not observed).
    pub attempts: Vec<Option<Attempt>>,
    pub records: &'a [StateChangeEvent],
    /// The sealed hash of item `i` (asked only for spans and hooks).
    pub hash_of: &'a dyn Fn(usize) -> Hash32,
    /// The items the store refused, in item order, with their errors.
    pub conflicts: Vec<(usize, RuntimeError)>,
}

/// A [`Sample`] whose evaluation was not timed (see [`EVALUATION_SAMPLE_EVERY`]).
const UNTIMED: u64 = u64::MAX;

/// A [`Sample`] without a trace id.
const NO_TRACE: u32 = u32::MAX;

/// One committed transition, for the histograms: what the committer knows of it, 32 bytes.
/// The durations are computed from the batch's instants by whoever records it.
struct Sample {
    received: Instant,
    /// Evaluation time in nanoseconds, or [`UNTIMED`].
    evaluation_ns: u64,
    /// Index into the batch's machines.
    machine: u32,
    /// Index into the batch's traces, or [`NO_TRACE`].
    trace: u32,
}

impl Sample {
    fn total_s(&self, batch: &SampleBatch) -> f64 {
        batch
            .committed
            .saturating_duration_since(self.received)
            .as_secs_f64()
    }
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
        if batch.traces.is_empty() {
            return;
        }
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        for s in batch.samples.iter().filter(|s| s.trace != NO_TRACE) {
            let Some((trace_id, time_ms)) = batch.traces.get(s.trace as usize) else {
                continue;
            };
            let Some(trace_id) = trace_id_of(trace_id) else {
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
                let value_s = s.total_s(batch);
                buckets[TransitionExemplars::bucket_of(value_s)] = Some(Exemplar {
                    trace_id,
                    value_s,
                    time_ms: *time_ms,
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

/// Slots [`LocalMetrics`] keeps before it starts afresh (after publishing a batch), so
/// machines applied again and again (a new allocation of their names each time) cannot grow
/// it without bound.
const LOCAL_SLOTS_MAX: usize = 4_096;

/// Entries of [`LocalMetrics`]' state memo (a power of two).
const STATE_MEMO_LEN: usize = 256;

/// Marks a [`MachineSlot`] the current batch has not touched.
const UNTOUCHED: u32 = u32::MAX;

/// Hashes the addresses that key [`LocalMetrics`]' slots (FxHash's step; the final rotation
/// brings the well-mixed high bits down to the bits a table indexes by).
#[derive(Default, Clone, Copy)]
struct AddressHasher(u64);

impl std::hash::Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

type ByAddress<K> = HashMap<K, u32, std::hash::BuildHasherDefault<AddressHasher>>;

/// The address of a name's allocation: the key of its slot. The slot holds a clone of the
/// `Arc`, so the address cannot be reused by another name while it is a key.
fn address_of(name: &Arc<str>) -> usize {
    Arc::as_ptr(name).cast::<u8>() as usize
}

/// One machine (one allocation of its name) in [`LocalMetrics`].
struct MachineSlot {
    name: Arc<str>,
    /// `cnsm.transitions` of the current batch, by [`Trigger::index`].
    counts: [u64; Trigger::ALL.len()],
    /// The attribute sets of `cnsm.transitions`, by [`Trigger::index`].
    count_attrs: [[KeyValue; 2]; Trigger::ALL.len()],
    /// Index into the current batch's machines, or [`UNTOUCHED`].
    batch_index: u32,
}

/// One (machine, state) pair of `cnsm.instances.active` in [`LocalMetrics`].
struct StateSlot {
    machine: u32,
    state: Arc<str>,
    /// The change of the current batch.
    delta: i64,
    touched: bool,
}

/// The committer's side of the metrics. Per transition it increments counters in slots that
/// live across batches (machines, and (machine, state) pairs, found by the address of their
/// names: states of one revision share their allocations, so this is a pointer hash, never a
/// string compare) and pushes one [`Sample`]; once per batch it adds the counts to
/// `cnsm.transitions`, the deltas to `cnsm.instances.active`, and hands the samples to the
/// `cnsm-metrics` thread. The same name in another allocation gets its own slot; slots are
/// summed by name when published.
#[derive(Default)]
pub(crate) struct LocalMetrics {
    machines: Vec<MachineSlot>,
    machine_by_address: ByAddress<usize>,
    /// The slot of the last machine seen (consecutive transitions usually share it).
    last_machine: Option<u32>,
    states: Vec<StateSlot>,
    state_by_address: ByAddress<(u32, usize)>,
    /// A direct-mapped cache in front of `state_by_address`: (machine slot, address, state
    /// slot), [`STATE_MEMO_LEN`] entries once used. Two lookups per transition, so a hit (two
    /// compares) instead of a probe of the table matters here.
    state_memo: Vec<(u32, usize, u32)>,
    /// The machine slots the current batch touched, in [`MachineSlot::batch_index`] order.
    batch_machines: Vec<u32>,
    /// The state slots the current batch touched.
    batch_states: Vec<u32>,
    samples: Vec<Sample>,
    /// The trace ids (as their 32 hex digits: parsed off the committer) and record times of
    /// the samples that have one.
    traces: Vec<([u8; 32], u64)>,
    /// Attribute sets for recording inline when the metrics thread lags.
    machine_attrs: MachineAttrs,
}

impl LocalMetrics {
    /// Counts one committed transition and keeps its sample.
    fn transition(&mut self, attempt: &Attempt, record: &StateChangeEvent) {
        let machine = self.machine_slot(&record.machine);
        let slot = &mut self.machines[machine as usize];
        slot.counts[attempt.trigger.index()] += 1;
        if slot.batch_index == UNTOUCHED {
            slot.batch_index = self.batch_machines.len() as u32;
            self.batch_machines.push(machine);
        }
        let batch_index = slot.batch_index;
        if attempt.prev_active
            && let Some(from) = &record.from
        {
            let state = self.state_slot(machine, from);
            self.add_active(state, -1);
        }
        if !record.status.is_final() {
            let state = self.state_slot(machine, &record.to);
            self.add_active(state, 1);
        }
        let trace = match record
            .trace
            .as_ref()
            .and_then(|t| <[u8; 32]>::try_from(t.trace_id.as_bytes()).ok())
        {
            Some(trace_id) => {
                self.traces.push((trace_id, record.time_ms));
                (self.traces.len() - 1) as u32
            }
            None => NO_TRACE,
        };
        self.samples.push(Sample {
            received: attempt.received,
            evaluation_ns: if attempt.timed {
                u64::try_from(attempt.evaluation.as_nanos()).unwrap_or(UNTIMED - 1)
            } else {
                UNTIMED
            },
            machine: batch_index,
            trace,
        });
    }

    fn machine_slot(&mut self, machine: &Arc<str>) -> u32 {
        if let Some(last) = self.last_machine
            && Arc::ptr_eq(&self.machines[last as usize].name, machine)
        {
            return last;
        }
        let address = address_of(machine);
        let slot = match self.machine_by_address.get(&address) {
            Some(slot) => *slot,
            None => {
                let slot = self.machines.len() as u32;
                let name = opentelemetry::Value::from(Arc::clone(machine));
                self.machines.push(MachineSlot {
                    name: Arc::clone(machine),
                    counts: [0; Trigger::ALL.len()],
                    count_attrs: Trigger::ALL.map(|trigger| {
                        [
                            KeyValue::new("cnsm.machine.name", name.clone()),
                            KeyValue::new("cnsm.trigger", trigger.as_str()),
                        ]
                    }),
                    batch_index: UNTOUCHED,
                });
                self.machine_by_address.insert(address, slot);
                slot
            }
        };
        self.last_machine = Some(slot);
        slot
    }

    fn state_slot(&mut self, machine: u32, state: &Arc<str>) -> u32 {
        let address = address_of(state);
        // Allocations are at least 8-byte aligned: the low bits carry nothing.
        let memo = ((address >> 4) ^ machine as usize) & (STATE_MEMO_LEN - 1);
        if let Some((m, a, slot)) = self.state_memo.get(memo)
            && *m == machine
            && *a == address
        {
            return *slot;
        }
        let key = (machine, address);
        let slot = match self.state_by_address.get(&key) {
            Some(slot) => *slot,
            None => {
                let slot = self.states.len() as u32;
                self.states.push(StateSlot {
                    machine,
                    state: Arc::clone(state),
                    delta: 0,
                    touched: false,
                });
                self.state_by_address.insert(key, slot);
                slot
            }
        };
        if self.state_memo.is_empty() {
            self.state_memo = vec![(UNTOUCHED, 0, 0); STATE_MEMO_LEN];
        }
        self.state_memo[memo] = (machine, address, slot);
        slot
    }

    fn add_active(&mut self, state: u32, delta: i64) {
        let slot = &mut self.states[state as usize];
        slot.delta += delta;
        if !slot.touched {
            slot.touched = true;
            self.batch_states.push(state);
        }
    }

    /// Publishes the batch: counts, active-instance deltas, and the samples (to the metrics
    /// thread). `dequeued` and `committed` are the batch's instants the durations end at.
    fn publish(&mut self, metrics: &Metrics, dequeued: Instant, committed: Instant) {
        for &machine in &self.batch_machines {
            let slot = &mut self.machines[machine as usize];
            for (n, attrs) in slot.counts.iter_mut().zip(&slot.count_attrs) {
                if *n > 0 {
                    metrics.transitions.add(*n, attrs);
                    *n = 0;
                }
            }
            slot.batch_index = UNTOUCHED;
        }
        if !self.batch_states.is_empty() {
            let mut active = metrics.gauges.active.lock().ok();
            for &state in &self.batch_states {
                let slot = &mut self.states[state as usize];
                let delta = std::mem::take(&mut slot.delta);
                slot.touched = false;
                let Some(active) = active.as_mut().filter(|_| delta != 0) else {
                    continue;
                };
                let key = (
                    Arc::clone(&self.machines[slot.machine as usize].name),
                    Arc::clone(&slot.state),
                );
                match active.entry(key) {
                    std::collections::hash_map::Entry::Occupied(mut n) => {
                        *n.get_mut() += delta;
                        if *n.get() <= 0 {
                            n.remove();
                        }
                    }
                    std::collections::hash_map::Entry::Vacant(n) => {
                        if delta > 0 {
                            n.insert(delta);
                        }
                    }
                }
            }
            self.batch_states.clear();
        }
        metrics.send_samples(self, dequeued, committed);
        self.batch_machines.clear();
        if self.machines.len() + self.states.len() > LOCAL_SLOTS_MAX {
            self.machines.clear();
            self.machine_by_address.clear();
            self.last_machine = None;
            self.states.clear();
            self.state_by_address.clear();
            self.state_memo.clear();
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
    /// Batches the metrics thread has emptied, for the committer to fill again.
    spare: Mutex<Vec<SampleBatch>>,
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

    fn give_back(&self, mut batch: SampleBatch) {
        batch.machines.clear();
        batch.samples.clear();
        batch.traces.clear();
        if let Ok(mut spare) = self.spare.lock()
            && spare.len() < SPARE_BUFFERS_MAX
        {
            spare.push(batch);
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

/// One batch's samples, the machines and traces they name, and the instants their durations
/// end at, as the metrics thread receives them.
struct SampleBatch {
    /// When the committer took the batch (the end of the queue waits).
    dequeued: Instant,
    /// When the batch was committed (the end of the transitions).
    committed: Instant,
    machines: Vec<Arc<str>>,
    samples: Vec<Sample>,
    /// Trace ids (32 hex digits) and record times (ms), by [`Sample::trace`].
    traces: Vec<([u8; 32], u64)>,
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
    /// The attribute sets of a batch's machines, in its order.
    fn of_batch(&mut self, machines: &[Arc<str>]) -> Vec<&[KeyValue]> {
        let map = &mut self.0;
        if map.len() + machines.len() > 10_000 {
            map.clear();
        }
        for machine in machines {
            if !map.contains_key(machine) {
                map.insert(
                    Arc::clone(machine),
                    vec![KeyValue::new("cnsm.machine.name", machine.to_string())],
                );
            }
        }
        machines
            .iter()
            .map(|m| map.get(m).map(Vec::as_slice).unwrap_or(&[]))
            .collect()
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
    let attrs = attrs.of_batch(&batch.machines);
    for s in &batch.samples {
        let attrs = attrs.get(s.machine as usize).copied().unwrap_or(&[]);
        duration.record(s.total_s(batch), attrs);
        // One queue for every machine: no attributes (and the SDK's cheapest record).
        let queue_s = batch
            .dequeued
            .saturating_duration_since(s.received)
            .as_secs_f64();
        queue.record(queue_s, &[]);
        if s.evaluation_ns != UNTIMED {
            evaluation.record(Duration::from_nanos(s.evaluation_ns).as_secs_f64(), attrs);
        }
    }
    exemplars.record(batch);
}

impl Metrics {
    /// Hands the batch's samples to the metrics thread (inline when it is too far behind).
    fn send_samples(&self, local: &mut LocalMetrics, dequeued: Instant, committed: Instant) {
        if local.samples.is_empty() {
            return;
        }
        // A batch the metrics thread gave back (no allocation per batch), else a new one.
        let mut batch = self
            .samples
            .spare
            .lock()
            .ok()
            .and_then(|mut spare| spare.pop())
            .unwrap_or_else(|| SampleBatch {
                dequeued,
                committed,
                machines: Vec::new(),
                samples: Vec::with_capacity(local.samples.len()),
                traces: Vec::new(),
            });
        batch.dequeued = dequeued;
        batch.committed = committed;
        std::mem::swap(&mut batch.samples, &mut local.samples);
        std::mem::swap(&mut batch.traces, &mut local.traces);
        batch.machines.extend(
            local
                .batch_machines
                .iter()
                .map(|m| Arc::clone(&local.machines[*m as usize].name)),
        );
        if let Err(mut batch) = self.samples.push(batch) {
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
            // Keep the buffers on the committer.
            batch.samples.clear();
            batch.traces.clear();
            std::mem::swap(&mut batch.samples, &mut local.samples);
            std::mem::swap(&mut batch.traces, &mut local.traces);
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
                    for batch in batches {
                        record_samples(&batch, &mut attrs, &histograms, &recorded);
                        queue_of_thread.give_back(batch);
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
    /// The batch's dequeue time (the last one given to `transition`).
    dequeued: Option<Instant>,
}

impl CommitterTelemetry {
    pub fn new(telemetry: Telemetry) -> CommitterTelemetry {
        CommitterTelemetry {
            telemetry,
            local: LocalMetrics::default(),
            attempts: Vec::new(),
            dequeued: None,
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
        self.dequeued = Some(dequeued);
        out
    }

    /// The batch's records (one per [`CommitterTelemetry::transition`], in order) committed.
    pub fn committed(&mut self, records: &[StateChangeEvent], commit_duration: Duration) {
        let attempts = std::mem::take(&mut self.attempts);
        let dequeued = self.dequeued.take();
        if !self.telemetry.is_enabled() {
            return;
        }
        let batch = CommittedBatch {
            n_items: records.len(),
            commit_duration,
            dequeued: dequeued.unwrap_or_else(Instant::now),
            attempts,
            records,
            hash_of: &|_| Hash32::default(),
            conflicts: Vec::new(),
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
    fn triggers_index_their_slots() {
        for (i, trigger) in Trigger::ALL.iter().enumerate() {
            assert_eq!(trigger.index(), i, "{trigger:?}");
        }
    }

    fn active_of(metrics: &Metrics) -> Vec<(String, String, i64)> {
        let active = metrics.gauges.active.lock().unwrap();
        let mut rows: Vec<_> = active
            .iter()
            .map(|((m, s), n)| (m.to_string(), s.to_string(), *n))
            .collect();
        rows.sort();
        rows
    }

    #[test]
    fn local_metrics_keep_slots_across_batches_and_sum_by_name() {
        use opentelemetry::metrics::MeterProvider as _;
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::default();
        let metrics = Metrics::new(&provider.meter("test"));
        let mut local = LocalMetrics::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let a_again: Arc<str> = Arc::from("a");
        let (s, t): (Arc<str>, Arc<str>) = (Arc::from("s"), Arc::from("t"));
        let s_again: Arc<str> = Arc::from("s");

        let (ia, ib, ia_again) = (
            local.machine_slot(&a),
            local.machine_slot(&b),
            local.machine_slot(&a_again),
        );
        assert_eq!((ia, ib, ia_again), (0, 1, 2), "one slot per allocation");
        assert_eq!(local.machine_slot(&a), ia, "found again by address");
        assert_eq!(local.state_slot(ia, &s), local.state_slot(ia, &s));
        assert_ne!(local.state_slot(ia, &s), local.state_slot(ib, &s));
        assert_ne!(local.state_slot(ia, &s), local.state_slot(ia, &s_again));

        // Batch 1: a/s +2 (two allocations of both names), a/t +1, b/s +1 then -1.
        let a_s = local.state_slot(ia, &s);
        let a_again_s = local.state_slot(ia_again, &s_again);
        let a_t = local.state_slot(ia, &t);
        let b_s = local.state_slot(ib, &s);
        local.add_active(a_s, 1);
        local.add_active(a_again_s, 1);
        local.add_active(a_t, 1);
        local.add_active(b_s, 1);
        local.add_active(b_s, -1);
        assert_eq!(local.batch_states.len(), 4, "each slot once per batch");
        let now = Instant::now();
        local.publish(&metrics, now, now);
        assert_eq!(
            active_of(&metrics),
            vec![("a".into(), "s".into(), 2), ("a".into(), "t".into(), 1)],
            "summed by name; a pair back at zero is not kept"
        );
        assert!(local.batch_states.is_empty());
        assert!(local.states.iter().all(|s| s.delta == 0 && !s.touched));

        // Batch 2: the same slots; a/t goes to zero and is dropped.
        assert_eq!(local.state_slot(ia, &t), a_t);
        local.add_active(a_t, -1);
        local.add_active(a_s, 1);
        local.publish(&metrics, now, now);
        assert_eq!(active_of(&metrics), vec![("a".into(), "s".into(), 3)]);

        // Many machines: the slots start afresh after the batch that passed the bound.
        let names: Vec<Arc<str>> = (0..LOCAL_SLOTS_MAX)
            .map(|i| Arc::from(format!("m{i}")))
            .collect();
        for name in &names {
            let m = local.machine_slot(name);
            let state = local.state_slot(m, &s);
            local.add_active(state, 1);
        }
        local.publish(&metrics, now, now);
        assert!(local.machines.is_empty() && local.states.is_empty());
        assert_eq!(active_of(&metrics).len(), 1 + LOCAL_SLOTS_MAX);
        assert_eq!(local.machine_slot(&a), 0, "a new slot after the reset");
        assert_eq!(
            local.state_slot(0, &s),
            0,
            "the memo was reset with the slots"
        );
        assert_eq!(local.states[0].state, s);
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
            parent: None,
            link: None,
        });
        assert!(started.is_none());
    }
}
