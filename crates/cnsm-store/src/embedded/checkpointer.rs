//! Checkpoints beside the committer.
//!
//! A checkpoint is a durable redb commit: it writes every page the non-durable commits since the
//! last one changed and fsyncs the file. On a large store that takes milliseconds, and redb holds
//! its one write lock meanwhile. Taken on the committer's thread, every batch that arrives during
//! one waits for it: those waits were the whole tail of commit latency (BENCHMARKS.md). So the
//! committer starts each checkpoint on a thread of its own (`cnsm-checkpoint`) and goes on:
//!
//! 1. it switches the write-ahead log to its other file ([`super::wal::Wal::switch`]); the
//!    checkpoint covers every frame of the first one (redb has applied them all);
//! 2. while the checkpoint runs, each batch is decided without redb's write lock: an item's
//!    compare-and-swap reads the instance's head from the batches deferred so far, else from a
//!    redb read snapshot (which a write transaction does not block), exactly as the write would
//!    ([`super::decide`]); the committed items are appended to the log and made durable, and the
//!    batch is acknowledged and kept here;
//! 3. when the durable commit is done, the checkpoint thread applies the deferred batches to redb
//!    in non-durable transactions, checking that each item commits as it was decided: while
//!    many wait, in rounds that take them out and apply them without the lock, so the committer
//!    goes on deferring (in the durable bench at 256 clients, 38–70 ms per checkpoint, all of it
//!    a wait for the committer when it was one round under the lock); the last round applies the
//!    few left under the lock, and the committer goes back to applying batches itself. The heads
//!    stay until that last round, and readers of what a round holds wait for it as for the
//!    deferred batches.
//!
//! The checkpoint thread (and the background verifier) run at a lower CPU priority (nice 10):
//! on a machine with few cores a checkpoint's page writes and apply rounds otherwise preempted
//! the committer and the request threads, and the requests answered in those windows made the
//! HTTP tail (BENCHMARKS.md). They still get the CPU the others leave.
//!
//! Nothing is acknowledged before it is durable in the log, as before. A crash during a
//! checkpoint leaves redb at the previous one; replay follows the chain of frames from there
//! through the first file into the second ([`super::wal::live_chain`]).
//!
//! Reads must not miss an acknowledged batch: an instance or idempotency key that a deferred
//! batch changed is read from the row or entry it left; a read of such an instance's history, an
//! instance by uid, and any read that is not about one instance (lists, the commit log, timers,
//! backups) wait until the batches are applied, but only while deferred batches exist, which is
//! only during a checkpoint. Every other write of the store waits for the checkpoint to finish first.
//!
//! If the checkpoint or the application of the deferred batches fails, the store refuses every
//! further read and write with that error: the acknowledged batches are in the log, and the next
//! open replays them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use cnsm_core::record::Hash32;
use redb::{Database, Durability};

use super::tables::*;
use super::wal::CheckpointStats;
use super::{InstanceHead, commit_in, meta_get, persistable_checkpoint};
use crate::{CommitItem, IdempotencyEntry, ItemOutcome, StoreError};

/// The state shared by the committer, the checkpoint thread and readers.
#[derive(Default)]
pub(crate) struct Checkpointer {
    state: Mutex<State>,
    /// Signalled when a checkpoint finishes (or a test releases a held one).
    changed: Condvar,
    /// Whether deferred batches exist: readers look here before taking the lock.
    deferred: AtomicBool,
}

#[derive(Default)]
pub(crate) struct State {
    /// A checkpoint runs (from its start until its deferred batches are applied).
    pub(crate) in_flight: bool,
    thread: Option<JoinHandle<()>>,
    /// Batches acknowledged during the checkpoint, in order; only their committed items.
    batches: Vec<DeferredBatch>,
    /// The head and row of every instance a deferred batch changed, by namespace and id.
    heads: HashMap<String, HashMap<String, (InstanceHead, Vec<u8>)>>,
    /// The idempotency entries the deferred batches wrote, by namespace, id and key.
    keys: HashMap<(String, String, String), IdempotencyEntry>,
    /// The uids of those instances.
    uids: HashSet<u64>,
    /// `(next_uid, next_seq)` after the deferred batches, once one was decided.
    pub(crate) counters: Option<(u64, u64)>,
    /// Why the store refuses work until it is reopened.
    failed: Option<String>,
    /// The checkpoint thread applies batches it took out of `batches` (not yet visible in redb).
    applying: bool,
    /// Test hook: a checkpoint that starts waits until this is cleared.
    hold: bool,
    pub(crate) stats: CheckpointStats,
}

struct DeferredBatch {
    first_seq: u64,
    items: Vec<CommitItem>,
    prev_hashes: Vec<Hash32>,
}

impl State {
    /// The head a deferred batch left for an instance.
    pub(crate) fn head(&self, namespace: &str, id: &str) -> Option<&InstanceHead> {
        self.heads.get(namespace)?.get(id).map(|(head, _)| head)
    }

    /// Whether a deferred batch changed the instance with `uid`.
    pub(crate) fn touches_uid(&self, uid: u64) -> bool {
        self.uids.contains(&uid)
    }

    /// The uid and encoded row a deferred batch left for an instance.
    pub(crate) fn row(&self, namespace: &str, id: &str) -> Option<(u64, &[u8])> {
        self.heads
            .get(namespace)?
            .get(id)
            .map(|(head, row)| (head.uid, row.as_slice()))
    }

    /// The idempotency entry a deferred batch wrote for an instance's key.
    pub(crate) fn key(&self, namespace: &str, id: &str, key: &str) -> Option<&IdempotencyEntry> {
        self.keys
            .get(&(namespace.to_owned(), id.to_owned(), key.to_owned()))
    }

    pub(crate) fn failed(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(why) => Err(StoreError::Io(why.clone())),
            None => Ok(()),
        }
    }

    /// Keeps a batch the committer acknowledged during the checkpoint, with the heads it left,
    /// the encoded row of each (in the same order) and the counters after it.
    pub(crate) fn defer(
        &mut self,
        first_seq: u64,
        items: Vec<CommitItem>,
        prev_hashes: Vec<Hash32>,
        heads: Vec<(String, String, InstanceHead)>,
        rows: Vec<Vec<u8>>,
        counters: (u64, u64),
    ) {
        for item in &items {
            if let Some(entry) = &item.idempotency {
                let (namespace, id) = (&item.instance.namespace, &item.instance.id);
                self.keys.insert(
                    (namespace.to_string(), id.to_string(), entry.key.clone()),
                    entry.clone(),
                );
            }
        }
        for ((namespace, id, head), row) in heads.into_iter().zip(rows) {
            self.uids.insert(head.uid);
            self.heads
                .entry(namespace)
                .or_default()
                .insert(id, (head, row));
        }
        self.batches.push(DeferredBatch {
            first_seq,
            items,
            prev_hashes,
        });
        self.counters = Some(counters);
    }
}

impl Checkpointer {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks that deferred batches exist (after [`State::defer`], under the lock).
    pub(crate) fn mark_deferred(&self) {
        self.deferred.store(true, Ordering::SeqCst);
    }

    /// What `look` finds among the deferred batches, or `None` at once when there are none.
    pub(crate) fn look<T>(&self, look: impl FnOnce(&State) -> Option<T>) -> Option<T> {
        if !self.deferred.load(Ordering::SeqCst) {
            return None;
        }
        look(&self.lock())
    }

    /// Waits until no deferred batch that `touches` matters to is waiting to be applied, so that
    /// a read sees every acknowledged batch. Free when no checkpoint has deferred anything.
    pub(crate) fn wait_applied(&self, touches: impl Fn(&State) -> bool) -> Result<(), StoreError> {
        if !self.deferred.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut state = self.lock();
        while state.failed.is_none()
            && (!state.batches.is_empty() || state.applying)
            && touches(&state)
        {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.failed()
    }

    /// Waits until no checkpoint runs, and joins its thread; the store's error if it failed.
    pub(crate) fn settle(&self) -> Result<(), StoreError> {
        let mut state = self.lock();
        while state.in_flight {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        let thread = state.thread.take();
        let result = state.failed();
        drop(state);
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        result
    }

    /// Test hook: checkpoints that start from now on wait (before their durable commit) until
    /// this is called with `false`.
    pub(crate) fn hold(&self, hold: bool) {
        self.lock().hold = hold;
        self.changed.notify_all();
    }

    /// Starts a checkpoint on its own thread; the caller switched the log and holds the store's
    /// write lock. `log_bytes` are the frames it covers. `Err` when the thread cannot start (the
    /// caller then takes the checkpoint itself).
    pub(crate) fn start(
        self: &Arc<Checkpointer>,
        db: &Arc<Database>,
        quick_repair: bool,
        verified_upto: &Arc<AtomicU64>,
        log_bytes: u64,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(done) = state.thread.take() {
            // It finished: `in_flight` is only set here, under the write lock.
            let _ = done.join();
        }
        let (me, db, upto) = (Arc::clone(self), Arc::clone(db), Arc::clone(verified_upto));
        let thread = std::thread::Builder::new()
            .name("cnsm-checkpoint".into())
            .spawn(move || {
                super::yield_cpu_to_the_committer();
                me.run(&db, quick_repair, &upto, log_bytes)
            })
            .map_err(|e| StoreError::Io(format!("cannot start a checkpoint thread: {e}")))?;
        state.in_flight = true;
        state.thread = Some(thread);
        Ok(())
    }

    fn run(&self, db: &Database, quick_repair: bool, verified_upto: &AtomicU64, log_bytes: u64) {
        {
            let mut state = self.lock();
            while state.hold {
                state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
        let started = Instant::now();
        let durable = durable_checkpoint(db, quick_repair, verified_upto);
        let took = started.elapsed();
        let (mut state, result) = match durable {
            Ok(()) => {
                self.lock().stats.record(took, log_bytes);
                self.apply_all(db, verified_upto)
            }
            Err(e) => (self.lock(), Err(e)),
        };
        match result {
            Ok(()) => {
                state.batches.clear();
                state.heads.clear();
                state.keys.clear();
                state.uids.clear();
                state.counters = None;
                self.deferred.store(false, Ordering::SeqCst);
            }
            Err(e) => {
                state.failed = Some(format!(
                    "a checkpoint failed ({e}); every acknowledged batch is in the write-ahead \
                     log: reopen the store to recover"
                ));
            }
        }
        state.in_flight = false;
        drop(state);
        self.changed.notify_all();
    }

    /// Applies the deferred batches after the durable commit, in rounds: while many are waiting,
    /// a round takes them out and applies them without the lock, so the committer goes on
    /// deferring new ones meanwhile (their heads stay, so its decisions and the readers'
    /// answers do not depend on how far the rounds got); the last round, with few left or after
    /// [`APPLY_ROUNDS_MAX`], applies the rest under the lock. Returns the lock and the result.
    fn apply_all(
        &self,
        db: &Database,
        verified_upto: &AtomicU64,
    ) -> (MutexGuard<'_, State>, Result<(), StoreError>) {
        let mut state = self.lock();
        let mut free_rounds = 0;
        loop {
            let waiting: usize = state.batches.iter().map(|b| b.items.len()).sum();
            if waiting <= APPLY_HELD_ITEMS_MAX || free_rounds == APPLY_ROUNDS_MAX {
                let started = Instant::now();
                let result = apply_deferred(db, verified_upto, &state.batches);
                let took = started.elapsed();
                state.stats.count_applied(waiting, took);
                state.stats.held_max = state.stats.held_max.max(took);
                return (state, result);
            }
            let batches = std::mem::take(&mut state.batches);
            state.applying = true;
            drop(state);
            let started = Instant::now();
            let result = apply_deferred(db, verified_upto, &batches);
            let took = started.elapsed();
            state = self.lock();
            state.applying = false;
            state.stats.count_applied(waiting, took);
            state.stats.free_rounds += 1;
            free_rounds += 1;
            if let Err(e) = result {
                return (state, Err(e));
            }
            // Readers waiting for these batches may go on.
            self.changed.notify_all();
        }
    }
}

/// Rounds of applying deferred batches outside the lock, at most, before the rest is applied
/// under it (the committer then waits).
const APPLY_ROUNDS_MAX: usize = 32;

/// Deferred items few enough to apply under the lock at once.
const APPLY_HELD_ITEMS_MAX: usize = 256;

/// A durable redb commit that persists every earlier non-durable one, and the verifier's
/// watermark (so it always has something to write).
pub(crate) fn durable_checkpoint(
    db: &Database,
    quick_repair: bool,
    verified_upto: &AtomicU64,
) -> Result<(), StoreError> {
    let mut txn = db.begin_write().io()?;
    txn.set_durability(Durability::Immediate).io()?;
    txn.set_quick_repair(quick_repair);
    {
        let mut meta = txn.open_table(META).io()?;
        let next_seq = meta_get(&meta, META_NEXT_SEQ)?;
        let verified_seq = persistable_checkpoint(&meta, next_seq, verified_upto)?;
        meta.insert(META_VERIFIED_SEQ, verified_seq).io()?;
    }
    txn.commit().io()
}

/// Applies the deferred batches to redb in one non-durable transaction (they are durable in the
/// log); each item must commit, at the sequence it was given, as it was decided.
fn apply_deferred(
    db: &Database,
    verified_upto: &AtomicU64,
    batches: &[DeferredBatch],
) -> Result<(), StoreError> {
    if batches.is_empty() {
        return Ok(());
    }
    let mut txn = db.begin_write().io()?;
    txn.set_durability(Durability::None).io()?;
    for batch in batches {
        let applied = match commit_in(&txn, &batch.items, &batch.prev_hashes, verified_upto) {
            Ok(applied) => applied,
            Err(e) => {
                let _ = txn.abort();
                return Err(e);
            }
        };
        let all_committed = applied
            .outcomes
            .iter()
            .all(|o| matches!(o, ItemOutcome::Committed { .. }));
        if !all_committed || applied.first_seq != batch.first_seq {
            let _ = txn.abort();
            return Err(StoreError::Corrupt(format!(
                "a batch acknowledged during a checkpoint (commit sequence {}) does not apply as \
                 it was decided",
                batch.first_seq
            )));
        }
    }
    txn.commit().io()
}
