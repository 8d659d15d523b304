//! The embedded, durable default backend: one redb file (`cnsm.redb`) in a data directory.
//!
//! Every [`Store::commit`] is one redb write transaction for the whole batch (group commit),
//! made durable before it returns: by default through the write-ahead log beside the file (one
//! sequential `fdatasync` per batch, redb's own durable commit every quarter second as a
//! checkpoint; see [`wal`]), or, with the log turned off, by a durable redb commit
//! ([`Durability::Immediate`]) each. Instances get a store-local `uid` (never reused) at creation
//! so that the big tables key on integers.
//!
//! # Tables
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | `u64`: `format`, `next_uid`, `next_seq`, `verified_seq` |
//! | `definitions` | (namespace, name, revision) | (revision hash, created ms, CBOR of the `StateMachine`) |
//! | `definition_latest` | (namespace, name) | latest revision |
//! | `instances` | (namespace, id) | (uid, version, status, timer, last record hash, machine, compact JSON of the `Instance`) |
//! | `instance_uids` | uid | (namespace, id) |
//! | `active_instances` | (namespace, machine, uid) | () |
//! | `records` | commit sequence | (uid, version, record hash, the record's exact bytes) |
//! | `record_index` | (uid, version) | commit sequence |
//! | `timers` | (due ms, uid) | (entry seq, kind) |
//! | `idempotency` | (uid, key) | (request hash, version, expires ms) |
//! | `idempotency_expiry` | (expires ms, uid, key) | () |
//! | `retired_uids` | uid | () - instances replaced by `snapshot import --replace` (their records stay in the log) |
//!
//! Definition rows are the deterministic CBOR of the serde form ([`cnsm_core::cbor`]); instance
//! rows, rewritten on every commit, are compact JSON encoded straight from the struct. The instance
//! row repeats a few fields of its document in fixed columns (version, status, timer, last
//! record hash, machine) so that a commit maintains the indexes and checks the new record's
//! link without decoding the previous row or reading the previous record, and list queries
//! filter before decoding. `timers` holds exactly each active instance's current timer;
//! `active_instances` lets [`Store::delete_definition`] count users without a scan.
//!
//! `records` is keyed by the global commit sequence, so it is the commit log itself (the base
//! of the verification checkpoint, and of an outbox cursor) and a commit only appends to it:
//! its pages fill in order instead of a random leaf per transition being copied on write.
//! `record_index` finds an instance's records by version (history, chain checks) with small
//! values.
//!
//! # Verification checkpoints
//!
//! `records` numbers every committed record; `meta.verified_seq` says up to where records were
//! read back from the file and checked (stored hash over the stored bytes, belongs to the
//! instance of its uid, links to the previous record of that instance, and the index points
//! back at it).
//!
//! - [`EmbeddedStore::open`] checks the tail after `verified_seq` and refuses to open a store
//!   whose tail is corrupt ([`StoreError::Corrupt`] naming instance and version).
//! - A background verifier thread (`cnsm-verifier`) reads back every committed record on a read
//!   snapshot, beside the writer and off the commit path, and advances an in-memory watermark;
//!   each [`Store::commit`] persists that watermark as `verified_seq` in its own transaction. The
//!   unverified tail therefore stays about as long as the verifier's lag (milliseconds of
//!   commits), and open stays fast however large the store grows. A problem found there stops
//!   the watermark (open then reports it); commits go on, since the batch at hand is not at fault.
//! - [`Store::commit`] itself checks each item against its own bytes (pair assertions: the hash
//!   over the bytes, identity, previous hash against the instance row's last hash column,
//!   state and status) without a full decode, and refuses the whole batch on a mismatch.
//! - [`EmbeddedStore::close`] checks whatever tail is left, so a cleanly closed store opens with
//!   nothing to check.
//! - [`Store::verify`] checks everything from genesis.
//!
//! ```
//! use cnsm_store::{Store, embedded::EmbeddedStore};
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedStore::open(dir.path()).unwrap();
//! assert!(store.verify().unwrap().is_ok());
//! store.close().unwrap();
//! ```

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use cnsm_core::record::{Hash32, RECORD_DOMAIN, SealedRecord};
use cnsm_core::resource::StateMachine;
use cnsm_core::{Instance, Status};
use redb::{
    Database, DatabaseError, Durability, ReadTransaction, ReadableDatabase, ReadableTable,
    TableError, WriteTransaction,
};

use crate::{
    CommitItem, DefinitionRow, IdempotencyEntry, ImportItem, ImportReport, InstanceQuery,
    ItemOutcome, PutDefinition, STORE_FORMAT, Store, StoreError, StoredInstance, TimerRef,
    VerifyReport,
};

pub mod backup;
mod check;
mod checkpointer;
mod import;
mod retention;
pub(crate) mod tables;
#[doc(hidden)]
pub mod testing;
mod wal;
pub use wal::CheckpointStats;

use tables::*;

/// The database file inside the data directory.
pub const FILE_NAME: &str = "cnsm.redb";

/// Most items one [`Store::commit`] accepts.
pub const COMMIT_ITEMS_MAX: usize = 100_000;

/// The embedded store. Cheap to share behind an `Arc`; redb serializes write transactions and
/// lets reads run beside them on a consistent snapshot.
pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    quick_repair: bool,
    verify_tail: bool,
    /// The log sequence where the per-commit check found a problem; it is not retried until
    /// the store is reopened (open reports it).
    tail_problem: Arc<Mutex<Option<u64>>>,
    /// Every record logged at or below this sequence was read back and verified by the
    /// background verifier; the next commit persists it as the checkpoint.
    verified_upto: Arc<AtomicU64>,
    verifier: Option<Verifier>,
    /// The write-ahead log of transition batches (see [`wal`]); `None` when every commit is a
    /// durable redb commit. Every write of the store holds this lock.
    wal: Mutex<Option<wal::Wal>>,
    /// Checkpoints beside the committer and the batches acknowledged during one (see
    /// [`checkpointer`]).
    checkpointer: Arc<checkpointer::Checkpointer>,
    background_checkpoints: bool,
}

/// The background thread that reads back committed records (on a read snapshot, beside the
/// writer) and advances the verification watermark, so commits do no verification work and
/// the tail an open must check after a crash stays short.
struct Verifier {
    stop: Arc<(AtomicBool, Mutex<()>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Verifier {
    fn shut_down(&mut self) {
        let (stop, lock, wake) = &*self.stop;
        stop.store(true, Ordering::SeqCst);
        let _guard = lock.lock();
        wake.notify_all();
        drop(_guard);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // The checkpoint thread holds the database: it must be gone when the store is.
        self.checkpointer.hold(false);
        let _ = self.checkpointer.settle();
        if let Some(verifier) = self.verifier.as_mut() {
            verifier.shut_down();
        }
    }
}

/// How often the verifier looks for new records.
const VERIFY_INTERVAL: Duration = Duration::from_millis(20);
/// Most records the verifier checks per read snapshot.
const VERIFY_CHUNK: u64 = 20_000;

fn run_verifier(
    db: Arc<Database>,
    verified_upto: Arc<AtomicU64>,
    tail_problem: Arc<Mutex<Option<u64>>>,
    stop: Arc<(AtomicBool, Mutex<()>, Condvar)>,
) {
    let (stopping, lock, wake) = &*stop;
    while !stopping.load(Ordering::SeqCst) {
        let mut progressed = false;
        let problem_known = tail_problem.lock().map(|p| p.is_some()).unwrap_or(true);
        if !problem_known && let Ok(txn) = db.begin_read() {
            let result = (|| -> Result<Option<(u64, Option<String>)>, StoreError> {
                let meta = txn.open_table(META).io()?;
                let records = txn.open_table(RECORDS).io()?;
                let uids = txn.open_table(INSTANCE_UIDS).io()?;
                let index = txn.open_table(RECORD_INDEX).io()?;
                let durable = meta_get(&meta, META_VERIFIED_SEQ)?;
                let next_seq = meta_get(&meta, META_NEXT_SEQ)?;
                let from = durable.max(verified_upto.load(Ordering::SeqCst));
                if from + 1 >= next_seq {
                    return Ok(None);
                }
                let checked = check::verify_tail(
                    &records,
                    &uids,
                    &index,
                    from,
                    next_seq,
                    Some(VERIFY_CHUNK),
                )?;
                Ok(Some((checked.verified_seq, checked.problem)))
            })();
            if let Ok(Some((verified_seq, problem))) = result {
                progressed = verified_seq > verified_upto.load(Ordering::SeqCst);
                verified_upto.fetch_max(verified_seq, Ordering::SeqCst);
                if problem.is_some()
                    && let Ok(mut p) = tail_problem.lock()
                {
                    *p = Some(verified_seq + 1);
                }
            }
        }
        if !progressed {
            let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            if stopping.load(Ordering::SeqCst) {
                break;
            }
            let _ = wake.wait_timeout(guard, VERIFY_INTERVAL);
        }
    }
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Where the verification checkpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every record logged at or below this sequence has been verified.
    pub verified_seq: u64,
    /// The sequence of the last committed record (0 when there is none).
    pub last_seq: u64,
}

impl Checkpoint {
    /// Records committed but not yet read back and verified.
    pub fn n_unverified(&self) -> u64 {
        self.last_seq.saturating_sub(self.verified_seq)
    }
}

/// How [`EmbeddedStore::open_with_options`] opens a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct EmbeddedOptions {
    /// Check the records committed since the last checkpoint before accepting work (default
    /// `true`). Off only for forensics: see [`EmbeddedStore::open_unverified`].
    pub verify_tail: bool,
    /// Have every commit save redb's allocator state ("quick repair", default `true`), so that
    /// opening after a crash or a kill is instant instead of a walk over the whole file.
    ///
    /// Measured on 2 shared cores: a 3.4 GB store (1 M instances, 5 M records) reopens after a
    /// kill in 6 ms with it and 12 s without; a single-item commit takes 1.6 ms instead of
    /// 1.1 ms on a 70 MB store and about 3.3 ms instead of 1.5 ms on the 3.4 GB one (quick
    /// repair commits in two phases). Durability is the same either way.
    pub quick_repair: bool,
    /// Make transition batches durable through a write-ahead log beside the file
    /// (`cnsm.redb.wal`) instead of a durable redb commit each (default `true`): one sequential
    /// `fdatasync` per batch, with a durable redb commit (a checkpoint) every quarter second.
    /// Durability is the same either way; see `ARCHITECTURE.md`.
    pub write_ahead_log: bool,
    /// Take the write-ahead log's checkpoints on a thread of their own while the committer goes
    /// on (default `true`), instead of on the committer's thread, which then waits for each.
    /// Batches acknowledged during a checkpoint are applied to redb after it; until then the
    /// instances and keys they changed are read as they left them, and other reads that concern
    /// them wait. See `ARCHITECTURE.md`.
    pub background_checkpoints: bool,
    /// The memory redb may use to cache pages, written ones of an open transaction included
    /// (default [`CACHE_LEN_BYTES_DEFAULT`], redb's own default). A smaller cache bounds the
    /// memory of a big one-transaction write such as a snapshot import.
    pub cache_len_bytes: usize,
}

/// redb's default page cache: 1 GiB.
pub const CACHE_LEN_BYTES_DEFAULT: usize = 1 << 30;

impl Default for EmbeddedOptions {
    fn default() -> EmbeddedOptions {
        EmbeddedOptions {
            verify_tail: true,
            quick_repair: true,
            write_ahead_log: true,
            background_checkpoints: true,
            cache_len_bytes: CACHE_LEN_BYTES_DEFAULT,
        }
    }
}

impl EmbeddedOptions {
    /// These options with a page cache of `cache_len_bytes`.
    pub fn with_cache_len_bytes(mut self, cache_len_bytes: usize) -> EmbeddedOptions {
        self.cache_len_bytes = cache_len_bytes;
        self
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` with the default options, checking the
    /// records committed since the last verification checkpoint.
    ///
    /// Errors: [`StoreError::Locked`] when another process (or another handle in this process)
    /// has the store open, [`StoreError::FormatTooNew`] for a store written by a newer cnsm,
    /// [`StoreError::Corrupt`] when a record of the unverified tail fails its checks.
    pub fn open(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        EmbeddedStore::open_with_options(dir, EmbeddedOptions::default())
    }

    /// Opens the store without checking the unverified tail (and without advancing the
    /// checkpoint): for `store verify` and other forensics on a store that `open` refuses, so
    /// that [`Store::verify`] can list every problem.
    pub fn open_unverified(dir: &Path) -> Result<EmbeddedStore, StoreError> {
        let options = EmbeddedOptions {
            verify_tail: false,
            ..EmbeddedOptions::default()
        };
        EmbeddedStore::open_with_options(dir, options)
    }

    /// Opens (creating if needed) the store in `dir`.
    pub fn open_with_options(
        dir: &Path,
        options: EmbeddedOptions,
    ) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dir.display())))?;
        EmbeddedStore::open_file(&dir.join(FILE_NAME), options)
    }

    /// Opens (creating if needed) the store file `path` itself, e.g. a backup.
    pub fn open_file(path: &Path, options: EmbeddedOptions) -> Result<EmbeddedStore, StoreError> {
        let path = path.to_owned();
        let db = Database::builder()
            .set_cache_size(options.cache_len_bytes)
            .create(&path)
            .map_err(|e| open_error(&path, e))?;
        check_format(&db)?;
        let mut store = EmbeddedStore {
            db: Arc::new(db),
            path,
            quick_repair: options.quick_repair,
            verify_tail: options.verify_tail,
            tail_problem: Arc::new(Mutex::new(None)),
            verified_upto: Arc::new(AtomicU64::new(0)),
            verifier: None,
            wal: Mutex::new(None),
            checkpointer: Arc::default(),
            background_checkpoints: options.background_checkpoints,
        };
        // Batches acknowledged through the log but not yet in a durable redb commit.
        let wal_paths = wal::paths_for(&store.path);
        let logs = wal_paths
            .iter()
            .map(|path| wal::read_log(path))
            .collect::<Result<Vec<_>, _>>()?;
        let txn = store.begin_durable()?;
        if let Err(e) = init_and_verify(&txn, &logs, options.verify_tail) {
            let _ = txn.abort();
            return Err(e);
        }
        txn.commit().io()?;
        // Everything the log held is now in a durable commit: its frames no longer start at
        // the store's next sequence. A file of the first format is emptied (its frames carry
        // no sequence), and a log that is no longer wanted goes.
        for (path, log) in wal_paths.iter().zip(&logs) {
            let unwanted = log.is_legacy() || !options.write_ahead_log;
            if !unwanted || !path.exists() {
                continue;
            }
            let emptied = if options.write_ahead_log {
                std::fs::File::options()
                    .write(true)
                    .open(path)
                    .and_then(|file| file.set_len(0).and_then(|()| file.sync_all()))
            } else {
                std::fs::remove_file(path)
            };
            emptied.map_err(|e| StoreError::Io(format!("cannot empty {}: {e}", path.display())))?;
        }
        if options.write_ahead_log {
            *store.wal.lock().unwrap_or_else(|e| e.into_inner()) = Some(wal::Wal::new(wal_paths));
        }
        if options.verify_tail {
            let stop = Arc::new((AtomicBool::new(false), Mutex::new(()), Condvar::new()));
            let thread = {
                let (db, upto, problem, stop) = (
                    Arc::clone(&store.db),
                    Arc::clone(&store.verified_upto),
                    Arc::clone(&store.tail_problem),
                    Arc::clone(&stop),
                );
                std::thread::Builder::new()
                    .name("cnsm-verifier".into())
                    .spawn(move || {
                        yield_cpu_to_the_committer();
                        run_verifier(db, upto, problem, stop)
                    })
                    .map_err(|e| StoreError::Io(format!("cannot start the verifier: {e}")))?
            };
            store.verifier = Some(Verifier {
                stop,
                thread: Some(thread),
            });
        }
        Ok(store)
    }

    /// A write transaction that is durable when `commit` returns (fsync).
    fn begin_durable(&self) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().io()?;
        txn.set_durability(Durability::Immediate).io()?;
        txn.set_quick_repair(self.quick_repair);
        Ok(txn)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sequence up to which the background verifier has read back and checked records
    /// (persisted as the checkpoint by the next commit).
    pub fn verified_in_memory(&self) -> u64 {
        self.verified_upto.load(Ordering::SeqCst)
    }

    /// Where the verification checkpoint stands.
    pub fn checkpoint(&self) -> Result<Checkpoint, StoreError> {
        let txn = self.db.begin_read().io()?;
        let meta = txn.open_table(META).io()?;
        let next_seq = meta_get(&meta, META_NEXT_SEQ)?;
        let verified_seq = meta_get(&meta, META_VERIFIED_SEQ)?;
        Ok(Checkpoint {
            verified_seq,
            last_seq: next_seq.saturating_sub(1),
        })
    }

    /// Verifies the records committed since the checkpoint and advances it, then closes the
    /// store. The next open has nothing to check. Dropping the store instead is safe: the next
    /// open checks the tail. A store opened with `verify_tail` off is closed without a check.
    ///
    /// Errors: [`StoreError::Corrupt`] when a record of the tail fails its checks (the store is
    /// closed all the same, with the checkpoint just before that record).
    pub fn close(mut self) -> Result<(), StoreError> {
        if let Some(verifier) = self.verifier.as_mut() {
            verifier.shut_down();
        }
        let mut log = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        self.checkpointer.settle()?;
        if !self.verify_tail {
            if log.as_ref().is_some_and(|l| l.len() > 0) {
                let txn = self.begin_durable()?;
                txn.commit().io()?;
            }
            if let Some(log) = log.as_mut() {
                log.reset();
            }
            return Ok(());
        }
        let txn = self.begin_durable()?;
        let verified = {
            let meta = txn.open_table(META).io()?;
            let records = txn.open_table(RECORDS).io()?;
            let uids = txn.open_table(INSTANCE_UIDS).io()?;
            let index = txn.open_table(RECORD_INDEX).io()?;
            let from =
                meta_get(&meta, META_VERIFIED_SEQ)?.max(self.verified_upto.load(Ordering::SeqCst));
            let next_seq = meta_get(&meta, META_NEXT_SEQ)?;
            check::verify_tail(&records, &uids, &index, from, next_seq, None)?
        };
        {
            let mut meta = txn.open_table(META).io()?;
            meta.insert(META_VERIFIED_SEQ, verified.verified_seq).io()?;
        }
        txn.commit().io()?;
        if let Some(log) = log.as_mut() {
            log.reset();
        }
        match verified.problem {
            Some(problem) => Err(StoreError::Corrupt(problem)),
            None => Ok(()),
        }
    }

    /// A read snapshot that holds every acknowledged batch (it waits for the batches deferred
    /// during a checkpoint to be applied).
    fn read(&self) -> Result<ReadTransaction, StoreError> {
        self.read_after(|_| true)
    }

    /// A read snapshot that holds every acknowledged batch `touches` matters to: it waits only
    /// while a batch deferred during a checkpoint that it matters to is not applied yet.
    fn read_after(
        &self,
        touches: impl Fn(&checkpointer::State) -> bool,
    ) -> Result<ReadTransaction, StoreError> {
        self.checkpointer.wait_applied(touches)?;
        self.db.begin_read().io()
    }

    /// A read snapshot for definitions and rollouts, which no transition batch writes (only
    /// durable writes do, after any checkpoint finished): it never waits.
    fn read_definitions(&self) -> Result<ReadTransaction, StoreError> {
        self.db.begin_read().io()
    }

    /// The verification checkpoint a write persists (see [`persistable_checkpoint`]).
    fn checkpoint_to_persist(
        &self,
        meta: &impl ReadableTable<&'static str, u64>,
        next_seq: u64,
    ) -> Result<u64, StoreError> {
        persistable_checkpoint(meta, next_seq, &self.verified_upto)
    }

    /// [`Store::erase`] inside one write transaction: compare-and-swap, bytes replaced in the
    /// commit log (the only copy; the index points at it), then the erasure record as an item.
    fn erase_in(
        &self,
        txn: &WriteTransaction,
        redacted: &[SealedRecord],
        item: &CommitItem,
        prev_hash: Hash32,
    ) -> Result<ItemOutcome, StoreError> {
        let mut t = WriteTables::open(txn)?;
        let (namespace, id) = (&*item.instance.namespace, &*item.instance.id);
        let corrupt =
            |detail: String| StoreError::Corrupt(format!("instance {namespace}/{id}: {detail}"));
        let head = match t.instances.get((namespace, id)).io()? {
            Some(row) => head_of(&row.value()).map_err(corrupt)?,
            None => return Ok(ItemOutcome::Conflict { actual: None }),
        };
        if Some(head.version) != item.expected_version {
            return Ok(ItemOutcome::Conflict {
                actual: Some(head.version),
            });
        }
        let uid = head.uid;
        for sealed in redacted {
            let version = sealed.version;
            let Some(seq) = t.index.get((uid, version)).io()?.map(|g| g.value()) else {
                return Err(corrupt(format!("record {version} is missing")));
            };
            let stored = t.records.get(seq).io()?.map(|g| {
                let (u, v, hash, _) = g.value();
                (u, v, hash)
            });
            match stored {
                Some((u, v, hash)) if (u, v) == (uid, version) && Hash32(hash) == sealed.hash => {}
                Some(_) => {
                    return Err(StoreError::Refused(format!(
                        "erasure of {namespace}/{id} refused: record {version} is not stored with the hash the erasure keeps"
                    )));
                }
                None => {
                    return Err(corrupt(format!(
                        "record {version} is missing (commit sequence {seq})"
                    )));
                }
            }
            t.records
                .insert(seq, (uid, version, sealed.hash.0, sealed.bytes.as_slice()))
                .io()?;
        }
        let mut counters = Counters {
            next_uid: meta_get(&t.meta, META_NEXT_UID)?,
            next_seq: meta_get(&t.meta, META_NEXT_SEQ)?,
            rows: Vec::new(),
        };
        let verified_seq = self.checkpoint_to_persist(&t.meta, counters.next_seq)?;
        let outcome = apply_item(&mut t, item, prev_hash, &mut counters)?;
        if !matches!(outcome, ItemOutcome::Committed { .. }) {
            // Checked above in this transaction; returning an error aborts the redactions.
            return Err(corrupt(
                "the erasure record lost its compare-and-swap".into(),
            ));
        }
        t.meta.insert(META_NEXT_UID, counters.next_uid).io()?;
        t.meta.insert(META_NEXT_SEQ, counters.next_seq).io()?;
        t.meta.insert(META_VERIFIED_SEQ, verified_seq).io()?;
        Ok(outcome)
    }

    /// One durable write. It also persists every earlier batch of the write-ahead log, which
    /// is emptied after it.
    fn write<T>(
        &self,
        body: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut log = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        self.checkpointer.settle()?;
        let txn = self.begin_durable()?;
        match body(&txn) {
            Ok(value) => {
                txn.commit().io()?;
                if let Some(log) = log.as_mut() {
                    log.reset();
                }
                Ok(value)
            }
            Err(e) => {
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    /// A write that may be lost in a crash and done again (it changes nothing a logged batch
    /// depends on: forgetting expired idempotency keys): with the log, a non-durable redb commit
    /// that the next checkpoint persists, skipped (`Ok(None)`) while a checkpoint runs; without
    /// the log, a durable commit like any other.
    fn write_unlogged<T>(
        &self,
        body: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let log = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        if log.is_none() {
            drop(log);
            return self.write(body).map(Some);
        }
        {
            let state = self.checkpointer.lock();
            state.failed()?;
            if state.in_flight {
                return Ok(None);
            }
        }
        let mut txn = self.db.begin_write().io()?;
        txn.set_durability(Durability::None).io()?;
        match body(&txn) {
            Ok(value) => {
                txn.commit().io()?;
                Ok(Some(value))
            }
            Err(e) => {
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    /// A transition batch through the write-ahead log: applied in a non-durable redb
    /// transaction, its committed items made durable in the log, then the transaction committed
    /// (visible from then on). See [`wal`].
    fn commit_logged(
        &self,
        log: &mut wal::Wal,
        items: &[CommitItem],
        prev_hashes: &[Hash32],
    ) -> Result<Vec<ItemOutcome>, StoreError> {
        let mut txn = self.db.begin_write().io()?;
        txn.set_durability(Durability::None).io()?;
        let Applied {
            outcomes,
            rows,
            first_seq,
        } = match commit_in(&txn, items, prev_hashes, &self.verified_upto) {
            Ok(applied) => applied,
            Err(e) => {
                let _ = txn.abort();
                return Err(e);
            }
        };
        let committed: Vec<&CommitItem> = items
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| matches!(outcome, ItemOutcome::Committed { .. }))
            .map(|(item, _)| item)
            .collect();
        if committed.is_empty() {
            let _ = txn.abort();
            return Ok(outcomes);
        }
        let before = match log.append(first_seq, &committed, &rows) {
            Ok(before) => before,
            Err(e) => {
                let _ = txn.abort();
                return Err(e);
            }
        };
        if let Err(e) = txn.commit() {
            // Not acknowledged, so it must not come back on replay.
            log.truncate_to(before)?;
            return Err(StoreError::Io(e.to_string()));
        }
        if log.checkpoint_due() {
            self.start_checkpoint(log)?;
        }
        Ok(outcomes)
    }

    /// A batch that arrives while a checkpoint holds redb's write lock: decided on the heads the
    /// deferred batches left and a read snapshot, made durable in the log, acknowledged, and
    /// kept for the checkpoint thread to apply (see [`checkpointer`]).
    fn commit_deferred(
        &self,
        state: &mut checkpointer::State,
        log: &mut wal::Wal,
        items: &[CommitItem],
        prev_hashes: &[Hash32],
    ) -> Result<Vec<ItemOutcome>, StoreError> {
        let snapshot = self.db.begin_read().io()?;
        let instances = snapshot.open_table(INSTANCES).io()?;
        let (mut next_uid, mut next_seq) = match state.counters {
            Some(counters) => counters,
            None => {
                let meta = snapshot.open_table(META).io()?;
                (
                    meta_get(&meta, META_NEXT_UID)?,
                    meta_get(&meta, META_NEXT_SEQ)?,
                )
            }
        };
        let first_seq = next_seq;
        // Heads this batch changed (an instance may have several items in one batch), and where
        // each instance's latest one is.
        let mut staged: Vec<(String, String, InstanceHead)> = Vec::new();
        let mut latest: HashMap<(&str, &str), usize> = HashMap::new();
        let mut outcomes = Vec::with_capacity(items.len());
        let mut committed: Vec<&CommitItem> = Vec::new();
        let mut committed_prev: Vec<Hash32> = Vec::new();
        let mut rows = Vec::new();
        for (item, prev_hash) in items.iter().zip(prev_hashes) {
            let (namespace, id) = (&*item.instance.namespace, &*item.instance.id);
            let existing = match latest
                .get(&(namespace, id))
                .map(|&at| &staged[at].2)
                .or_else(|| state.head(namespace, id))
            {
                Some(head) => Some(head.clone()),
                None => match instances.get((namespace, id)).io()? {
                    Some(row) => Some(head_of(&row.value()).map_err(|detail| {
                        StoreError::Corrupt(format!("instance {namespace}/{id}: {detail}"))
                    })?),
                    None => None,
                },
            };
            let uid = match decide(existing, item, *prev_hash)? {
                Decision::Conflict { actual } => {
                    outcomes.push(ItemOutcome::Conflict { actual });
                    continue;
                }
                Decision::Create => {
                    next_uid += 1;
                    next_uid - 1
                }
                Decision::Update(head) => head.uid,
            };
            next_seq += 1;
            rows.push(encode_row(&item.instance)?);
            latest.insert((namespace, id), staged.len());
            staged.push((
                namespace.to_owned(),
                id.to_owned(),
                InstanceHead {
                    uid,
                    version: item.record.version,
                    status: item.instance.status,
                    timer: indexed_timer(&item.instance),
                    last_hash: item.record.hash,
                    machine: item.instance.machine.to_string(),
                },
            ));
            outcomes.push(ItemOutcome::Committed { uid });
            committed.push(item);
            committed_prev.push(*prev_hash);
        }
        if committed.is_empty() {
            return Ok(outcomes);
        }
        log.append(first_seq, &committed, &rows)?;
        state.defer(
            first_seq,
            committed.into_iter().cloned().collect(),
            committed_prev,
            staged,
            rows,
            (next_uid, next_seq),
        );
        self.checkpointer.mark_deferred();
        Ok(outcomes)
    }

    /// Starts a checkpoint: on its own thread (the committer goes on) unless the options say
    /// otherwise or the thread cannot start.
    fn start_checkpoint(&self, log: &mut wal::Wal) -> Result<(), StoreError> {
        if self.background_checkpoints {
            let log_bytes = log.switch();
            let started = self.checkpointer.start(
                &self.db,
                self.quick_repair,
                &self.verified_upto,
                log_bytes,
            );
            if started.is_ok() {
                return Ok(());
            }
        }
        self.checkpoint_locked(log)
    }

    /// A durable redb commit that covers every batch in the log, which is then emptied, taken
    /// on this thread; no checkpoint may be running.
    fn checkpoint_locked(&self, log: &mut wal::Wal) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        checkpointer::durable_checkpoint(&self.db, self.quick_repair, &self.verified_upto)?;
        let log_bytes = log.len();
        self.checkpointer
            .lock()
            .stats
            .record(started.elapsed(), log_bytes);
        log.reset();
        Ok(())
    }

    /// What this store's checkpoints have cost since it was opened or since the last call, and
    /// starts counting again (all zero with the write-ahead log off). Each checkpoint is a
    /// durable redb commit that writes every page the batches since the previous one changed;
    /// with [`EmbeddedOptions::background_checkpoints`] off the committer waits for each, and
    /// their durations are the long tail of commit latency (BENCHMARKS.md).
    pub fn take_checkpoint_stats(&self) -> CheckpointStats {
        std::mem::take(&mut self.checkpointer.lock().stats)
    }

    /// Takes a checkpoint now if the write-ahead log holds anything, after waiting for one that
    /// runs (tests and tools; the store takes them by itself).
    pub fn checkpoint_now(&self) -> Result<(), StoreError> {
        self.checkpoint_if_logged(EmbeddedStore::checkpoint_locked)
    }

    /// Runs `take` on the log if it holds anything, after waiting for a running checkpoint.
    fn checkpoint_if_logged(
        &self,
        take: fn(&EmbeddedStore, &mut wal::Wal) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut log = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        self.checkpointer.settle()?;
        match log.as_mut() {
            Some(log) if log.len() > 0 => take(self, log),
            _ => Ok(()),
        }
    }

    /// Test hook: starts a checkpoint in the background now if the log holds anything and none
    /// runs, as the committer does when one is due. Not part of the supported API.
    #[doc(hidden)]
    pub fn start_checkpoint_now(&self) -> Result<(), StoreError> {
        self.checkpoint_if_logged(EmbeddedStore::start_checkpoint)
    }

    /// Test hook: background checkpoints that start from now on wait before their durable
    /// commit until this is called with `false`, so that a test can commit batches while one
    /// runs. Not part of the supported API.
    #[doc(hidden)]
    pub fn hold_checkpoints(&self, hold: bool) {
        self.checkpointer.hold(hold);
    }
}

/// The nice value of the store's background threads (checkpoints, the verifier).
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`], so that on a busy machine a
/// background checkpoint or the verifier takes the cores the committer and the request threads
/// leave, instead of preempting them. Best effort: a refusal leaves the priority as it was.
fn yield_cpu_to_the_committer() {
    #[cfg(target_os = "linux")]
    {
        // On Linux, a thread id names one thread for setpriority.
        let _ =
            rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE);
    }
}

/// The verification checkpoint a write persists: the stored one, advanced to what the
/// background verifier read back (never past the last logged record, `next_seq - 1`).
fn persistable_checkpoint(
    meta: &impl ReadableTable<&'static str, u64>,
    next_seq: u64,
    verified_upto: &AtomicU64,
) -> Result<u64, StoreError> {
    Ok(meta_get(meta, META_VERIFIED_SEQ)?.max(
        verified_upto
            .load(Ordering::SeqCst)
            .min(next_seq.saturating_sub(1)),
    ))
}

/// Runs the writes of one batch; the caller commits or aborts.
fn commit_in(
    txn: &WriteTransaction,
    items: &[CommitItem],
    prev_hashes: &[Hash32],
    verified_upto: &AtomicU64,
) -> Result<Applied, StoreError> {
    let mut t = WriteTables::open(txn)?;
    let mut counters = Counters {
        next_uid: meta_get(&t.meta, META_NEXT_UID)?,
        next_seq: meta_get(&t.meta, META_NEXT_SEQ)?,
        rows: Vec::with_capacity(items.len()),
    };
    let first_seq = counters.next_seq;
    // The background verifier read back everything up to `verified_upto`; persist it.
    let verified_seq = persistable_checkpoint(&t.meta, counters.next_seq, verified_upto)?;

    let mut outcomes = Vec::with_capacity(items.len());
    for (item, prev_hash) in items.iter().zip(prev_hashes) {
        outcomes.push(apply_item(&mut t, item, *prev_hash, &mut counters)?);
    }
    t.meta.insert(META_NEXT_UID, counters.next_uid).io()?;
    t.meta.insert(META_NEXT_SEQ, counters.next_seq).io()?;
    t.meta.insert(META_VERIFIED_SEQ, verified_seq).io()?;
    Ok(Applied {
        outcomes,
        rows: counters.rows,
        first_seq,
    })
}

/// Refuses an empty or over-long delivery target name.
fn check_target_name(target: &str) -> Result<(), StoreError> {
    if target.is_empty() || target.len() > crate::DELIVERY_TARGET_CHARS_MAX {
        return Err(StoreError::Refused(format!(
            "a delivery target name must have 1 to {} bytes",
            crate::DELIVERY_TARGET_CHARS_MAX
        )));
    }
    Ok(())
}

/// Refuses an over-long redrive actor.
fn check_actor(actor: &str) -> Result<(), StoreError> {
    if actor.len() > crate::REDRIVE_ACTOR_CHARS_MAX {
        return Err(StoreError::Refused(format!(
            "a redrive actor must have at most {} bytes",
            crate::REDRIVE_ACTOR_CHARS_MAX
        )));
    }
    Ok(())
}

fn decode_dead_letter(
    target: &str,
    position: u64,
    bytes: &[u8],
) -> Result<crate::DeadLetter, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Corrupt(format!(
            "dead letter {target} at position {position} does not decode: {e}"
        ))
    })
}

fn redrive_of((requested_ms, actor): (u64, &str)) -> crate::Redrive {
    crate::Redrive {
        requested_ms,
        actor: actor.to_owned(),
    }
}

fn open_error(path: &Path, error: DatabaseError) -> StoreError {
    match error {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Locked(format!(
                "{} is open elsewhere (another process, or another handle in this one); stop it first",
                path.display()
            ))
        }
        other => StoreError::Io(format!("cannot open {}: {other}", path.display())),
    }
}

/// Refuses a newer format before anything is written.
fn check_format(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_read().io()?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(StoreError::Io(e.to_string())),
    };
    match meta.get(META_FORMAT).io()? {
        Some(found) => {
            let found = found.value();
            if found > u64::from(STORE_FORMAT) {
                return Err(StoreError::FormatTooNew {
                    found: u32::try_from(found).unwrap_or(u32::MAX),
                    supported: STORE_FORMAT,
                });
            }
            Ok(())
        }
        None => Err(StoreError::Corrupt(
            "the meta table has no format version".into(),
        )),
    }
}

/// Creates the tables and counters of a new store, replays the write-ahead log's batches, and
/// checks the unverified tail.
fn init_and_verify(
    txn: &WriteTransaction,
    logs: &[wal::LogFile],
    verify_tail: bool,
) -> Result<(), StoreError> {
    txn.open_table(RETIRED_UIDS).io()?;
    let mut t = WriteTables::open(txn)?;
    if t.meta.get(META_FORMAT).io()?.is_none() {
        t.meta.insert(META_FORMAT, u64::from(STORE_FORMAT)).io()?;
        t.meta.insert(META_NEXT_UID, 1).io()?;
        t.meta.insert(META_NEXT_SEQ, 1).io()?;
        t.meta.insert(META_VERIFIED_SEQ, 0).io()?;
    }
    let logged = wal::live_chain(logs, meta_get(&t.meta, META_NEXT_SEQ)?)?;
    replay(&mut t, &logged)?;
    if verify_tail {
        let from = meta_get(&t.meta, META_VERIFIED_SEQ)?;
        let next_seq = meta_get(&t.meta, META_NEXT_SEQ)?;
        if from + 1 < next_seq {
            let checked = check::verify_tail(&t.records, &t.uids, &t.index, from, next_seq, None)?;
            if let Some(problem) = checked.problem {
                return Err(StoreError::Corrupt(problem));
            }
            t.meta
                .insert(META_VERIFIED_SEQ, checked.verified_seq)
                .io()?;
        }
    }
    Ok(())
}

/// Re-applies the write-ahead log's batches in order. redb holds the last checkpoint, possibly
/// plus a prefix of these batches (a crash after a checkpoint, before the log was emptied):
/// items whose record is already stored with the same hash are skipped; any other mismatch means
/// the log does not belong to this store state.
fn replay(t: &mut WriteTables<'_>, logged: &[Vec<CommitItem>]) -> Result<(), StoreError> {
    if logged.is_empty() {
        return Ok(());
    }
    let mut counters = Counters {
        next_uid: meta_get(&t.meta, META_NEXT_UID)?,
        next_seq: meta_get(&t.meta, META_NEXT_SEQ)?,
        rows: Vec::new(),
    };
    for (n_batch, batch) in logged.iter().enumerate() {
        for (index, item) in batch.iter().enumerate() {
            let prev_hash = check_item(index, item)?;
            let (namespace, id) = (&*item.instance.namespace, &*item.instance.id);
            let head = match t.instances.get((namespace, id)).io()? {
                Some(row) => Some(head_of(&row.value()).map_err(StoreError::Corrupt)?),
                None => None,
            };
            if let Some(head) = &head
                && head.version >= item.record.version
            {
                let stored = match t.index.get((head.uid, item.record.version)).io()? {
                    Some(seq) => t.records.get(seq.value()).io()?.map(|r| r.value().2),
                    None => None,
                };
                if stored == Some(item.record.hash.0) {
                    continue;
                }
            }
            match apply_item(t, item, prev_hash, &mut counters)? {
                ItemOutcome::Committed { .. } => {}
                ItemOutcome::Conflict { actual } => {
                    return Err(StoreError::Corrupt(format!(
                        "write-ahead log batch {n_batch}: {namespace}/{id} record {} does not \
                         follow the store (stored version {actual:?}); the log belongs to \
                         another state of this store",
                        item.record.version
                    )));
                }
            }
        }
    }
    t.meta.insert(META_NEXT_UID, counters.next_uid).io()?;
    t.meta.insert(META_NEXT_SEQ, counters.next_seq).io()?;
    Ok(())
}

pub(crate) fn meta_get(
    meta: &impl ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<u64, StoreError> {
    match meta.get(key).io()? {
        Some(value) => Ok(value.value()),
        None => Err(StoreError::Corrupt(format!(
            "the meta table has no `{key}`"
        ))),
    }
}

/// Every table, opened for writing in one transaction.
pub(crate) struct WriteTables<'txn> {
    pub(crate) meta: redb::Table<'txn, &'static str, u64>,
    pub(crate) definitions: redb::Table<'txn, (&'static str, &'static str, u32), DefinitionValue>,
    pub(crate) definition_latest: redb::Table<'txn, (&'static str, &'static str), u32>,
    pub(crate) instances: redb::Table<'txn, (&'static str, &'static str), InstanceValue>,
    pub(crate) uids: redb::Table<'txn, u64, (&'static str, &'static str)>,
    pub(crate) active: redb::Table<'txn, (&'static str, &'static str, u64), ()>,
    pub(crate) records: redb::Table<'txn, u64, RecordValue>,
    pub(crate) index: redb::Table<'txn, (u64, u64), u64>,
    pub(crate) timers: redb::Table<'txn, (u64, u64), (u64, u8)>,
    pub(crate) idempotency: redb::Table<'txn, (u64, &'static str), IdempotencyValue>,
    pub(crate) idempotency_expiry: redb::Table<'txn, (u64, u64, &'static str), ()>,
}

impl<'txn> WriteTables<'txn> {
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<WriteTables<'txn>, StoreError> {
        Ok(WriteTables {
            meta: txn.open_table(META).io()?,
            definitions: txn.open_table(DEFINITIONS).io()?,
            definition_latest: txn.open_table(DEFINITION_LATEST).io()?,
            instances: txn.open_table(INSTANCES).io()?,
            uids: txn.open_table(INSTANCE_UIDS).io()?,
            active: txn.open_table(ACTIVE_INSTANCES).io()?,
            records: txn.open_table(RECORDS).io()?,
            index: txn.open_table(RECORD_INDEX).io()?,
            timers: txn.open_table(TIMERS).io()?,
            idempotency: txn.open_table(IDEMPOTENCY).io()?,
            idempotency_expiry: txn.open_table(IDEMPOTENCY_EXPIRY).io()?,
        })
    }
}

/// What a batch did in its write transaction.
struct Applied {
    outcomes: Vec<ItemOutcome>,
    /// The encoded instance row of each committed item, in order.
    rows: Vec<Vec<u8>>,
    /// The commit sequence of the first committed item (each takes the next one).
    first_seq: u64,
}

struct Counters {
    next_uid: u64,
    next_seq: u64,
    /// The encoded instance row of each committed item, in order (the write-ahead log frame
    /// reuses them instead of encoding every row twice).
    rows: Vec<Vec<u8>>,
}

/// The fixed columns of an instance row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InstanceHead {
    pub(crate) uid: u64,
    pub(crate) version: u64,
    pub(crate) status: Status,
    pub(crate) timer: Option<cnsm_core::record::Timer>,
    pub(crate) last_hash: Hash32,
    pub(crate) machine: String,
}

pub(crate) fn head_of(
    value: &(u64, u64, u8, Option<TimerColumn>, [u8; 32], &str, &[u8]),
) -> Result<InstanceHead, String> {
    let (uid, version, status, timer, last_hash, machine, _) = *value;
    Ok(InstanceHead {
        uid,
        version,
        status: status_from_code(status).ok_or_else(|| format!("unknown status code {status}"))?,
        timer: timer_from_column(timer)?,
        last_hash: Hash32(last_hash),
        machine: machine.to_owned(),
    })
}

fn batch_error(index: usize, item: &CommitItem, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!(
        "commit item {index} ({}/{} version {}): {detail}",
        item.instance.namespace, item.instance.id, item.record.version
    ))
}

/// Pair assertions on one item before any I/O; returns the previous hash its record declares.
///
/// A failure here is a programming error in the caller, and the whole batch is refused.
pub fn check_item(index: usize, item: &CommitItem) -> Result<Hash32, StoreError> {
    let instance = &item.instance;
    let record = &item.record;
    let fail = |detail: String| Err(batch_error(index, item, detail));
    if record.version != instance.version {
        return fail(format!("the instance is at version {}", instance.version));
    }
    let expected_record_version = match item.expected_version {
        None => Some(0),
        Some(v) => v.checked_add(1),
    };
    if expected_record_version != Some(record.version) {
        return fail(format!(
            "expected version {:?} does not precede the record",
            item.expected_version
        ));
    }
    if instance.last_hash != record.hash {
        return fail("the instance's last hash is not the record's hash".into());
    }
    if Hash32::digest(RECORD_DOMAIN, &record.bytes) != record.hash {
        return fail("the record's hash does not match its bytes".into());
    }
    // Pair assertions on the bytes themselves, without a full decode: identity, link, state.
    let fields = match cnsm_core::cbor::top_level_texts(
        &record.bytes,
        &["namespace", "instance", "prevHash", "to", "status"],
    ) {
        Ok(fields) => fields,
        Err(e) => return fail(e.to_string()),
    };
    let (Some(namespace), Some(id), Some(prev_hex), Some(to), Some(status)) =
        (fields[0], fields[1], fields[2], fields[3], fields[4])
    else {
        return fail("the bytes are not a record (a required field is missing)".into());
    };
    if namespace != &*instance.namespace || id != &*instance.id {
        return fail(format!("the record belongs to {namespace}/{id}"));
    }
    let Some(prev_hash) = Hash32::from_hex(prev_hex) else {
        return fail("the record's previous hash is not 64 hex digits".into());
    };
    if record.version == 0 && prev_hash != Hash32::ZERO {
        return fail("a genesis record must have a zero previous hash".into());
    }
    if to != &*instance.state || status != instance.status.as_str() {
        return fail("the instance's state or status differ from the record's".into());
    }
    if let Some(entry) = &item.idempotency
        && entry.version != record.version
    {
        return fail(format!(
            "the idempotency entry names version {}",
            entry.version
        ));
    }
    Ok(prev_hash)
}

/// What an item does to the store, given the instance's stored head.
enum Decision {
    /// It loses its compare-and-swap (the stored version, if the instance exists).
    Conflict { actual: Option<u64> },
    /// It creates the instance (a new uid).
    Create,
    /// It advances the instance.
    Update(InstanceHead),
}

/// The compare-and-swap of one item against the instance's head; the one place where
/// [`apply_item`] and a batch deferred during a checkpoint decide.
fn decide(
    existing: Option<InstanceHead>,
    item: &CommitItem,
    prev_hash: Hash32,
) -> Result<Decision, StoreError> {
    match (item.expected_version, existing) {
        (None, Some(head)) => Ok(Decision::Conflict {
            actual: Some(head.version),
        }),
        (Some(_), None) => Ok(Decision::Conflict { actual: None }),
        (Some(expected), Some(head)) if head.version != expected => Ok(Decision::Conflict {
            actual: Some(head.version),
        }),
        (None, None) => Ok(Decision::Create),
        (Some(expected), Some(head)) => {
            // The row carries the hash of its last record: no record read on the commit path.
            if head.last_hash != prev_hash {
                return Err(StoreError::Corrupt(format!(
                    "instance {}/{}: record {} does not chain to the stored record {expected}",
                    item.instance.namespace, item.instance.id, item.record.version
                )));
            }
            Ok(Decision::Update(head))
        }
    }
}

fn apply_item(
    t: &mut WriteTables<'_>,
    item: &CommitItem,
    prev_hash: Hash32,
    counters: &mut Counters,
) -> Result<ItemOutcome, StoreError> {
    let instance = &item.instance;
    let namespace: &str = &instance.namespace;
    let id: &str = &instance.id;
    let version = item.record.version;
    let corrupt =
        |detail: String| StoreError::Corrupt(format!("instance {namespace}/{id}: {detail}"));

    let existing = match t.instances.get((namespace, id)).io()? {
        Some(row) => Some(head_of(&row.value()).map_err(corrupt)?),
        None => None,
    };
    let (uid, previous) = match decide(existing, item, prev_hash)? {
        Decision::Conflict { actual } => return Ok(ItemOutcome::Conflict { actual }),
        Decision::Create => {
            let uid = counters.next_uid;
            counters.next_uid += 1;
            if t.uids.insert(uid, (namespace, id)).io()?.is_some() {
                return Err(corrupt(format!(
                    "uid {uid} from the meta counter is already taken"
                )));
            }
            (uid, None)
        }
        Decision::Update(head) => (head.uid, Some(head)),
    };

    let seq = counters.next_seq;
    if t.index.insert((uid, version), seq).io()?.is_some() {
        return Err(corrupt(format!("record {version} already exists")));
    }
    if t.records
        .insert(
            seq,
            (
                uid,
                version,
                item.record.hash.0,
                item.record.bytes.as_slice(),
            ),
        )
        .io()?
        .is_some()
    {
        return Err(corrupt(format!(
            "commit sequence {seq} from the meta counter is already taken"
        )));
    }
    counters.next_seq += 1;

    let row = encode_row(instance)?;
    let timer = indexed_timer(instance);
    t.instances
        .insert(
            (namespace, id),
            (
                uid,
                version,
                status_code(instance.status),
                timer_column(timer),
                item.record.hash.0,
                &*instance.machine,
                row.as_slice(),
            ),
        )
        .io()?;
    counters.rows.push(row);

    // Index entries change only when their key or value does.
    let old_timer = previous.as_ref().and_then(|p| p.timer);
    if old_timer != timer {
        if let Some(old) = old_timer {
            t.timers.remove((old.due_ms, uid)).io()?;
        }
        if let Some(new) = timer {
            t.timers
                .insert((new.due_ms, uid), (new.entry_seq, kind_code(new.kind)))
                .io()?;
        }
    }
    let old_active = previous
        .as_ref()
        .filter(|p| p.status == Status::Active)
        .map(|p| p.machine.as_str());
    let new_active = (instance.status == Status::Active).then_some(&*instance.machine);
    if old_active != new_active {
        if let Some(machine) = old_active {
            t.active.remove((namespace, machine, uid)).io()?;
        }
        if let Some(machine) = new_active {
            t.active.insert((namespace, machine, uid), ()).io()?;
        }
    }

    if let Some(entry) = &item.idempotency {
        let key = entry.key.as_str();
        let old = t
            .idempotency
            .insert(
                (uid, key),
                (entry.request_hash.0, entry.version, entry.expires_ms),
            )
            .io()?
            .map(|g| g.value().2);
        if let Some(old_expires) = old {
            t.idempotency_expiry.remove((old_expires, uid, key)).io()?;
        }
        t.idempotency_expiry
            .insert((entry.expires_ms, uid, key), ())
            .io()?;
    }
    Ok(ItemOutcome::Committed { uid })
}

fn decode_instance(bytes: &[u8], namespace: &str, id: &str) -> Result<Instance, StoreError> {
    decode_row(bytes, &|| {
        format!("instance {namespace}/{id}: row does not decode")
    })
}

fn decode_definition(
    namespace: &str,
    name: &str,
    revision: u32,
    value: DefinitionValueRef<'_>,
) -> Result<DefinitionRow, StoreError> {
    let (hash, created_ms, bytes) = value;
    let definition: StateMachine = decode_cbor(bytes, &|| {
        format!("definition {namespace}/{name}@{revision}: row does not decode")
    })?;
    Ok(DefinitionRow {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        revision,
        hash: Hash32(hash),
        definition,
        created_ms,
    })
}

type DefinitionValueRef<'a> = ([u8; 32], u64, &'a [u8]);

fn matches_query(query: &InstanceQuery, instance: &Instance) -> bool {
    query.state.as_deref().is_none_or(|s| s == &*instance.state)
        && query
            .labels
            .iter()
            .all(|(k, v)| instance.labels.get(k) == Some(v))
}

impl Store for EmbeddedStore {
    fn put_definition(
        &self,
        definition: &StateMachine,
        hash: Hash32,
        now_ms: u64,
    ) -> Result<PutDefinition, StoreError> {
        let namespace = definition.metadata.namespace.as_str();
        let name = definition.metadata.name.as_str();
        let row = encode_cbor(definition)?;
        self.write(|txn| {
            let mut t = WriteTables::open(txn)?;
            let latest = t
                .definition_latest
                .get((namespace, name))
                .io()?
                .map(|g| g.value());
            if let Some(latest) = latest {
                let stored = t
                    .definitions
                    .get((namespace, name, latest))
                    .io()?
                    .map(|g| g.value().0);
                match stored {
                    Some(stored) if stored == hash.0 => {
                        return Ok(PutDefinition::Unchanged(latest));
                    }
                    Some(_) => {}
                    None => {
                        return Err(StoreError::Corrupt(format!(
                            "definition {namespace}/{name}: latest revision {latest} is missing"
                        )));
                    }
                }
            }
            let revision = latest.unwrap_or(0).checked_add(1).ok_or_else(|| {
                StoreError::Refused(format!(
                    "definition {namespace}/{name} has run out of revision numbers"
                ))
            })?;
            t.definitions
                .insert(
                    (namespace, name, revision),
                    (hash.0, now_ms, row.as_slice()),
                )
                .io()?;
            t.definition_latest
                .insert((namespace, name), revision)
                .io()?;
            Ok(PutDefinition::Created(revision))
        })
    }

    fn definition(
        &self,
        namespace: &str,
        name: &str,
        revision: Option<u32>,
    ) -> Result<Option<DefinitionRow>, StoreError> {
        let txn = self.read_definitions()?;
        let revision = match revision {
            Some(revision) => revision,
            None => {
                let latest = txn.open_table(DEFINITION_LATEST).io()?;
                match latest.get((namespace, name)).io()? {
                    Some(revision) => revision.value(),
                    None => return Ok(None),
                }
            }
        };
        let definitions = txn.open_table(DEFINITIONS).io()?;
        match definitions.get((namespace, name, revision)).io()? {
            Some(row) => decode_definition(namespace, name, revision, row.value()).map(Some),
            None => Ok(None),
        }
    }

    fn list_definitions(&self, namespace: Option<&str>) -> Result<Vec<DefinitionRow>, StoreError> {
        let txn = self.read_definitions()?;
        let latest = txn.open_table(DEFINITION_LATEST).io()?;
        let definitions = txn.open_table(DEFINITIONS).io()?;
        let start = (namespace.unwrap_or(""), "");
        let mut rows = Vec::new();
        for entry in latest.range(start..).io()? {
            let (key, revision) = entry.io()?;
            let (ns, name) = key.value();
            if namespace.is_some_and(|wanted| wanted != ns) {
                break;
            }
            let revision = revision.value();
            let Some(row) = definitions.get((ns, name, revision)).io()? else {
                return Err(StoreError::Corrupt(format!(
                    "definition {ns}/{name}: latest revision {revision} is missing"
                )));
            };
            rows.push(decode_definition(ns, name, revision, row.value())?);
        }
        Ok(rows)
    }

    fn delete_definition(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        self.write(|txn| {
            let mut t = WriteTables::open(txn)?;
            let n_active = t
                .active
                .range((namespace, name, 0)..=(namespace, name, u64::MAX))
                .io()?
                .count();
            if n_active > 0 {
                return Err(StoreError::Refused(format!(
                    "definition {namespace}/{name} is used by {n_active} active instance(s); \
                     let them finish or cancel them first"
                )));
            }
            let removed_latest = t
                .definition_latest
                .remove((namespace, name))
                .io()?
                .is_some();
            let mut revisions = Vec::new();
            for entry in t
                .definitions
                .range((namespace, name, 0)..=(namespace, name, u32::MAX))
                .io()?
            {
                revisions.push(entry.io()?.0.value().2);
            }
            for revision in &revisions {
                t.definitions.remove((namespace, name, *revision)).io()?;
            }
            txn.open_table(ROLLOUTS)
                .io()?
                .remove((namespace, name))
                .io()?;
            Ok(removed_latest || !revisions.is_empty())
        })
    }

    fn commit(&self, items: &[CommitItem]) -> Result<Vec<ItemOutcome>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if items.len() > COMMIT_ITEMS_MAX {
            return Err(StoreError::Refused(format!(
                "a batch of {} items exceeds the limit of {COMMIT_ITEMS_MAX}",
                items.len()
            )));
        }
        let prev_hashes = items
            .iter()
            .enumerate()
            .map(|(index, item)| check_item(index, item))
            .collect::<Result<Vec<_>, _>>()?;
        let mut log = self.wal.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = log.as_mut() {
            let mut state = self.checkpointer.lock();
            state.failed()?;
            if state.in_flight {
                return self.commit_deferred(&mut state, log, items, &prev_hashes);
            }
            drop(state);
            return self.commit_logged(log, items, &prev_hashes);
        }
        drop(log);
        self.write(|txn| {
            commit_in(txn, items, &prev_hashes, &self.verified_upto).map(|applied| applied.outcomes)
        })
    }

    fn erase(
        &self,
        redacted: &[SealedRecord],
        erasure: &CommitItem,
    ) -> Result<ItemOutcome, StoreError> {
        let prev_hash = check_item(0, erasure)?;
        crate::check_erase(redacted, erasure)?;
        self.write(|txn| self.erase_in(txn, redacted, erasure, prev_hash))
    }

    fn instance(&self, namespace: &str, id: &str) -> Result<Option<StoredInstance>, StoreError> {
        // An instance a batch acknowledged during a checkpoint changed: its row as that left it.
        let deferred = self.checkpointer.look(|state| {
            let (uid, row) = state.row(namespace, id)?;
            Some(
                decode_instance(row, namespace, id)
                    .map(|instance| StoredInstance { uid, instance }),
            )
        });
        if let Some(stored) = deferred {
            return stored.map(Some);
        }
        let txn = self.db.begin_read().io()?;
        let instances = txn.open_table(INSTANCES).io()?;
        let Some(row) = instances.get((namespace, id)).io()? else {
            return Ok(None);
        };
        let (uid, _, _, _, _, _, bytes) = row.value();
        Ok(Some(StoredInstance {
            uid,
            instance: decode_instance(bytes, namespace, id)?,
        }))
    }

    fn instance_by_uid(&self, uid: u64) -> Result<Option<StoredInstance>, StoreError> {
        let txn = self.read_after(|state| state.touches_uid(uid))?;
        let uids = txn.open_table(INSTANCE_UIDS).io()?;
        let instances = txn.open_table(INSTANCES).io()?;
        let Some(key) = uids.get(uid).io()? else {
            return Ok(None);
        };
        let (namespace, id) = key.value();
        let Some(row) = instances.get((namespace, id)).io()? else {
            return Err(StoreError::Corrupt(format!(
                "uid {uid} names {namespace}/{id}, which has no row"
            )));
        };
        let (row_uid, _, _, _, _, _, bytes) = row.value();
        if row_uid != uid {
            return Err(StoreError::Corrupt(format!(
                "uid {uid} names {namespace}/{id}, whose uid is {row_uid}"
            )));
        }
        Ok(Some(StoredInstance {
            uid,
            instance: decode_instance(bytes, namespace, id)?,
        }))
    }

    fn list_instances(&self, query: &InstanceQuery) -> Result<Vec<StoredInstance>, StoreError> {
        list_on(&self.read()?, query)
    }

    fn list_instances_with_history(
        &self,
        query: &InstanceQuery,
    ) -> Result<Vec<(StoredInstance, Vec<SealedRecord>)>, StoreError> {
        // One read transaction for the page and every history in it: a consistent snapshot.
        let txn = self.read()?;
        let page = list_on(&txn, query)?;
        let index = txn.open_table(RECORD_INDEX).io()?;
        let records = txn.open_table(RECORDS).io()?;
        let mut out = Vec::with_capacity(page.len());
        for stored in page {
            let (namespace, id) = (&*stored.instance.namespace, &*stored.instance.id);
            let (uid, last) = (stored.uid, stored.instance.version);
            let mut history = Vec::with_capacity(last as usize + 1);
            for entry in index.range((uid, 0)..=(uid, last)).io()? {
                let (key, seq) = entry.io()?;
                let version = key.value().1;
                let seq = seq.value();
                let Some(value) = records.get(seq).io()? else {
                    return Err(StoreError::Corrupt(format!(
                        "instance {namespace}/{id} record {version}: missing (commit sequence {seq})"
                    )));
                };
                let (record_uid, record_version, hash, bytes) = value.value();
                if (record_uid, record_version) != (uid, version) {
                    return Err(StoreError::Corrupt(format!(
                        "instance {namespace}/{id} record {version}: commit sequence {seq} holds \
                         record {record_version} of uid {record_uid}"
                    )));
                }
                history.push(SealedRecord {
                    version,
                    bytes: bytes.to_vec(),
                    hash: Hash32(hash),
                });
            }
            if history.len() as u64 != last + 1 {
                return Err(StoreError::Corrupt(format!(
                    "instance {namespace}/{id}: {} of its {} records are indexed",
                    history.len(),
                    last + 1
                )));
            }
            out.push((stored, history));
        }
        Ok(out)
    }

    fn history(
        &self,
        namespace: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        let limit = crate::page_len(limit);
        let txn = self.read_after(|state| state.head(namespace, id).is_some())?;
        let instances = txn.open_table(INSTANCES).io()?;
        let Some(row) = instances.get((namespace, id)).io()? else {
            return Ok(Vec::new());
        };
        let uid = row.value().0;
        let index = txn.open_table(RECORD_INDEX).io()?;
        let records = txn.open_table(RECORDS).io()?;
        let mut out = Vec::new();
        for entry in index
            .range((uid, from_version)..=(uid, u64::MAX))
            .io()?
            .take(limit)
        {
            let (key, seq) = entry.io()?;
            let version = key.value().1;
            let seq = seq.value();
            let Some(value) = records.get(seq).io()? else {
                return Err(StoreError::Corrupt(format!(
                    "instance {namespace}/{id} record {version}: missing (commit sequence {seq})"
                )));
            };
            let (record_uid, record_version, hash, bytes) = value.value();
            if (record_uid, record_version) != (uid, version) {
                return Err(StoreError::Corrupt(format!(
                    "instance {namespace}/{id} record {version}: commit sequence {seq} holds \
                     record {record_version} of uid {record_uid}"
                )));
            }
            out.push(SealedRecord {
                version,
                bytes: bytes.to_vec(),
                hash: Hash32(hash),
            });
        }
        Ok(out)
    }

    fn idempotency(
        &self,
        namespace: &str,
        id: &str,
        key: &str,
    ) -> Result<Option<IdempotencyEntry>, StoreError> {
        // Written by a batch acknowledged during a checkpoint; any other key is as redb has it.
        if let Some(entry) = self
            .checkpointer
            .look(|state| state.key(namespace, id, key).cloned())
        {
            return Ok(Some(entry));
        }
        let txn = self.db.begin_read().io()?;
        let instances = txn.open_table(INSTANCES).io()?;
        let Some(row) = instances.get((namespace, id)).io()? else {
            return Ok(None);
        };
        let uid = row.value().0;
        let idempotency = txn.open_table(IDEMPOTENCY).io()?;
        Ok(idempotency.get((uid, key)).io()?.map(|g| {
            let (request_hash, version, expires_ms) = g.value();
            IdempotencyEntry {
                key: key.to_owned(),
                request_hash: Hash32(request_hash),
                version,
                expires_ms,
            }
        }))
    }

    fn purge_idempotency(&self, now_ms: u64) -> Result<u64, StoreError> {
        // Nothing expired (the usual case): no write, which on a large store would hold the
        // committer for a durable commit.
        {
            // Batches not applied yet only add keys, which expire later.
            let txn = self.db.begin_read().io()?;
            let expiry = txn.open_table(IDEMPOTENCY_EXPIRY).io()?;
            match expiry.first().io()? {
                Some((key, _)) if key.value().0 <= now_ms => {}
                _ => return Ok(0),
            }
        }
        self.write_unlogged(|txn| {
            let mut t = WriteTables::open(txn)?;
            let mut expired: Vec<(u64, u64, String)> = Vec::new();
            for entry in t
                .idempotency_expiry
                .range::<(u64, u64, &str)>((0, 0, "")..)
                .io()?
            {
                let (key, _) = entry.io()?;
                let (expires_ms, uid, idempotency_key) = key.value();
                if expires_ms > now_ms {
                    break;
                }
                expired.push((expires_ms, uid, idempotency_key.to_owned()));
            }
            for (expires_ms, uid, key) in &expired {
                t.idempotency_expiry
                    .remove((*expires_ms, *uid, key.as_str()))
                    .io()?;
                t.idempotency.remove((*uid, key.as_str())).io()?;
            }
            Ok(expired.len() as u64)
        })
        .map(Option::unwrap_or_default)
    }

    fn pending_timers(&self, visit: &mut dyn FnMut(TimerRef)) -> Result<(), StoreError> {
        let txn = self.read()?;
        let timers = txn.open_table(TIMERS).io()?;
        for entry in timers.iter().io()? {
            let (key, value) = entry.io()?;
            let (due_ms, uid) = key.value();
            let (entry_seq, code) = value.value();
            let kind = kind_from_code(code).ok_or_else(|| {
                StoreError::Corrupt(format!("timer of uid {uid}: unknown kind {code}"))
            })?;
            visit(TimerRef {
                due_ms,
                uid,
                entry_seq,
                kind,
            });
        }
        Ok(())
    }

    fn purge_finished(
        &self,
        namespace: &str,
        machine: &str,
        ended_before_ms: u64,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.purge_finished_in(namespace, machine, ended_before_ms, limit)
    }

    fn rollout(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<cnsm_core::rollout::Rollout>, StoreError> {
        let txn = self.read_definitions()?;
        let table = match txn.open_table(ROLLOUTS) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(StoreError::Io(e.to_string())),
        };
        match table.get((namespace, name)).io()? {
            Some(bytes) => serde_json::from_slice(bytes.value())
                .map(Some)
                .map_err(|e| {
                    StoreError::Corrupt(format!(
                        "rollout of {namespace}/{name} does not decode: {e}"
                    ))
                }),
            None => Ok(None),
        }
    }

    fn claim_delivery(
        &self,
        target: &str,
        node: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<crate::DeliveryCursor>, StoreError> {
        check_target_name(target)?;
        // A claim that changes nothing visible (the holder renewing well inside its lease) still
        // writes: the lease end moves.
        self.write(|txn| {
            let mut table = txn.open_table(DELIVERY_CURSORS).io()?;
            let (position, holder, until) = match table.get(target).io()? {
                Some(row) => {
                    let (position, holder, until) = row.value();
                    (position, holder.to_owned(), until)
                }
                None => (0, String::new(), 0),
            };
            if !holder.is_empty() && holder != node && until > now_ms {
                return Ok(None);
            }
            let until_ms = now_ms.saturating_add(lease_ms);
            table.insert(target, (position, node, until_ms)).io()?;
            Ok(Some(crate::DeliveryCursor {
                position,
                lease_node: node.to_owned(),
                lease_until_ms: until_ms,
            }))
        })
    }

    fn put_delivery_cursor(
        &self,
        target: &str,
        node: &str,
        position: u64,
    ) -> Result<bool, StoreError> {
        check_target_name(target)?;
        self.write(|txn| {
            let mut table = txn.open_table(DELIVERY_CURSORS).io()?;
            let until = match table.get(target).io()? {
                Some(row) if row.value().1 == node => row.value().2,
                _ => return Ok(false),
            };
            table.insert(target, (position, node, until)).io()?;
            Ok(true)
        })
    }

    fn delivery_cursors(&self) -> Result<Vec<(String, crate::DeliveryCursor)>, StoreError> {
        let txn = self.read()?;
        let table = match txn.open_table(DELIVERY_CURSORS) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::Io(e.to_string())),
        };
        let mut out = Vec::new();
        for entry in table.iter().io()? {
            let (key, value) = entry.io()?;
            let (position, node, until) = value.value();
            out.push((
                key.value().to_owned(),
                crate::DeliveryCursor {
                    position,
                    lease_node: node.to_owned(),
                    lease_until_ms: until,
                },
            ));
        }
        Ok(out)
    }

    fn put_dead_letter(&self, letter: &crate::DeadLetter) -> Result<(), StoreError> {
        check_target_name(&letter.target)?;
        let redrive = letter.redrive.clone();
        let bytes = serde_json::to_vec(&crate::DeadLetter {
            redrive: None,
            ..letter.clone()
        })
        .map_err(|e| StoreError::Io(format!("cannot encode a dead letter: {e}")))?;
        let key = (letter.target.as_str(), letter.position);
        self.write(|txn| {
            txn.open_table(DEAD_LETTERS)
                .io()?
                .insert(key, bytes.as_slice())
                .io()?;
            let mut marks = txn.open_table(DEAD_LETTER_REDRIVES).io()?;
            match &redrive {
                Some(r) => {
                    marks.insert(key, (r.requested_ms, r.actor.as_str())).io()?;
                }
                None => {
                    marks.remove(key).io()?;
                }
            }
            Ok(())
        })
    }

    fn dead_letters(
        &self,
        target: Option<&str>,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<crate::DeadLetter>, StoreError> {
        let limit = crate::page_len(limit);
        let txn = self.read()?;
        let table = match txn.open_table(DEAD_LETTERS) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::Io(e.to_string())),
        };
        let marks = match txn.open_table(DEAD_LETTER_REDRIVES) {
            Ok(table) => Some(table),
            Err(TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(StoreError::Io(e.to_string())),
        };
        let start = match (after, target) {
            (Some((t, p)), _) => Bound::Excluded((t, p)),
            (None, Some(t)) => Bound::Included((t, 0)),
            (None, None) => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for entry in table.range::<(&str, u64)>((start, Bound::Unbounded)).io()? {
            let (key, value) = entry.io()?;
            let (key_target, position) = key.value();
            if target.is_some_and(|t| t != key_target) {
                break;
            }
            let mut letter = decode_dead_letter(key_target, position, value.value())?;
            if let Some(marks) = &marks {
                letter.redrive = marks
                    .get((key_target, position))
                    .io()?
                    .map(|mark| redrive_of(mark.value()));
            }
            out.push(letter);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn redrive_dead_letters(
        &self,
        target: &str,
        position: Option<u64>,
        redrive: &crate::Redrive,
    ) -> Result<u64, StoreError> {
        check_target_name(target)?;
        check_actor(&redrive.actor)?;
        self.write(|txn| {
            let letters = txn.open_table(DEAD_LETTERS).io()?;
            let positions: Vec<u64> = match position {
                Some(p) => {
                    if letters.get((target, p)).io()?.is_some() {
                        vec![p]
                    } else {
                        Vec::new()
                    }
                }
                None => {
                    let mut found = Vec::new();
                    for entry in letters
                        .range::<(&str, u64)>((target, 0)..=(target, u64::MAX))
                        .io()?
                    {
                        found.push(entry.io()?.0.value().1);
                    }
                    found
                }
            };
            drop(letters);
            let mut marks = txn.open_table(DEAD_LETTER_REDRIVES).io()?;
            for p in &positions {
                marks
                    .insert((target, *p), (redrive.requested_ms, redrive.actor.as_str()))
                    .io()?;
            }
            Ok(positions.len() as u64)
        })
    }

    fn redrive_requests(
        &self,
        target: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<crate::DeadLetter>, StoreError> {
        let limit = crate::page_len(limit);
        let start = match after {
            Some(p) if p == u64::MAX => return Ok(Vec::new()),
            Some(p) => p + 1,
            None => 0,
        };
        let txn = self.read()?;
        let (letters, marks) = match (
            txn.open_table(DEAD_LETTERS),
            txn.open_table(DEAD_LETTER_REDRIVES),
        ) {
            (Ok(letters), Ok(marks)) => (letters, marks),
            (Err(TableError::TableDoesNotExist(_)), _)
            | (_, Err(TableError::TableDoesNotExist(_))) => return Ok(Vec::new()),
            (Err(e), _) | (_, Err(e)) => return Err(StoreError::Io(e.to_string())),
        };
        let mut out = Vec::new();
        for entry in marks
            .range::<(&str, u64)>((target, start)..=(target, u64::MAX))
            .io()?
        {
            let (key, mark) = entry.io()?;
            let position = key.value().1;
            let Some(bytes) = letters.get((target, position)).io()? else {
                return Err(StoreError::Corrupt(format!(
                    "the redrive mark of {target} at position {position} has no dead letter"
                )));
            };
            let mut letter = decode_dead_letter(target, position, bytes.value())?;
            letter.redrive = Some(redrive_of(mark.value()));
            out.push(letter);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn delete_dead_letter(&self, target: &str, position: u64) -> Result<bool, StoreError> {
        check_target_name(target)?;
        self.write(|txn| {
            let removed = txn
                .open_table(DEAD_LETTERS)
                .io()?
                .remove((target, position))
                .io()?
                .is_some();
            txn.open_table(DEAD_LETTER_REDRIVES)
                .io()?
                .remove((target, position))
                .io()?;
            Ok(removed)
        })
    }

    fn put_rollout(
        &self,
        namespace: &str,
        name: &str,
        rollout: Option<&cnsm_core::rollout::Rollout>,
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            if let Some(r) = rollout {
                let definitions = txn.open_table(DEFINITIONS).io()?;
                for revision in [r.stable, r.canary] {
                    if definitions.get((namespace, name, revision)).io()?.is_none() {
                        return Err(StoreError::Refused(format!(
                            "statemachine {namespace}/{name} has no revision {revision}"
                        )));
                    }
                }
            }
            let mut table = txn.open_table(ROLLOUTS).io()?;
            match rollout {
                Some(r) => {
                    let bytes = serde_json::to_vec(r)
                        .map_err(|e| StoreError::Io(format!("cannot encode a rollout: {e}")))?;
                    table.insert((namespace, name), bytes.as_slice()).io()?;
                }
                None => {
                    table.remove((namespace, name)).io()?;
                }
            }
            Ok(())
        })
    }

    fn backup(&self, out: &Path) -> Result<crate::BackupReport, StoreError> {
        self.backup_to(out)
    }

    fn records_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SealedRecord)>, StoreError> {
        let limit = crate::page_len(limit);
        let txn = self.read()?;
        let records = txn.open_table(RECORDS).io()?;
        let mut out = Vec::new();
        for entry in records
            .range((Bound::Excluded(after), Bound::Unbounded))
            .io()?
            .take(limit)
        {
            let (seq, value) = entry.io()?;
            let (_uid, version, hash, bytes) = value.value();
            out.push((
                seq.value(),
                SealedRecord {
                    version,
                    bytes: bytes.to_vec(),
                    hash: Hash32(hash),
                },
            ));
        }
        Ok(out)
    }

    fn import_instances(
        &self,
        definitions: &[DefinitionRow],
        items: &[ImportItem],
        replace: bool,
    ) -> Result<ImportReport, StoreError> {
        crate::check_import(definitions, items)?;
        self.write(|txn| {
            import::import_in(
                txn,
                definitions,
                &mut items.iter().cloned().map(import::Prepared::new),
                replace,
            )
        })
    }

    fn import_stream(
        &self,
        definitions: &[DefinitionRow],
        items: &mut crate::ImportItems<'_>,
        replace: bool,
    ) -> Result<ImportReport, StoreError> {
        crate::check_import_definitions(definitions)?;
        import::pipelined(items, |checked| {
            self.write(|txn| import::import_in(txn, definitions, checked, replace))
        })
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        let txn = self.read()?;
        check::verify_all(&txn)
    }
}

/// [`Store::list_instances`] on a given read transaction.
fn list_on(
    txn: &ReadTransaction,
    query: &InstanceQuery,
) -> Result<Vec<StoredInstance>, StoreError> {
    let limit = crate::page_len(query.limit);
    let instances = txn.open_table(INSTANCES).io()?;
    let namespace = query.namespace.as_deref();
    let after = query
        .after
        .as_ref()
        .map(|(ns, id)| (ns.as_str(), id.as_str()));
    let start: Bound<(&str, &str)> = match (namespace, after) {
        (Some(ns), Some((after_ns, after_id))) if after_ns == ns => Bound::Excluded((ns, after_id)),
        (Some(ns), Some((after_ns, _))) if after_ns > ns => return Ok(Vec::new()),
        (Some(ns), _) => Bound::Included((ns, "")),
        (None, Some(after)) => Bound::Excluded(after),
        (None, None) => Bound::Unbounded,
    };
    let status = query.status.map(status_code);
    let mut found = Vec::new();
    for entry in instances
        .range::<(&str, &str)>((start, Bound::Unbounded))
        .io()?
    {
        let (key, row) = entry.io()?;
        let (ns, id) = key.value();
        if namespace.is_some_and(|wanted| wanted != ns) {
            break;
        }
        let (uid, _, row_status, _, _, machine, bytes) = row.value();
        if status.is_some_and(|s| s != row_status)
            || query.machine.as_deref().is_some_and(|m| m != machine)
        {
            continue;
        }
        let instance = decode_instance(bytes, ns, id)?;
        if matches_query(query, &instance) {
            found.push(StoredInstance { uid, instance });
            if found.len() == limit {
                break;
            }
        }
    }
    Ok(found)
}
