//! Durable storage for cnsm: one [`Store`] trait, the embedded [`redb`](crate::embedded) backend,
//! and the backend-agnostic [`conformance`] suite every backend must pass.
//!
//! The runtime is the only writer of a store. It commits batches of [`CommitItem`]s, each a new
//! history record together with the instance state after it; a batch is one durable transaction
//! (group commit), and nothing is acknowledged before it is durable. Each item carries the
//! version it was computed against, and the store refuses it (compare-and-swap) when the durable
//! version differs, so a store shared by several writers never forks a chain.
//!
//! ```
//! use cnsm_store::{Store, embedded::EmbeddedStore};
//! let dir = tempfile::tempdir().unwrap();
//! let store = EmbeddedStore::open(dir.path()).unwrap();
//! assert!(store.list_definitions(None).unwrap().is_empty());
//! ```

use cnsm_core::record::{Hash32, SealedRecord, TimerKind};
use cnsm_core::resource::StateMachine;
use cnsm_core::{Instance, Status};

pub mod conformance;
pub mod embedded;

/// The on-disk format this code writes; it reads this and older ones.
pub const STORE_FORMAT: u32 = 1;

/// Longest page a list or history query returns.
pub const PAGE_LEN_MAX: usize = 10_000;

/// The page length a store serves for a requested `limit`: 0 means the longest page,
/// anything longer is cut to [`PAGE_LEN_MAX`].
pub fn page_len(limit: usize) -> usize {
    if limit == 0 {
        PAGE_LEN_MAX
    } else {
        limit.min(PAGE_LEN_MAX)
    }
}

/// A stored revision of a `StateMachine`.
#[derive(Debug, Clone, PartialEq)]
pub struct DefinitionRow {
    pub namespace: String,
    pub name: String,
    /// 1, 2, 3... per (namespace, name).
    pub revision: u32,
    /// Content hash of the normalized spec ([`cnsm_core::engine::revision_hash`]).
    pub hash: Hash32,
    pub definition: StateMachine,
    pub created_ms: u64,
}

/// What [`Store::put_definition`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutDefinition {
    /// A new revision with this number.
    Created(u32),
    /// The latest revision already has this content; nothing changed.
    Unchanged(u32),
}

/// An instance with the store's numeric id for it (used by timer indexes to stay small).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredInstance {
    pub uid: u64,
    pub instance: Instance,
}

/// One answer of [`Store::refresh_instances`].
#[derive(Debug, Clone, PartialEq)]
pub enum Refreshed {
    /// The instance still has the uid and version of the caller's copy.
    Unchanged { namespace: String, id: String },
    /// The instance as stored now.
    Changed(Box<StoredInstance>),
}

/// A key of [`Store::refresh_instances`]: namespace, id, and the `(uid, version)` of the copy
/// the caller holds, if any.
pub type HeldKey<'a> = (&'a str, &'a str, Option<(u64, u64)>);

/// An idempotency key remembered with the committed transition it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyEntry {
    pub key: String,
    /// Hash of the request (event name and payload); the same key with another request is a
    /// conflict.
    pub request_hash: Hash32,
    /// The version of the record the request committed.
    pub version: u64,
    pub expires_ms: u64,
}

/// One transition to commit.
#[derive(Debug, Clone)]
pub struct CommitItem {
    /// The instance after `record`; `instance.version == record.version`.
    pub instance: Instance,
    pub record: SealedRecord,
    /// `None` creates the instance (it must not exist). `Some(v)`: the durable version must be
    /// `v`, else the item is refused with [`ItemOutcome::Conflict`].
    pub expected_version: Option<u64>,
    pub idempotency: Option<IdempotencyEntry>,
}

/// What happened to one item of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemOutcome {
    Committed {
        uid: u64,
    },
    /// The durable version was not the expected one (`None`: the instance does not exist, or,
    /// for a create, `Some` of the existing version).
    Conflict {
        actual: Option<u64>,
    },
}

/// One instance to import with its full history (`snapshot import`).
#[derive(Debug, Clone)]
pub struct ImportItem {
    /// The instance as of its last record; its pending timer (absolute due time) is restored.
    pub instance: Instance,
    /// Records `0..=instance.version`, exact bytes and hashes as exported.
    pub records: Vec<SealedRecord>,
    /// Idempotency keys still inside their window.
    pub idempotency: Vec<IdempotencyEntry>,
}

/// What [`Store::import_instances`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub n_instances: u64,
    pub n_records: u64,
    /// Instances that existed and were replaced (`replace`).
    pub n_replaced: u64,
    /// Definition revisions that were new to the store.
    pub n_definitions_created: u64,
    /// Pending timers restored.
    pub n_timers: u64,
}

/// Most instances one [`Store::import_instances`] call accepts (callers import bigger snapshots
/// in one call per store: see `docs/snapshots.md` for the all-or-nothing rule).
pub const IMPORT_ITEMS_MAX: usize = 1_000_000;

/// Checks an import before any write: each item's chain (hashes recomputed from the bytes,
/// links, versions `0..=version`, identity), its state against its last record, its
/// idempotency entries, no instance twice, and every definition's content hash. Backends call
/// it first so that a refused import writes nothing.
pub fn check_import(definitions: &[DefinitionRow], items: &[ImportItem]) -> Result<(), StoreError> {
    if items.len() > IMPORT_ITEMS_MAX {
        return Err(StoreError::Refused(format!(
            "an import of {} instances exceeds the limit of {IMPORT_ITEMS_MAX}",
            items.len()
        )));
    }
    check_import_definitions(definitions)?;
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    for item in items {
        let instance = &item.instance;
        if !seen.insert((&*instance.namespace, &*instance.id)) {
            return Err(StoreError::Refused(format!(
                "import refused: instance {}/{}: appears twice",
                instance.namespace, instance.id
            )));
        }
        check_import_item(item)?;
    }
    Ok(())
}

/// Every definition's content hash ([`check_import`]'s first part).
pub fn check_import_definitions(definitions: &[DefinitionRow]) -> Result<(), StoreError> {
    for row in definitions {
        if cnsm_core::engine::revision_hash(&row.definition) != row.hash
            || row.definition.metadata.namespace != row.namespace
            || row.definition.metadata.name != row.name
        {
            return Err(StoreError::Refused(format!(
                "import refused: definition {}/{}@{}: content does not match its hash",
                row.namespace, row.name, row.revision
            )));
        }
    }
    Ok(())
}

/// One item of an import ([`check_import`]'s per-instance part): chain, state against last
/// record, idempotency entries.
pub fn check_import_item(item: &ImportItem) -> Result<(), StoreError> {
    let instance = &item.instance;
    let refuse = |detail: String| {
        StoreError::Refused(format!(
            "import refused: instance {}/{}: {detail}",
            instance.namespace, instance.id
        ))
    };
    if item.records.len() as u64 != instance.version + 1 {
        return Err(refuse(format!(
            "{} record(s) for version {}",
            item.records.len(),
            instance.version
        )));
    }
    let last = cnsm_core::record::verify_chain_links(
        &instance.namespace,
        &instance.id,
        true,
        &item.records,
    )
    .map_err(|e| refuse(e.to_string()))?;
    if last != instance.last_hash {
        return Err(refuse("its last hash is not its last record's hash".into()));
    }
    let Some(last_record) = item.records.last() else {
        return Err(refuse("has no records".into()));
    };
    let fields = cnsm_core::cbor::top_level_texts(&last_record.bytes, &["to", "status"])
        .map_err(|e| refuse(e.to_string()))?;
    if fields[0] != Some(&*instance.state) || fields[1] != Some(instance.status.as_str()) {
        return Err(refuse(
            "its state or status differ from its last record".into(),
        ));
    }
    for entry in &item.idempotency {
        if entry.version > instance.version {
            return Err(refuse(format!(
                "idempotency key {:?} names version {}, past its history",
                entry.key, entry.version
            )));
        }
    }
    Ok(())
}

/// The items of a streamed import ([`Store::import_stream`]). An `Err` from the source ends
/// the import: the store writes nothing and returns that error.
pub type ImportItems<'a> = dyn Iterator<Item = Result<ImportItem, StoreError>> + Send + 'a;

/// The store's own check of streamed items, as they pass: [`check_import_item`] on each, no
/// more than [`IMPORT_ITEMS_MAX`], and strictly increasing (namespace, id), which is how a
/// snapshot holds them and how an instance appearing twice is refused without remembering
/// every key.
pub fn checked_import_items<'a>(
    items: &'a mut ImportItems<'_>,
) -> impl Iterator<Item = Result<ImportItem, StoreError>> + Send + 'a {
    let mut last: Option<(std::sync::Arc<str>, std::sync::Arc<str>)> = None;
    let mut n_items = 0usize;
    items.map(move |item| {
        let item = item?;
        n_items += 1;
        if n_items > IMPORT_ITEMS_MAX {
            return Err(StoreError::Refused(format!(
                "an import of more than {IMPORT_ITEMS_MAX} instances exceeds the limit"
            )));
        }
        let key = (item.instance.namespace.clone(), item.instance.id.clone());
        if last.as_ref().is_some_and(|last| *last >= key) {
            return Err(StoreError::Refused(format!(
                "import refused: instance {}/{}: appears twice or out of (namespace, id) order",
                key.0, key.1
            )));
        }
        last = Some(key);
        check_import_item(&item)?;
        Ok(item)
    })
}

/// The read-side check of a history page of `namespace/id` (stores call it on the way out):
/// each record's bytes hash to its stored hash, or a later erasure record of its chain lists it
/// ([`cnsm_core::record::ErasureCheck`]). `later(v)` reads the records after version `v` (a page;
/// an empty page ends the search); it is called only when a redacted record needs them.
pub fn check_history_page(
    namespace: &str,
    id: &str,
    page: &[SealedRecord],
    mut later: impl FnMut(u64) -> Result<Vec<SealedRecord>, StoreError>,
) -> Result<(), StoreError> {
    let mut erasures = cnsm_core::record::ErasureCheck::default();
    let corrupt = |e: cnsm_core::record::ChainError| {
        StoreError::Corrupt(format!("instance {namespace}/{id}: {e}"))
    };
    let mut last = None;
    for sealed in page {
        erasures.check_hash(sealed.version, sealed.hash, &sealed.bytes);
        erasures
            .note_bytes(sealed.version, &sealed.bytes)
            .map_err(corrupt)?;
        last = Some(sealed.version);
    }
    while let Some(after) = last
        && erasures.has_pending()
        && erasures.finish().is_err()
    {
        let more = later(after)?;
        last = None;
        for sealed in &more {
            if sealed.version > after {
                erasures
                    .note_bytes(sealed.version, &sealed.bytes)
                    .map_err(corrupt)?;
                last = Some(sealed.version);
            }
        }
    }
    erasures.finish().map_err(corrupt)
}

/// Checks an erasure before any write (pair assertions, shared by the backends): the item is
/// an `erasure` record following an expected version, and it lists every redacted record with
/// `originalHash` = the hash kept for it and `redactedHash` = the hash of its new bytes.
pub fn check_erase(redacted: &[SealedRecord], erasure: &CommitItem) -> Result<(), StoreError> {
    let instance = &erasure.instance;
    let refuse = |detail: String| {
        StoreError::Refused(format!(
            "erasure of {}/{} refused: {detail}",
            instance.namespace, instance.id
        ))
    };
    let Some(expected) = erasure.expected_version else {
        return Err(refuse("an erasure needs an expected version".into()));
    };
    if erasure.idempotency.is_some() {
        return Err(refuse("an erasure carries no idempotency key".into()));
    }
    let record = erasure
        .record
        .open()
        .map_err(|e| refuse(format!("the erasure record: {e}")))?;
    let Some(list) = record
        .erasure
        .as_ref()
        .filter(|_| record.kind == cnsm_core::record::RecordKind::Erasure)
    else {
        return Err(refuse("the record is not an erasure record".into()));
    };
    let mut previous = None;
    for sealed in redacted {
        if sealed.version > expected || previous.is_some_and(|p| p >= sealed.version) {
            return Err(refuse(format!(
                "redacted record {} is out of order or past version {expected}",
                sealed.version
            )));
        }
        previous = Some(sealed.version);
        let redacted_hash = Hash32::digest(cnsm_core::record::RECORD_DOMAIN, &sealed.bytes);
        let listed = list.records.iter().any(|entry| {
            entry.version == sealed.version
                && entry.original_hash == sealed.hash
                && entry.redacted_hash == redacted_hash
        });
        if !listed {
            return Err(refuse(format!(
                "redacted record {} is not listed by the erasure record with its hashes",
                sealed.version
            )));
        }
    }
    Ok(())
}

/// A pending timer as the timer index keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerRef {
    pub due_ms: u64,
    pub uid: u64,
    pub entry_seq: u64,
    pub kind: TimerKind,
}

/// Filters for [`Store::list_instances`]. Results are ordered by (namespace, id).
#[derive(Debug, Clone, Default)]
pub struct InstanceQuery {
    pub namespace: Option<String>,
    pub machine: Option<String>,
    pub state: Option<String>,
    pub status: Option<Status>,
    /// Every pair must match a label.
    pub labels: Vec<(String, String)>,
    /// Continue after this (namespace, id).
    pub after: Option<(String, String)>,
    /// At most this many (capped at [`PAGE_LEN_MAX`]).
    pub limit: usize,
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub n_instances: u64,
    pub n_records: u64,
    pub n_definitions: u64,
    /// Every problem, with the instance it concerns.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Errors of a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk or database failed; the batch did not commit.
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// Stored bytes failed a check (hash chain, decoding, index).
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    /// The store was written by a newer cnsm.
    #[error("store format {found} is newer than this binary supports ({supported}); upgrade cnsm")]
    FormatTooNew { found: u32, supported: u32 },
    /// Another process holds the store.
    #[error("store is in use by another process: {0}")]
    Locked(String),
    /// A request the store refuses (e.g. deleting a definition that instances still use).
    #[error("{0}")]
    Refused(String),
}

/// A push-delivery target's durable progress: the position in the commit log below which every
/// matching record was delivered or dead-lettered, and the node that holds the target's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryCursor {
    /// The commit position (as [`Store::records_after`] reports it) the target has finished.
    pub position: u64,
    /// The node delivering for the target, and until when (ms since the epoch).
    pub lease_node: String,
    pub lease_until_ms: u64,
}

/// A record a target gave up on: delivery failed `attempts` times (or was refused for good).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// `namespace/machine/target`.
    pub target: String,
    /// The record's commit position.
    pub position: u64,
    pub namespace: String,
    pub instance: String,
    pub version: u64,
    /// The CloudEvent `id` the attempts carried.
    pub event_id: String,
    pub attempts: u32,
    pub last_error: String,
    /// When it was given up (ms since the epoch).
    pub failed_ms: u64,
    /// Set while an operator's redrive is pending ([`Store::redrive_dead_letters`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redrive: Option<Redrive>,
}

/// An operator's request to deliver a dead letter again: the deliverer of the target sends the
/// record once more (same CloudEvent `id`); the letter is deleted once delivered, or replaced
/// (without the request) when it fails again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redrive {
    /// When it was asked (ms since the epoch).
    pub requested_ms: u64,
    /// Who asked (the authenticated subject, or the name the operator gave).
    pub actor: String,
}

/// Longest actor name a [`Redrive`] keeps.
pub const REDRIVE_ACTOR_CHARS_MAX: usize = 256;

/// Longest target name a delivery cursor or dead letter takes.
pub const DELIVERY_TARGET_CHARS_MAX: usize = 512;

/// What a backup or a restore wrote and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// The file written.
    pub path: std::path::PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// The verification of the copy (every chain, every index, from genesis).
    pub verified: VerifyReport,
}

/// A durable store. Implementations are internally synchronized; the runtime calls `commit`
/// from one committer thread and reads from any thread.
pub trait Store: Send + Sync + 'static {
    /// Stores a new revision unless the latest one has the same content hash.
    fn put_definition(
        &self,
        definition: &StateMachine,
        hash: Hash32,
        now_ms: u64,
    ) -> Result<PutDefinition, StoreError>;

    /// A revision, or the latest one when `revision` is `None`.
    fn definition(
        &self,
        namespace: &str,
        name: &str,
        revision: Option<u32>,
    ) -> Result<Option<DefinitionRow>, StoreError>;

    /// The latest revision of each definition, ordered by (namespace, name).
    fn list_definitions(&self, namespace: Option<&str>) -> Result<Vec<DefinitionRow>, StoreError>;

    /// Deletes every revision of a definition. Refused while any instance of it is active.
    fn delete_definition(&self, namespace: &str, name: &str) -> Result<bool, StoreError>;

    /// Commits a batch in one durable transaction and reports each item's fate. Items that
    /// conflict are skipped; the others commit. Returns only after the commit is durable.
    fn commit(&self, items: &[CommitItem]) -> Result<Vec<ItemOutcome>, StoreError>;

    fn instance(&self, namespace: &str, id: &str) -> Result<Option<StoredInstance>, StoreError>;

    fn instance_by_uid(&self, uid: u64) -> Result<Option<StoredInstance>, StoreError>;

    fn list_instances(&self, query: &InstanceQuery) -> Result<Vec<StoredInstance>, StoreError>;

    /// Records `from_version..` of an instance, at most `limit`, in order, as stored.
    fn history(
        &self,
        namespace: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<SealedRecord>, StoreError>;

    /// A page of [`Store::list_instances`] with each instance's records `0..=version`, for
    /// exports. Backends may read the page on one consistent snapshot; the default makes one
    /// `history` call per instance. `query.limit` bounds the page as for `list_instances`.
    fn list_instances_with_history(
        &self,
        query: &InstanceQuery,
    ) -> Result<Vec<(StoredInstance, Vec<SealedRecord>)>, StoreError> {
        let page = self.list_instances(query)?;
        let mut out = Vec::with_capacity(page.len());
        for stored in page {
            let (namespace, id) = (&*stored.instance.namespace, &*stored.instance.id);
            let mut records: Vec<SealedRecord> = Vec::new();
            while (records.len() as u64) <= stored.instance.version {
                let from = records.len() as u64;
                let want = (stored.instance.version + 1 - from).min(PAGE_LEN_MAX as u64);
                let more = self.history(namespace, id, from, want as usize)?;
                if more.is_empty() {
                    return Err(StoreError::Corrupt(format!(
                        "instance {namespace}/{id}: record {from} is missing"
                    )));
                }
                records.extend(more);
            }
            records.truncate(stored.instance.version as usize + 1);
            out.push((stored, records));
        }
        Ok(out)
    }

    fn idempotency(
        &self,
        namespace: &str,
        id: &str,
        key: &str,
    ) -> Result<Option<IdempotencyEntry>, StoreError>;

    /// Forgets idempotency keys that expired at `now_ms`; returns how many.
    fn purge_idempotency(&self, now_ms: u64) -> Result<u64, StoreError>;

    /// Calls `visit` for every pending timer (to rebuild the in-memory timer index).
    fn pending_timers(&self, visit: &mut dyn FnMut(TimerRef)) -> Result<(), StoreError>;

    /// Imports definition revisions (keeping their numbers and hashes) and instances with
    /// their full history, idempotency entries and pending timers, in ONE durable transaction:
    /// all or nothing. Refuses ([`StoreError::Refused`], nothing written) when an item fails
    /// [`check_import`], when a revision exists with another hash, when an instance pins a
    /// revision that is neither imported nor stored, or when an instance already exists and
    /// `replace` is false. With `replace`, an existing instance's state, timers and keys are
    /// replaced by the imported ones.
    fn import_instances(
        &self,
        definitions: &[DefinitionRow],
        items: &[ImportItem],
        replace: bool,
    ) -> Result<ImportReport, StoreError>;

    /// [`Store::import_instances`] with the items pulled one at a time from `items` (sorted by
    /// (namespace, id), see [`checked_import_items`]) and written as they arrive, still in ONE
    /// durable transaction: when `items` yields an error midway, or any item or definition
    /// is refused, the transaction is dropped and nothing is written (that error is
    /// returned). Memory does not grow with the number of items.
    fn import_stream(
        &self,
        definitions: &[DefinitionRow],
        items: &mut ImportItems<'_>,
        replace: bool,
    ) -> Result<ImportReport, StoreError>;

    /// Checks every hash chain, every instance against its last record, every index.
    fn verify(&self) -> Result<VerifyReport, StoreError>;

    /// Erasure of personal data (see [`cnsm_core::erasure`]), in ONE durable transaction:
    /// replaces the stored bytes of each `redacted` record of the instance of `erasure` (each
    /// keeps its stored hash, which must equal the record's `hash` here, as the chain link),
    /// and commits `erasure` (the `erasure` record, with `expected_version`) as [`Store::commit`]
    /// would. When the durable version is not the expected one the answer is
    /// [`ItemOutcome::Conflict`] and nothing changes. Every copy of a record's bytes the store
    /// keeps (commit log included) is replaced.
    fn erase(
        &self,
        redacted: &[SealedRecord],
        erasure: &CommitItem,
    ) -> Result<ItemOutcome, StoreError>;

    /// Retention: deletes up to `limit` instances of `namespace/machine` that ended
    /// (succeeded, failed, cancelled) before `ended_before_ms`, with their whole history and
    /// idempotency keys, durably; returns how many. Active instances are never touched.
    fn purge_finished(
        &self,
        namespace: &str,
        machine: &str,
        ended_before_ms: u64,
        limit: usize,
    ) -> Result<u64, StoreError>;

    /// The canary rollout of a machine, if one is set.
    fn rollout(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<cnsm_core::rollout::Rollout>, StoreError>;

    /// Sets (or, with `None`, clears) the canary rollout of a machine, durably. Refused when a
    /// revision it names does not exist.
    fn put_rollout(
        &self,
        namespace: &str,
        name: &str,
        rollout: Option<&cnsm_core::rollout::Rollout>,
    ) -> Result<(), StoreError>;

    /// Writes a consistent point-in-time copy of the whole store to the file `out` while it
    /// keeps serving, verified before it is kept. Stores without a file of their own (a
    /// database server) refuse: their database's own backup tools apply.
    fn backup(&self, out: &std::path::Path) -> Result<BackupReport, StoreError> {
        Err(StoreError::Refused(format!(
            "this store cannot write a backup file ({}); use the database's own backup tools",
            out.display()
        )))
    }

    /// The commit log: committed records whose commit position is greater than `after`, in
    /// commit order, at most `limit` (0 = a page of [`PAGE_LEN_MAX`]), each with its position.
    /// Positions increase with commit order but need not be gap-free; outbox readers (the audit
    /// log) keep the last position they handled as their cursor. A backend without a commit log
    /// says so with [`StoreError::Refused`].
    fn records_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SealedRecord)>, StoreError> {
        let _ = (after, limit);
        Err(StoreError::Refused(
            "this store does not expose a commit log".into(),
        ))
    }

    /// Claims up to `limit` timers due at `now_ms` for `lease_ms` on behalf of `node`, for a
    /// store shared by several nodes: a claimed timer is not handed to another node until its
    /// lease expires (the node died) or a commit to its instance clears the claim. Ordered by
    /// due time.
    ///
    /// The default, for a store with one writer, returns the due timers without a lease.
    fn claim_due_timers(
        &self,
        now_ms: u64,
        lease_ms: u64,
        node: &str,
        limit: usize,
    ) -> Result<Vec<TimerRef>, StoreError> {
        let _ = (lease_ms, node);
        let mut due = Vec::new();
        self.pending_timers(&mut |timer| {
            if timer.due_ms <= now_ms {
                due.push(timer);
            }
        })?;
        due.sort();
        due.truncate(limit);
        Ok(due)
    }

    /// Several instances at once, by (namespace, id), in any order; missing ones are left out.
    /// A store on a network overrides it with one round trip.
    fn instances(&self, keys: &[(&str, &str)]) -> Result<Vec<StoredInstance>, StoreError> {
        let mut found = Vec::with_capacity(keys.len());
        for (namespace, id) in keys {
            found.extend(self.instance(namespace, id)?);
        }
        Ok(found)
    }

    /// [`Store::instances`] for a caller that holds copies of some of them: each key comes
    /// with the `(uid, version)` of the copy it holds, if any. An instance that still has that
    /// uid and version is answered [`Refreshed::Unchanged`] without its row (a network store
    /// saves reading and sending it); every other one found is [`Refreshed::Changed`]; missing
    /// ones are left out. The default answers everything found as changed.
    fn refresh_instances(&self, keys: &[HeldKey<'_>]) -> Result<Vec<Refreshed>, StoreError> {
        let plain: Vec<(&str, &str)> = keys.iter().map(|k| (k.0, k.1)).collect();
        Ok(self
            .instances(&plain)?
            .into_iter()
            .map(|stored| Refreshed::Changed(Box::new(stored)))
            .collect())
    }

    /// Push delivery: claims (or renews) the lease of `target` for `node` until
    /// `now_ms + lease_ms`, with compare-and-set: it succeeds when no node holds the target,
    /// `node` already holds it, or the holder's lease expired at `now_ms`. Returns the target's
    /// cursor when the lease is `node`'s (a new target starts at position 0), `None` when
    /// another node holds it. Durable before it returns.
    fn claim_delivery(
        &self,
        target: &str,
        node: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<DeliveryCursor>, StoreError> {
        let _ = (target, node, now_ms, lease_ms);
        Err(StoreError::Refused(
            "this store does not keep delivery cursors".into(),
        ))
    }

    /// Moves `target`'s cursor to `position`, only while `node` holds its lease (a fenced
    /// write: a node that lost its lease cannot move the cursor of the node that took over).
    /// Returns whether it was written. Durable before it returns.
    fn put_delivery_cursor(
        &self,
        target: &str,
        node: &str,
        position: u64,
    ) -> Result<bool, StoreError> {
        let _ = (target, node, position);
        Err(StoreError::Refused(
            "this store does not keep delivery cursors".into(),
        ))
    }

    /// Every target's cursor, ordered by target name.
    fn delivery_cursors(&self) -> Result<Vec<(String, DeliveryCursor)>, StoreError> {
        Ok(Vec::new())
    }

    /// Stores a dead letter durably (a second one for the same target and position replaces
    /// the first, redrive mark included: `letter.redrive` is stored as given).
    fn put_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let _ = letter;
        Err(StoreError::Refused(
            "this store does not keep dead letters".into(),
        ))
    }

    /// Dead letters ordered by (target, position): of one target or of all, those after
    /// `after` (a (target, position) pair from the previous page), at most `limit` (0 = a page
    /// of [`PAGE_LEN_MAX`]).
    fn dead_letters(
        &self,
        target: Option<&str>,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let _ = (target, after, limit);
        Ok(Vec::new())
    }

    /// Marks dead letters of `target` for redrive with `redrive` (who asked, and when): the one
    /// at `position`, or, with `None`, every one of the target. A letter already marked gets the
    /// new mark. Returns how many letters are marked; 0 when the target has none (or none at
    /// `position`), and then nothing changed. Durable before it returns.
    fn redrive_dead_letters(
        &self,
        target: &str,
        position: Option<u64>,
        redrive: &Redrive,
    ) -> Result<u64, StoreError> {
        let _ = (target, position, redrive);
        Err(StoreError::Refused(
            "this store does not keep dead letters".into(),
        ))
    }

    /// The dead letters of `target` marked for redrive, ordered by position, those after
    /// `after`, at most `limit` (0 = a page of [`PAGE_LEN_MAX`]).
    fn redrive_requests(
        &self,
        target: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let _ = (target, after, limit);
        Ok(Vec::new())
    }

    /// Deletes the dead letter of `target` at `position` (a redrive delivered it). Returns
    /// whether there was one. Durable before it returns.
    fn delete_dead_letter(&self, target: &str, position: u64) -> Result<bool, StoreError> {
        let _ = (target, position);
        Err(StoreError::Refused(
            "this store does not keep dead letters".into(),
        ))
    }

    /// For a store shared by several nodes: calls `on_commit(uid, version)` for each record
    /// committed through *other* handles of the store, soon after it commits (per instance in
    /// version order), until the store is dropped. Delivery is best effort: while the store
    /// cannot reach its database, commits are missed. Returns `false` when the store has no
    /// such feed (a store with one writer sees every commit itself).
    fn subscribe_foreign_commits(
        &self,
        on_commit: std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>,
    ) -> Result<bool, StoreError> {
        let _ = on_commit;
        Ok(false)
    }
}
