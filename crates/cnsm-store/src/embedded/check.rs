//! Reading the embedded store back and checking it: the unverified tail (on open, per commit,
//! on close) and the full verification behind [`Store::verify`](crate::Store::verify).

use std::collections::{BTreeMap, HashMap, HashSet};

use cnsm_core::Instance;
use cnsm_core::engine::revision_hash;
use cnsm_core::record::{
    ChainError, ErasureCheck, Hash32, RECORD_DOMAIN, SealedRecord, decode_record,
};
use cnsm_core::resource::StateMachine;
use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};

use super::tables::*;
use super::{head_of, meta_get};
use crate::{STORE_FORMAT, StoreError, VerifyReport};

/// Most problems one report lists; the rest are counted in a last line.
pub const PROBLEMS_MAX: usize = 10_000;

/// How far a tail check got.
#[derive(Debug)]
pub(crate) struct TailCheck {
    /// The last log sequence verified (the checkpoint to store).
    pub(crate) verified_seq: u64,
    /// The first problem met, which stopped the check.
    pub(crate) problem: Option<String>,
}

/// Verifies the records committed after `verified_seq` (up to `budget` of them, or all), in
/// commit order, and stops at the first problem.
pub(crate) fn verify_tail(
    records: &impl ReadableTable<u64, RecordValue>,
    uids: &impl ReadableTable<u64, (&'static str, &'static str)>,
    index: &impl ReadableTable<(u64, u64), u64>,
    verified_seq: u64,
    next_seq: u64,
    budget: Option<u64>,
) -> Result<TailCheck, StoreError> {
    let start = verified_seq.saturating_add(1);
    let end = match budget {
        Some(budget) => next_seq.min(start.saturating_add(budget)),
        None => next_seq,
    };
    let mut done = verified_seq;
    if start >= end {
        return Ok(TailCheck {
            verified_seq: done,
            problem: None,
        });
    }
    let stop = |done: u64, problem: String| {
        Ok(TailCheck {
            verified_seq: done,
            problem: Some(problem),
        })
    };
    for entry in records.range(start..end).io()? {
        let (seq, value) = entry.io()?;
        let seq = seq.value();
        if seq != done + 1 {
            return stop(
                done,
                format!("commit sequence {} holds no record", done + 1),
            );
        }
        if let Err(problem) = check_record(records, uids, index, seq, value.value())? {
            return stop(done, problem);
        }
        done = seq;
    }
    if done + 1 < end {
        return stop(
            done,
            format!("commit sequence {} holds no record", done + 1),
        );
    }
    Ok(TailCheck {
        verified_seq: done,
        problem: None,
    })
}

/// Checks one stored record, committed at `seq`: its hash over the stored bytes, that it is
/// record `version` of the instance its uid names, that it links to the stored previous record
/// of that instance, and that the record index points back at `seq`.
///
/// The inner error is a problem description naming the instance and version.
pub(crate) fn check_record(
    records: &impl ReadableTable<u64, RecordValue>,
    uids: &impl ReadableTable<u64, (&'static str, &'static str)>,
    index: &impl ReadableTable<(u64, u64), u64>,
    seq: u64,
    value: (u64, u64, [u8; 32], &[u8]),
) -> Result<Result<(), String>, StoreError> {
    let (uid, version, hash, bytes) = value;
    let Some(key) = uids.get(uid).io()? else {
        return Ok(Err(format!(
            "record {version} of uid {uid} (commit sequence {seq}): the uid names no instance"
        )));
    };
    let (namespace, id) = key.value();
    let name = format!("instance {namespace}/{id} record {version}");
    if Hash32::digest(RECORD_DOMAIN, bytes) != Hash32(hash)
        && !erased_and_listed(records, index, uid, version, Hash32(hash), bytes)?
    {
        return Ok(Err(format!("{name}: stored hash does not match its bytes")));
    }
    // The hash matched (or a later erasure record of the chain lists these bytes), so the bytes
    // are what was committed: read just the identity and the link (a full decode is `verify`'s
    // job).
    let fields =
        match cnsm_core::cbor::top_level_texts(bytes, &["namespace", "instance", "prevHash"]) {
            Ok(fields) => fields,
            Err(e) => return Ok(Err(format!("{name}: {e}"))),
        };
    let (Some(record_namespace), Some(record_id), Some(prev_hex)) =
        (fields[0], fields[1], fields[2])
    else {
        return Ok(Err(format!(
            "{name}: bytes are not a record (identity or link missing)"
        )));
    };
    if record_namespace != namespace || record_id != id {
        return Ok(Err(format!(
            "{name}: belongs to {record_namespace}/{record_id}"
        )));
    }
    let Some(prev_hash) = Hash32::from_hex(prev_hex) else {
        return Ok(Err(format!("{name}: previous hash is not 64 hex digits")));
    };
    let expected_prev = match version.checked_sub(1) {
        None => Hash32::ZERO,
        Some(previous) => match stored_hash(records, index, uid, previous)? {
            Ok(hash) => hash,
            Err(problem) => {
                return Ok(Err(format!(
                    "{name}: record {previous} before it {problem}"
                )));
            }
        },
    };
    if prev_hash != expected_prev {
        return Ok(Err(format!(
            "{name}: previous hash does not match the stored record before it"
        )));
    }
    match index.get((uid, version)).io()?.map(|g| g.value()) {
        Some(indexed) if indexed == seq => {}
        Some(indexed) => {
            return Ok(Err(format!(
                "{name}: the record index points at commit sequence {indexed}, not {seq}"
            )));
        }
        None => {
            return Ok(Err(format!(
                "{name}: missing from the record index (commit sequence {seq})"
            )));
        }
    }
    Ok(Ok(()))
}

/// Whether record `version` of `uid`, whose bytes do not hash to its stored hash, is a redacted
/// record that a later erasure record of its chain lists ([`ErasureCheck`], the core's rule).
fn erased_and_listed(
    records: &impl ReadableTable<u64, RecordValue>,
    index: &impl ReadableTable<(u64, u64), u64>,
    uid: u64,
    version: u64,
    stored_hash: Hash32,
    bytes: &[u8],
) -> Result<bool, StoreError> {
    let mut erasures = ErasureCheck::default();
    erasures.check_hash(version, stored_hash, bytes);
    for entry in index.range((uid, version + 1)..=(uid, u64::MAX)).io()? {
        let (key, seq) = entry.io()?;
        let later_version = key.value().1;
        let Some(value) = records.get(seq.value()).io()? else {
            continue;
        };
        let (_, _, _, later_bytes) = value.value();
        if erasures.note_bytes(later_version, later_bytes).is_err() {
            continue;
        }
    }
    Ok(erasures.finish().is_ok())
}

/// The stored hash of record `version` of `uid`, found through the record index; the inner
/// error says what is wrong with it.
fn stored_hash(
    records: &impl ReadableTable<u64, RecordValue>,
    index: &impl ReadableTable<(u64, u64), u64>,
    uid: u64,
    version: u64,
) -> Result<Result<Hash32, String>, StoreError> {
    let Some(seq) = index.get((uid, version)).io()?.map(|g| g.value()) else {
        return Ok(Err("is missing".into()));
    };
    let Some(value) = records.get(seq).io()? else {
        return Ok(Err(format!("is missing (commit sequence {seq})")));
    };
    let (record_uid, record_version, hash, _) = value.value();
    if (record_uid, record_version) != (uid, version) {
        return Ok(Err(format!(
            "is indexed at commit sequence {seq}, which holds record {record_version} of uid {record_uid}"
        )));
    }
    Ok(Ok(Hash32(hash)))
}

/// Problems found so far, capped at [`PROBLEMS_MAX`].
#[derive(Default)]
struct Problems {
    list: Vec<String>,
    n_more: u64,
}

impl Problems {
    fn push(&mut self, problem: String) {
        if self.list.len() < PROBLEMS_MAX {
            self.list.push(problem);
        } else {
            self.n_more += 1;
        }
    }

    fn finish(mut self) -> Vec<String> {
        if self.n_more > 0 {
            self.list
                .push(format!("... and {} more problems", self.n_more));
        }
        self.list
    }
}

/// What the instance pass expects the index tables to hold.
#[derive(Default)]
struct Expected {
    uids: HashSet<u64>,
    timers: HashMap<(u64, u64), (u64, u8)>,
    active: HashSet<(String, String, u64)>,
    max_uid: u64,
    /// Uids of instances replaced by an import: their records stay in the log as superseded
    /// history and their uid keeps its entry in the uid index.
    retired: HashSet<u64>,
}

/// The full check: every chain from genesis, every instance against the replay of its
/// history, every index, the counters and the format.
pub(crate) fn verify_all(txn: &ReadTransaction) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let mut problems = Problems::default();
    let meta = txn.open_table(META).io()?;
    match meta.get(META_FORMAT).io()?.map(|g| g.value()) {
        Some(format) if format > u64::from(STORE_FORMAT) => {
            problems.push(format!(
                "store format {format} is newer than this binary supports ({STORE_FORMAT})"
            ));
        }
        Some(_) => {}
        None => problems.push("the meta table has no format version".into()),
    }
    let next_uid = meta_get(&meta, META_NEXT_UID)?;
    let next_seq = meta_get(&meta, META_NEXT_SEQ)?;
    let verified_seq = meta_get(&meta, META_VERIFIED_SEQ)?;
    if verified_seq >= next_seq {
        problems.push(format!(
            "the verification checkpoint {verified_seq} is past the log end {next_seq}"
        ));
    }

    report.n_definitions = check_definitions(txn, &mut problems)?;
    let mut expected = check_instances(txn, &mut report, &mut problems)?;
    match txn.open_table(RETIRED_UIDS) {
        Ok(retired) => {
            for entry in retired.iter().io()? {
                expected.retired.insert(entry.io()?.0.value());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(StoreError::Io(e.to_string())),
    }
    if expected.max_uid >= next_uid {
        problems.push(format!(
            "uid {} is not below the next uid counter {next_uid}",
            expected.max_uid
        ));
    }
    check_log(txn, &expected, next_seq, report.n_records, &mut problems)?;
    check_indexes(txn, expected, &mut problems)?;
    report.problems = problems.finish();
    Ok(report)
}

fn check_definitions(txn: &ReadTransaction, problems: &mut Problems) -> Result<u64, StoreError> {
    let definitions = txn.open_table(DEFINITIONS).io()?;
    let latest = txn.open_table(DEFINITION_LATEST).io()?;
    let mut max_revision: BTreeMap<(String, String), u32> = BTreeMap::new();
    for entry in definitions.iter().io()? {
        let (key, value) = entry.io()?;
        let (namespace, name, revision) = key.value();
        let (hash, _, bytes) = value.value();
        let what = || format!("definition {namespace}/{name}@{revision}");
        max_revision.insert((namespace.to_owned(), name.to_owned()), revision);
        match decode_cbor::<StateMachine>(bytes, &|| format!("{}: row does not decode", what())) {
            Err(e) => problems.push(e.to_string()),
            Ok(definition) => {
                if definition.metadata.namespace != namespace || definition.metadata.name != name {
                    problems.push(format!(
                        "{}: holds {}/{}",
                        what(),
                        definition.metadata.namespace,
                        definition.metadata.name
                    ));
                }
                if revision_hash(&definition) != Hash32(hash) {
                    problems.push(format!(
                        "{}: stored hash does not match its content",
                        what()
                    ));
                }
            }
        }
    }
    let mut n_latest = 0u64;
    for entry in latest.iter().io()? {
        let (key, value) = entry.io()?;
        let (namespace, name) = key.value();
        let revision = value.value();
        n_latest += 1;
        match max_revision.remove(&(namespace.to_owned(), name.to_owned())) {
            Some(max) if max == revision => {}
            Some(max) => problems.push(format!(
                "definition {namespace}/{name}: latest index says revision {revision}, the highest stored is {max}"
            )),
            None => problems.push(format!(
                "definition {namespace}/{name}: latest index names revision {revision}, which is not stored"
            )),
        }
    }
    for (namespace, name) in max_revision.keys() {
        problems.push(format!(
            "definition {namespace}/{name}: revisions stored without a latest index entry"
        ));
    }
    Ok(n_latest)
}

fn check_instances(
    txn: &ReadTransaction,
    report: &mut VerifyReport,
    problems: &mut Problems,
) -> Result<Expected, StoreError> {
    let instances = txn.open_table(INSTANCES).io()?;
    let uids = txn.open_table(INSTANCE_UIDS).io()?;
    let records = txn.open_table(RECORDS).io()?;
    let index = txn.open_table(RECORD_INDEX).io()?;
    let mut expected = Expected::default();
    for entry in instances.iter().io()? {
        let (key, value) = entry.io()?;
        let (namespace, id) = key.value();
        let value = value.value();
        let bytes = value.6;
        let name = format!("instance {namespace}/{id}");
        report.n_instances += 1;
        let head = match head_of(&value) {
            Ok(head) => head,
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                continue;
            }
        };
        let uid = head.uid;
        expected.max_uid = expected.max_uid.max(uid);
        if !expected.uids.insert(uid) {
            problems.push(format!("{name}: uid {uid} is shared with another instance"));
        }
        match uids.get(uid).io()? {
            Some(g) if g.value() == (namespace, id) => {}
            Some(g) => {
                let (other_ns, other_id) = g.value();
                problems.push(format!("{name}: uid {uid} maps to {other_ns}/{other_id}"));
            }
            None => problems.push(format!("{name}: uid {uid} is missing from the uid index")),
        }
        if let Some(timer) = head.timer {
            expected.timers.insert(
                (timer.due_ms, uid),
                (timer.entry_seq, kind_code(timer.kind)),
            );
        }
        if head.status == cnsm_core::Status::Active {
            expected
                .active
                .insert((namespace.to_owned(), head.machine.clone(), uid));
        }

        let stored: Option<Instance> =
            match decode_row(bytes, &|| format!("{name}: row does not decode")) {
                Ok(instance) => Some(instance),
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            };
        let replayed = replay(&records, &index, namespace, id, uid, report, problems)?;
        if let Some(stored) = &stored {
            let fixed = head.version == stored.version
                && head.status == stored.status
                && *head.machine == *stored.machine
                && head.timer == indexed_timer(stored)
                && head.last_hash == stored.last_hash
                && &*stored.namespace == namespace
                && &*stored.id == id;
            if !fixed {
                problems.push(format!(
                    "{name}: the row's fixed columns disagree with its document"
                ));
            }
            if let Some(replayed) = &replayed {
                let fields = differences(stored, replayed);
                if !fields.is_empty() {
                    problems.push(format!(
                        "{name}: the row differs from the replay of its history in {}",
                        fields.join(", ")
                    ));
                } else if encode_row(replayed)? != bytes {
                    // Equal values from different bytes: a field lost to a default, or bytes
                    // that were not written by this store.
                    problems.push(format!(
                        "{name}: the row's bytes are not the encoding of the replay of its history"
                    ));
                }
            }
        }
    }
    Ok(expected)
}

/// Replays one instance's history from genesis; `None` when the chain is broken (reported).
fn replay(
    records: &impl ReadableTable<u64, RecordValue>,
    index: &impl ReadableTable<(u64, u64), u64>,
    namespace: &str,
    id: &str,
    uid: u64,
    report: &mut VerifyReport,
    problems: &mut Problems,
) -> Result<Option<Instance>, StoreError> {
    let mut replayed: Option<Instance> = None;
    let mut broken = false;
    let mut erasures = ErasureCheck::default();
    let mut expected_version = 0u64;
    for entry in index.range((uid, 0)..=(uid, u64::MAX)).io()? {
        let (key, seq) = entry.io()?;
        report.n_records += 1;
        if broken {
            continue;
        }
        let version = key.value().1;
        let seq = seq.value();
        let name = format!("instance {namespace}/{id} record {version}");
        if version != expected_version {
            problems.push(format!("{name}: expected record {expected_version} first"));
            broken = true;
            continue;
        }
        let Some(value) = records.get(seq).io()? else {
            problems.push(format!("{name}: missing (commit sequence {seq})"));
            broken = true;
            continue;
        };
        let (record_uid, record_version, hash, bytes) = value.value();
        if (record_uid, record_version) != (uid, version) {
            problems.push(format!(
                "{name}: indexed at commit sequence {seq}, which holds record {record_version} of uid {record_uid}"
            ));
            broken = true;
            continue;
        }
        let sealed = SealedRecord {
            version,
            bytes: bytes.to_vec(),
            hash: Hash32(hash),
        };
        let matched = erasures.check_hash(version, sealed.hash, &sealed.bytes);
        let record = match decode_record(version, &sealed.bytes) {
            Ok(record) => record,
            Err(e) => {
                let e = if matched {
                    e
                } else {
                    ChainError::HashMismatch { version }
                };
                problems.push(format!("instance {namespace}/{id}: {e}"));
                broken = true;
                continue;
            }
        };
        if let Some(erasure) = &record.erasure {
            erasures.note(version, erasure);
        }
        if &*record.namespace != namespace || &*record.instance != id {
            problems.push(format!(
                "{name}: belongs to {}/{}",
                record.namespace, record.instance
            ));
            broken = true;
            continue;
        }
        let applied = match replayed.as_mut() {
            None => Instance::from_genesis(&record, sealed.hash).map(|i| replayed = Some(i)),
            Some(instance) => instance.apply_record(&record, sealed.hash),
        };
        if let Err(e) = applied {
            problems.push(format!("instance {namespace}/{id}: {e}"));
            broken = true;
            continue;
        }
        expected_version += 1;
    }
    if replayed.is_none() && !broken {
        problems.push(format!("instance {namespace}/{id}: has no history"));
    }
    // A record whose bytes do not hash to its stored hash is accepted only through a later
    // erasure record of the chain.
    if !broken && let Err(e) = erasures.finish() {
        problems.push(format!("instance {namespace}/{id}: {e}"));
        broken = true;
    }
    Ok(if broken { None } else { replayed })
}

/// Names the fields in which a stored instance differs from its replay.
fn differences(stored: &Instance, replayed: &Instance) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut check = |same: bool, field: &'static str| {
        if !same {
            fields.push(field);
        }
    };
    check(
        stored.namespace == replayed.namespace && stored.id == replayed.id,
        "id",
    );
    check(stored.machine == replayed.machine, "machine");
    check(stored.revision == replayed.revision, "revision");
    check(
        stored.revision_hash == replayed.revision_hash,
        "revisionHash",
    );
    check(stored.state == replayed.state, "state");
    check(stored.status == replayed.status, "status");
    check(stored.phase == replayed.phase, "phase");
    check(stored.reason == replayed.reason, "reason");
    check(stored.data == replayed.data, "data");
    check(stored.version == replayed.version, "version");
    check(stored.entry_seq == replayed.entry_seq, "entrySeq");
    check(stored.attempt == replayed.attempt, "attempt");
    check(stored.in_backoff == replayed.in_backoff, "inBackoff");
    check(
        stored.compensations == replayed.compensations,
        "compensations",
    );
    check(
        stored.pending_outcome == replayed.pending_outcome,
        "pendingOutcome",
    );
    check(stored.timer == replayed.timer, "timer");
    check(stored.labels == replayed.labels, "labels");
    check(stored.created_ms == replayed.created_ms, "createdMs");
    check(stored.updated_ms == replayed.updated_ms, "updatedMs");
    check(stored.last_hash == replayed.last_hash, "lastHash");
    fields
}

/// The commit log (`records` by sequence) against the record index: every record is below
/// the log end, belongs to an instance, is indexed at its own sequence, and each instance's
/// records appear in version order without gaps; every index entry names a stored record
/// (entries of live instances were followed by the replay; the rest are scanned only when the
/// counts disagree).
fn check_log(
    txn: &ReadTransaction,
    expected: &Expected,
    next_seq: u64,
    n_replayed: u64,
    problems: &mut Problems,
) -> Result<(), StoreError> {
    let records = txn.open_table(RECORDS).io()?;
    let index = txn.open_table(RECORD_INDEX).io()?;
    let uids = txn.open_table(INSTANCE_UIDS).io()?;
    let name_of = |uid: u64, version: u64| -> Result<String, StoreError> {
        Ok(match uids.get(uid).io()? {
            Some(g) => {
                let (namespace, id) = g.value();
                format!("instance {namespace}/{id} record {version}")
            }
            None => format!("record {version} of uid {uid}"),
        })
    };
    let mut next_version: HashMap<u64, u64> = HashMap::new();
    let mut orphans = HashSet::new();
    for entry in records.iter().io()? {
        let (seq, value) = entry.io()?;
        let seq = seq.value();
        let (uid, version, _, _) = value.value();
        if seq >= next_seq {
            problems.push(format!(
                "{} (commit sequence {seq}) is past the log end {next_seq}",
                name_of(uid, version)?
            ));
        }
        if !expected.uids.contains(&uid) && !expected.retired.contains(&uid) {
            if orphans.insert(uid) {
                problems.push(format!(
                    "records of uid {uid} (record {version} at commit sequence {seq} and on) belong to no instance"
                ));
            }
            continue;
        }
        match index.get((uid, version)).io()?.map(|g| g.value()) {
            Some(indexed) if indexed == seq => {}
            Some(indexed) => problems.push(format!(
                "{} (commit sequence {seq}): the record index points at commit sequence {indexed}",
                name_of(uid, version)?
            )),
            None => problems.push(format!(
                "{} (commit sequence {seq}): missing from the record index",
                name_of(uid, version)?
            )),
        }
        let wanted = next_version.get(&uid).copied().unwrap_or(0);
        if version != wanted {
            problems.push(format!(
                "{} (commit sequence {seq}): out of order (expected record {wanted})",
                name_of(uid, version)?
            ));
        }
        next_version.insert(uid, version.max(wanted) + 1);
    }
    if index.len().io()? != n_replayed {
        let mut reported = HashSet::new();
        for entry in index.iter().io()? {
            let (key, _) = entry.io()?;
            let (uid, version) = key.value();
            if !expected.uids.contains(&uid)
                && !expected.retired.contains(&uid)
                && reported.insert(uid)
            {
                problems.push(format!(
                    "record index entries of uid {uid} (record {version} and on) belong to no instance"
                ));
            }
        }
    }
    // Every record maps to its own index entry (above) and every index entry of a live uid was
    // followed to a record of that (uid, version) by the replay, so the two tables agree.
    Ok(())
}

/// The uid, timer, active-instance and idempotency indexes against what the rows imply.
fn check_indexes(
    txn: &ReadTransaction,
    mut expected: Expected,
    problems: &mut Problems,
) -> Result<(), StoreError> {
    let uids = txn.open_table(INSTANCE_UIDS).io()?;
    if uids.len().io()? != expected.uids.len() as u64 {
        for entry in uids.iter().io()? {
            let (uid, key) = entry.io()?;
            let uid = uid.value();
            if !expected.uids.contains(&uid) && !expected.retired.contains(&uid) {
                let (namespace, id) = key.value();
                problems.push(format!(
                    "uid {uid} maps to {namespace}/{id}, whose row does not have it"
                ));
            }
        }
    }

    let timers = txn.open_table(TIMERS).io()?;
    for entry in timers.iter().io()? {
        let (key, value) = entry.io()?;
        let (due_ms, uid) = key.value();
        match expected.timers.remove(&(due_ms, uid)) {
            Some(wanted) if wanted == value.value() => {}
            Some(_) => problems.push(format!(
                "timer of uid {uid} due at {due_ms}: differs from the instance's timer"
            )),
            None => problems.push(format!(
                "timer of uid {uid} due at {due_ms}: not the instance's current timer"
            )),
        }
    }
    let mut missing: Vec<_> = expected.timers.keys().collect();
    missing.sort();
    for (due_ms, uid) in missing {
        problems.push(format!(
            "timer of uid {uid} due at {due_ms}: missing from the timer index"
        ));
    }

    let active = txn.open_table(ACTIVE_INSTANCES).io()?;
    for entry in active.iter().io()? {
        let (key, _) = entry.io()?;
        let (namespace, machine, uid) = key.value();
        if !expected
            .active
            .remove(&(namespace.to_owned(), machine.to_owned(), uid))
        {
            problems.push(format!(
                "active index lists uid {uid} under {namespace}/{machine}, which is not active"
            ));
        }
    }
    let mut missing: Vec<_> = expected.active.iter().collect();
    missing.sort();
    for (namespace, machine, uid) in missing {
        problems.push(format!(
            "active index misses uid {uid} of {namespace}/{machine}"
        ));
    }

    let idempotency = txn.open_table(IDEMPOTENCY).io()?;
    let expiry = txn.open_table(IDEMPOTENCY_EXPIRY).io()?;
    for entry in idempotency.iter().io()? {
        let (key, value) = entry.io()?;
        let (uid, idempotency_key) = key.value();
        let (_, _, expires_ms) = value.value();
        if !expected.uids.contains(&uid) {
            problems.push(format!(
                "idempotency key {idempotency_key:?} of uid {uid}: the uid names no instance"
            ));
        }
        if expiry
            .get((expires_ms, uid, idempotency_key))
            .io()?
            .is_none()
        {
            problems.push(format!(
                "idempotency key {idempotency_key:?} of uid {uid}: missing from the expiry index"
            ));
        }
    }
    if expiry.len().io()? != idempotency.len().io()? {
        for entry in expiry.iter().io()? {
            let (key, _) = entry.io()?;
            let (expires_ms, uid, idempotency_key) = key.value();
            let matches = idempotency
                .get((uid, idempotency_key))
                .io()?
                .is_some_and(|g| g.value().2 == expires_ms);
            if !matches {
                problems.push(format!(
                    "expiry index entry {idempotency_key:?} of uid {uid} at {expires_ms}: no such idempotency key"
                ));
            }
        }
    }
    Ok(())
}
