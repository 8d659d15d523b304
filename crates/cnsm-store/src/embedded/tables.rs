//! The redb table definitions of the embedded store (the layout is described in the
//! [`embedded`](super) module docs) and the small codecs for their columns.

use cnsm_core::cbor;
use cnsm_core::record::{Timer, TimerKind};
use cnsm_core::{Instance, Status};
use redb::TableDefinition;

use crate::StoreError;

/// Store-level counters and the format version.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The store format ([`crate::STORE_FORMAT`]) the file was written with.
pub(crate) const META_FORMAT: &str = "format";
/// The uid the next new instance gets (uids start at 1).
pub(crate) const META_NEXT_UID: &str = "next_uid";
/// The log sequence the next committed record gets (sequences start at 1).
pub(crate) const META_NEXT_SEQ: &str = "next_seq";
/// Every record logged at or below this sequence has been read back and verified.
pub(crate) const META_VERIFIED_SEQ: &str = "verified_seq";

/// (hash, created_ms, CBOR of the definition).
pub(crate) type DefinitionValue = ([u8; 32], u64, &'static [u8]);
pub(crate) const DEFINITIONS: TableDefinition<(&str, &str, u32), DefinitionValue> =
    TableDefinition::new("definitions");
pub(crate) const DEFINITION_LATEST: TableDefinition<(&str, &str), u32> =
    TableDefinition::new("definition_latest");

/// A timer column: (due_ms, entry_seq, kind).
pub(crate) type TimerColumn = (u64, u64, u8);
/// (uid, version, status, timer, last record hash, machine, CBOR of the instance).
pub(crate) type InstanceValue = (
    u64,
    u64,
    u8,
    Option<TimerColumn>,
    [u8; 32],
    &'static str,
    &'static [u8],
);
pub(crate) const INSTANCES: TableDefinition<(&str, &str), InstanceValue> =
    TableDefinition::new("instances");
pub(crate) const INSTANCE_UIDS: TableDefinition<u64, (&str, &str)> =
    TableDefinition::new("instance_uids");
/// Active instances by machine, so deleting a definition need not scan every instance.
pub(crate) const ACTIVE_INSTANCES: TableDefinition<(&str, &str, u64), ()> =
    TableDefinition::new("active_instances");

/// (uid, version, record hash, exact record bytes).
pub(crate) type RecordValue = (u64, u64, [u8; 32], &'static [u8]);
/// Every record by commit sequence: the global commit log (append-only pages), the base of
/// verification checkpoints and of a future outbox cursor.
pub(crate) const RECORDS: TableDefinition<u64, RecordValue> = TableDefinition::new("records");
/// (uid, version) -> commit sequence of that record in [`RECORDS`].
pub(crate) const RECORD_INDEX: TableDefinition<(u64, u64), u64> =
    TableDefinition::new("record_index");
/// (due_ms, uid) -> (entry_seq, kind): exactly each active instance's current timer.
pub(crate) const TIMERS: TableDefinition<(u64, u64), (u64, u8)> = TableDefinition::new("timers");

/// (request hash, version, expires_ms).
pub(crate) type IdempotencyValue = ([u8; 32], u64, u64);
pub(crate) const IDEMPOTENCY: TableDefinition<(u64, &str), IdempotencyValue> =
    TableDefinition::new("idempotency");
pub(crate) const IDEMPOTENCY_EXPIRY: TableDefinition<(u64, u64, &str), ()> =
    TableDefinition::new("idempotency_expiry");

pub(crate) fn status_code(status: Status) -> u8 {
    match status {
        Status::Active => 0,
        Status::Succeeded => 1,
        Status::Failed => 2,
        Status::Cancelled => 3,
    }
}

pub(crate) fn status_from_code(code: u8) -> Option<Status> {
    Some(match code {
        0 => Status::Active,
        1 => Status::Succeeded,
        2 => Status::Failed,
        3 => Status::Cancelled,
        _ => return None,
    })
}

pub(crate) fn kind_code(kind: TimerKind) -> u8 {
    match kind {
        TimerKind::Timeout => 0,
        TimerKind::Wait => 1,
        TimerKind::Backoff => 2,
    }
}

pub(crate) fn kind_from_code(code: u8) -> Option<TimerKind> {
    Some(match code {
        0 => TimerKind::Timeout,
        1 => TimerKind::Wait,
        2 => TimerKind::Backoff,
        _ => return None,
    })
}

/// The timer the `timers` table keeps for an instance: its current one while it is active.
pub(crate) fn indexed_timer(instance: &Instance) -> Option<Timer> {
    if instance.status.is_final() {
        None
    } else {
        instance.timer
    }
}

pub(crate) fn timer_column(timer: Option<Timer>) -> Option<TimerColumn> {
    timer.map(|t| (t.due_ms, t.entry_seq, kind_code(t.kind)))
}

pub(crate) fn timer_from_column(column: Option<TimerColumn>) -> Result<Option<Timer>, String> {
    let Some((due_ms, entry_seq, code)) = column else {
        return Ok(None);
    };
    let kind = kind_from_code(code).ok_or_else(|| format!("unknown timer kind {code}"))?;
    Ok(Some(Timer {
        due_ms,
        entry_seq,
        kind,
    }))
}

/// Deterministic CBOR of a serde value.
pub(crate) fn encode_cbor<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let json = serde_json::to_value(value)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode a row: {e}")))?;
    Ok(cbor::encode(&json))
}

/// Decodes a CBOR row; `what` names the row in the error.
pub(crate) fn decode_cbor<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &dyn Fn() -> String,
) -> Result<T, StoreError> {
    let json = cbor::decode(bytes).map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))?;
    serde_json::from_value(json).map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))
}

/// An instance row's document: compact JSON, written on every commit, so it is encoded straight
/// from the struct (no intermediate tree). Records, not rows, carry the hashed CBOR form.
pub(crate) fn encode_row(instance: &cnsm_core::Instance) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(instance)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode an instance row: {e}")))
}

/// Decodes an instance row; `what` names the row in the error.
pub(crate) fn decode_row(
    bytes: &[u8],
    what: &dyn Fn() -> String,
) -> Result<cnsm_core::Instance, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))
}

/// Maps any redb error to [`StoreError::Io`].
pub(crate) trait IoContext<T> {
    fn io(self) -> Result<T, StoreError>;
}

impl<T, E: std::fmt::Display> IoContext<T> for Result<T, E> {
    fn io(self) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Io(e.to_string()))
    }
}

/// uid -> (): instances replaced by `snapshot import --replace`. Their records stay in the
/// commit log (append-only) and their uid keeps naming the instance in [`INSTANCE_UIDS`], but
/// no row uses the uid any more; verification accepts such records as superseded history.
pub(crate) const RETIRED_UIDS: TableDefinition<u64, ()> = TableDefinition::new("retired_uids");

/// (namespace, name) -> JSON of the machine's canary rollout.
pub(crate) const ROLLOUTS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("rollouts");

/// `namespace/machine/target` -> (position, lease node, lease until ms): push-delivery cursors.
pub(crate) const DELIVERY_CURSORS: TableDefinition<&str, (u64, &str, u64)> =
    TableDefinition::new("delivery_cursors");

/// (target, commit position) -> JSON of the [`crate::DeadLetter`].
pub(crate) const DEAD_LETTERS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("dead_letters");

/// (target, commit position) -> (requested ms, actor): the dead letters marked for redrive (the
/// letter's `redrive`; its JSON in [`DEAD_LETTERS`] is kept without it). An index, so the
/// deliverer finds the marked letters without reading every letter.
pub(crate) const DEAD_LETTER_REDRIVES: TableDefinition<(&str, u64), (u64, &str)> =
    TableDefinition::new("dead_letter_redrives");
