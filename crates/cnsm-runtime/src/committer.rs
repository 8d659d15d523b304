//! The committer thread: batches requests, applies them through the engine, commits each batch
//! durably once, then answers every waiter (group commit). Due timers enter the same batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use cnsm_core::TransitionError;
use cnsm_core::engine::{ACTOR_TIMER, Input, NewInstance, Trigger as EngineTrigger};
use cnsm_core::flags::FlagQuery;
use cnsm_core::migration::CompiledMigration;
use cnsm_core::record::{FlagDecision, Hash32, StateChangeEvent, Timer};
use cnsm_core::{Instance, SealedRecord};
use cnsm_store::{
    CommitItem, DefinitionRow, IdempotencyEntry, ImportItem, ImportReport, ItemOutcome, Refreshed,
    TimerRef,
};
use tokio::sync::oneshot;

use crate::flags::SeenFlags;
use crate::telemetry::{Attempt, AttemptStart, CommittedBatch, LocalMetrics, TraceParent, Trigger};
use crate::timers::TimerIndex;
use crate::{
    ControlRequest, CreateInstance, EventRequest, RuntimeError, SHARED_RETRIES_MAX, Shared,
    TransitionOutcome,
};

/// Longest sleep of the timer driver, so a clock jump is noticed.
const SLEEP_MS_MAX: u64 = 1000;

/// How often expired idempotency keys are purged from the store.
const PURGE_INTERVAL_MS: u64 = 60_000;

/// How often retention deletes finished instances past their machine's window.
const RETENTION_INTERVAL_MS: u64 = 600_000;

/// Most instances one retention transaction deletes, and transactions per machine per sweep
/// (the sweep runs between batches, so it stays short).
const RETENTION_CHUNK: usize = 1_000;
const RETENTION_CHUNKS_MAX: usize = 20;

pub(crate) enum Command {
    Create {
        request: CreateInstance,
        /// The provider's answer for the flag a flag-routed rollout names, evaluated by
        /// `Runtime::create_instance` before queueing (flags are async).
        routing: Option<FlagDecision>,
        /// When `Runtime::create_instance` got it: the start of its transition timing.
        received: std::time::Instant,
        reply: oneshot::Sender<Result<Instance, RuntimeError>>,
    },
    Event {
        namespace: String,
        id: String,
        event: EventRequest,
        /// When `Runtime::send` got the event: the start of its transition timing.
        received: std::time::Instant,
        /// Flag decisions made before queueing, tagged with the version they saw.
        flags: Option<SeenFlags>,
        reply: oneshot::Sender<EventReply>,
    },
    Control {
        namespace: String,
        id: String,
        request: ControlRequest,
        /// When `Runtime::control` got it.
        received: std::time::Instant,
        reply: oneshot::Sender<Result<TransitionOutcome, RuntimeError>>,
    },
    Tick {
        reply: oneshot::Sender<usize>,
    },
    CountTimers {
        reply: oneshot::Sender<usize>,
    },
    /// One step of a migration for one instance: its `pre` lock or its migration record.
    Migrate {
        namespace: String,
        id: String,
        migration: Arc<CompiledMigration>,
        lock: bool,
        actor: String,
        reply: oneshot::Sender<Result<TransitionOutcome, RuntimeError>>,
    },
    /// Apply every machine's retention now; answers how many instances were deleted.
    Retention {
        reply: oneshot::Sender<Result<u64, RuntimeError>>,
    },
    /// An erasure: runs on this thread (the one writer) after the batch it arrived in, in its
    /// own store transaction (redacted records and the erasure record together).
    Erase {
        namespace: String,
        id: String,
        request: crate::EraseRequest,
        reply: oneshot::Sender<Result<TransitionOutcome, RuntimeError>>,
    },
    /// A snapshot import: runs on this thread (the one writer) after the batch it arrived in.
    Import {
        definitions: Vec<DefinitionRow>,
        items: Vec<ImportItem>,
        replace: bool,
        reply: oneshot::Sender<Result<ImportReport, RuntimeError>>,
    },
    /// A streamed snapshot import: like `Import`, with the items pulled from `items` inside
    /// the store's one transaction.
    ImportStream {
        definitions: Vec<DefinitionRow>,
        items: Box<cnsm_store::ImportItems<'static>>,
        replace: bool,
        reply: oneshot::Sender<Result<ImportReport, RuntimeError>>,
    },
    Stop,
}

/// The committer's answer to an event. `Done` is the common, large one; boxing it would cost an
/// allocation per event, so the size difference stays.
#[allow(clippy::large_enum_variant)]
pub(crate) enum EventReply {
    Done(Result<TransitionOutcome, RuntimeError>),
    /// The event needs flag decisions for this version (none were given, or they are stale);
    /// nothing was committed. The request comes back to be queued again.
    NeedFlags {
        event: EventRequest,
        version: u64,
        queries: Vec<FlagQuery>,
    },
}

type Key = (String, String);

struct Cached {
    uid: Option<u64>,
    instance: Instance,
    /// The trace of the last record this process committed for it (timer spans link to it).
    trace: Option<cnsm_core::record::TraceContext>,
}

/// An event kept for re-applying after it lost a race to another node (shared store).
struct RetryEvent {
    key: Key,
    event: EventRequest,
    received: std::time::Instant,
}

/// Where the outcome of a transition goes: an event's reply (which may also carry a request
/// for flag decisions), or a control's or migration step's plain result.
enum OutcomeReply {
    Event(oneshot::Sender<EventReply>),
    Direct(oneshot::Sender<Result<TransitionOutcome, RuntimeError>>),
}

impl OutcomeReply {
    fn send(self, result: Result<TransitionOutcome, RuntimeError>) {
        match self {
            OutcomeReply::Event(reply) => {
                let _ = reply.send(EventReply::Done(result));
            }
            OutcomeReply::Direct(reply) => {
                let _ = reply.send(result);
            }
        }
    }
}

/// What to answer once the batch is durable.
enum Waiter {
    Created {
        item: usize,
        reply: oneshot::Sender<Result<Instance, RuntimeError>>,
    },
    Applied {
        item: usize,
        replayed: bool,
        reply: OutcomeReply,
        /// On a shared store, an event without an expected version, kept to re-apply it if it
        /// loses a race to another node.
        retry: Option<Box<RetryEvent>>,
    },
    CreateFailed {
        error: RuntimeError,
        reply: oneshot::Sender<Result<Instance, RuntimeError>>,
    },
    EventFailed {
        error: RuntimeError,
        reply: OutcomeReply,
    },
    Tick {
        n_fired: usize,
        reply: oneshot::Sender<usize>,
    },
}

struct Committer {
    shared: Arc<Shared>,
    /// The decoded record of each item of the current batch, in item order, so nothing is
    /// decoded again after sealing.
    batch_records: Vec<StateChangeEvent>,
    /// The telemetry of each item of the current batch, in item order (`None` when off).
    batch_attempts: Vec<Option<Attempt>>,
    local_metrics: LocalMetrics,
    cache: HashMap<Key, Cached>,
    /// A full cache (and version map) taken out, freed a chunk per batch: freeing 200,000
    /// instances at once held the committer for some 100 ms, and freeing them on another thread
    /// as long (the allocator's arena lock).
    evicted: Option<std::collections::hash_map::IntoIter<Key, Cached>>,
    evicted_versions: Option<std::collections::hash_map::IntoIter<Key, u64>>,
    timers: TimerIndex,
    /// When a shared-store node next asks the store for due timers.
    next_timer_poll_ms: u64,
}

/// How many evicted cache entries the committer frees per batch.
const EVICT_CHUNK: usize = 1_000;

/// Frees up to [`EVICT_CHUNK`] entries of `evicted`, and forgets it when it is empty.
fn free_chunk<V>(evicted: &mut Option<std::collections::hash_map::IntoIter<Key, V>>) {
    if let Some(entries) = evicted {
        for _ in 0..EVICT_CHUNK {
            if entries.next().is_none() {
                *evicted = None;
                return;
            }
        }
    }
}

pub(crate) fn start(
    shared: Arc<Shared>,
) -> Result<(SyncSender<Command>, JoinHandle<()>), RuntimeError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(shared.options.queue_len_max);
    let mut committer = Committer {
        shared,
        batch_records: Vec::new(),
        batch_attempts: Vec::new(),
        local_metrics: LocalMetrics::default(),
        cache: HashMap::new(),
        evicted: None,
        evicted_versions: None,
        timers: TimerIndex::default(),
        next_timer_poll_ms: 0,
    };
    // On a shared store the timers are claimed from the store; there is no index to build.
    if committer.shared.options.timers && !committer.shared.options.shared_store {
        committer.rebuild_timers()?;
    }
    let thread = std::thread::Builder::new()
        .name("cnsm-committer".into())
        .spawn(move || committer.run(rx))
        .map_err(|e| RuntimeError::Unavailable(format!("cannot start the committer: {e}")))?;
    Ok((tx, thread))
}

/// The answer to a repeated idempotency key: the original record, or a conflict.
pub(crate) fn replay(
    shared: &Shared,
    namespace: &str,
    id: &str,
    event: &EventRequest,
    entry: &IdempotencyEntry,
) -> Result<TransitionOutcome, RuntimeError> {
    if entry.request_hash != event.request_hash() {
        return Err(RuntimeError::Conflict(format!(
            "idempotency key '{}' was used with a different request",
            entry.key
        )));
    }
    let sealed = shared
        .store
        .history(namespace, id, 0, entry.version as usize + 1)?;
    let history = crate::decode_history(&*shared.store, namespace, id, &sealed)?;
    let instance = Instance::replay(history.iter().map(|h| (&h.record, h.hash)))
        .map_err(|e| RuntimeError::Unavailable(format!("history does not replay: {e}")))?
        .ok_or_else(|| RuntimeError::NotFound(format!("instance {namespace}/{id}")))?;
    let last = history
        .into_iter()
        .last()
        .ok_or_else(|| RuntimeError::NotFound(format!("instance {namespace}/{id}")))?;
    Ok(TransitionOutcome {
        record: last.record,
        hash: last.hash,
        instance,
        replayed: true,
    })
}

impl Committer {
    fn rebuild_timers(&mut self) -> Result<(), RuntimeError> {
        self.timers.clear();
        let timers = &mut self.timers;
        self.shared
            .store
            .pending_timers(&mut |t| timers.insert_ref(t))?;
        Ok(())
    }

    /// Imports through the store in one transaction, then forgets cached copies and published
    /// versions of the imported instances and rebuilds the timer index from the store, so an
    /// imported timer that is already due fires on the next pass.
    fn import(
        &mut self,
        definitions: &[DefinitionRow],
        items: &[ImportItem],
        replace: bool,
    ) -> Result<ImportReport, RuntimeError> {
        let result = self
            .shared
            .store
            .import_instances(definitions, items, replace);
        let mut versions = self.shared.versions.lock().ok();
        for item in items {
            let key = (
                item.instance.namespace.to_string(),
                item.instance.id.to_string(),
            );
            self.cache.remove(&key);
            if let Some(v) = versions.as_mut() {
                v.remove(&key);
            }
        }
        drop(versions);
        if self.shared.options.timers {
            self.rebuild_timers()?;
        }
        Ok(result?)
    }

    /// [`Committer::import`] for a stream of items. The imported keys are not kept (that would
    /// grow with the snapshot), so the whole cache and version map are forgotten instead: both
    /// refill from the store.
    fn import_stream(
        &mut self,
        definitions: &[DefinitionRow],
        items: &mut cnsm_store::ImportItems<'_>,
        replace: bool,
    ) -> Result<ImportReport, RuntimeError> {
        let result = self.shared.store.import_stream(definitions, items, replace);
        // Freed a chunk per batch, as a full cache is (at once, a full one held the committer
        // for some 100 ms).
        self.evicted = Some(std::mem::take(&mut self.cache).into_iter());
        if let Ok(mut versions) = self.shared.versions.lock() {
            self.evicted_versions = Some(std::mem::take(&mut *versions).into_iter());
        }
        if self.shared.options.timers {
            self.rebuild_timers()?;
        }
        Ok(result?)
    }

    /// Plans and commits an erasure: the instance and its whole history from the store (the one
    /// writer committed everything it caches), the redaction, one `Store::erase`; then the cache,
    /// the version map, the timer index and listeners as after a commit.
    fn erase(
        &mut self,
        key: Key,
        request: &crate::EraseRequest,
        now_ms: u64,
    ) -> Result<TransitionOutcome, RuntimeError> {
        let store = Arc::clone(&self.shared.store);
        let parent = request.trace.clone().map(|context| TraceParent {
            context,
            sampled: true,
            tracestate: None,
        });
        let started = std::time::Instant::now();
        let attempt = self.shared.options.telemetry.start(AttemptStart {
            trigger: Trigger::Control,
            namespace: &key.0,
            instance: &key.1,
            event: Some("erase"),
            actor: &request.actor,
            received: started,
            parent: parent.as_ref(),
            link: None,
        });
        let mut attempt = attempt;
        let result = (|| {
            let Some(stored) = store.instance(&key.0, &key.1)? else {
                return Err(RuntimeError::NotFound(format!(
                    "instance {}/{}",
                    key.0, key.1
                )));
            };
            let instance = stored.instance;
            if let Some(a) = attempt.as_mut() {
                a.note_instance(&instance);
            }
            let mut history = Vec::new();
            while (history.len() as u64) <= instance.version {
                let page = store.history(
                    &key.0,
                    &key.1,
                    history.len() as u64,
                    cnsm_store::PAGE_LEN_MAX,
                )?;
                if page.is_empty() {
                    break;
                }
                history.extend(page);
            }
            history.truncate(instance.version as usize + 1);
            let plan = cnsm_core::erasure::plan(
                &instance,
                &history,
                &cnsm_core::erasure::EraseRequest {
                    fields: &request.fields,
                    reason: request.reason.as_deref(),
                    actor: &request.actor,
                    now_ms,
                    trace: request.trace.clone(),
                },
            )
            .map_err(|e| match e {
                cnsm_core::erasure::ErasureError::History { .. } => {
                    RuntimeError::Unavailable(e.to_string())
                }
                other => RuntimeError::Invalid(other.to_string()),
            })?;
            let item = CommitItem {
                instance: plan.instance.clone(),
                record: plan.sealed.clone(),
                expected_version: Some(instance.version),
                idempotency: None,
            };
            self.cache.remove(&key);
            let commit_started = std::time::Instant::now();
            let outcome = store.erase(&plan.redacted, &item)?;
            let commit_duration = commit_started.elapsed();
            if let ItemOutcome::Conflict { .. } = outcome {
                return Err(RuntimeError::Transition(TransitionError::RaceCondition {
                    expected: instance.version,
                    actual: instance.version + 1,
                }));
            }
            let before: HashMap<Key, Option<Timer>> = [(key.clone(), instance.timer)].into();
            self.after_commit(
                std::slice::from_ref(&item),
                std::slice::from_ref(&plan.record),
                std::slice::from_ref(&key),
                &[outcome],
                &before,
            );
            let hash = plan.sealed.hash;
            let batch = CommittedBatch {
                n_items: 1,
                commit_duration,
                dequeued: started,
                attempts: vec![attempt.take()],
                records: std::slice::from_ref(&plan.record),
                hash_of: &|_| hash,
                conflicts: Vec::new(),
            };
            self.shared
                .options
                .telemetry
                .committed(batch, &mut self.local_metrics);
            Ok(TransitionOutcome {
                record: plan.record,
                hash: plan.sealed.hash,
                instance: plan.instance,
                replayed: false,
            })
        })();
        if let (Some(attempt), Err(e)) = (attempt, &result) {
            self.shared.options.telemetry.failed(attempt, e);
        }
        result
    }

    /// Runs a command that commits in a store transaction of its own (an import, an erasure)
    /// and answers it. Other commands are ignored: they go through [`Committer::process`].
    fn run_alone(&mut self, command: Command, now_ms: u64) {
        match command {
            Command::Import {
                definitions,
                items,
                replace,
                reply,
            } => {
                let _ = reply.send(self.import(&definitions, &items, replace));
            }
            Command::ImportStream {
                definitions,
                mut items,
                replace,
                reply,
            } => {
                let _ = reply.send(self.import_stream(&definitions, &mut *items, replace));
            }
            Command::Erase {
                namespace,
                id,
                request,
                reply,
            } => {
                let _ = reply.send(self.erase((namespace, id), &request, now_ms));
            }
            _ => {}
        }
    }

    fn run(mut self, rx: Receiver<Command>) {
        let batch_len_max = self.shared.options.batch_len_max.max(1);
        let clock = Arc::clone(&self.shared.options.clock);
        let drive_timers = self.shared.options.timers && !clock.is_virtual();
        let mut next_purge_ms = clock.now_ms().saturating_add(PURGE_INTERVAL_MS);
        let mut next_retention_ms = clock.now_ms().saturating_add(PURGE_INTERVAL_MS);
        loop {
            let wait = if drive_timers && self.shared.options.shared_store {
                let now = clock.now_ms();
                Some(Duration::from_millis(
                    self.next_timer_poll_ms
                        .saturating_sub(now)
                        .min(SLEEP_MS_MAX),
                ))
            } else if drive_timers {
                let now = clock.now_ms();
                let until = self
                    .timers
                    .next_due_ms()
                    .map(|d| d.saturating_sub(now))
                    .unwrap_or(SLEEP_MS_MAX);
                Some(Duration::from_millis(until.min(SLEEP_MS_MAX)))
            } else {
                None
            };
            let first = match wait {
                Some(d) if d.is_zero() => None,
                Some(d) => match rx.recv_timeout(d) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                },
            };
            let mut batch: Vec<Command> = first.into_iter().collect();
            while batch.len() < batch_len_max {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            // Stop is sent without counting it in; every other command was counted on submit.
            let n_counted = batch.iter().filter(|c| !matches!(c, Command::Stop)).count();
            self.shared
                .queued
                .fetch_sub(n_counted, std::sync::atomic::Ordering::SeqCst);
            let stop = batch.iter().any(|c| matches!(c, Command::Stop));
            let fire_timers =
                drive_timers || batch.iter().any(|c| matches!(c, Command::Tick { .. }));
            let (imports, batch): (Vec<Command>, Vec<Command>) = batch.into_iter().partition(|c| {
                matches!(
                    c,
                    Command::Import { .. } | Command::ImportStream { .. } | Command::Erase { .. }
                )
            });
            self.process(batch, fire_timers, 0);
            for import in imports {
                self.run_alone(import, clock.now_ms());
            }
            // Forget expired idempotency keys now and then (expired ones are ignored anyway).
            if drive_timers && clock.now_ms() >= next_purge_ms {
                let _ = self.shared.store.purge_idempotency(clock.now_ms());
                next_purge_ms = clock.now_ms().saturating_add(PURGE_INTERVAL_MS);
            }
            if drive_timers && clock.now_ms() >= next_retention_ms {
                let _ = self.apply_retention(clock.now_ms());
                next_retention_ms = clock.now_ms().saturating_add(RETENTION_INTERVAL_MS);
            }
            if stop {
                break;
            }
        }
    }

    /// Deletes the finished instances of every machine with `spec.retention` (its latest
    /// revision's) that ended more than `finishedAfterDays` before `now_ms`.
    fn apply_retention(&mut self, now_ms: u64) -> Result<u64, RuntimeError> {
        let store = Arc::clone(&self.shared.store);
        let mut n_deleted = 0;
        for row in store.list_definitions(None)? {
            let Some(retention) = row.definition.spec.retention else {
                continue;
            };
            let window_ms = u64::from(retention.finished_after_days) * 86_400_000;
            let cutoff = now_ms.saturating_sub(window_ms);
            for _ in 0..RETENTION_CHUNKS_MAX {
                let n = store.purge_finished(&row.namespace, &row.name, cutoff, RETENTION_CHUNK)?;
                n_deleted += n;
                if (n as usize) < RETENTION_CHUNK {
                    break;
                }
            }
        }
        if n_deleted > 0 {
            // Deleted instances had ended, so the cache holds none of them; the version map
            // might.
            if let Ok(mut versions) = self.shared.versions.lock() {
                versions.clear();
            }
        }
        Ok(n_deleted)
    }

    /// The current state of an instance: this batch's working copy, the cache, or the store.
    fn load(&mut self, key: &Key) -> Result<Option<&mut Cached>, RuntimeError> {
        if !self.cache.contains_key(key) {
            match self.shared.store.instance(&key.0, &key.1)? {
                Some(stored) => {
                    if self.cache.len() >= self.shared.options.cache_len_max {
                        // A rest of the previous eviction, if any, goes at once.
                        self.evicted = Some(std::mem::take(&mut self.cache).into_iter());
                    }
                    self.cache.insert(
                        key.clone(),
                        Cached {
                            uid: Some(stored.uid),
                            instance: stored.instance,
                            trace: None,
                        },
                    );
                }
                None => return Ok(None),
            }
        }
        Ok(self.cache.get_mut(key))
    }

    /// Brings the cache up to date for a batch (shared store: other nodes commit too, so a
    /// cached copy may be stale). Every instance the batch's events, controls and migrations
    /// name is refreshed in one round trip, in which a copy still at the stored uid and version
    /// is kept without reading its row; every other cached instance is forgotten (timers and
    /// retries read theirs). Best effort: after a failure the cache is empty and the instances
    /// are read one by one.
    fn refresh(&mut self, batch: &[Command]) {
        let keys: std::collections::BTreeSet<(&str, &str)> = batch
            .iter()
            .filter_map(|c| match c {
                Command::Event { namespace, id, .. }
                | Command::Control { namespace, id, .. }
                | Command::Migrate { namespace, id, .. } => Some((namespace.as_str(), id.as_str())),
                _ => None,
            })
            .collect();
        self.cache
            .retain(|k, _| keys.contains(&(k.0.as_str(), k.1.as_str())));
        // What the cache holds now is the batch's: the (uid, version) of each copy.
        let copies: HashMap<(&str, &str), (u64, u64)> = self
            .cache
            .iter()
            .filter_map(|(k, c)| Some(((&*k.0, &*k.1), (c.uid?, c.instance.version))))
            .collect();
        let held: Vec<cnsm_store::HeldKey<'_>> = keys
            .iter()
            .map(|&(namespace, id)| (namespace, id, copies.get(&(namespace, id)).copied()))
            .collect();
        let Ok(found) = self.shared.store.refresh_instances(&held) else {
            self.cache.clear();
            return;
        };
        let mut current: std::collections::HashSet<Key> =
            std::collections::HashSet::with_capacity(found.len());
        for refreshed in found {
            match refreshed {
                Refreshed::Unchanged { namespace, id } => {
                    current.insert((namespace, id));
                }
                Refreshed::Changed(stored) => {
                    let stored = *stored;
                    let key = (
                        stored.instance.namespace.to_string(),
                        stored.instance.id.to_string(),
                    );
                    current.insert(key.clone());
                    self.cache.insert(
                        key,
                        Cached {
                            uid: Some(stored.uid),
                            instance: stored.instance,
                            trace: None,
                        },
                    );
                }
            }
        }
        // Copies of instances the store no longer has.
        self.cache.retain(|k, _| current.contains(k));
    }

    /// Applies and commits one batch; `attempt` counts re-applications after lost races
    /// (shared store only).
    fn process(&mut self, batch: Vec<Command>, fire_timers: bool, attempt: u32) {
        free_chunk(&mut self.evicted);
        free_chunk(&mut self.evicted_versions);
        let now_ms = self.shared.options.clock.now_ms();
        // When the batch was taken: the end of every request's queue wait.
        let batch_started = std::time::Instant::now();
        let shared_store = self.shared.options.shared_store;
        if shared_store {
            self.refresh(&batch);
        }
        let mut items: Vec<CommitItem> = Vec::new();
        let mut item_keys: Vec<Key> = Vec::new();
        // The timer each touched instance had before the batch (`None` for new instances), to
        // take out of the index after the commit; the keys are what a failed commit evicts.
        let mut before: HashMap<Key, Option<Timer>> = HashMap::new();
        let mut waiters: Vec<Waiter> = Vec::new();
        let mut pending_keys: HashMap<(Key, String), (Hash32, usize)> = HashMap::new();
        let mut n_timers_fired = 0;

        for command in batch {
            match command {
                Command::Stop => {}
                // `run` takes imports and erasures out of the batch; one that got here runs in
                // order.
                command @ (Command::Import { .. }
                | Command::ImportStream { .. }
                | Command::Erase { .. }) => {
                    self.run_alone(command, now_ms);
                }
                Command::CountTimers { reply } => {
                    let _ = reply.send(self.timers.len());
                }
                Command::Tick { reply } => waiters.push(Waiter::Tick { n_fired: 0, reply }),
                Command::Migrate {
                    namespace,
                    id,
                    migration,
                    lock,
                    actor,
                    reply,
                } => {
                    let key = (namespace, id);
                    let mut attempt = self.shared.options.telemetry.start(AttemptStart {
                        trigger: Trigger::Migration,
                        namespace: &key.0,
                        instance: &key.1,
                        event: Some(if lock { "lock" } else { "migrate" }),
                        actor: &actor,
                        received: batch_started,
                        parent: None,
                        link: None,
                    });
                    let result = self.migrate(
                        &key,
                        &migration,
                        lock,
                        &actor,
                        now_ms,
                        &mut attempt,
                        &mut items,
                        &mut item_keys,
                        &mut before,
                    );
                    self.settle(result, attempt, reply, &mut waiters);
                }
                Command::Retention { reply } => {
                    let _ = reply.send(self.apply_retention(now_ms));
                }
                Command::Create {
                    request,
                    routing,
                    received,
                    reply,
                } => {
                    let telemetry = &self.shared.options.telemetry;
                    let attempt = telemetry.start(AttemptStart {
                        trigger: Trigger::Create,
                        namespace: &request.namespace,
                        instance: request.id.as_deref().unwrap_or_default(),
                        event: None,
                        actor: &request.actor,
                        received,
                        parent: None,
                        link: None,
                    });
                    let attempt_slot = &mut Some(attempt);
                    let past = queued_past_deadline(request.deadline, batch_started, || {
                        "the create".to_owned()
                    });
                    let result = match past {
                        Some(error) => Err(error),
                        None => self.create(
                            request,
                            routing,
                            now_ms,
                            &mut items,
                            &mut item_keys,
                            &mut before,
                        ),
                    };
                    match result {
                        Ok(item) => {
                            self.batch_attempts.push(attempt_slot.take().flatten());
                            waiters.push(Waiter::Created { item, reply });
                        }
                        Err(error) => {
                            if let Some(a) = attempt_slot.take().flatten() {
                                self.shared.options.telemetry.failed(a, &error);
                            }
                            waiters.push(Waiter::CreateFailed { error, reply });
                        }
                    }
                }
                Command::Event {
                    namespace,
                    id,
                    event,
                    received,
                    flags,
                    reply,
                } => {
                    let key = (namespace, id);
                    let parent = event.trace_parent.clone().or_else(|| {
                        event.trace.clone().map(|context| TraceParent {
                            context,
                            sampled: true,
                            tracestate: None,
                        })
                    });
                    let mut attempt = self.shared.options.telemetry.start(AttemptStart {
                        trigger: Trigger::Event,
                        namespace: &key.0,
                        instance: &key.1,
                        event: Some(&event.name),
                        actor: &event.actor,
                        received,
                        parent: parent.as_ref(),
                        link: None,
                    });
                    let retry = (shared_store && event.expected_version.is_none()).then(|| {
                        Box::new(RetryEvent {
                            key: key.clone(),
                            event: event.clone(),
                            received,
                        })
                    });
                    // A caller's deadline that passed while the event waited in the queue:
                    // refused before it is applied (error.type Timeout).
                    let past = queued_past_deadline(event.deadline, batch_started, || {
                        format!("the event '{}'", event.name)
                    });
                    let result = if let Some(error) = past {
                        Err(error)
                    } else {
                        self.event(
                            &key,
                            event,
                            flags,
                            now_ms,
                            &mut attempt,
                            &mut items,
                            &mut item_keys,
                            &mut before,
                            &mut pending_keys,
                        )
                    };
                    match result {
                        Ok(Applied::Staged(item, replayed)) => {
                            if !replayed {
                                self.batch_attempts.push(attempt);
                            }
                            waiters.push(Waiter::Applied {
                                item,
                                replayed,
                                reply: OutcomeReply::Event(reply),
                                retry,
                            })
                        }
                        Ok(Applied::NeedFlags {
                            event,
                            version,
                            queries,
                        }) => {
                            // Not an attempt yet: it comes back with decisions.
                            drop(attempt);
                            let _ = reply.send(EventReply::NeedFlags {
                                event,
                                version,
                                queries,
                            });
                        }
                        Err(error) => {
                            if let Some(a) = attempt {
                                self.shared.options.telemetry.failed(a, &error);
                            }
                            waiters.push(Waiter::EventFailed {
                                error,
                                reply: OutcomeReply::Event(reply),
                            })
                        }
                    }
                }
                Command::Control {
                    namespace,
                    id,
                    request,
                    received,
                    reply,
                } => {
                    let key = (namespace, id);
                    let parent = request.trace.clone().map(|context| TraceParent {
                        context,
                        sampled: true,
                        tracestate: None,
                    });
                    let mut attempt = self.shared.options.telemetry.start(AttemptStart {
                        trigger: Trigger::Control,
                        namespace: &key.0,
                        instance: &key.1,
                        event: Some(request.action.as_str()),
                        actor: &request.actor,
                        received,
                        parent: parent.as_ref(),
                        link: None,
                    });
                    let past = queued_past_deadline(request.deadline, batch_started, || {
                        format!("the {} control", request.action.as_str())
                    });
                    let result = match past {
                        Some(error) => Err(error),
                        None => self.control(
                            &key,
                            &request,
                            now_ms,
                            &mut attempt,
                            &mut items,
                            &mut item_keys,
                            &mut before,
                        ),
                    };
                    self.settle(result, attempt, reply, &mut waiters);
                }
            }
        }
        let poll_due = !shared_store || now_ms >= self.next_timer_poll_ms || {
            // A Tick asks for timers now.
            waiters.iter().any(|w| matches!(w, Waiter::Tick { .. }))
        };
        if fire_timers && poll_due {
            n_timers_fired = self.fire_due(now_ms, &mut items, &mut item_keys, &mut before);
        }
        for w in &mut waiters {
            if let Waiter::Tick { n_fired, .. } = w {
                *n_fired = n_timers_fired;
            }
        }
        let records = std::mem::take(&mut self.batch_records);
        let attempts = std::mem::take(&mut self.batch_attempts);
        self.shared
            .options
            .telemetry
            .timers_pending(self.timers.len());
        if items.is_empty() {
            answer(waiters, &[], &[], &[]);
            return;
        }
        let commit_started = std::time::Instant::now();
        match self.shared.store.commit(&items) {
            Ok(outcomes) => {
                let commit_duration = commit_started.elapsed();
                self.after_commit(&items, &records, &item_keys, &outcomes, &before);
                self.shared
                    .options
                    .telemetry
                    .timers_pending(self.timers.len());
                if self.shared.options.telemetry.is_enabled() {
                    let batch = CommittedBatch {
                        n_items: items.len(),
                        commit_duration,
                        dequeued: batch_started,
                        attempts,
                        records: &records,
                        hash_of: &|i| items[i].record.hash,
                        conflicts: items
                            .iter()
                            .zip(&outcomes)
                            .enumerate()
                            .filter_map(|(i, (item, outcome))| match outcome {
                                ItemOutcome::Committed { .. } => None,
                                ItemOutcome::Conflict { actual } => Some((
                                    i,
                                    RuntimeError::from(TransitionError::RaceCondition {
                                        expected: item.expected_version.unwrap_or(0),
                                        actual: actual.unwrap_or(0),
                                    }),
                                )),
                            })
                            .collect(),
                    };
                    self.shared
                        .options
                        .telemetry
                        .committed(batch, &mut self.local_metrics);
                }
                // Listeners hear of the batch after its transitions are marked committed (the
                // audit log's rejected lines come from the telemetry hooks above).
                if let Ok(listeners) = self.shared.listeners.read() {
                    for l in listeners.iter() {
                        l.on_batch(items.len(), commit_duration);
                    }
                }
                let (waiters, retries) = split_lost_races(waiters, &outcomes, attempt);
                answer(waiters, &items, &records, &outcomes);
                if !retries.is_empty() {
                    // Re-applied on the state the winning node committed (reloaded).
                    self.process(retries, false, attempt + 1);
                }
            }
            Err(e) => {
                // Nothing of the batch is durable: forget the working copies, rebuild the timer
                // index from the store, and fail every waiter of the batch.
                for key in before.keys() {
                    self.cache.remove(key);
                }
                if let Ok(mut versions) = self.shared.versions.lock() {
                    versions.clear();
                }
                if !shared_store {
                    let _ = self.rebuild_timers();
                }
                let message = format!("the durable commit failed, nothing was committed: {e}");
                tracing::warn!(n_items = items.len(), "{message}");
                let error = RuntimeError::Unavailable(message.clone());
                for a in attempts.into_iter().flatten() {
                    self.shared.options.telemetry.failed(a, &error);
                }
                fail_all(waiters, &message);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        request: CreateInstance,
        routing_answer: Option<FlagDecision>,
        now_ms: u64,
        items: &mut Vec<CommitItem>,
        item_keys: &mut Vec<Key>,
        before: &mut HashMap<Key, Option<Timer>>,
    ) -> Result<usize, RuntimeError> {
        let id = request
            .id
            .clone()
            .unwrap_or_else(|| generate_id(&request.machine));
        // A canary rollout routes new instances that ask for no revision (sticky per id).
        let mut routing = None;
        let mut revision = request.revision;
        if revision.is_none()
            && let Some(rollout) = self
                .shared
                .store
                .rollout(&request.namespace, &request.machine)?
        {
            let (routed, decision) = match &rollout.flag {
                None => rollout.route(&request.machine, &id),
                Some(flag) => {
                    // Evaluated before queueing; a rollout that changed to a flag in between
                    // finds no answer here and falls back to its stable revision.
                    let answer = routing_answer
                        .filter(|a| a.key == *flag)
                        .unwrap_or_else(|| FlagDecision {
                            key: flag.clone(),
                            variant: None,
                            value: serde_json::Value::Null,
                            reason: "ERROR".into(),
                            error: Some("FLAG_NOT_EVALUATED".into()),
                            allowed: false,
                        });
                    let store = &self.shared.store;
                    rollout.route_by_flag(answer, |candidate| {
                        store
                            .definition(&request.namespace, &request.machine, Some(candidate))
                            .map(|row| row.is_some())
                    })?
                }
            };
            revision = Some(routed);
            routing = Some(decision);
        }
        let row = self
            .shared
            .store
            .definition(&request.namespace, &request.machine, revision)?
            .ok_or_else(|| {
                RuntimeError::NotFound(format!(
                    "statemachine {}/{}",
                    request.namespace, request.machine
                ))
            })?;
        let machine = self.shared.machine_of(row)?;
        let key = (request.namespace.clone(), id.clone());
        if self.load(&key)?.is_some() {
            return Err(RuntimeError::Conflict(format!(
                "instance {}/{} already exists",
                key.0, key.1
            )));
        }
        let mut record = machine.create(NewInstance {
            namespace: &request.namespace,
            id: &id,
            data: request.data,
            labels: request.labels,
            now_ms,
            actor: &request.actor,
        })?;
        // The routing decision is part of the genesis record, like any flag decision.
        record.flags.extend(routing);
        let sealed = record.seal();
        let instance = Instance::from_genesis(&record, sealed.hash).map_err(|e| {
            RuntimeError::Unavailable(format!("genesis record does not apply: {e}"))
        })?;
        before.entry(key.clone()).or_insert(None);
        self.cache.insert(
            key.clone(),
            Cached {
                uid: None,
                instance: instance.clone(),
                trace: None,
            },
        );
        self.batch_records.push(record);
        items.push(CommitItem {
            instance,
            record: sealed,
            expected_version: None,
            idempotency: None,
        });
        item_keys.push(key);
        Ok(items.len() - 1)
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        key: &Key,
        event: EventRequest,
        flags: Option<SeenFlags>,
        now_ms: u64,
        attempt: &mut Option<Attempt>,
        items: &mut Vec<CommitItem>,
        item_keys: &mut Vec<Key>,
        before: &mut HashMap<Key, Option<Timer>>,
        pending_keys: &mut HashMap<(Key, String), (Hash32, usize)>,
    ) -> Result<Applied, RuntimeError> {
        let request_hash = event.request_hash();
        if let Some(k) = &event.idempotency_key {
            if let Some((hash, item)) = pending_keys.get(&(key.clone(), k.clone())) {
                if *hash != request_hash {
                    return Err(RuntimeError::Conflict(format!(
                        "idempotency key '{k}' was used with a different request"
                    )));
                }
                return Ok(Applied::Staged(*item, true));
            }
            if let Some(entry) = self.shared.store.idempotency(&key.0, &key.1, k)?
                && entry.expires_ms > now_ms
            {
                // Committed by an earlier batch after this request passed its arrival check.
                return Err(match replay(&self.shared, &key.0, &key.1, &event, &entry) {
                    Ok(_) => RuntimeError::Conflict(format!(
                        "idempotency key '{k}' was committed concurrently; repeat the request to read its result"
                    )),
                    Err(e) => e,
                });
            }
        }
        let ttl = self.shared.options.idempotency_ttl_ms;
        let shared = Arc::clone(&self.shared);
        let Some(cached) = self.load(key)? else {
            return Err(RuntimeError::NotFound(format!(
                "instance {}/{}",
                key.0, key.1
            )));
        };
        if let Some(expected) = event.expected_version
            && expected != cached.instance.version
        {
            return Err(TransitionError::RaceCondition {
                expected,
                actual: cached.instance.version,
            }
            .into());
        }
        let instance = &cached.instance;
        let machine = shared.machine(&instance.namespace, &instance.machine, instance.revision)?;
        // Flag gates: decisions must have been made at this very version (DESIGN.md §3).
        let mut decisions: &[FlagDecision] = &[];
        if shared.options.flags.is_some() {
            let queries = machine.flag_queries(instance, &event.name, &event.payload);
            if !queries.is_empty() {
                match &flags {
                    Some(seen) if seen.version == instance.version => decisions = &seen.decisions,
                    _ => {
                        return Ok(Applied::NeedFlags {
                            version: instance.version,
                            queries,
                            event,
                        });
                    }
                }
            }
        }
        let mut input = Input::new(
            EngineTrigger::Event {
                name: &event.name,
                payload: &event.payload,
            },
            now_ms,
            event.actor.as_str(),
        );
        input.idempotency_key = event.idempotency_key.as_deref();
        input.flags = decisions;
        let evaluated = match attempt {
            Some(a) => {
                shared.options.telemetry.loaded(a, instance);
                // The span's ids, or the caller's context (which the attempt copied).
                input.trace = a.trace.as_deref().cloned();
                a.timed.then(std::time::Instant::now)
            }
            None => {
                input.trace = event.trace.clone();
                None
            }
        };
        let record = machine.apply(instance, &input);
        if let (Some(a), Some(t)) = (attempt.as_mut(), evaluated) {
            a.evaluation = t.elapsed();
        }
        let record = record?;
        let idempotency = event.idempotency_key.as_ref().map(|k| IdempotencyEntry {
            key: k.clone(),
            request_hash,
            version: record.version,
            expires_ms: now_ms.saturating_add(ttl),
        });
        stage(cached, key, &record, idempotency, items, item_keys, before)?;
        self.batch_records.push(record);
        if let Some(k) = event.idempotency_key {
            pending_keys.insert((key.clone(), k), (request_hash, items.len() - 1));
        }
        Ok(Applied::Staged(items.len() - 1, false))
    }

    /// Queues the answer of a control or migration step, and its attempt for telemetry (kept
    /// aligned with the batch's items).
    fn settle(
        &mut self,
        result: Result<usize, RuntimeError>,
        attempt: Option<Attempt>,
        reply: oneshot::Sender<Result<TransitionOutcome, RuntimeError>>,
        waiters: &mut Vec<Waiter>,
    ) {
        match result {
            Ok(item) => {
                self.batch_attempts.push(attempt);
                waiters.push(Waiter::Applied {
                    item,
                    replayed: false,
                    reply: OutcomeReply::Direct(reply),
                    retry: None,
                });
            }
            Err(error) => {
                if let Some(a) = attempt {
                    self.shared.options.telemetry.failed(a, &error);
                }
                waiters.push(Waiter::EventFailed {
                    error,
                    reply: OutcomeReply::Direct(reply),
                });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn control(
        &mut self,
        key: &Key,
        request: &ControlRequest,
        now_ms: u64,
        attempt: &mut Option<Attempt>,
        items: &mut Vec<CommitItem>,
        item_keys: &mut Vec<Key>,
        before: &mut HashMap<Key, Option<Timer>>,
    ) -> Result<usize, RuntimeError> {
        let shared = Arc::clone(&self.shared);
        let Some(cached) = self.load(key)? else {
            return Err(RuntimeError::NotFound(format!(
                "instance {}/{}",
                key.0, key.1
            )));
        };
        let instance = &cached.instance;
        if let Some(a) = attempt {
            a.note_instance(instance);
        }
        let machine = shared.machine(&instance.namespace, &instance.machine, instance.revision)?;
        let mut input = Input::new(
            EngineTrigger::Control {
                action: request.action,
                reason: request.reason.as_deref(),
            },
            now_ms,
            request.actor.as_str(),
        );
        input.trace = request.trace.clone();
        let record = machine.apply(instance, &input)?;
        stage(cached, key, &record, None, items, item_keys, before)?;
        self.batch_records.push(record);
        Ok(items.len() - 1)
    }

    /// A migration step: the `pre` lock (`lock`), or the migration record on the target
    /// revision. The plan is decided here, against the instance as it is now.
    #[allow(clippy::too_many_arguments)]
    fn migrate(
        &mut self,
        key: &Key,
        migration: &CompiledMigration,
        lock: bool,
        actor: &str,
        now_ms: u64,
        attempt: &mut Option<Attempt>,
        items: &mut Vec<CommitItem>,
        item_keys: &mut Vec<Key>,
        before: &mut HashMap<Key, Option<Timer>>,
    ) -> Result<usize, RuntimeError> {
        let shared = Arc::clone(&self.shared);
        let Some(cached) = self.load(key)? else {
            return Err(RuntimeError::NotFound(format!(
                "instance {}/{}",
                key.0, key.1
            )));
        };
        let instance = &cached.instance;
        if let Some(a) = attempt {
            a.note_instance(instance);
        }
        let refuse = |why: String| -> RuntimeError {
            TransitionError::TransitionFailure {
                state: instance.state.to_string(),
                event: "migrate".into(),
                reason: cnsm_core::error::FailureReason::ControlRefused(why.clone()),
                message: format!("'migrate' refused: {why}"),
            }
            .into()
        };
        let plan = migration.plan(instance).map_err(refuse)?;
        let input = Input::new(
            EngineTrigger::Event {
                name: "migrate",
                payload: &serde_json::Value::Null,
            },
            now_ms,
            actor,
        );
        let record = if lock {
            let machine =
                shared.machine(&instance.namespace, &instance.machine, instance.revision)?;
            machine.lock(
                instance,
                &migration.name,
                now_ms.saturating_add(migration.lock_ms),
                &input,
            )?
        } else {
            let target = shared.machine(
                &instance.namespace,
                &instance.machine,
                migration.to_revision,
            )?;
            target.migrate(
                instance,
                &migration.name,
                &plan.target_state,
                plan.data_set,
                &input,
            )?
        };
        stage(cached, key, &record, None, items, item_keys, before)?;
        self.batch_records.push(record);
        Ok(items.len() - 1)
    }

    /// Turns due timers into items. A timer whose instance moved on is dropped silently.
    fn fire_due(
        &mut self,
        now_ms: u64,
        items: &mut Vec<CommitItem>,
        item_keys: &mut Vec<Key>,
        before: &mut HashMap<Key, Option<Timer>>,
    ) -> usize {
        let n_max = self.shared.options.batch_len_max.max(1);
        let options = &self.shared.options;
        let due = if options.shared_store {
            self.next_timer_poll_ms = now_ms.saturating_add(options.timer_poll_ms.max(1));
            // Claimed for a lease: a timer whose commit fails here is claimed again (by any
            // node) once the lease expires.
            match self.shared.store.claim_due_timers(
                now_ms,
                options.timer_lease_ms,
                &options.node_id,
                n_max,
            ) {
                Ok(due) => due,
                Err(_) => return 0,
            }
        } else {
            self.timers.pop_due(now_ms, n_max)
        };
        let shared_store = options.shared_store;
        let mut n_fired = 0;
        for timer in due {
            match self.fire_one(timer, now_ms, items, item_keys, before) {
                Ok(true) => n_fired += 1,
                Ok(false) => {}
                Err(RuntimeError::Transition(TransitionError::Locked { until_ms, .. })) => {
                    // Held by a migration's lock: try again when the lease ends (the migration
                    // record re-arms the timer under the new revision before that, if it
                    // commits).
                    self.timers.insert_ref(TimerRef {
                        due_ms: until_ms.max(now_ms + 1),
                        ..timer
                    });
                }
                Err(_) if shared_store => {}
                Err(_) => {
                    // Retried until it commits: put it back for the next round.
                    self.timers.insert_ref(TimerRef {
                        due_ms: now_ms + 100,
                        ..timer
                    });
                }
            }
        }
        n_fired
    }

    fn fire_one(
        &mut self,
        timer: TimerRef,
        now_ms: u64,
        items: &mut Vec<CommitItem>,
        item_keys: &mut Vec<Key>,
        before: &mut HashMap<Key, Option<Timer>>,
    ) -> Result<bool, RuntimeError> {
        let Some(stored) = self.shared.store.instance_by_uid(timer.uid)? else {
            return Ok(false);
        };
        let key = (
            stored.instance.namespace.to_string(),
            stored.instance.id.to_string(),
        );
        let shared = Arc::clone(&self.shared);
        let Some(cached) = self.load(&key)? else {
            return Ok(false);
        };
        cached.uid = Some(timer.uid);
        let instance = &cached.instance;
        let machine = shared.machine(&instance.namespace, &instance.machine, instance.revision)?;
        let fired = cnsm_core::record::Timer {
            due_ms: timer.due_ms,
            entry_seq: timer.entry_seq,
            kind: timer.kind,
        };
        let mut input = Input::new(EngineTrigger::Timer(fired), now_ms, ACTOR_TIMER);
        let telemetry = &shared.options.telemetry;
        let mut attempt = None;
        if telemetry.is_enabled() && instance.timer == Some(fired) {
            let trigger = if fired.kind == cnsm_core::record::TimerKind::Backoff {
                Trigger::Retry
            } else {
                Trigger::Timer
            };
            let now = std::time::Instant::now();
            attempt = telemetry.start(AttemptStart {
                trigger,
                namespace: &instance.namespace,
                instance: &instance.id,
                event: None,
                actor: ACTOR_TIMER,
                received: now,
                parent: None,
                link: cached.trace.as_ref(),
            });
            if let Some(a) = attempt.as_mut() {
                telemetry.loaded(a, instance);
                input.trace = a.trace.as_deref().cloned();
            }
        }
        let evaluated = attempt
            .as_ref()
            .filter(|a| a.timed)
            .map(|_| std::time::Instant::now());
        let record = match machine.fire(instance, &input) {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(false),
            Err(e) => {
                let e = RuntimeError::from(e);
                if let Some(a) = attempt {
                    telemetry.failed(a, &e);
                }
                return Err(e);
            }
        };
        if let (Some(a), Some(t)) = (attempt.as_mut(), evaluated) {
            a.evaluation = t.elapsed();
        }
        telemetry.timer_fired(Duration::from_millis(now_ms.saturating_sub(timer.due_ms)));
        stage(cached, &key, &record, None, items, item_keys, before)?;
        self.batch_records.push(record);
        self.batch_attempts.push(attempt);
        Ok(true)
    }

    fn after_commit(
        &mut self,
        items: &[CommitItem],
        records: &[StateChangeEvent],
        item_keys: &[Key],
        outcomes: &[ItemOutcome],
        before: &HashMap<Key, Option<Timer>>,
    ) {
        let listeners = self
            .shared
            .listeners
            .read()
            .map(|l| l.clone())
            .unwrap_or_default();
        let shared_store = self.shared.options.shared_store;
        let mut versions = self.shared.versions.lock().ok();
        if let Some(v) = versions.as_mut()
            && v.len() > self.shared.options.cache_len_max
        {
            self.evicted_versions = Some(std::mem::take(&mut **v).into_iter());
        }
        // The timer each instance had before the batch, to take out of the index.
        let mut old_timers: HashMap<&Key, Option<Timer>> =
            before.iter().map(|(key, timer)| (key, *timer)).collect();
        let mut conflicted: Vec<&Key> = Vec::new();
        for (index, ((item, key), outcome)) in items.iter().zip(item_keys).zip(outcomes).enumerate()
        {
            match outcome {
                ItemOutcome::Committed { uid } if shared_store => {
                    // No timer index and no published versions: other nodes commit too. The
                    // cached copy is kept with its uid, for the next batch's refresh.
                    if let Some(c) = self.cache.get_mut(key) {
                        c.uid = Some(*uid);
                    }
                    if let Some(record) = records.get(index) {
                        for l in &listeners {
                            l.on_commit(record, item.record.hash, &item.instance);
                        }
                    }
                }
                ItemOutcome::Committed { uid } => {
                    if let Some(old) = old_timers.get_mut(key) {
                        if let Some(t) = old.take() {
                            self.timers.remove(*uid, &t);
                        }
                        *old = item.instance.timer;
                    }
                    if let Some(t) = &item.instance.timer {
                        self.timers.insert(*uid, t);
                    }
                    if let Some(c) = self.cache.get_mut(key) {
                        c.uid = Some(*uid);
                    }
                    if let Some(v) = versions.as_mut() {
                        v.insert(key.clone(), item.instance.version);
                    }
                    if let Some(record) = records.get(index) {
                        for l in &listeners {
                            l.on_commit(record, item.record.hash, &item.instance);
                        }
                    }
                }
                ItemOutcome::Conflict { .. } => conflicted.push(key),
            }
        }
        // A conflict means another writer moved the instance: reload it next time.
        for key in conflicted {
            self.cache.remove(key);
            if let Some(v) = versions.as_mut() {
                v.remove(key);
            }
        }
        // Drop the batch's final instances from the cache: nothing more happens to them. (Only
        // the batch's keys: a scan of the whole cache per batch costs O(cache), which on a
        // store of a million instances was most of the committer's time.)
        for (item, key) in items.iter().zip(item_keys) {
            if item.instance.status.is_final()
                && self
                    .cache
                    .get(key)
                    .is_some_and(|c| c.instance.status.is_final())
            {
                self.cache.remove(key);
            }
        }
    }
}

/// What became of an event in the batch.
// A short-lived return value; boxing the request would cost an allocation per flagged event.
#[allow(clippy::large_enum_variant)]
enum Applied {
    /// Staged as this item (`true`: a repeated idempotency key within the batch).
    Staged(usize, bool),
    /// Sent back for flag decisions at `version`.
    NeedFlags {
        event: EventRequest,
        version: u64,
        queries: Vec<FlagQuery>,
    },
}

/// Seals `record`, folds it into the working copy of its instance, and adds it to the batch.
#[allow(clippy::too_many_arguments)]
fn stage(
    cached: &mut Cached,
    key: &Key,
    record: &StateChangeEvent,
    idempotency: Option<IdempotencyEntry>,
    items: &mut Vec<CommitItem>,
    item_keys: &mut Vec<Key>,
    before: &mut HashMap<Key, Option<Timer>>,
) -> Result<(), RuntimeError> {
    let sealed = record.seal();
    let expected_version = cached.instance.version;
    before.entry(key.clone()).or_insert(cached.instance.timer);
    if record.trace.is_some() || cached.trace.is_some() {
        cached.trace = record.trace.clone();
    }
    cached
        .instance
        .apply_record(record, sealed.hash)
        .map_err(|e| RuntimeError::Unavailable(format!("record does not apply: {e}")))?;
    items.push(CommitItem {
        instance: cached.instance.clone(),
        record: sealed,
        expected_version: Some(expected_version),
        idempotency,
    });
    item_keys.push(key.clone());
    Ok(())
}

/// The refusal of an event, create or control (`what` names it) whose caller's deadline passed
/// while it waited in the queue: not applied (error.type `Timeout`).
fn queued_past_deadline(
    deadline: Option<std::time::Instant>,
    dequeued: std::time::Instant,
    what: impl FnOnce() -> String,
) -> Option<RuntimeError> {
    deadline.filter(|at| dequeued >= *at).map(|_| {
        RuntimeError::Timeout(format!(
            "{} waited in the queue past the request's deadline; it was not applied",
            what()
        ))
    })
}

/// Splits off the waiters whose event lost a race to another node and may be re-applied (no
/// expected version, shared store): they come back as commands for another batch, or, after
/// [`SHARED_RETRIES_MAX`] attempts, fail with `Unavailable`.
fn split_lost_races(
    waiters: Vec<Waiter>,
    outcomes: &[ItemOutcome],
    attempt: u32,
) -> (Vec<Waiter>, Vec<Command>) {
    let mut keep = Vec::with_capacity(waiters.len());
    let mut retries = Vec::new();
    for waiter in waiters {
        match waiter {
            Waiter::Applied {
                item,
                reply: OutcomeReply::Event(reply),
                retry: Some(retry),
                ..
            } if matches!(outcomes.get(item), Some(ItemOutcome::Conflict { .. })) => {
                if attempt < SHARED_RETRIES_MAX {
                    let RetryEvent {
                        key: (namespace, id),
                        event,
                        received,
                    } = *retry;
                    // Flag decisions were made at the lost version: they are asked for again.
                    retries.push(Command::Event {
                        namespace,
                        id,
                        event,
                        received,
                        flags: None,
                        reply,
                    });
                } else {
                    keep.push(Waiter::EventFailed {
                        error: RuntimeError::Unavailable(
                            "the instance is contended by other nodes; retry later".into(),
                        ),
                        reply: OutcomeReply::Event(reply),
                    });
                }
            }
            other => keep.push(other),
        }
    }
    (keep, retries)
}

fn answer(
    waiters: Vec<Waiter>,
    items: &[CommitItem],
    records: &[StateChangeEvent],
    outcomes: &[ItemOutcome],
) {
    let conflict = |item: usize| match outcomes.get(item) {
        Some(ItemOutcome::Committed { .. }) => None,
        Some(ItemOutcome::Conflict { actual }) => Some(*actual),
        None => Some(None),
    };
    for waiter in waiters {
        match waiter {
            Waiter::Created { item, reply } => {
                let result = match conflict(item) {
                    None => Ok(items[item].instance.clone()),
                    Some(_) => Err(RuntimeError::Conflict(format!(
                        "instance {}/{} already exists",
                        items[item].instance.namespace, items[item].instance.id
                    ))),
                };
                let _ = reply.send(result);
            }
            Waiter::Applied {
                item,
                replayed,
                reply,
                retry: _,
            } => {
                let result = match conflict(item) {
                    None => outcome_of(&items[item], records.get(item), replayed),
                    Some(actual) => {
                        let expected = items[item].expected_version.unwrap_or(0);
                        Err(TransitionError::RaceCondition {
                            expected,
                            actual: actual.unwrap_or(0),
                        }
                        .into())
                    }
                };
                reply.send(result);
            }
            Waiter::CreateFailed { error, reply } => {
                let _ = reply.send(Err(error));
            }
            Waiter::EventFailed { error, reply } => reply.send(Err(error)),
            Waiter::Tick { n_fired, reply } => {
                let _ = reply.send(n_fired);
            }
        }
    }
}

fn outcome_of(
    item: &CommitItem,
    record: Option<&StateChangeEvent>,
    replayed: bool,
) -> Result<TransitionOutcome, RuntimeError> {
    let record = match record {
        Some(record) => record.clone(),
        None => open(&item.record)?,
    };
    Ok(TransitionOutcome {
        record,
        hash: item.record.hash,
        instance: item.instance.clone(),
        replayed,
    })
}

fn open(sealed: &SealedRecord) -> Result<StateChangeEvent, RuntimeError> {
    sealed
        .open()
        .map_err(|e| RuntimeError::Unavailable(format!("record failed its check: {e}")))
}

fn fail_all(waiters: Vec<Waiter>, message: &str) {
    for waiter in waiters {
        match waiter {
            Waiter::Created { reply, .. } | Waiter::CreateFailed { reply, .. } => {
                let _ = reply.send(Err(RuntimeError::Unavailable(message.to_owned())));
            }
            Waiter::Applied { reply, .. } | Waiter::EventFailed { reply, .. } => {
                reply.send(Err(RuntimeError::Unavailable(message.to_owned())));
            }
            Waiter::Tick { reply, .. } => {
                let _ = reply.send(0);
            }
        }
    }
}

/// A fresh instance id: the machine name and 12 hex digits from the OS's randomness.
pub(crate) fn generate_id(machine: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{machine}-{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_waiter(item: usize, retry: bool) -> (Waiter, oneshot::Receiver<EventReply>) {
        let (reply, rx) = oneshot::channel();
        let retry = retry.then(|| {
            Box::new(RetryEvent {
                key: ("default".into(), "c".into()),
                event: EventRequest::new("add"),
                received: std::time::Instant::now(),
            })
        });
        let waiter = Waiter::Applied {
            item,
            replayed: false,
            reply: OutcomeReply::Event(reply),
            retry,
        };
        (waiter, rx)
    }

    /// After a shared-store batch lost races, every waiter still holds its reply: an event
    /// without expected version comes back as a command to re-apply (while retries are left) or
    /// fails `Unavailable`; an `If-Match` event and a committed one stay to be answered.
    #[test]
    fn lost_races_keep_every_reply() {
        for attempt in [0, SHARED_RETRIES_MAX - 1, SHARED_RETRIES_MAX] {
            let conflict = ItemOutcome::Conflict { actual: Some(3) };
            let outcomes = [conflict, conflict, ItemOutcome::Committed { uid: 1 }];
            let (waiters, mut receivers): (Vec<_>, Vec<_>) =
                [(0, true), (1, false), (2, true), (0, true)]
                    .into_iter()
                    .map(|(item, retry)| event_waiter(item, retry))
                    .unzip();
            let (kept, retries) = split_lost_races(waiters, &outcomes, attempt);
            let n_retried = if attempt < SHARED_RETRIES_MAX { 2 } else { 0 };
            assert_eq!(retries.len(), n_retried, "attempt {attempt}");
            assert_eq!(kept.len(), 4 - n_retried, "attempt {attempt}");
            if attempt == SHARED_RETRIES_MAX {
                let n_failed = kept
                    .iter()
                    .filter(|w| {
                        matches!(w, Waiter::EventFailed { error: RuntimeError::Unavailable(m), .. }
                            if m.contains("contended"))
                    })
                    .count();
                assert_eq!(n_failed, 2);
            }
            // Answer what was kept, and the re-queued commands as a later batch would.
            fail_all(kept, "answered");
            for command in retries {
                let Command::Event {
                    reply,
                    event,
                    flags,
                    ..
                } = command
                else {
                    panic!("a retry is an event command");
                };
                assert!(flags.is_none(), "flag decisions are asked for again");
                assert_eq!(event.name, "add");
                let _ = reply.send(EventReply::Done(Err(RuntimeError::Unavailable(
                    "retried".into(),
                ))));
            }
            for (index, rx) in receivers.iter_mut().enumerate() {
                assert!(
                    matches!(rx.try_recv(), Ok(EventReply::Done(Err(_)))),
                    "attempt {attempt}: waiter {index} got no answer"
                );
            }
        }
    }
}
