//! The cnsm runtime: applies events to instances through the pure engine and a durable store,
//! with group commit, and owns the timers.
//!
//! Requests enter a bounded queue. One committer thread takes everything pending as a batch,
//! applies each request through [`cnsm_core::engine::Machine`] against the cached current state
//! of its instance (requests for one instance in arrival order), writes every resulting record
//! in one store transaction, waits for it to be durable, then answers every waiter. Due timers
//! re-enter through the same path, so per-instance order and compare-and-swap have one source.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use cnsm_runtime::{Runtime, RuntimeOptions, CreateInstance, EventRequest};
//! use cnsm_store::embedded::EmbeddedStore;
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedStore::open(dir.path()).unwrap();
//! let runtime = Runtime::open(store, RuntimeOptions::default()).unwrap();
//! let yaml = r#"
//! apiVersion: statemachine.cn/v1alpha1
//! kind: StateMachine
//! metadata: {name: door}
//! spec:
//!   initialState: closed
//!   states:
//!   - {name: closed, type: task, timeoutSeconds: 60, onEvent: [{event: open, target: opened}]}
//!   - {name: opened, type: final}
//! "#;
//! runtime.apply_yaml(yaml, None).await.unwrap();
//! let door = runtime.create_instance(CreateInstance::new("default", "door").id("d-1")).await.unwrap();
//! assert_eq!(&*door.state, "closed");
//! let done = runtime.send("default", "d-1", EventRequest::new("open")).await.unwrap();
//! assert_eq!(&*done.instance.state, "opened");
//! assert_eq!(runtime.history("default", "d-1", 0, 100).await.unwrap().len(), 2);
//! runtime.shutdown();
//! # });
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use cnsm_core::admission::{self, Problem};
pub use cnsm_core::engine::Control;
use cnsm_core::engine::Machine;
use cnsm_core::record::{Hash32, SealedRecord, StateChangeEvent, TraceContext};
use cnsm_core::resource::StateMachine;
use cnsm_core::{Instance, Status};
use cnsm_store::{DefinitionRow, InstanceQuery, PutDefinition, Store};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

pub mod audit;
pub mod clock;
mod committer;
pub mod delivery;
mod error;
pub mod flags;
mod foreign;
mod migrate;
pub mod telemetry;
pub mod timers;

pub use clock::{Clock, SystemClock, VirtualClock};
pub use error::RuntimeError;
pub use flags::FlagEvaluator;
pub use migrate::{
    MigrationEntry, MigrationOutcome, MigrationPhase, MigrationReport, MigrationRequest,
};
pub use telemetry::{Telemetry, TraceParent, TransitionContext, TransitionHook};

/// Limits and defaults of a runtime.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Requests waiting for the committer; more are refused with `Unavailable`.
    pub queue_len_max: usize,
    /// Most requests one durable commit serves.
    pub batch_len_max: usize,
    /// How long idempotency keys are remembered.
    pub idempotency_ttl_ms: u64,
    /// Instances kept in memory between batches.
    pub cache_len_max: usize,
    /// Largest event payload or instance data, in bytes of JSON.
    pub payload_len_max: usize,
    /// Whether the timer driver runs (read-only tools turn it off).
    pub timers: bool,
    pub clock: Arc<dyn Clock>,
    /// Spans, metrics and hooks (all off by default); see [`telemetry`].
    pub telemetry: Telemetry,
    /// Evaluates `flag:` gates before events are applied; without one every gate sees a
    /// `FLAG_NOT_EVALUATED` error and its `onFlagError` policy decides.
    pub flags: Option<Arc<dyn FlagEvaluator>>,
    /// The store is shared with other nodes (PostgreSQL). The committer then refreshes each
    /// batch's instances from the store (and keeps no other cached copy), re-applies an event
    /// without an expected version that lost a race to another node (at most
    /// [`SHARED_RETRIES_MAX`] times), and claims due timers from the store with leases instead
    /// of keeping its own timer index. Off: the embedded behaviour.
    pub shared_store: bool,
    /// This node's name in timer claims (shared store only).
    pub node_id: String,
    /// How long a claimed timer stays with this node before another may take it.
    pub timer_lease_ms: u64,
    /// How often a node on a shared store asks the store for due timers.
    pub timer_poll_ms: u64,
}

/// How many times a shared-store node re-applies an event that lost a race to another node
/// before it answers `Unavailable`.
pub const SHARED_RETRIES_MAX: u32 = 8;

impl Default for RuntimeOptions {
    fn default() -> RuntimeOptions {
        RuntimeOptions {
            queue_len_max: 65_536,
            batch_len_max: 2_048,
            idempotency_ttl_ms: 24 * 3600 * 1000,
            cache_len_max: 200_000,
            payload_len_max: 1 << 20,
            timers: true,
            clock: Arc::new(SystemClock),
            telemetry: Telemetry::default(),
            flags: None,
            shared_store: false,
            node_id: format!("node-{}", std::process::id()),
            timer_lease_ms: 30_000,
            timer_poll_ms: 250,
        }
    }
}

impl RuntimeOptions {
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> RuntimeOptions {
        self.clock = clock;
        self
    }

    pub fn with_telemetry(mut self, telemetry: Telemetry) -> RuntimeOptions {
        self.telemetry = telemetry;
        self
    }

    pub fn with_flags(mut self, flags: Arc<dyn FlagEvaluator>) -> RuntimeOptions {
        self.flags = Some(flags);
        self
    }
}

/// A request to create an instance.
#[derive(Debug, Clone)]
pub struct CreateInstance {
    pub namespace: String,
    pub machine: String,
    /// Generated when absent.
    pub id: Option<String>,
    pub data: Map<String, Value>,
    pub labels: BTreeMap<String, String>,
    /// A specific revision; the latest when absent.
    pub revision: Option<u32>,
    pub actor: String,
    /// When the caller stops waiting, as [`EventRequest::deadline`]: a create still queued then
    /// is refused without being applied, and the wait for its commit ends then (outcome
    /// unknown); both are `RuntimeError::Timeout`, counted on the transition span and metrics.
    pub deadline: Option<std::time::Instant>,
}

impl CreateInstance {
    pub fn new(namespace: impl Into<String>, machine: impl Into<String>) -> CreateInstance {
        CreateInstance {
            namespace: namespace.into(),
            machine: machine.into(),
            id: None,
            data: Map::new(),
            labels: BTreeMap::new(),
            revision: None,
            actor: "anonymous".into(),
            deadline: None,
        }
    }

    /// Sets the deadline (see [`CreateInstance::deadline`]).
    pub fn deadline(mut self, at: std::time::Instant) -> CreateInstance {
        self.deadline = Some(at);
        self
    }

    pub fn id(mut self, id: impl Into<String>) -> CreateInstance {
        self.id = Some(id.into());
        self
    }

    pub fn data(mut self, data: Map<String, Value>) -> CreateInstance {
        self.data = data;
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> CreateInstance {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// An event for an instance.
#[derive(Debug, Clone)]
pub struct EventRequest {
    pub name: String,
    pub payload: Value,
    pub idempotency_key: Option<String>,
    /// Compare-and-swap: apply only at this version.
    pub expected_version: Option<u64>,
    /// The caller's trace context (W3C `traceparent` ids); see also `trace_parent`.
    pub trace: Option<TraceContext>,
    /// The full incoming W3C context (sampled flag, `tracestate`); the parent of the transition
    /// span. When absent, `trace` (if any) is the parent, taken as sampled.
    pub trace_parent: Option<TraceParent>,
    pub actor: String,
    /// When the caller stops waiting: an event still queued then is refused without being
    /// applied, and `send` stops waiting for a commit then (outcome unknown); both are
    /// `RuntimeError::Timeout` (error.type `Timeout`).
    pub deadline: Option<std::time::Instant>,
}

impl EventRequest {
    pub fn new(name: impl Into<String>) -> EventRequest {
        EventRequest {
            name: name.into(),
            payload: Value::Null,
            idempotency_key: None,
            expected_version: None,
            trace: None,
            trace_parent: None,
            actor: "anonymous".into(),
            deadline: None,
        }
    }

    /// Sets the deadline (see [`EventRequest::deadline`]).
    pub fn deadline(mut self, at: std::time::Instant) -> EventRequest {
        self.deadline = Some(at);
        self
    }

    /// Sets the incoming W3C trace context (the parent of the transition span).
    pub fn traced(mut self, parent: TraceParent) -> EventRequest {
        self.trace = Some(parent.context.clone());
        self.trace_parent = Some(parent);
        self
    }

    pub fn payload(mut self, payload: Value) -> EventRequest {
        self.payload = payload;
        self
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> EventRequest {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn expected_version(mut self, version: u64) -> EventRequest {
        self.expected_version = Some(version);
        self
    }

    pub fn actor(mut self, actor: impl Into<String>) -> EventRequest {
        self.actor = actor.into();
        self
    }

    /// The hash that identifies the request for idempotency.
    pub(crate) fn request_hash(&self) -> Hash32 {
        let mut bytes = Vec::new();
        cnsm_core::cbor::encode_text(&mut bytes, &self.name);
        cnsm_core::cbor::encode_into(&mut bytes, &self.payload);
        Hash32::digest(b"cnsm/idempotency/v1\0", &bytes)
    }
}

/// A machine's rollout and where its active instances are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutStatus {
    /// The newest revision (what new instances get when no rollout is set).
    pub latest: u32,
    pub rollout: Option<cnsm_core::rollout::Rollout>,
    /// Active instances per revision.
    pub active_by_revision: BTreeMap<u32, u64>,
}

/// Longest flag key a rollout may name.
pub const FLAG_KEY_LEN_MAX: usize = 256;

/// A change to a machine's rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RolloutChange {
    Set {
        revision: u32,
        weight: u8,
    },
    /// Route new instances by this flag: its value names the revision (docs/migration.md).
    Flag {
        flag: String,
    },
    Promote,
    Abort,
}

/// An operator control (cancel, suspend, resume, redrive) for an instance.
#[derive(Debug, Clone)]
pub struct ControlRequest {
    pub action: Control,
    /// Why (kept on the record of a cancel).
    pub reason: Option<String>,
    pub trace: Option<TraceContext>,
    /// The acting subject, written on the record.
    pub actor: String,
    /// When the caller stops waiting (see [`CreateInstance::deadline`]).
    pub deadline: Option<std::time::Instant>,
}

/// An erasure of personal data from one instance ([`Runtime::erase`]).
#[derive(Debug, Clone, Default)]
pub struct EraseRequest {
    /// Data paths to erase (dotted, `address.zip`), also from event payloads; empty: all data
    /// and all payloads.
    pub fields: Vec<String>,
    /// Why (kept in the erasure record).
    pub reason: Option<String>,
    pub trace: Option<TraceContext>,
    /// The acting subject, written on the erasure record.
    pub actor: String,
}

impl ControlRequest {
    pub fn new(action: Control) -> ControlRequest {
        ControlRequest {
            action,
            reason: None,
            trace: None,
            actor: "anonymous".into(),
            deadline: None,
        }
    }

    /// Sets the deadline (see [`ControlRequest::deadline`]).
    pub fn deadline(mut self, at: std::time::Instant) -> ControlRequest {
        self.deadline = Some(at);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> ControlRequest {
        self.reason = Some(reason.into());
        self
    }

    pub fn actor(mut self, actor: impl Into<String>) -> ControlRequest {
        self.actor = actor.into();
        self
    }
}

/// A committed transition (or the replay of one, for a repeated idempotency key).
#[derive(Debug, Clone)]
pub struct TransitionOutcome {
    pub record: StateChangeEvent,
    pub hash: Hash32,
    /// The instance right after the record.
    pub instance: Instance,
    /// True when an idempotency key matched an earlier commit and nothing changed.
    pub replayed: bool,
}

/// A definition stored by [`Runtime::apply`].
#[derive(Debug, Clone)]
pub struct AppliedDefinition {
    pub namespace: String,
    pub name: String,
    pub revision: u32,
    pub hash: Hash32,
    /// False when the content equals the latest revision (nothing changed).
    pub created: bool,
    /// Admission warnings.
    pub warnings: Vec<Problem>,
}

/// One history entry as read back from the store.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub record: StateChangeEvent,
    pub hash: Hash32,
}

/// Observes every committed transition, on the committer thread, before waiters are answered.
/// Keep it quick.
pub trait CommitListener: Send + Sync + 'static {
    fn on_commit(&self, record: &StateChangeEvent, hash: Hash32, instance: &Instance);

    /// Called once per durable store commit with the number of items it carried and how long
    /// the commit (including its fsync) took.
    fn on_batch(&self, n_items: usize, commit_duration: std::time::Duration) {
        let _ = (n_items, commit_duration);
    }

    /// On a shared store: a transition another node committed, soon after its commit (on a
    /// feed thread, not the committer). Watch streams publish it; per-node observers (metrics,
    /// audit) leave it alone, since the committing node reports it.
    fn on_remote_commit(&self, record: &StateChangeEvent, hash: Hash32, instance: &Instance) {
        let _ = (record, hash, instance);
    }

    /// Whether [`CommitListener::on_remote_commit`] wants calls right now; another node's
    /// commit is read from the store only when some listener does (a watch is open).
    fn wants_remote_commits(&self) -> bool {
        false
    }
}

pub(crate) struct Shared {
    pub store: Arc<dyn Store>,
    pub options: RuntimeOptions,
    pub machines: RwLock<HashMap<(String, String, u32), Arc<Machine>>>,
    pub listeners: RwLock<Vec<Arc<dyn CommitListener>>>,
    /// Durable versions the committer published, for StaleState checks on arrival.
    pub versions: Mutex<HashMap<(String, String), u64>>,
    /// Requests queued for the committer and not yet taken into a batch.
    pub queued: std::sync::atomic::AtomicUsize,
    /// The push deliverer, once started.
    pub delivery: RwLock<Option<delivery::Deliverer>>,
}

impl Shared {
    /// The compiled machine of a revision, from the cache or the store.
    pub(crate) fn machine(
        &self,
        namespace: &str,
        name: &str,
        revision: u32,
    ) -> Result<Arc<Machine>, RuntimeError> {
        let key = (namespace.to_owned(), name.to_owned(), revision);
        if let Some(m) = self.machines.read().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(m);
        }
        let row = self
            .store
            .definition(namespace, name, Some(revision))?
            .ok_or_else(|| {
                RuntimeError::NotFound(format!("statemachine {namespace}/{name}@{revision}"))
            })?;
        self.machine_of(row)
    }

    /// The compiled machine of a revision already read from the store (cached by revision).
    pub(crate) fn machine_of(&self, row: DefinitionRow) -> Result<Arc<Machine>, RuntimeError> {
        let key = (row.namespace, row.name, row.revision);
        if let Some(m) = self.machines.read().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(m);
        }
        let machine = Machine::compile(row.definition)
            .map_err(|e| {
                RuntimeError::Unavailable(format!("stored definition does not compile: {e}"))
            })?
            .with_revision(row.revision);
        let machine = Arc::new(machine);
        if let Ok(mut cache) = self.machines.write() {
            cache.insert(key, Arc::clone(&machine));
        }
        Ok(machine)
    }
}

/// The runtime. Cheap to clone; the committer stops when [`Runtime::shutdown`] is called or the
/// last clone is dropped.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
    queue: std::sync::mpsc::SyncSender<committer::Command>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").finish_non_exhaustive()
    }
}

impl Runtime {
    /// Starts a runtime over `store`: rebuilds the timer index (overdue timers fire right away)
    /// and starts the committer thread.
    pub fn open(store: impl Store, options: RuntimeOptions) -> Result<Runtime, RuntimeError> {
        Runtime::open_shared(Arc::new(store), options)
    }

    /// Like [`Runtime::open`] over a store the caller keeps a handle to.
    pub fn open_shared(
        store: Arc<dyn Store>,
        options: RuntimeOptions,
    ) -> Result<Runtime, RuntimeError> {
        let shared = Arc::new(Shared {
            store,
            options,
            machines: RwLock::new(HashMap::new()),
            listeners: RwLock::new(Vec::new()),
            versions: Mutex::new(HashMap::new()),
            queued: std::sync::atomic::AtomicUsize::new(0),
            delivery: RwLock::new(None),
        });
        if shared.options.telemetry.metrics_enabled() {
            seed_active(&shared)?;
        }
        let (queue, thread) = committer::start(Arc::clone(&shared))?;
        if shared.options.shared_store {
            foreign::start(&shared)?;
        }
        Ok(Runtime {
            shared,
            queue,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    /// Requests waiting for the committer (not yet in a batch); a diagnostic, not a limit.
    pub fn queue_depth(&self) -> usize {
        self.shared
            .queued
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The store under the runtime.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.options.clock
    }

    /// The flag evaluator, when one is configured.
    pub fn flags(&self) -> Option<&Arc<dyn FlagEvaluator>> {
        self.shared.options.flags.as_ref()
    }

    /// The push deliverer's targets, when one was started on this runtime.
    pub fn delivery_status(&self) -> Option<Vec<delivery::TargetStatus>> {
        let deliverer = self.shared.delivery.read().ok()?.clone()?;
        Some(deliverer.status())
    }

    pub(crate) fn set_delivery(&self, deliverer: delivery::Deliverer) {
        if let Ok(mut slot) = self.shared.delivery.write() {
            *slot = Some(deliverer);
        }
    }

    /// Adds an observer of committed transitions.
    pub fn subscribe(&self, listener: Arc<dyn CommitListener>) {
        if let Ok(mut l) = self.shared.listeners.write() {
            l.push(listener);
        }
    }

    /// Stops the committer after the requests already queued; later calls get `Unavailable`.
    pub fn shutdown(&self) {
        let _ = self.queue.try_send(committer::Command::Stop);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }

    async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> committer::Command,
    ) -> Result<T, RuntimeError> {
        let rx = self.enqueue(make)?;
        rx.await
            .map_err(|_| RuntimeError::Unavailable("the runtime stopped before answering".into()))
    }

    /// Queues a command without waiting for its answer (so many can share one commit).
    pub(crate) fn enqueue<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> committer::Command,
    ) -> Result<oneshot::Receiver<T>, RuntimeError> {
        let (tx, rx) = oneshot::channel();
        // Count before sending: the committer may take the request before `try_send` returns.
        self.shared
            .queued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let sent = self.queue.try_send(make(tx));
        if sent.is_err() {
            self.shared
                .queued
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
        match sent {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(_)) => {
                return Err(RuntimeError::Unavailable(
                    "the request queue is full; retry later".into(),
                ));
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(RuntimeError::Unavailable("the runtime has stopped".into()));
            }
        }
        Ok(rx)
    }

    /// Admits a YAML definition and stores it (a new revision when the content changed).
    pub async fn apply_yaml(
        &self,
        source: &str,
        file: Option<&str>,
    ) -> Result<AppliedDefinition, RuntimeError> {
        let admitted = admission::admit_str(source, file);
        let warnings: Vec<Problem> = admitted.warnings().cloned().collect();
        match admitted.machine {
            Some(machine) => {
                let mut applied = self.apply(machine).await?;
                applied.warnings = warnings;
                Ok(applied)
            }
            None => Err(RuntimeError::Admission(admitted.problems)),
        }
    }

    /// Admits a typed definition and stores it.
    pub async fn apply(&self, machine: StateMachine) -> Result<AppliedDefinition, RuntimeError> {
        let admitted = admission::admit(machine);
        let mut warnings: Vec<Problem> = admitted.warnings().cloned().collect();
        let Some(machine) = admitted.machine else {
            return Err(RuntimeError::Admission(admitted.problems));
        };
        let previous = self.shared.store.definition(
            &machine.metadata.namespace,
            &machine.metadata.name,
            None,
        )?;
        let compiled =
            Machine::compile(machine.clone()).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let hash = compiled.hash();
        let now_ms = self.shared.options.clock.now_ms();
        let outcome = self.shared.store.put_definition(&machine, hash, now_ms)?;
        let (revision, created) = match outcome {
            PutDefinition::Created(r) => (r, true),
            PutDefinition::Unchanged(r) => (r, false),
        };
        if created && let Some(previous) = previous {
            warnings.extend(self.breaking_changes(&previous.definition, &machine)?);
        }
        Ok(AppliedDefinition {
            namespace: machine.metadata.namespace.clone(),
            name: machine.metadata.name.clone(),
            revision,
            hash,
            created,
            warnings,
        })
    }

    /// Warnings for states the new revision removes while active instances are in them.
    fn breaking_changes(
        &self,
        previous: &StateMachine,
        next: &StateMachine,
    ) -> Result<Vec<Problem>, RuntimeError> {
        let mut warnings = Vec::new();
        for state in &previous.spec.states {
            if next.spec.states.iter().any(|s| s.name == state.name) {
                continue;
            }
            let running = self.shared.store.list_instances(&InstanceQuery {
                namespace: Some(next.metadata.namespace.clone()),
                machine: Some(next.metadata.name.clone()),
                state: Some(state.name.clone()),
                status: Some(Status::Active),
                limit: cnsm_store::PAGE_LEN_MAX,
                ..InstanceQuery::default()
            })?;
            if !running.is_empty() {
                let more = if running.len() >= cnsm_store::PAGE_LEN_MAX {
                    " or more"
                } else {
                    ""
                };
                warnings.push(Problem::warning(
                    admission::codes::BREAKING_CHANGE,
                    "spec.states",
                    format!(
                        "state '{}' is removed, but {}{more} running instance(s) are in it; they stay on their revision until migrated with a StateMigrationPolicy that maps or refuses '{}' (cnsmctl migrate)",
                        state.name,
                        running.len(),
                        state.name
                    ),
                ));
            }
        }
        Ok(warnings)
    }

    /// A definition revision (the latest when `revision` is `None`).
    pub async fn definition(
        &self,
        namespace: &str,
        name: &str,
        revision: Option<u32>,
    ) -> Result<DefinitionRow, RuntimeError> {
        self.shared
            .store
            .definition(namespace, name, revision)?
            .ok_or_else(|| RuntimeError::NotFound(format!("statemachine {namespace}/{name}")))
    }

    pub async fn definitions(
        &self,
        namespace: Option<&str>,
    ) -> Result<Vec<DefinitionRow>, RuntimeError> {
        Ok(self.shared.store.list_definitions(namespace)?)
    }

    /// Deletes a definition; refused while instances of it are active.
    pub async fn delete_definition(&self, namespace: &str, name: &str) -> Result<(), RuntimeError> {
        if self.shared.store.delete_definition(namespace, name)? {
            if let Ok(mut cache) = self.shared.machines.write() {
                cache.retain(|(ns, n, _), _| !(ns == namespace && n == name));
            }
            Ok(())
        } else {
            Err(RuntimeError::NotFound(format!(
                "statemachine {namespace}/{name}"
            )))
        }
    }

    /// Creates an instance at version 0 (its genesis record). Without a requested revision, a
    /// rollout routes it: by weight on the committer, or by the rollout's flag, evaluated here
    /// before the create is queued; the decision is recorded in the genesis record.
    pub async fn create_instance(&self, request: CreateInstance) -> Result<Instance, RuntimeError> {
        let received = std::time::Instant::now();
        validate_name("namespace", &request.namespace)?;
        if let Some(id) = &request.id {
            validate_id(id)?;
        }
        let size = serde_json::to_vec(&request.data)
            .map(|v| v.len())
            .unwrap_or(0);
        if size > self.shared.options.payload_len_max {
            return Err(RuntimeError::Invalid(format!(
                "instance data is {size} bytes, more than the limit of {}",
                self.shared.options.payload_len_max
            )));
        }
        let mut request = request;
        let routing = self.flag_routing(&mut request).await?;
        let deadline = request.deadline;
        self.submit_until(deadline, |reply| committer::Command::Create {
            request,
            routing,
            received,
            reply,
        })
        .await?
    }

    /// [`Runtime::submit`] that stops waiting at `deadline` with `Timeout` (the committer
    /// refuses the command if it is still queued then, and counts that attempt).
    async fn submit_until<T>(
        &self,
        deadline: Option<std::time::Instant>,
        make: impl FnOnce(oneshot::Sender<T>) -> committer::Command,
    ) -> Result<T, RuntimeError> {
        let submitted = self.submit(make);
        match deadline {
            None => submitted.await,
            Some(at) => tokio::time::timeout_at(tokio::time::Instant::from_std(at), submitted)
                .await
                .unwrap_or_else(|_| {
                    Err(RuntimeError::Timeout(
                        "the request's deadline passed while it was queued or committing; \
                         its outcome is unknown (read the instance before retrying)"
                            .into(),
                    ))
                }),
        }
    }

    /// When the machine's rollout routes by a flag and the request names no revision: the
    /// provider's answer for that flag, evaluated here (flags are async; never on the
    /// committer). The id is generated first when absent, since it is the targeting key. The
    /// evaluation context is the instance to be: the labels as top-level fields, `machine`,
    /// `namespace` and `event: "create"`. Without a provider the answer is an error decision
    /// (`FLAG_NOT_EVALUATED`), so the instance gets the stable revision.
    async fn flag_routing(
        &self,
        request: &mut CreateInstance,
    ) -> Result<Option<cnsm_core::record::FlagDecision>, RuntimeError> {
        if request.revision.is_some() {
            return Ok(None);
        }
        let Some(flag) = self
            .shared
            .store
            .rollout(&request.namespace, &request.machine)?
            .and_then(|r| r.flag)
        else {
            return Ok(None);
        };
        let id = request
            .id
            .get_or_insert_with(|| committer::generate_id(&request.machine))
            .clone();
        let Some(evaluator) = &self.shared.options.flags else {
            return Ok(Some(cnsm_core::record::FlagDecision {
                key: flag,
                variant: None,
                value: Value::Null,
                reason: "ERROR".into(),
                error: Some("FLAG_NOT_EVALUATED: no flag provider is configured".into()),
                allowed: false,
            }));
        };
        let mut context = Map::new();
        for (name, value) in &request.labels {
            context.insert(name.clone(), Value::from(value.as_str()));
        }
        context.insert("machine".into(), Value::from(request.machine.as_str()));
        context.insert("namespace".into(), Value::from(request.namespace.as_str()));
        context.insert("event".into(), Value::from("create"));
        let query = [cnsm_core::flags::FlagQuery {
            key: flag,
            targeting_key: id,
            targeting_key_error: None,
            context,
            value_type: cnsm_core::flags::FlagValueType::Any,
        }];
        Ok(evaluator.evaluate(&query).await.into_iter().next())
    }

    /// Applies an event. Checks, in order: the idempotency key, then the expected version.
    pub async fn send(
        &self,
        namespace: &str,
        id: &str,
        event: EventRequest,
    ) -> Result<TransitionOutcome, RuntimeError> {
        let received = std::time::Instant::now();
        let telemetry = &self.shared.options.telemetry;
        if !telemetry.is_enabled() {
            return self
                .send_checked(namespace, id, event, received)
                .await
                .map_err(|e| e.error);
        }
        // A request refused before it reaches the committer is still an attempted transition:
        // its span, error count and audit line are made here.
        let name = event.name.clone();
        let actor = event.actor.clone();
        let parent = event.trace_parent.clone().or_else(|| {
            event.trace.clone().map(|context| TraceParent {
                context,
                sampled: true,
                tracestate: None,
            })
        });
        let result = self.send_checked(namespace, id, event, received).await;
        if let Err(error) = &result
            && !error.from_committer
        {
            telemetry.rejected(
                telemetry::AttemptStart {
                    trigger: telemetry::Trigger::Event,
                    namespace,
                    instance: id,
                    event: Some(&name),
                    actor: &actor,
                    received,
                    parent: parent.as_ref(),
                    link: None,
                },
                &error.error,
            );
        }
        result.map_err(|e| e.error)
    }

    async fn send_checked(
        &self,
        namespace: &str,
        id: &str,
        event: EventRequest,
        received: std::time::Instant,
    ) -> Result<TransitionOutcome, SendError> {
        if event.name.is_empty() || event.name.len() > 253 {
            return Err(SendError::arrival(RuntimeError::Invalid(
                "event name must be 1 to 253 characters".into(),
            )));
        }
        let size = serde_json::to_vec(&event.payload)
            .map(|v| v.len())
            .unwrap_or(0);
        if size > self.shared.options.payload_len_max {
            return Err(SendError::arrival(RuntimeError::Invalid(format!(
                "payload is {size} bytes, more than the limit of {}",
                self.shared.options.payload_len_max
            ))));
        }
        let store = &self.shared.store;
        // Arrival checks: a repeated key replays; an expected version already behind is stale.
        // On a shared store the durable version is a database read (no other node's commits
        // are published here), so an event that has neither goes straight to the committer,
        // which reads the instance anyway and answers NotFound for a missing one.
        let needs_arrival_read =
            event.expected_version.is_some() || event.idempotency_key.is_some();
        let durable = if self.shared.options.shared_store && !needs_arrival_read {
            None
        } else {
            match self
                .durable_version(namespace, id)
                .map_err(SendError::arrival)?
            {
                Some(v) => Some(v),
                None => {
                    return Err(SendError::arrival(RuntimeError::NotFound(format!(
                        "instance {namespace}/{id}"
                    ))));
                }
            }
        };
        if let Some(key) = &event.idempotency_key
            && let Some(entry) = store
                .idempotency(namespace, id, key)
                .map_err(|e| SendError::arrival(e.into()))?
            && entry.expires_ms > self.shared.options.clock.now_ms()
        {
            return self
                .replay(namespace, id, &event, &entry)
                .await
                .map_err(SendError::arrival);
        }
        if let Some(expected) = event.expected_version
            && let Some(durable) = durable
            && expected != durable
        {
            return Err(SendError::arrival(
                cnsm_core::TransitionError::StaleState {
                    expected,
                    actual: durable,
                }
                .into(),
            ));
        }
        let mut event = event;
        let mut flags = None;
        let deadline = event.deadline;
        for _ in 0..=flags::FLAG_ROUNDS_MAX {
            let (namespace, id) = (namespace.to_owned(), id.to_owned());
            let submitted = self.submit(|reply| committer::Command::Event {
                namespace,
                id,
                event,
                flags: flags.take(),
                received,
                reply,
            });
            let reply = match deadline {
                None => submitted.await,
                Some(at) => tokio::time::timeout_at(tokio::time::Instant::from_std(at), submitted)
                    .await
                    .unwrap_or_else(|_| Err(RuntimeError::Timeout(String::new()))),
            }
            .map_err(|error| match error {
                // The committer accounts for the attempt (refused as Timeout if it was still
                // queued, else applied): no second span or count here.
                RuntimeError::Timeout(_) => SendError {
                    error: RuntimeError::Timeout(
                        "the request's deadline passed while its event was queued or \
                         committing; its outcome is unknown (retry with the same idempotency \
                         key)"
                            .into(),
                    ),
                    from_committer: true,
                },
                other => SendError::arrival(other),
            })?;
            match reply {
                committer::EventReply::Done(result) => {
                    return result.map_err(|error| SendError {
                        error,
                        from_committer: true,
                    });
                }
                committer::EventReply::NeedFlags {
                    event: returned,
                    version,
                    queries,
                } => {
                    event = returned;
                    let Some(evaluator) = &self.shared.options.flags else {
                        return Err(SendError::arrival(RuntimeError::Unavailable(
                            "flag decisions were requested without an evaluator".into(),
                        )));
                    };
                    let decisions = evaluator.evaluate(&queries).await;
                    flags = Some(flags::SeenFlags { version, decisions });
                }
            }
        }
        Err(SendError::arrival(RuntimeError::Unavailable(format!(
            "flag decisions for {namespace}/{id} went stale {} times in a row (the instance \
             keeps changing); retry",
            flags::FLAG_ROUNDS_MAX + 1
        ))))
    }

    /// The rollout of a machine with the instance counts per revision.
    pub async fn rollout_status(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<RolloutStatus, RuntimeError> {
        let latest = self
            .shared
            .store
            .definition(namespace, name, None)?
            .ok_or_else(|| RuntimeError::NotFound(format!("statemachine {namespace}/{name}")))?;
        let rollout = self.shared.store.rollout(namespace, name)?;
        let mut active: BTreeMap<u32, u64> = BTreeMap::new();
        self.for_each_active(namespace, name, &mut |instance| {
            *active.entry(instance.revision).or_default() += 1;
        })?;
        Ok(RolloutStatus {
            latest: latest.revision,
            rollout,
            active_by_revision: active,
        })
    }

    /// Calls `visit` for every active instance of a machine, reading the store a page at a time.
    pub(crate) fn for_each_active(
        &self,
        namespace: &str,
        machine: &str,
        visit: &mut dyn FnMut(Instance),
    ) -> Result<(), RuntimeError> {
        let mut after = None;
        loop {
            let page = self.shared.store.list_instances(&InstanceQuery {
                namespace: Some(namespace.to_owned()),
                machine: Some(machine.to_owned()),
                status: Some(Status::Active),
                after: after.take(),
                limit: cnsm_store::PAGE_LEN_MAX,
                ..InstanceQuery::default()
            })?;
            let full = page.len() == cnsm_store::PAGE_LEN_MAX;
            if let Some(last) = page.last() {
                after = Some((
                    last.instance.namespace.to_string(),
                    last.instance.id.to_string(),
                ));
            }
            for stored in page {
                visit(stored.instance);
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Changes a machine's rollout: `Set` routes `weight` percent of new instances to
    /// `revision` (the rest to the rollout's stable revision, or to the revision before
    /// `revision` when none is in progress); `Promote` sends every new instance to the canary;
    /// `Abort` sends every new instance back to the stable revision; `Flag` routes new
    /// instances by a flag whose value names the revision, falling back to the revision new
    /// instances get now (see [`Runtime::create_instance`] and docs/migration.md).
    pub async fn change_rollout(
        &self,
        namespace: &str,
        name: &str,
        change: RolloutChange,
    ) -> Result<RolloutStatus, RuntimeError> {
        use cnsm_core::rollout::Rollout;
        let store = &self.shared.store;
        let latest = store
            .definition(namespace, name, None)?
            .ok_or_else(|| RuntimeError::NotFound(format!("statemachine {namespace}/{name}")))?
            .revision;
        let current = store.rollout(namespace, name)?;
        let next = match change {
            RolloutChange::Set { revision, weight } => {
                if weight > 100 {
                    return Err(RuntimeError::Invalid(format!(
                        "the weight is a percentage (0 to 100), not {weight}"
                    )));
                }
                if store.definition(namespace, name, Some(revision))?.is_none() {
                    return Err(RuntimeError::NotFound(format!(
                        "statemachine {namespace}/{name} revision {revision}"
                    )));
                }
                let stable = match &current {
                    Some(r) if r.weight >= 100 => r.canary,
                    Some(r) => r.stable,
                    None => {
                        let mut before = None;
                        for candidate in (1..revision).rev() {
                            if store
                                .definition(namespace, name, Some(candidate))?
                                .is_some()
                            {
                                before = Some(candidate);
                                break;
                            }
                        }
                        before.ok_or_else(|| {
                            RuntimeError::Invalid(format!(
                                "revision {revision} has no earlier revision to share new instances with"
                            ))
                        })?
                    }
                };
                if stable == revision {
                    return Err(RuntimeError::Invalid(format!(
                        "revision {revision} is already the stable revision"
                    )));
                }
                Some(Rollout {
                    stable,
                    canary: revision,
                    weight,
                    flag: None,
                })
            }
            RolloutChange::Flag { flag } => {
                if flag.is_empty()
                    || flag.len() > FLAG_KEY_LEN_MAX
                    || flag.chars().any(char::is_control)
                {
                    return Err(RuntimeError::Invalid(format!(
                        "the rollout flag must be a key of 1 to {FLAG_KEY_LEN_MAX} characters \
                         without control characters"
                    )));
                }
                // The fallback: what new instances get now (the rollout's stable revision, or
                // its canary once promoted; the latest without a rollout).
                let stable = match &current {
                    Some(r) if r.flag.is_none() && r.weight >= 100 => r.canary,
                    Some(r) => r.stable,
                    None => latest,
                };
                Some(Rollout {
                    stable,
                    canary: stable,
                    weight: 0,
                    flag: Some(flag),
                })
            }
            RolloutChange::Promote | RolloutChange::Abort => {
                let Some(r) = current else {
                    return Err(RuntimeError::Invalid(format!(
                        "statemachine {namespace}/{name} has no rollout in progress"
                    )));
                };
                let target = if change == RolloutChange::Promote {
                    r.canary
                } else {
                    r.stable
                };
                // With the latest revision as the target, no rollout is needed any more.
                (target != latest).then_some(Rollout {
                    stable: target,
                    canary: target,
                    weight: 0,
                    flag: None,
                })
            }
        };
        store.put_rollout(namespace, name, next.as_ref())?;
        self.rollout_status(namespace, name).await
    }

    /// Applies retention now: deletes the finished instances of every machine with
    /// `spec.retention` that ended more than `finishedAfterDays` ago (by the runtime's clock),
    /// with their history. The committer also does this every 10 minutes on a real clock.
    /// Returns how many instances were deleted.
    pub async fn apply_retention(&self) -> Result<u64, RuntimeError> {
        self.submit(|reply| committer::Command::Retention { reply })
            .await?
    }

    /// Applies an operator control through the same queue as events (so it is ordered with
    /// them), as one history record with the acting subject.
    pub async fn control(
        &self,
        namespace: &str,
        id: &str,
        request: ControlRequest,
    ) -> Result<TransitionOutcome, RuntimeError> {
        if let Some(reason) = &request.reason
            && reason.len() > 1024
        {
            return Err(RuntimeError::Invalid(
                "a control reason is at most 1024 bytes".into(),
            ));
        }
        if self.durable_version(namespace, id)?.is_none() {
            return Err(RuntimeError::NotFound(format!("instance {namespace}/{id}")));
        }
        let received = std::time::Instant::now();
        let (namespace, id) = (namespace.to_owned(), id.to_owned());
        let deadline = request.deadline;
        self.submit_until(deadline, |reply| committer::Command::Control {
            namespace,
            id,
            request,
            received,
            reply,
        })
        .await?
    }

    /// Erases personal data from an instance's history and data (see
    /// [`cnsm_core::erasure`]): one `erasure` record, committed on the committer thread with the
    /// redacted records in one store transaction. Allowed in any status; an active instance
    /// goes on with the marker values in its data.
    pub async fn erase(
        &self,
        namespace: &str,
        id: &str,
        request: EraseRequest,
    ) -> Result<TransitionOutcome, RuntimeError> {
        cnsm_core::erasure::parse_fields(&request.fields)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        if request
            .reason
            .as_ref()
            .is_some_and(|r| r.len() > cnsm_core::erasure::ERASE_REASON_LEN_MAX)
        {
            return Err(RuntimeError::Invalid(format!(
                "an erasure reason is at most {} bytes",
                cnsm_core::erasure::ERASE_REASON_LEN_MAX
            )));
        }
        if self.durable_version(namespace, id)?.is_none() {
            return Err(RuntimeError::NotFound(format!("instance {namespace}/{id}")));
        }
        let (namespace, id) = (namespace.to_owned(), id.to_owned());
        self.submit(|reply| committer::Command::Erase {
            namespace,
            id,
            request,
            reply,
        })
        .await?
    }

    pub(crate) async fn replay(
        &self,
        namespace: &str,
        id: &str,
        event: &EventRequest,
        entry: &cnsm_store::IdempotencyEntry,
    ) -> Result<TransitionOutcome, RuntimeError> {
        committer::replay(&self.shared, namespace, id, event, entry)
    }

    fn durable_version(&self, namespace: &str, id: &str) -> Result<Option<u64>, RuntimeError> {
        let key = (namespace.to_owned(), id.to_owned());
        if let Some(v) = self
            .shared
            .versions
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied())
        {
            return Ok(Some(v));
        }
        Ok(self
            .shared
            .store
            .instance(namespace, id)?
            .map(|s| s.instance.version))
    }

    /// The instance as of its latest commit.
    pub async fn instance(&self, namespace: &str, id: &str) -> Result<Instance, RuntimeError> {
        self.shared
            .store
            .instance(namespace, id)?
            .map(|s| s.instance)
            .ok_or_else(|| RuntimeError::NotFound(format!("instance {namespace}/{id}")))
    }

    pub async fn list_instances(
        &self,
        query: &InstanceQuery,
    ) -> Result<Vec<Instance>, RuntimeError> {
        Ok(self
            .shared
            .store
            .list_instances(query)?
            .into_iter()
            .map(|s| s.instance)
            .collect())
    }

    /// History records `from_version..`, at most `limit`, decoded and hash-checked.
    pub async fn history(
        &self,
        namespace: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, RuntimeError> {
        let store = &self.shared.store;
        if store.instance(namespace, id)?.is_none() {
            return Err(RuntimeError::NotFound(format!("instance {namespace}/{id}")));
        }
        let sealed = store.history(namespace, id, from_version, limit)?;
        decode_history(&**store, namespace, id, &sealed)
    }

    /// Fires every timer due at the clock's current time and waits until their records are
    /// committed. Returns how many timers fired. With the system clock the driver does this on
    /// its own; tests with a [`VirtualClock`] call it after advancing the clock.
    pub async fn fire_due_timers(&self) -> Result<usize, RuntimeError> {
        self.submit(|reply| committer::Command::Tick { reply })
            .await
    }

    /// Imports definition revisions and instances with their full history (a verified snapshot,
    /// see `cnsm-snapshot`) through [`Store::import_instances`]: one durable transaction, all
    /// or nothing, refused for existing instances unless `replace`. Runs on the committer
    /// thread, so it never interleaves with a batch; afterwards the timer index is rebuilt from
    /// the store, so imported timers that are already due fire right away.
    pub async fn import_instances(
        &self,
        definitions: Vec<cnsm_store::DefinitionRow>,
        items: Vec<cnsm_store::ImportItem>,
        replace: bool,
    ) -> Result<cnsm_store::ImportReport, RuntimeError> {
        self.submit(|reply| committer::Command::Import {
            definitions,
            items,
            replace,
            reply,
        })
        .await?
    }

    /// [`Runtime::import_instances`] with the items pulled one at a time from `items` inside
    /// the store's one transaction ([`Store::import_stream`]): memory does not grow with the
    /// snapshot, and an error from `items` midway writes nothing.
    pub async fn import_stream(
        &self,
        definitions: Vec<cnsm_store::DefinitionRow>,
        items: Box<cnsm_store::ImportItems<'static>>,
        replace: bool,
    ) -> Result<cnsm_store::ImportReport, RuntimeError> {
        self.submit(|reply| committer::Command::ImportStream {
            definitions,
            items,
            replace,
            reply,
        })
        .await?
    }

    /// Timers pending in the in-memory index.
    pub async fn pending_timers(&self) -> Result<usize, RuntimeError> {
        self.submit(|reply| committer::Command::CountTimers { reply })
            .await
    }
}

/// The error of `Runtime::send`, and whether the committer already reported it.
struct SendError {
    error: RuntimeError,
    from_committer: bool,
}

impl SendError {
    fn arrival(error: RuntimeError) -> SendError {
        SendError {
            error,
            from_committer: false,
        }
    }
}

/// Seeds the `cnsm.instances.active` gauge with the instances already stored.
fn seed_active(shared: &Shared) -> Result<(), RuntimeError> {
    let mut query = InstanceQuery {
        limit: cnsm_store::PAGE_LEN_MAX,
        ..InstanceQuery::default()
    };
    loop {
        let page = shared.store.list_instances(&query)?;
        let instances: Vec<Instance> = page.into_iter().map(|s| s.instance).collect();
        shared.options.telemetry.seed_active(&instances);
        match instances.last() {
            Some(last) if instances.len() == query.limit => {
                query.after = Some((last.namespace.to_string(), last.id.to_string()));
            }
            _ => return Ok(()),
        }
    }
}

/// Decodes a page of stored records of `namespace/id`, checking each stored hash; a redacted
/// record must be listed by a later erasure record of its chain (read from `store` when the page
/// does not reach it).
pub fn decode_history(
    store: &dyn cnsm_store::Store,
    namespace: &str,
    id: &str,
    sealed: &[SealedRecord],
) -> Result<Vec<HistoryEntry>, RuntimeError> {
    let failed =
        |e: String| RuntimeError::Unavailable(format!("stored history failed a check: {e}"));
    cnsm_store::check_history_page(namespace, id, sealed, |after| {
        store.history(namespace, id, after + 1, cnsm_store::PAGE_LEN_MAX)
    })
    .map_err(|e| failed(e.to_string()))?;
    sealed
        .iter()
        .map(|s| {
            cnsm_core::record::decode_record(s.version, &s.bytes)
                .map(|record| HistoryEntry {
                    record,
                    hash: s.hash,
                })
                .map_err(|e| failed(e.to_string()))
        })
        .collect()
}

/// RFC 1123 label.
pub fn validate_name(what: &str, name: &str) -> Result<(), RuntimeError> {
    if admission::is_rfc1123_label(name) {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "{what} '{name}' must be a lowercase RFC 1123 label (a-z, 0-9, '-', at most 63 characters)"
        )))
    }
}

/// Instance ids: 1–253 characters of `[A-Za-z0-9._:-]`.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "instance id '{id}' must be 1 to 253 characters of letters, digits, '.', '_', ':' or '-'"
        )))
    }
}

/// Counts instances by status (for `describe` and diagnostics).
pub fn count_by_status(instances: &[Instance]) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for i in instances {
        *out.entry(i.status.as_str()).or_insert(0) += 1;
    }
    out
}

/// True when `status` is active.
pub fn is_active(status: Status) -> bool {
    status == Status::Active
}
