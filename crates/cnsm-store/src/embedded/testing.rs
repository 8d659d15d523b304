//! Test hooks that edit a closed store's file directly, below the store's checks: to bump the
//! format, move the checkpoint, or damage records and indexes the way a disk or an intruder
//! would. Not part of the supported API.

use std::path::Path;

use cnsm_core::record::SealedRecord;
use redb::{Database, Durability, ReadableTable, WriteTransaction};

use super::tables::*;
use super::{FILE_NAME, open_error};
use crate::StoreError;

/// The meta key of the store format.
pub const META_FORMAT_KEY: &str = META_FORMAT;
/// The meta key of the verification checkpoint.
pub const META_VERIFIED_SEQ_KEY: &str = META_VERIFIED_SEQ;

fn edit<T>(
    dir: &Path,
    body: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let path = dir.join(FILE_NAME);
    let db = Database::open(&path).map_err(|e| open_error(&path, e))?;
    let mut txn = db.begin_write().io()?;
    txn.set_durability(Durability::Immediate).io()?;
    let value = body(&txn)?;
    txn.commit().io()?;
    db.close().io()?;
    Ok(value)
}

fn uid_of(txn: &WriteTransaction, namespace: &str, id: &str) -> Result<u64, StoreError> {
    let instances = txn.open_table(INSTANCES).io()?;
    let row = instances.get((namespace, id)).io()?;
    row.map(|g| g.value().0)
        .ok_or_else(|| StoreError::Refused(format!("no instance {namespace}/{id}")))
}

/// The commit sequence of record `version` of an instance, through the record index.
fn seq_of(
    txn: &WriteTransaction,
    namespace: &str,
    id: &str,
    version: u64,
) -> Result<(u64, u64), StoreError> {
    let uid = uid_of(txn, namespace, id)?;
    let index = txn.open_table(RECORD_INDEX).io()?;
    let seq = index.get((uid, version)).io()?.map(|g| g.value());
    let seq =
        seq.ok_or_else(|| StoreError::Refused(format!("no record {version} of {namespace}/{id}")))?;
    Ok((uid, seq))
}

/// Sets a meta counter (`format`, `verified_seq`, ...).
pub fn set_meta(dir: &Path, key: &str, value: u64) -> Result<(), StoreError> {
    edit(dir, |txn| {
        txn.open_table(META).io()?.insert(key, value).io()?;
        Ok(())
    })
}

/// Flips every bit of byte `byte_index` of a stored record, keeping its stored hash.
pub fn flip_record_byte(
    dir: &Path,
    namespace: &str,
    id: &str,
    version: u64,
    byte_index: usize,
) -> Result<(), StoreError> {
    edit(dir, |txn| {
        let (uid, seq) = seq_of(txn, namespace, id, version)?;
        let mut records = txn.open_table(RECORDS).io()?;
        let (hash, mut bytes) = match records.get(seq).io()? {
            Some(g) => {
                let (_, _, hash, bytes) = g.value();
                (hash, bytes.to_vec())
            }
            None => {
                return Err(StoreError::Refused(format!(
                    "no record {version} of {namespace}/{id}"
                )));
            }
        };
        let byte = bytes.get_mut(byte_index).ok_or_else(|| {
            StoreError::Refused(format!(
                "record {version} is shorter than {byte_index} bytes"
            ))
        })?;
        *byte ^= 0xff;
        records
            .insert(seq, (uid, version, hash, bytes.as_slice()))
            .io()?;
        Ok(())
    })
}

/// Flips every bit of byte `byte_index` of an instance row's CBOR document.
pub fn flip_instance_row_byte(
    dir: &Path,
    namespace: &str,
    id: &str,
    byte_index: usize,
) -> Result<(), StoreError> {
    edit(dir, |txn| {
        let mut instances = txn.open_table(INSTANCES).io()?;
        let (uid, version, status, timer, last_hash, machine, mut bytes) =
            match instances.get((namespace, id)).io()? {
                Some(g) => {
                    let (uid, version, status, timer, last_hash, machine, bytes) = g.value();
                    (
                        uid,
                        version,
                        status,
                        timer,
                        last_hash,
                        machine.to_owned(),
                        bytes.to_vec(),
                    )
                }
                None => return Err(StoreError::Refused(format!("no instance {namespace}/{id}"))),
            };
        let byte = bytes.get_mut(byte_index).ok_or_else(|| {
            StoreError::Refused(format!("the row is shorter than {byte_index} bytes"))
        })?;
        *byte ^= 0xff;
        instances
            .insert(
                (namespace, id),
                (
                    uid,
                    version,
                    status,
                    timer,
                    last_hash,
                    machine.as_str(),
                    bytes.as_slice(),
                ),
            )
            .io()?;
        Ok(())
    })
}

/// Replaces a stored record, bytes and hash, with another one (at the same commit sequence).
pub fn replace_record(
    dir: &Path,
    namespace: &str,
    id: &str,
    record: &SealedRecord,
) -> Result<(), StoreError> {
    edit(dir, |txn| {
        let (uid, seq) = seq_of(txn, namespace, id, record.version)?;
        let mut records = txn.open_table(RECORDS).io()?;
        records
            .insert(
                seq,
                (uid, record.version, record.hash.0, record.bytes.as_slice()),
            )
            .io()?;
        Ok(())
    })
}

/// Sets the last record hash column of an instance row, leaving its document alone.
pub fn set_row_last_hash(
    dir: &Path,
    namespace: &str,
    id: &str,
    last_hash: [u8; 32],
) -> Result<(), StoreError> {
    edit(dir, |txn| {
        let mut instances = txn.open_table(INSTANCES).io()?;
        let (uid, version, status, timer, machine, bytes) =
            match instances.get((namespace, id)).io()? {
                Some(g) => {
                    let (uid, version, status, timer, _, machine, bytes) = g.value();
                    (
                        uid,
                        version,
                        status,
                        timer,
                        machine.to_owned(),
                        bytes.to_vec(),
                    )
                }
                None => return Err(StoreError::Refused(format!("no instance {namespace}/{id}"))),
            };
        instances
            .insert(
                (namespace, id),
                (
                    uid,
                    version,
                    status,
                    timer,
                    last_hash,
                    machine.as_str(),
                    bytes.as_slice(),
                ),
            )
            .io()?;
        Ok(())
    })
}

/// Removes the record index entry of record `version` of an instance, leaving the record.
pub fn remove_record_index_entry(
    dir: &Path,
    namespace: &str,
    id: &str,
    version: u64,
) -> Result<(), StoreError> {
    edit(dir, |txn| {
        let (uid, _) = seq_of(txn, namespace, id, version)?;
        txn.open_table(RECORD_INDEX)
            .io()?
            .remove((uid, version))
            .io()?;
        Ok(())
    })
}

/// Empties the timer index; returns how many entries it held.
pub fn clear_timers(dir: &Path) -> Result<u64, StoreError> {
    edit(dir, |txn| {
        let mut timers = txn.open_table(TIMERS).io()?;
        let mut keys = Vec::new();
        for entry in timers.iter().io()? {
            keys.push(entry.io()?.0.value());
        }
        for key in &keys {
            timers.remove(*key).io()?;
        }
        Ok(keys.len() as u64)
    })
}

/// Moves the verification checkpoint to the end of the log, as if every record had been read
/// back: damage made afterwards is left to [`crate::Store::verify`].
pub fn mark_all_verified(dir: &Path) -> Result<(), StoreError> {
    edit(dir, |txn| {
        let mut meta = txn.open_table(META).io()?;
        let next_seq = meta
            .get(META_NEXT_SEQ)
            .io()?
            .map(|g| g.value())
            .unwrap_or(1);
        meta.insert(META_VERIFIED_SEQ, next_seq.saturating_sub(1))
            .io()?;
        Ok(())
    })
}
