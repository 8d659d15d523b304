//! `Store::import_instances` for the embedded store: one write transaction for the whole
//! import (definitions, instances, records, timers, idempotency keys), so a refused or failed
//! import leaves nothing behind.
//!
//! Imported records are appended to the commit log with fresh sequence numbers under a fresh
//! uid, exactly as a commit would write them. A replaced instance's uid is retired: its
//! records stay in the append-only log (and keep verifying), its row, timer, active entry and
//! idempotency keys go.

use cnsm_core::Status;
use redb::{ReadableTable, WriteTransaction};

use super::tables::*;
use super::{WriteTables, head_of, meta_get};
use crate::{DefinitionRow, ImportItem, ImportReport, StoreError};

/// How many conflicting instances a refusal names.
const NAMED_CONFLICTS_MAX: usize = 10;

/// Items in flight between the reading thread and the writer of a streamed import (memory:
/// this many instances with their histories).
const PIPELINE_ITEMS_MAX: usize = 64;

/// Runs `write` over the checked items of a streamed import with the pulling and checking
/// ([`crate::checked_import_items`]: decoding the source, chain hashes) on a second thread,
/// so the source's work and the store's check overlap with the table writes. The channel
/// is bounded, so memory stays a few hundred instances. An error from the source or the
/// check is handed to the writer as the next item (it then drops its transaction); when the
/// writer stops early, the reader stops at its next send. The reader ends the stream with an
/// explicit end mark: a reader that dies without it (a panic) is an error for the writer,
/// never a short import that commits.
pub(super) fn pipelined<T>(
    items: &mut crate::ImportItems<'_>,
    write: impl FnOnce(&mut dyn Iterator<Item = Result<Prepared, StoreError>>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let (sender, receiver) =
        std::sync::mpsc::sync_channel::<Option<Result<Prepared, StoreError>>>(PIPELINE_ITEMS_MAX);
    std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("cnsm-import-read".into())
            .spawn_scoped(scope, move || {
                for item in crate::checked_import_items(items) {
                    let item = item.and_then(Prepared::new);
                    let failed = item.is_err();
                    if sender.send(Some(item)).is_err() || failed {
                        return;
                    }
                }
                let _ = sender.send(None);
            })
            .map_err(|e| StoreError::Io(format!("cannot start the import reader: {e}")))?;
        let mut ended = false;
        let mut received = std::iter::from_fn(|| {
            if ended {
                return None;
            }
            match receiver.recv() {
                Ok(Some(item)) => Some(item),
                Ok(None) => {
                    ended = true;
                    None
                }
                Err(_) => {
                    ended = true;
                    Some(Err(StoreError::Io(
                        "the import reader stopped before the end of the items".into(),
                    )))
                }
            }
        });
        let result = write(&mut received);
        // Unblocks a reader waiting on a full channel after the writer stopped early.
        drop(receiver);
        // A reader that panicked before its end mark already failed the writer (above).
        let _ = reader.join();
        result
    })
}

/// An item with its instance row already encoded (on the reading side of a pipelined import).
pub(super) struct Prepared {
    item: ImportItem,
    row: Vec<u8>,
}

impl Prepared {
    pub(super) fn new(item: ImportItem) -> Result<Prepared, StoreError> {
        let row = encode_row(&item.instance)?;
        Ok(Prepared { item, row })
    }
}

pub(super) fn import_in(
    txn: &WriteTransaction,
    definitions: &[DefinitionRow],
    items: &mut dyn Iterator<Item = Result<Prepared, StoreError>>,
    replace: bool,
) -> Result<ImportReport, StoreError> {
    let mut t = WriteTables::open(txn)?;
    let mut retired = txn.open_table(RETIRED_UIDS).io()?;
    let mut report = ImportReport::default();

    for row in definitions {
        let key = (row.namespace.as_str(), row.name.as_str(), row.revision);
        let existing = t.definitions.get(key).io()?.map(|g| g.value().0);
        match existing {
            Some(hash) if hash == row.hash.0 => continue,
            Some(hash) => {
                return Err(StoreError::Refused(format!(
                    "import refused: definition {}/{}@{} exists here with hash {} (the snapshot has {})",
                    row.namespace,
                    row.name,
                    row.revision,
                    cnsm_core::Hash32(hash),
                    row.hash
                )));
            }
            None => {}
        }
        let bytes = encode_cbor(&row.definition)?;
        t.definitions
            .insert(key, (row.hash.0, row.created_ms, bytes.as_slice()))
            .io()?;
        let latest = t
            .definition_latest
            .get((key.0, key.1))
            .io()?
            .map(|g| g.value());
        if latest.is_none_or(|latest| latest < row.revision) {
            t.definition_latest
                .insert((key.0, key.1), row.revision)
                .io()?;
        }
        report.n_definitions_created += 1;
    }

    // Items are written as they arrive. Once one conflicts, nothing more is written (the
    // import will be refused and its transaction dropped), but the rest are still read so the
    // refusal counts every conflict and a later unpinned revision is still reported.
    let mut n_conflicts = 0usize;
    let mut conflicts = Vec::new();
    let mut next_uid = meta_get(&t.meta, META_NEXT_UID)?;
    let mut next_seq = meta_get(&t.meta, META_NEXT_SEQ)?;
    let mut last_pin = None;
    for prepared in items {
        let Prepared { item, row } = prepared?;
        let instance = &item.instance;
        let (namespace, id) = (&*instance.namespace, &*instance.id);
        // Instances come in runs on the same revision: a pin equal to the one checked last
        // is not looked up again.
        let pin = (
            instance.namespace.clone(),
            instance.machine.clone(),
            instance.revision,
            instance.revision_hash,
        );
        let pinned = if last_pin.as_ref() == Some(&pin) {
            Some(instance.revision_hash.0)
        } else {
            t.definitions
                .get((namespace, &*instance.machine, instance.revision))
                .io()?
                .map(|g| g.value().0)
        };
        if pinned != Some(instance.revision_hash.0) {
            return Err(StoreError::Refused(format!(
                "import refused: instance {namespace}/{id} pins {}@{} with hash {}, which is \
                 neither in the snapshot nor in this store",
                instance.machine, instance.revision, instance.revision_hash
            )));
        }
        last_pin = Some(pin);
        let existing = t
            .instances
            .get((namespace, id))
            .io()?
            .map(|row| head_of(&row.value()))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("instance {namespace}/{id}: {e}")))?;
        if existing.is_some() && !replace {
            n_conflicts += 1;
            if conflicts.len() < NAMED_CONFLICTS_MAX {
                conflicts.push(format!("{namespace}/{id}"));
            }
            continue;
        }
        if n_conflicts > 0 {
            continue;
        }
        if let Some(old) = existing {
            retire(&mut t, &mut retired, namespace, &old)?;
            report.n_replaced += 1;
        }

        let uid = next_uid;
        next_uid += 1;
        if t.uids.insert(uid, (namespace, id)).io()?.is_some() {
            return Err(StoreError::Corrupt(format!(
                "uid {uid} from the meta counter is already taken"
            )));
        }
        for record in &item.records {
            let seq = next_seq;
            next_seq += 1;
            t.index.insert((uid, record.version), seq).io()?;
            t.records
                .insert(
                    seq,
                    (uid, record.version, record.hash.0, record.bytes.as_slice()),
                )
                .io()?;
            report.n_records += 1;
        }
        let timer = indexed_timer(instance);
        t.instances
            .insert(
                (namespace, id),
                (
                    uid,
                    instance.version,
                    status_code(instance.status),
                    timer_column(timer),
                    instance.last_hash.0,
                    &*instance.machine,
                    row.as_slice(),
                ),
            )
            .io()?;
        if let Some(timer) = timer {
            t.timers
                .insert(
                    (timer.due_ms, uid),
                    (timer.entry_seq, kind_code(timer.kind)),
                )
                .io()?;
            report.n_timers += 1;
        }
        if instance.status == Status::Active {
            t.active
                .insert((namespace, &*instance.machine, uid), ())
                .io()?;
        }
        for entry in &item.idempotency {
            let key = entry.key.as_str();
            t.idempotency
                .insert(
                    (uid, key),
                    (entry.request_hash.0, entry.version, entry.expires_ms),
                )
                .io()?;
            t.idempotency_expiry
                .insert((entry.expires_ms, uid, key), ())
                .io()?;
        }
        report.n_instances += 1;
    }
    if n_conflicts > 0 {
        return Err(StoreError::Refused(format!(
            "import refused: {n_conflicts} instance(s) already exist ({}{}); nothing was imported (use --replace to overwrite)",
            conflicts.join(", "),
            if n_conflicts > NAMED_CONFLICTS_MAX {
                ", ..."
            } else {
                ""
            }
        )));
    }
    t.meta.insert(META_NEXT_UID, next_uid).io()?;
    t.meta.insert(META_NEXT_SEQ, next_seq).io()?;
    Ok(report)
}

/// Takes a replaced instance out of every live index; its records stay in the log.
fn retire(
    t: &mut WriteTables<'_>,
    retired: &mut redb::Table<'_, u64, ()>,
    namespace: &str,
    old: &super::InstanceHead,
) -> Result<(), StoreError> {
    let uid = old.uid;
    if let Some(timer) = old.timer {
        t.timers.remove((timer.due_ms, uid)).io()?;
    }
    if old.status == Status::Active {
        t.active
            .remove((namespace, old.machine.as_str(), uid))
            .io()?;
    }
    let mut keys: Vec<(String, u64)> = Vec::new();
    for entry in t.idempotency.range((uid, "")..(uid + 1, "")).io()? {
        let (key, value) = entry.io()?;
        keys.push((key.value().1.to_owned(), value.value().2));
    }
    for (key, expires_ms) in &keys {
        t.idempotency.remove((uid, key.as_str())).io()?;
        t.idempotency_expiry
            .remove((*expires_ms, uid, key.as_str()))
            .io()?;
    }
    retired.insert(uid, ()).io()?;
    Ok(())
}
