//! Push delivery: a CloudEvent per matching committed record to each `notify` target's HTTP
//! endpoint, from the durable commit log, at least once, in order per instance.
//!
//! The outbox is the store's commit log ([`Store::records_after`]), as for the audit log. Each
//! target (`namespace/machine/name`) has a durable cursor in the store: every matching record
//! at or below it was delivered or dead-lettered. A target's reader takes records after its
//! read head into a bounded window; per instance the records go out one at a time, in commit
//! order, and different instances go out concurrently (at most
//! [`DeliveryOptions::in_flight_max`] requests per target). The cursor advances to just below
//! the lowest record not yet finished and is written at most once per
//! [`DeliveryOptions::cursor_flush_ms`], so a crash redelivers from the cursor and never skips.
//!
//! A failed attempt (connection error, timeout, a status other than 2xx) is retried with
//! exponential back-off and jitter (base 100 ms, factor 2, cap 60 s) until the target's
//! `maxAttempts`; then the record becomes a durable [`DeadLetter`] and the instance's next
//! record goes out. A 4xx other than 401, 403, 408, 409, 425 and 429 refuses the event for good:
//! it is dead-lettered at once.
//!
//! An operator can redrive dead letters ([`Runtime::redrive_dead_letters`], `cnsmctl deliveries
//! redrive`): the letters are marked in the store (durable, with who asked), and the node that
//! holds the target reads the marked ones ([`Store::redrive_requests`]), reads each record again
//! from the commit log and sends it again with the same CloudEvent `id` (a fresh round of
//! attempts, in its instance's queue, before the instance's later records still waiting). A
//! delivered one leaves the dead-letter list ([`Store::delete_dead_letter`]); one that fails
//! again is written again, without the mark. Redrives do not hold the cursor: their mark is
//! their durable state.
//!
//! The committer only flips a flag and sends a wake-up ([`CommitListener::on_batch`]); the
//! deliverer runs on its own thread and tokio runtime, so a slow or dead receiver never slows
//! transitions. On a store shared by several nodes, one node delivers a target at a time (a
//! lease in the store, claimed with compare-and-set and renewed), and a record is taken only
//! once it is [`DeliveryOptions::settle_ms`] old, because commit positions become visible out of
//! order across nodes.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cnsm_core::Instance;
use cnsm_core::record::{Hash32, SealedRecord, StateChangeEvent};
use cnsm_core::resource::{NotifyTarget, StateMachine};
use cnsm_store::{DeadLetter, Redrive, Store, StoreError};
use hmac::{KeyInit, Mac};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

use crate::{CommitListener, Runtime, RuntimeError};

/// The CloudEvents `type` of every delivery.
pub const EVENT_TYPE: &str = "cn.statemachine.transition";
/// The header that carries `sha256=<hex HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "cnsm-signature";
/// The header that carries the attempt number (1 for the first).
pub const ATTEMPT_HEADER: &str = "cnsm-delivery-attempt";
/// The content type of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// First retry delay; each later one doubles, up to [`BACKOFF_CAP_MS`].
pub const BACKOFF_BASE_MS: u64 = 100;
/// Longest delay between two attempts.
pub const BACKOFF_CAP_MS: u64 = 60_000;

/// The shortest time between two passes of the delivery loop.
const LOOP_INTERVAL_MIN: Duration = Duration::from_millis(5);
/// Records read from the commit log per step.
const READ_PAGE_LEN: usize = 512;
/// Longest error text kept per target and dead letter.
const ERROR_CHARS_MAX: usize = 300;

/// One POST to a receiver.
#[derive(Debug, Clone)]
pub struct DeliveryRequest {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Arc<[u8]>,
}

/// What a receiver answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryResponse {
    pub status: u16,
}

/// A future a [`Transport`] returns.
pub type TransportFuture =
    Pin<Box<dyn Future<Output = Result<DeliveryResponse, String>> + Send + 'static>>;

/// Sends one request (the deliverer bounds it with the target's timeout). `Err` is a failure
/// without an HTTP answer (connection refused, reset, TLS), as text without secrets.
pub trait Transport: Send + Sync + 'static {
    fn post(&self, request: DeliveryRequest) -> TransportFuture;
}

/// Looks up a signing secret by environment variable name (`secretEnv`).
pub type SecretSource = Arc<dyn Fn(&str) -> Option<Vec<u8>> + Send + Sync>;

/// How the deliverer runs.
#[derive(Clone)]
pub struct DeliveryOptions {
    pub transport: Arc<dyn Transport>,
    /// This node's name in target leases.
    pub node_id: String,
    /// How often targets are refreshed from the definitions, leases claimed or renewed, and
    /// the commit log read without a wake-up (commits of other nodes).
    pub poll_ms: u64,
    /// How long a claimed target stays with this node without a renewal.
    pub lease_ms: u64,
    /// Cursors are written at most this often (and on stop).
    pub cursor_flush_ms: u64,
    /// Requests in flight per target.
    pub in_flight_max: usize,
    /// Records read and not finished per target; the reader waits when it is full.
    pub window_len_max: usize,
    /// Shared stores: a record is taken once it is this old (its commit time), so that
    /// commits still in flight on other nodes, whose positions are lower, are seen first.
    pub settle_ms: u64,
    /// Where secrets come from (default: the process environment).
    pub secrets: SecretSource,
    /// `cnsm.delivery.*` instruments are created on this meter.
    pub meter: Option<Meter>,
}

impl std::fmt::Debug for DeliveryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryOptions")
            .field("node_id", &self.node_id)
            .field("poll_ms", &self.poll_ms)
            .field("lease_ms", &self.lease_ms)
            .field("in_flight_max", &self.in_flight_max)
            .field("window_len_max", &self.window_len_max)
            .field("settle_ms", &self.settle_ms)
            .finish_non_exhaustive()
    }
}

impl DeliveryOptions {
    /// Defaults around `transport`: poll every second, 30 s leases, cursor writes at most once
    /// a second, 32 requests in flight and 4,096 records in the window per target, secrets
    /// from the environment.
    pub fn new(transport: Arc<dyn Transport>) -> DeliveryOptions {
        DeliveryOptions {
            transport,
            node_id: format!("node-{}", std::process::id()),
            poll_ms: 1_000,
            lease_ms: 30_000,
            cursor_flush_ms: 1_000,
            in_flight_max: 32,
            window_len_max: 4_096,
            settle_ms: 0,
            secrets: Arc::new(|name| std::env::var_os(name).map(|v| v.into_encoded_bytes())),
            meter: None,
        }
    }
}

/// One target's delivery state, as `/debug/statemachine` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// `namespace/machine/name`.
    pub target: String,
    pub url: String,
    /// Whether this node holds the target's lease (delivers it).
    pub held: bool,
    /// Every matching record at or below this commit position is finished (as last written).
    pub cursor: u64,
    /// Commit positions between the cursor and the newest position read.
    pub lag: u64,
    /// Records read and not finished.
    pub pending: usize,
    pub in_flight: usize,
    pub delivered: u64,
    pub attempts: u64,
    pub failed_attempts: u64,
    pub dead_letters: u64,
    /// Dead letters being redriven now (read and not finished).
    pub redriving: usize,
    /// Redriven dead letters that were delivered (and left the list).
    pub redriven: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why the target does not deliver right now (e.g. its secret is missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

/// The push deliverer. Cheap to clone; [`Deliverer::stop`] writes the cursors and stops it.
#[derive(Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer").finish_non_exhaustive()
    }
}

struct Inner {
    tx: UnboundedSender<Message>,
    wake_pending: AtomicBool,
    status: Arc<Mutex<Vec<TargetStatus>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

enum Message {
    Wake,
    /// Dead letters were marked for redrive: read the marks now.
    Redrive,
    Done(Finished),
    Stop,
    /// Stop at once, as a crash would.
    Abandon,
}

struct Finished {
    target: Arc<str>,
    position: u64,
    result: Result<DeliveryResponse, String>,
    duration: Duration,
}

impl Deliverer {
    /// Starts delivering for every `notify` target of the runtime's machines, subscribes to
    /// its commits, and registers itself for [`Runtime::delivery_status`].
    pub fn start(runtime: &Runtime, options: DeliveryOptions) -> Result<Deliverer, RuntimeError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(Vec::new()));
        let metrics = options
            .meter
            .as_ref()
            .map(|meter| DeliveryMetrics::new(meter, Arc::clone(&status)));
        let io = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cnsm-delivery-io")
            .enable_all()
            .build()
            .map_err(|e| RuntimeError::Unavailable(format!("cannot start delivery: {e}")))?;
        let mut state = State {
            store: Arc::clone(runtime.store()),
            clock: Arc::clone(runtime.clock()),
            options,
            targets: BTreeMap::new(),
            revisions: HashMap::new(),
            tx: tx.clone(),
            status: Arc::clone(&status),
            metrics,
            log_end: 0,
            random: seed(),
        };
        let thread = std::thread::Builder::new()
            .name("cnsm-delivery".into())
            .spawn(move || io.block_on(state.run(rx)))
            .map_err(|e| RuntimeError::Unavailable(format!("cannot start delivery: {e}")))?;
        let deliverer = Deliverer {
            inner: Arc::new(Inner {
                tx,
                wake_pending: AtomicBool::new(false),
                status,
                thread: Mutex::new(Some(thread)),
            }),
        };
        runtime.subscribe(Arc::new(deliverer.clone()));
        runtime.set_delivery(deliverer.clone());
        Ok(deliverer)
    }

    /// Every target this node knows, ordered by name.
    pub fn status(&self) -> Vec<TargetStatus> {
        self.inner
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Reads the commit log now (after commits this node did not see).
    pub fn wake(&self) {
        if !self.inner.wake_pending.swap(true, Ordering::SeqCst) {
            let _ = self.inner.tx.send(Message::Wake);
        }
    }

    /// Reads the redrive marks of every held target now (after a redrive request).
    pub fn redrive_requested(&self) {
        let _ = self.inner.tx.send(Message::Redrive);
    }

    /// Stops at once as a crashed node would: no cursor is written and no lease given back, so
    /// another node takes the targets over only when their leases expire (tests of takeover).
    pub fn abandon(&self) {
        let _ = self.inner.tx.send(Message::Abandon);
        let handle = self.inner.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    /// Writes every cursor and stops; requests in flight are abandoned (they are redelivered
    /// from the cursor by the next start).
    pub fn stop(&self) {
        let _ = self.inner.tx.send(Message::Stop);
        let handle = self.inner.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl CommitListener for Deliverer {
    fn on_commit(&self, _record: &StateChangeEvent, _hash: Hash32, _instance: &Instance) {}

    fn on_batch(&self, _n_items: usize, _commit_duration: Duration) {
        self.wake();
    }
}

/// An operator's redrive of dead letters ([`Runtime::redrive_dead_letters`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedriveRequest {
    /// `namespace/machine/name`.
    pub target: String,
    /// The dead letter at this commit position; `None`: every dead letter of the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Who asks (kept with each marked letter and logged).
    #[serde(default)]
    pub actor: String,
}

/// What a redrive request marked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RedriveReport {
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    /// Dead letters marked for redrive.
    pub marked: u64,
}

impl Runtime {
    /// Marks dead letters of a target for redrive, durably, with the actor and the time: the
    /// node that holds the target sends them again (same CloudEvent `id`), and each leaves the
    /// dead-letter list once delivered, or is written again (unmarked) when it fails again.
    /// Refused with `Invalid` for a malformed target name or actor, `NotFound` when there is
    /// no dead letter at `position`, or, for all of them, when the target is unknown; nothing
    /// changes then. Every accepted request is logged with its actor.
    pub fn redrive_dead_letters(
        &self,
        request: &RedriveRequest,
    ) -> Result<RedriveReport, RuntimeError> {
        let target = request.target.as_str();
        check_target(target)?;
        if request.actor.len() > cnsm_store::REDRIVE_ACTOR_CHARS_MAX {
            return Err(RuntimeError::Invalid(format!(
                "the actor must have at most {} bytes",
                cnsm_store::REDRIVE_ACTOR_CHARS_MAX
            )));
        }
        let store = self.store();
        if let Some(position) = request.position {
            let after = position.checked_sub(1).map(|p| (target, p));
            let found = store.dead_letters(Some(target), after, 1)?;
            if found.first().is_none_or(|d| d.position != position) {
                return Err(RuntimeError::NotFound(format!(
                    "dead letter of target {target} at commit position {position}"
                )));
            }
        }
        let redrive = Redrive {
            requested_ms: self.clock().now_ms(),
            actor: request.actor.clone(),
        };
        let marked = store.redrive_dead_letters(target, request.position, &redrive)?;
        if marked == 0 && request.position.is_none() && !target_known(store.as_ref(), target)? {
            return Err(RuntimeError::NotFound(format!(
                "delivery target {target} (no cursor, no notify target of that name, no dead letter)"
            )));
        }
        tracing::info!(
            target = %target,
            position = ?request.position,
            actor = %request.actor,
            marked,
            "dead letters marked for redrive"
        );
        if let Some(deliverer) = self.shared.delivery.read().ok().and_then(|d| d.clone()) {
            deliverer.redrive_requested();
        }
        Ok(RedriveReport {
            target: target.to_owned(),
            position: request.position,
            marked,
        })
    }
}

/// Refuses a target name that is not `namespace/machine/name`.
fn check_target(target: &str) -> Result<(), RuntimeError> {
    let parts: Vec<&str> = target.split('/').collect();
    if target.len() > cnsm_store::DELIVERY_TARGET_CHARS_MAX
        || parts.len() != 3
        || parts.iter().any(|p| p.is_empty())
    {
        return Err(RuntimeError::Invalid(format!(
            "target {target:?}: a delivery target is namespace/machine/name (at most {} bytes)",
            cnsm_store::DELIVERY_TARGET_CHARS_MAX
        )));
    }
    Ok(())
}

/// Whether a target has a cursor or is declared by the latest revision of its machine.
fn target_known(store: &dyn Store, target: &str) -> Result<bool, RuntimeError> {
    if store.delivery_cursors()?.iter().any(|(t, _)| t == target) {
        return Ok(true);
    }
    let mut parts = target.splitn(3, '/');
    let (Some(namespace), Some(machine), Some(name)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(false);
    };
    Ok(store
        .definition(namespace, machine, None)?
        .is_some_and(|row| row.definition.notify_targets().any(|(_, t)| t.name == name)))
}

/// The CloudEvent id of a record: stable across attempts and restarts, unique per record.
pub fn event_id(record: &StateChangeEvent, hash: &Hash32) -> String {
    let hex = hash.to_hex();
    format!(
        "{}/{}/{}/{}",
        record.namespace,
        record.instance,
        record.version,
        &hex[..16]
    )
}

/// The structured-mode CloudEvent of a record (the bytes that are signed and sent).
pub fn cloud_event(record: &StateChangeEvent, hash: &Hash32) -> Vec<u8> {
    let mut event = json!({
        "specversion": "1.0",
        "type": EVENT_TYPE,
        "source": format!(
            "/apis/statemachine.cn/v1alpha1/namespaces/{}/statemachines/{}",
            record.namespace, record.machine
        ),
        "subject": &*record.instance,
        "id": event_id(record, hash),
        "time": crate::audit::rfc3339_ms(record.time_ms),
        "datacontenttype": "application/json",
        "data": {"record": record, "hash": hash},
    });
    if let (Some(trace), Some(map)) = (&record.trace, event.as_object_mut()) {
        map.insert(
            "traceparent".into(),
            json!(crate::telemetry::TraceParent::format(trace)),
        );
    }
    serde_json::to_vec(&event).unwrap_or_default()
}

/// `sha256=<lowercase hex HMAC-SHA256(secret, body)>`, the [`SIGNATURE_HEADER`] value.
///
/// ```
/// // RFC 4231, test case 2.
/// let signature = cnsm_runtime::delivery::sign(b"Jefe", b"what do ya want for nothing?");
/// assert_eq!(
///     signature,
///     "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
/// );
/// ```
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest.iter() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The delay before attempt `n_failed + 1`: `base * 2^(n_failed - 1)` capped at 60 s, the
/// upper half of it jittered by `random` (0..=u64::MAX).
pub fn backoff_ms(n_failed: u32, random: u64) -> u64 {
    let exponent = n_failed.saturating_sub(1).min(20);
    let full = BACKOFF_BASE_MS
        .saturating_mul(1 << exponent)
        .min(BACKOFF_CAP_MS);
    let half = full / 2;
    half + random % (full - half + 1)
}

/// What a status answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Delivered,
    Retry,
    /// Refused for good: dead-lettered at once.
    Refused,
}

fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        401 | 403 | 408 | 409 | 425 | 429 => Verdict::Retry,
        400..=499 => Verdict::Refused,
        _ => Verdict::Retry,
    }
}

/// Which records of one revision a target takes.
#[derive(Debug, Clone)]
struct Filter {
    /// Records whose `to` is one of these (empty: any).
    states: Vec<String>,
    /// Records of these events (empty: any).
    events: Vec<String>,
}

impl Filter {
    fn of(state: Option<&str>, target: &NotifyTarget) -> Filter {
        Filter {
            states: match state {
                Some(state) => vec![state.to_owned()],
                None => target.states.clone(),
            },
            events: target.events.clone(),
        }
    }

    fn matches(&self, record: &StateChangeEvent) -> bool {
        (self.states.is_empty() || self.states.iter().any(|s| **s == *record.to))
            && (self.events.is_empty()
                || record
                    .event
                    .as_deref()
                    .is_some_and(|e| self.events.iter().any(|x| x == e)))
    }
}

/// A target's endpoint settings (from the latest revision that declares it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    url: String,
    secret_env: Option<String>,
    timeout_ms: u64,
    attempts_max: u32,
}

/// A record read and not finished.
struct Pending {
    instance: (Arc<str>, Arc<str>),
    version: u64,
    event_id: String,
    body: Arc<[u8]>,
    n_attempts: u32,
    next_at: Instant,
    in_flight: bool,
    /// A dead letter an operator asked to redrive: delivered, its letter is deleted; failed,
    /// it is written again without the mark. It does not hold the cursor.
    redrive: bool,
}

impl Pending {
    /// A record to deliver, due now, not yet attempted.
    fn new(
        instance: (Arc<str>, Arc<str>),
        record: &StateChangeEvent,
        hash: &Hash32,
        redrive: bool,
    ) -> Pending {
        Pending {
            instance,
            version: record.version,
            event_id: event_id(record, hash),
            body: cloud_event(record, hash).into(),
            n_attempts: 0,
            next_at: Instant::now(),
            in_flight: false,
            redrive,
        }
    }
}

#[derive(Default)]
struct Stats {
    delivered: u64,
    attempts: u64,
    failed_attempts: u64,
    dead_letters: u64,
    redriven: u64,
    last_error: Option<String>,
}

struct Target {
    key: Arc<str>,
    namespace: String,
    machine: String,
    name: String,
    endpoint: Endpoint,
    /// The lease end while this node holds the target.
    held_until_ms: Option<u64>,
    /// In memory: every matching record at or below it is finished.
    cursor: u64,
    /// As last written to the store.
    cursor_written: u64,
    last_flush: Instant,
    head: u64,
    pending: BTreeMap<u64, Pending>,
    /// Per instance, its pending positions in commit order; the front is the one that goes out.
    queues: HashMap<(Arc<str>, Arc<str>), VecDeque<u64>>,
    in_flight: usize,
    stats: Stats,
    degraded: Option<String>,
    /// The last redrive mark read; the next read continues after it (back to the start when a
    /// read finds none).
    redrive_after: Option<u64>,
}

impl Target {
    fn release(&mut self) {
        self.redrive_after = None;
        self.held_until_ms = None;
        self.pending.clear();
        self.queues.clear();
        self.in_flight = 0;
    }
}

struct State {
    store: Arc<dyn Store>,
    clock: Arc<dyn crate::Clock>,
    options: DeliveryOptions,
    targets: BTreeMap<Arc<str>, Target>,
    /// (namespace, machine, revision) -> target name -> filter.
    revisions: HashMap<(String, String, u32), Arc<HashMap<String, Filter>>>,
    tx: UnboundedSender<Message>,
    status: Arc<Mutex<Vec<TargetStatus>>>,
    metrics: Option<DeliveryMetrics>,
    /// The newest commit position any read saw.
    log_end: u64,
    random: u64,
}

impl State {
    async fn run(&mut self, mut rx: UnboundedReceiver<Message>) {
        let poll = Duration::from_millis(self.options.poll_ms.max(10));
        let mut next_poll = Instant::now();
        let mut redrive_now = false;
        loop {
            let now = Instant::now();
            if now >= next_poll {
                self.refresh();
                next_poll = now + poll;
                redrive_now = true;
            }
            if std::mem::take(&mut redrive_now) {
                self.load_redrives();
            }
            self.read_all();
            self.dispatch();
            self.advance(false);
            self.publish();
            let deadline = self.next_deadline().map_or(next_poll, |d| d.min(next_poll));
            let message = tokio::time::timeout_at(deadline, rx.recv()).await;
            let mut messages = match message {
                Ok(Some(m)) => vec![m],
                Ok(None) => break,
                Err(_) => Vec::new(),
            };
            // At most one pass per LOOP_INTERVAL_MIN: under a stream of commits the wake-ups
            // coalesce instead of costing a pass (and CPU beside the committer) each.
            tokio::time::sleep_until(now + LOOP_INTERVAL_MIN).await;
            while let Ok(m) = rx.try_recv() {
                messages.push(m);
            }
            let mut stop = false;
            for m in messages {
                match m {
                    Message::Abandon => return,
                    Message::Wake => {}
                    Message::Redrive => redrive_now = true,
                    Message::Done(done) => self.finish_attempt(done),
                    Message::Stop => stop = true,
                }
            }
            if stop {
                break;
            }
        }
        self.advance(true);
        // Give the leases back so another node (or the next start) takes over at once.
        let now_ms = self.clock.now_ms();
        for target in self.targets.values_mut() {
            if target.held_until_ms.is_some()
                && let Err(e) =
                    self.store
                        .claim_delivery(&target.key, &self.options.node_id, now_ms, 0)
            {
                tracing::warn!("delivery {}: cannot release the lease: {e}", target.key);
            }
            target.release();
        }
        self.publish();
    }

    /// The earliest retry due among records waiting for one.
    fn next_deadline(&self) -> Option<Instant> {
        self.targets
            .values()
            // A target at its in-flight limit waits for an answer, not for a deadline.
            .filter(|t| {
                t.held_until_ms.is_some()
                    && t.degraded.is_none()
                    && t.in_flight < self.options.in_flight_max.max(1)
            })
            .flat_map(|t| {
                t.queues
                    .values()
                    .filter_map(|q| q.front())
                    .filter_map(|p| t.pending.get(p))
                    .filter(|p| !p.in_flight)
                    .map(|p| p.next_at)
            })
            .min()
    }

    /// Targets from the latest revision of every machine, then leases claimed or renewed.
    fn refresh(&mut self) {
        let definitions = match self.store.list_definitions(None) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("delivery: cannot list definitions: {e}");
                return;
            }
        };
        let mut seen = Vec::new();
        for row in &definitions {
            for (_, target) in row.definition.notify_targets() {
                let key: Arc<str> =
                    format!("{}/{}/{}", row.namespace, row.name, target.name).into();
                let endpoint = Endpoint {
                    url: target.url.clone(),
                    secret_env: target.secret_env.clone(),
                    timeout_ms: target.timeout_ms(),
                    attempts_max: target.attempts_max(),
                };
                seen.push(Arc::clone(&key));
                let entry = self
                    .targets
                    .entry(Arc::clone(&key))
                    .or_insert_with(|| Target {
                        key,
                        namespace: row.namespace.clone(),
                        machine: row.name.clone(),
                        name: target.name.clone(),
                        endpoint: endpoint.clone(),
                        held_until_ms: None,
                        cursor: 0,
                        cursor_written: 0,
                        last_flush: Instant::now(),
                        head: 0,
                        pending: BTreeMap::new(),
                        queues: HashMap::new(),
                        in_flight: 0,
                        stats: Stats::default(),
                        degraded: None,
                        redrive_after: None,
                    });
                entry.endpoint = endpoint;
            }
        }
        // A target no later revision declares stops (its cursor stays in the store).
        let gone: Vec<Arc<str>> = self
            .targets
            .keys()
            .filter(|k| !seen.contains(k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(mut target) = self.targets.remove(&key) {
                self.flush(&mut target);
            }
        }
        let now_ms = self.clock.now_ms();
        let lease_ms = self.options.lease_ms;
        let keys: Vec<Arc<str>> = self.targets.keys().cloned().collect();
        for key in keys {
            let Some(target) = self.targets.get_mut(&key) else {
                continue;
            };
            target.degraded = match &target.endpoint.secret_env {
                Some(env) if (self.options.secrets)(env).is_none() => Some(format!(
                    "the signing secret is missing: environment variable {env} is not set; deliveries wait"
                )),
                _ => None,
            };
            if let Some(until) = target.held_until_ms
                && until > now_ms + lease_ms * 2 / 3
            {
                continue;
            }
            match self
                .store
                .claim_delivery(&key, &self.options.node_id, now_ms, lease_ms)
            {
                Ok(Some(cursor)) => {
                    if target.held_until_ms.is_none() {
                        target.cursor = cursor.position;
                        target.cursor_written = cursor.position;
                        target.head = cursor.position;
                        target.stats.dead_letters = count_dead_letters(&*self.store, &key);
                    }
                    target.held_until_ms = Some(cursor.lease_until_ms);
                }
                Ok(None) => target.release(),
                Err(e) => {
                    tracing::warn!("delivery {key}: cannot claim the target: {e}");
                    target.stats.last_error = Some(shorten(&format!("store: {e}")));
                    if target.held_until_ms.is_some_and(|until| until <= now_ms) {
                        target.release();
                    }
                }
            }
        }
    }

    /// The names of the targets this node holds the lease of.
    fn held_targets(&self) -> Vec<Arc<str>> {
        self.targets
            .iter()
            .filter(|(_, t)| t.held_until_ms.is_some())
            .map(|(k, _)| Arc::clone(k))
            .collect()
    }

    /// Reads new records for every held target, up to its window.
    fn read_all(&mut self) {
        for key in self.held_targets() {
            if let Err(e) = self.read(&key) {
                tracing::warn!("delivery {key}: cannot read the commit log: {e}");
                if let Some(t) = self.targets.get_mut(&key) {
                    t.stats.last_error = Some(shorten(&format!("store: {e}")));
                }
            }
        }
    }

    fn read(&mut self, key: &Arc<str>) -> Result<(), StoreError> {
        let settle_ms = self.options.settle_ms;
        let now_ms = self.clock.now_ms();
        loop {
            let Some(target) = self.targets.get(key) else {
                return Ok(());
            };
            let room = self
                .options
                .window_len_max
                .saturating_sub(target.pending.len());
            if room == 0 {
                return Ok(());
            }
            let page = self
                .store
                .records_after(target.head, room.min(READ_PAGE_LEN))?;
            let n_read = page.len();
            for (position, sealed) in page {
                let record = if settle_ms > 0 {
                    // Shared store: stop at the first record younger than the settle time.
                    let record = sealed.open().ok();
                    if record
                        .as_ref()
                        .is_some_and(|r| r.time_ms.saturating_add(settle_ms) > now_ms)
                    {
                        return Ok(());
                    }
                    record
                } else {
                    None
                };
                self.take(key, position, &sealed, record);
                self.log_end = self.log_end.max(position);
                if let Some(target) = self.targets.get_mut(key) {
                    target.head = position;
                }
            }
            if n_read < room.min(READ_PAGE_LEN) {
                return Ok(());
            }
        }
    }

    /// Adds the record at `position` to the target's window when the target takes it.
    fn take(
        &mut self,
        key: &Arc<str>,
        position: u64,
        sealed: &SealedRecord,
        record: Option<StateChangeEvent>,
    ) {
        let Some(target) = self.targets.get(key) else {
            return;
        };
        let (namespace, machine) = (target.namespace.clone(), target.machine.clone());
        let name = target.name.clone();
        let same_machine =
            cnsm_core::cbor::top_level_texts(&sealed.bytes, &["namespace", "machine"])
                .map(|f| f[0] == Some(namespace.as_str()) && f[1] == Some(machine.as_str()))
                .unwrap_or(true);
        if !same_machine {
            return;
        }
        let record = match record.map(Ok).unwrap_or_else(|| sealed.open()) {
            Ok(record) => record,
            Err(e) => {
                let message =
                    format!("the record at commit position {position} does not decode: {e}");
                tracing::error!("delivery {key}: {message}");
                self.dead_letter_now(key, position, message);
                return;
            }
        };
        let filters = self.filters(&namespace, &machine, record.revision);
        if !filters.get(&name).is_some_and(|f| f.matches(&record)) {
            return;
        }
        let Some(target) = self.targets.get_mut(key) else {
            return;
        };
        if target.pending.contains_key(&position) {
            return;
        }
        let instance = (Arc::clone(&record.namespace), Arc::clone(&record.instance));
        target.pending.insert(
            position,
            Pending::new(instance.clone(), &record, &sealed.hash, false),
        );
        target
            .queues
            .entry(instance)
            .or_default()
            .push_back(position);
    }

    /// Reads the redrive marks of every held target into its window (as room allows).
    fn load_redrives(&mut self) {
        for key in self.held_targets() {
            let Some(target) = self.targets.get(&key) else {
                continue;
            };
            let room = self
                .options
                .window_len_max
                .saturating_sub(target.pending.len());
            if room == 0 {
                continue;
            }
            let page = match self.store.redrive_requests(
                &key,
                target.redrive_after,
                room.min(READ_PAGE_LEN),
            ) {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!("delivery {key}: cannot read the redrive requests: {e}");
                    if let Some(t) = self.targets.get_mut(&key) {
                        t.stats.last_error = Some(shorten(&format!("store: {e}")));
                    }
                    continue;
                }
            };
            if page.is_empty() {
                if let Some(t) = self.targets.get_mut(&key) {
                    t.redrive_after = None;
                }
                continue;
            }
            for letter in page {
                let position = letter.position;
                if !self.take_redrive(&key, letter) {
                    break;
                }
                if let Some(t) = self.targets.get_mut(&key) {
                    t.redrive_after = Some(position);
                }
            }
        }
    }

    /// Puts a dead letter marked for redrive back into its target's window, read again from
    /// the commit log. Returns false when the commit log could not be read (tried again later).
    fn take_redrive(&mut self, key: &Arc<str>, letter: DeadLetter) -> bool {
        let position = letter.position;
        let Some(target) = self.targets.get_mut(key) else {
            return false;
        };
        if let Some(pending) = target.pending.get_mut(&position) {
            // Read again after a restart before its cursor moved: one delivery settles both.
            pending.redrive = true;
            return true;
        }
        let sealed = match self.store.records_after(position.saturating_sub(1), 1) {
            Ok(page) => page
                .into_iter()
                .next()
                .filter(|(p, _)| *p == position)
                .map(|(_, sealed)| sealed),
            Err(e) => {
                tracing::warn!("delivery {key}: cannot read the commit log for a redrive: {e}");
                target.stats.last_error = Some(shorten(&format!("store: {e}")));
                return false;
            }
        };
        let record = match sealed.as_ref().map(|s| s.open()) {
            Some(Ok(record)) => record,
            Some(Err(e)) => {
                let error =
                    format!("the record at commit position {position} does not decode: {e}");
                self.redrive_failed(key, letter, error);
                return true;
            }
            None => {
                let error = format!(
                    "redrive: the record at commit position {position} is no longer in the commit log"
                );
                self.redrive_failed(key, letter, error);
                return true;
            }
        };
        let Some(sealed) = sealed else {
            return true;
        };
        let Some(target) = self.targets.get_mut(key) else {
            return false;
        };
        let instance = (Arc::clone(&record.namespace), Arc::clone(&record.instance));
        // Before the instance's later records still waiting, after the one in flight.
        let queue = target.queues.entry(instance.clone()).or_default();
        let front_busy = queue
            .front()
            .and_then(|p| target.pending.get(p))
            .is_some_and(|p| p.in_flight);
        let mut index = queue
            .iter()
            .position(|p| *p > position)
            .unwrap_or(queue.len());
        if front_busy {
            index = index.max(1);
        }
        queue.insert(index, position);
        target.pending.insert(
            position,
            Pending::new(instance, &record, &sealed.hash, true),
        );
        true
    }

    /// A redrive that cannot be sent: the letter is written again with the reason, unmarked.
    fn redrive_failed(&mut self, key: &Arc<str>, letter: DeadLetter, error: String) {
        tracing::warn!(target = %key, position = letter.position, "redrive failed: {error}");
        let letter = DeadLetter {
            last_error: shorten(&error),
            failed_ms: self.clock.now_ms(),
            redrive: None,
            ..letter
        };
        if let Err(e) = self.store.put_dead_letter(&letter)
            && let Some(t) = self.targets.get_mut(key)
        {
            t.stats.last_error = Some(shorten(&format!("store: {e}")));
        }
    }

    /// The filters of a revision (cached).
    fn filters(
        &mut self,
        namespace: &str,
        machine: &str,
        revision: u32,
    ) -> Arc<HashMap<String, Filter>> {
        let key = (namespace.to_owned(), machine.to_owned(), revision);
        if let Some(f) = self.revisions.get(&key) {
            return Arc::clone(f);
        }
        let filters = match self.store.definition(namespace, machine, Some(revision)) {
            Ok(Some(row)) => Arc::new(filters_of(&row.definition)),
            Ok(None) => Arc::new(HashMap::new()),
            Err(e) => {
                // Not cached: the next record asks again.
                tracing::warn!("delivery: cannot read {namespace}/{machine}@{revision}: {e}");
                return Arc::new(HashMap::new());
            }
        };
        self.revisions.insert(key, Arc::clone(&filters));
        filters
    }

    /// Sends the front record of every instance whose retry is due, within the in-flight limit.
    fn dispatch(&mut self) {
        let now = Instant::now();
        let in_flight_max = self.options.in_flight_max.max(1);
        for target in self.targets.values_mut() {
            if target.held_until_ms.is_none() || target.in_flight >= in_flight_max {
                continue;
            }
            let secret = match &target.endpoint.secret_env {
                Some(env) => match (self.options.secrets)(env) {
                    Some(secret) => Some(secret),
                    None => {
                        target.degraded = Some(format!(
                            "the signing secret is missing: environment variable {env} is not set; deliveries wait"
                        ));
                        continue;
                    }
                },
                None => None,
            };
            target.degraded = None;
            let mut due: Vec<u64> = target
                .queues
                .values()
                .filter_map(|q| q.front().copied())
                .filter(|p| {
                    target
                        .pending
                        .get(p)
                        .is_some_and(|p| !p.in_flight && p.next_at <= now)
                })
                .collect();
            due.sort_unstable();
            for position in due {
                if target.in_flight >= in_flight_max {
                    break;
                }
                let Some(pending) = target.pending.get_mut(&position) else {
                    continue;
                };
                pending.in_flight = true;
                pending.n_attempts += 1;
                target.in_flight += 1;
                target.stats.attempts += 1;
                let mut headers = vec![
                    ("content-type".to_owned(), CONTENT_TYPE.to_owned()),
                    (ATTEMPT_HEADER.to_owned(), pending.n_attempts.to_string()),
                    (
                        "user-agent".to_owned(),
                        concat!("cnsm/", env!("CARGO_PKG_VERSION")).to_owned(),
                    ),
                ];
                if let Some(secret) = &secret {
                    headers.push((SIGNATURE_HEADER.to_owned(), sign(secret, &pending.body)));
                }
                let request = DeliveryRequest {
                    url: target.endpoint.url.clone(),
                    headers,
                    body: Arc::clone(&pending.body),
                };
                let timeout = Duration::from_millis(target.endpoint.timeout_ms.max(1));
                let transport = Arc::clone(&self.options.transport);
                let tx = self.tx.clone();
                let key = Arc::clone(&target.key);
                tokio::spawn(async move {
                    let started = Instant::now();
                    let result = match tokio::time::timeout(timeout, transport.post(request)).await
                    {
                        Ok(result) => result,
                        Err(_) => Err(format!(
                            "no answer within {} ms (timeoutSeconds)",
                            timeout.as_millis()
                        )),
                    };
                    let _ = tx.send(Message::Done(Finished {
                        target: key,
                        position,
                        result,
                        duration: started.elapsed(),
                    }));
                });
            }
        }
    }

    fn finish_attempt(&mut self, done: Finished) {
        let random = self.next_random();
        let Some(target) = self.targets.get_mut(&done.target) else {
            return;
        };
        let Some(pending) = target.pending.get_mut(&done.position) else {
            return;
        };
        if !pending.in_flight {
            return;
        }
        pending.in_flight = false;
        target.in_flight = target.in_flight.saturating_sub(1);
        let (outcome, error) = match &done.result {
            Ok(response) => match verdict(response.status) {
                Verdict::Delivered => ("delivered", None),
                Verdict::Retry => ("failed", Some(format!("HTTP {}", response.status))),
                Verdict::Refused => (
                    "refused",
                    Some(format!("HTTP {} (refused for good)", response.status)),
                ),
            },
            Err(e) if e.starts_with("no answer within") => ("timeout", Some(e.clone())),
            Err(e) => ("failed", Some(e.clone())),
        };
        if let Some(m) = &self.metrics {
            let attrs = [
                KeyValue::new("cnsm.machine.name", target.machine.clone()),
                KeyValue::new("cnsm.delivery.target", target.name.clone()),
                KeyValue::new("cnsm.delivery.outcome", outcome),
            ];
            m.attempts.add(1, &attrs);
            m.duration.record(done.duration.as_secs_f64(), &attrs[..2]);
        }
        let Some(error) = error else {
            target.stats.delivered += 1;
            if pending.redrive {
                match self.store.delete_dead_letter(&target.key, done.position) {
                    Ok(deleted) => {
                        target.stats.redriven += 1;
                        if deleted {
                            target.stats.dead_letters = target.stats.dead_letters.saturating_sub(1);
                        }
                        tracing::info!(target = %target.key, position = done.position, "redriven dead letter delivered");
                    }
                    Err(e) => {
                        // Its mark stays: it is redriven again later (at least once).
                        target.stats.last_error = Some(shorten(&format!("store: {e}")));
                    }
                }
            }
            finish(target, done.position);
            return;
        };
        let error = shorten(&error);
        target.stats.failed_attempts += 1;
        target.stats.last_error = Some(error.clone());
        tracing::debug!(target = %target.key, position = done.position, "delivery attempt failed: {error}");
        if outcome == "refused" || pending.n_attempts >= target.endpoint.attempts_max {
            let key = Arc::clone(&target.key);
            self.dead_letter_now(&key, done.position, error);
        } else {
            pending.next_at =
                Instant::now() + Duration::from_millis(backoff_ms(pending.n_attempts, random));
        }
    }

    /// Writes the dead letter of a pending record (or of an undecodable one) and finishes it;
    /// when the store refuses, the record stays and is tried again in a second.
    fn dead_letter_now(&mut self, key: &Arc<str>, position: u64, error: String) {
        let now_ms = self.clock.now_ms();
        let Some(target) = self.targets.get_mut(key) else {
            return;
        };
        let again = target.pending.get(&position).is_some_and(|p| p.redrive);
        let letter = match target.pending.get(&position) {
            Some(p) => DeadLetter {
                target: key.to_string(),
                position,
                namespace: p.instance.0.to_string(),
                instance: p.instance.1.to_string(),
                version: p.version,
                event_id: p.event_id.clone(),
                attempts: p.n_attempts,
                last_error: error,
                failed_ms: now_ms,
                redrive: None,
            },
            None => DeadLetter {
                target: key.to_string(),
                position,
                namespace: target.namespace.clone(),
                instance: String::new(),
                version: 0,
                event_id: String::new(),
                attempts: 0,
                last_error: error,
                failed_ms: now_ms,
                redrive: None,
            },
        };
        match self.store.put_dead_letter(&letter) {
            Ok(()) => {
                // A redrive that failed again replaced its letter.
                if !again {
                    target.stats.dead_letters += 1;
                }
                tracing::warn!(
                    target = %key,
                    instance = %letter.instance,
                    version = letter.version,
                    attempts = letter.attempts,
                    "delivery gave up; the record is a dead letter: {}",
                    letter.last_error
                );
                if let Some(m) = &self.metrics {
                    m.dead_letters.add(
                        1,
                        &[
                            KeyValue::new("cnsm.machine.name", target.machine.clone()),
                            KeyValue::new("cnsm.delivery.target", target.name.clone()),
                        ],
                    );
                }
                finish(target, position);
            }
            Err(e) => {
                target.stats.last_error = Some(shorten(&format!("store: {e}")));
                if let Some(p) = target.pending.get_mut(&position) {
                    p.next_at = Instant::now() + Duration::from_secs(1);
                    // One more attempt is allowed so the record is not stuck without a letter.
                    p.n_attempts = p.n_attempts.saturating_sub(1);
                }
            }
        }
    }

    /// Moves each cursor below the lowest unfinished record and writes it when due.
    fn advance(&mut self, force: bool) {
        let flush_every = Duration::from_millis(self.options.cursor_flush_ms);
        let keys: Vec<Arc<str>> = self.targets.keys().cloned().collect();
        for key in keys {
            let Some(mut target) = self.targets.remove(&key) else {
                continue;
            };
            if target.held_until_ms.is_some() {
                // Redrives are below the cursor already and do not hold it.
                let finished = match target.pending.iter().find(|(_, p)| !p.redrive) {
                    Some((lowest, _)) => lowest - 1,
                    None => target.head,
                };
                target.cursor = target.cursor.max(finished);
                if force || target.last_flush.elapsed() >= flush_every {
                    self.flush(&mut target);
                }
            }
            self.targets.insert(key, target);
        }
    }

    fn flush(&self, target: &mut Target) {
        if target.held_until_ms.is_none() || target.cursor == target.cursor_written {
            return;
        }
        target.last_flush = Instant::now();
        match self
            .store
            .put_delivery_cursor(&target.key, &self.options.node_id, target.cursor)
        {
            Ok(true) => target.cursor_written = target.cursor,
            Ok(false) => {
                tracing::warn!("delivery {}: another node took the target over", target.key);
                target.release();
            }
            Err(e) => {
                target.stats.last_error = Some(shorten(&format!("store: {e}")));
            }
        }
    }

    fn publish(&self) {
        let list: Vec<TargetStatus> = self
            .targets
            .values()
            .map(|t| TargetStatus {
                target: t.key.to_string(),
                url: t.endpoint.url.clone(),
                held: t.held_until_ms.is_some(),
                cursor: t.cursor_written,
                lag: self.log_end.max(t.head).saturating_sub(t.cursor),
                pending: t.pending.len(),
                in_flight: t.in_flight,
                delivered: t.stats.delivered,
                attempts: t.stats.attempts,
                failed_attempts: t.stats.failed_attempts,
                dead_letters: t.stats.dead_letters,
                redriving: t.pending.values().filter(|p| p.redrive).count(),
                redriven: t.stats.redriven,
                last_error: t.stats.last_error.clone(),
                degraded: t.degraded.clone(),
            })
            .collect();
        if let Ok(mut status) = self.status.lock() {
            *status = list;
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: jitter only, no security role.
        let mut x = self.random;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.random = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Removes a finished record from the window and its instance's queue.
fn finish(target: &mut Target, position: u64) {
    let Some(pending) = target.pending.remove(&position) else {
        return;
    };
    if let Some(queue) = target.queues.get_mut(&pending.instance) {
        queue.retain(|p| *p != position);
        if queue.is_empty() {
            target.queues.remove(&pending.instance);
        }
    }
}

/// Every target of a revision, by name, with what it takes.
fn filters_of(machine: &StateMachine) -> HashMap<String, Filter> {
    machine
        .notify_targets()
        .map(|(state, target)| {
            (
                target.name.clone(),
                Filter::of(state.map(|s| s.name.as_str()), target),
            )
        })
        .collect()
}

fn count_dead_letters(store: &dyn Store, key: &str) -> u64 {
    let mut n = 0u64;
    let mut after: Option<(String, u64)> = None;
    loop {
        let page =
            match store.dead_letters(Some(key), after.as_ref().map(|(t, p)| (t.as_str(), *p)), 0) {
                Ok(page) => page,
                Err(_) => return n,
            };
        n += page.len() as u64;
        match page.last() {
            Some(last) if page.len() >= cnsm_store::PAGE_LEN_MAX => {
                after = Some((last.target.clone(), last.position));
            }
            _ => return n,
        }
    }
}

fn shorten(text: &str) -> String {
    if text.chars().count() <= ERROR_CHARS_MAX {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(ERROR_CHARS_MAX).collect();
    out.push('…');
    out
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    (nanos ^ u64::from(std::process::id())) | 1
}

/// The `cnsm.delivery.*` instruments.
struct DeliveryMetrics {
    attempts: Counter<u64>,
    dead_letters: Counter<u64>,
    duration: Histogram<f64>,
    _lag: ObservableGauge<u64>,
}

impl DeliveryMetrics {
    fn new(meter: &Meter, status: Arc<Mutex<Vec<TargetStatus>>>) -> DeliveryMetrics {
        let lag = meter
            .u64_observable_gauge("cnsm.delivery.lag")
            .with_description("Commit positions a held notify target is behind")
            .with_callback(move |observer| {
                if let Ok(status) = status.lock() {
                    for t in status.iter().filter(|t| t.held) {
                        let mut parts = t.target.splitn(3, '/');
                        let (_, machine, name) = (parts.next(), parts.next(), parts.next());
                        observer.observe(
                            t.lag,
                            &[
                                KeyValue::new(
                                    "cnsm.machine.name",
                                    machine.unwrap_or("").to_owned(),
                                ),
                                KeyValue::new(
                                    "cnsm.delivery.target",
                                    name.unwrap_or("").to_owned(),
                                ),
                            ],
                        );
                    }
                }
            })
            .build();
        DeliveryMetrics {
            attempts: meter
                .u64_counter("cnsm.delivery.attempts")
                .with_description("Delivery attempts to notify targets, by outcome")
                .build(),
            dead_letters: meter
                .u64_counter("cnsm.delivery.dead_letters")
                .with_description("Records a notify target gave up on")
                .build(),
            duration: meter
                .f64_histogram("cnsm.delivery.duration")
                .with_unit("s")
                .with_description("One delivery attempt, request to answer")
                .with_boundaries(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ])
                .build(),
            _lag: lag,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100_ms_to_a_60_s_cap_with_jitter_in_the_upper_half() {
        assert_eq!(backoff_ms(1, 0), 50);
        assert_eq!(backoff_ms(1, 7), 57);
        assert_eq!(backoff_ms(2, 1000), 100 + 1000 % 101);
        for (n_failed, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (10, 51_200),
            (11, 60_000),
            (40, 60_000),
        ] {
            for random in [0, 1, 12345, u64::MAX] {
                let d = backoff_ms(n_failed, random);
                assert!(
                    (full / 2..=full).contains(&d),
                    "{n_failed}: {d} not in {full}/2..={full}"
                );
            }
        }
    }

    #[test]
    fn statuses_deliver_retry_or_refuse() {
        for (status, expected) in [
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (301, Verdict::Retry),
            (400, Verdict::Refused),
            (401, Verdict::Retry),
            (404, Verdict::Refused),
            (408, Verdict::Retry),
            (422, Verdict::Refused),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (503, Verdict::Retry),
        ] {
            assert_eq!(verdict(status), expected, "{status}");
        }
    }
}
