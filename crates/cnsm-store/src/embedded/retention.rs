//! Retention: deleting finished instances, with their whole history, once they are old enough.

use std::ops::Bound;

use cnsm_core::Status;
use redb::ReadableTable;

use super::tables::*;
use super::{EmbeddedStore, WriteTables, head_of, meta_get};
use crate::StoreError;

impl EmbeddedStore {
    /// Deletes up to `limit` instances of `namespace/machine` that ended (succeeded, failed or
    /// cancelled) before `ended_before_ms`, with every record, index entry and idempotency key
    /// of theirs, in one durable transaction; returns how many.
    ///
    /// Only instances whose records all lie below the verification watermark are deleted, so
    /// the unverified tail that an open checks stays a gap-free run of commit sequences.
    pub(crate) fn purge_finished_in(
        &self,
        namespace: &str,
        machine: &str,
        ended_before_ms: u64,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.write(|txn| {
            let mut t = WriteTables::open(txn)?;
            // What the background verifier has checked, persisted in this same transaction (as
            // a commit does), so every gap this leaves lies below the durable watermark.
            let next_seq = meta_get(&t.meta, META_NEXT_SEQ)?;
            let verified_seq = self.checkpoint_to_persist(&t.meta, next_seq)?;
            t.meta.insert(META_VERIFIED_SEQ, verified_seq).io()?;
            let mut doomed: Vec<(String, u64, u64)> = Vec::new();
            let start = (namespace, "");
            for entry in t
                .instances
                .range::<(&str, &str)>((Bound::Included(start), Bound::Unbounded))
                .io()?
            {
                if doomed.len() >= limit {
                    break;
                }
                let (key, row) = entry.io()?;
                let (row_namespace, id) = key.value();
                if row_namespace != namespace {
                    break;
                }
                let value = row.value();
                let head = head_of(&value)
                    .map_err(|e| StoreError::Corrupt(format!("instance {namespace}/{id}: {e}")))?;
                if head.status == Status::Active || head.machine != machine {
                    continue;
                }
                let instance = decode_row(value.6, &|| {
                    format!("instance {namespace}/{id}: row does not decode")
                })?;
                if instance.updated_ms >= ended_before_ms {
                    continue;
                }
                let last_seq = t
                    .index
                    .get((head.uid, head.version))
                    .io()?
                    .map(|g| g.value())
                    .unwrap_or(u64::MAX);
                if last_seq > verified_seq {
                    continue;
                }
                doomed.push((id.to_owned(), head.uid, head.version));
            }
            for (id, uid, version) in &doomed {
                let (uid, version) = (*uid, *version);
                for v in 0..=version {
                    if let Some(seq) = t.index.remove((uid, v)).io()? {
                        t.records.remove(seq.value()).io()?;
                    }
                }
                let keys: Vec<(String, u64)> = t
                    .idempotency
                    .range::<(u64, &str)>((uid, "")..(uid + 1, ""))
                    .io()?
                    .map(|e| {
                        e.io().map(|(k, v)| {
                            let (_, key) = k.value();
                            (key.to_owned(), v.value().2)
                        })
                    })
                    .collect::<Result<_, _>>()?;
                for (key, expires_ms) in &keys {
                    t.idempotency.remove((uid, key.as_str())).io()?;
                    t.idempotency_expiry
                        .remove((*expires_ms, uid, key.as_str()))
                        .io()?;
                }
                t.uids.remove(uid).io()?;
                t.instances.remove((namespace, id.as_str())).io()?;
            }
            Ok(doomed.len() as u64)
        })
    }
}
