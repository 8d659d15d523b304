//! Erasure of personal data from an instance's history while its hash chain stays verifiable.
//!
//! An erasure of instance `I` at version `v` redacts records `0..=v` (their `data` and
//! `payload` values become [`ERASED_MARKER`], everything else stays byte for byte) and appends
//! ONE `erasure` record (version `v + 1`, an ordinary chained record) that lists, for every
//! record whose stored bytes now differ from the bytes it was sealed with, its version, its
//! original hash and the hash of its redacted bytes. The store keeps the original hash as each
//! redacted record's stored hash (the chain links through it) and replaces the bytes;
//! verification accepts such a record only through a later erasure record of the same chain
//! ([`crate::record::erased_record_accepted`]). The scheme is described in
//! `docs/operations.md`.
//!
//! ```
//! use cnsm_core::erasure::redact_value;
//! use serde_json::json;
//! let mut payload = json!({"email": "ann@example.com", "address": {"city": "Oslo", "zip": "0150"}});
//! redact_value(&mut payload, &[vec!["address".into(), "zip".into()]]);
//! assert_eq!(payload, json!({"email": "ann@example.com", "address": {"city": "Oslo", "zip": "[erased]"}}));
//! redact_value(&mut payload, &[]);
//! assert_eq!(payload, json!({"email": "[erased]", "address": "[erased]"}));
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::cbor;
use crate::instance::{ApplyError, Instance};
use crate::record::{
    ChainError, ERASED_MARKER, ErasedRecord, Erasure, Hash32, RECORD_DOMAIN, RecordKind,
    SealedRecord, StateChangeEvent, TraceContext, verify_chain,
};

/// Most `--field` paths one erasure accepts.
pub const ERASE_FIELDS_MAX: usize = 256;
/// Longest field path, in bytes.
pub const ERASE_FIELD_LEN_MAX: usize = 1024;
/// Longest erasure reason, in bytes.
pub const ERASE_REASON_LEN_MAX: usize = 1024;

/// Why an erasure could not be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ErasureError {
    /// A field path is not a dotted path of non-empty names (`fields[i]` names the position).
    #[error("fields[{index}]: {detail}")]
    InvalidField { index: usize, detail: String },
    #[error("reason: longer than {ERASE_REASON_LEN_MAX} bytes")]
    ReasonTooLong,
    /// The stored history does not verify or does not end at the instance's version.
    #[error("the stored history of {instance} fails a check: {detail}")]
    History { instance: String, detail: String },
}

/// What one erasure writes, in one store transaction.
#[derive(Debug, Clone)]
pub struct ErasurePlan {
    /// The records whose stored bytes change: the redacted bytes, with `hash` the hash the
    /// record was first sealed with (kept as the stored hash and chain link).
    pub redacted: Vec<SealedRecord>,
    /// The `erasure` record (version `v + 1`).
    pub record: StateChangeEvent,
    pub sealed: SealedRecord,
    /// The instance after the erasure record: its data redacted, everything else as before.
    pub instance: Instance,
}

/// Checks and splits `--field` paths (`a.b` → `["a", "b"]`).
pub fn parse_fields(fields: &[String]) -> Result<Vec<Vec<String>>, ErasureError> {
    if fields.len() > ERASE_FIELDS_MAX {
        return Err(ErasureError::InvalidField {
            index: ERASE_FIELDS_MAX,
            detail: format!("more than {ERASE_FIELDS_MAX} fields"),
        });
    }
    fields
        .iter()
        .enumerate()
        .map(|(index, path)| {
            let invalid = |detail: String| ErasureError::InvalidField { index, detail };
            if path.len() > ERASE_FIELD_LEN_MAX {
                return Err(invalid(format!("longer than {ERASE_FIELD_LEN_MAX} bytes")));
            }
            let parts: Vec<String> = path.split('.').map(str::to_owned).collect();
            if parts.iter().any(String::is_empty) {
                return Err(invalid(format!(
                    "{path:?} is not a dotted path of names (like address.zip)"
                )));
            }
            Ok(parts)
        })
        .collect()
}

/// Replaces personal content in `value` by [`ERASED_MARKER`]: with no `fields`, every value of
/// an object (a non-object, non-null value as a whole); otherwise the value at each path, where
/// it exists. Returns whether anything changed.
pub fn redact_value(value: &mut Value, fields: &[Vec<String>]) -> bool {
    let marker = || Value::String(ERASED_MARKER.to_owned());
    if fields.is_empty() {
        return match value {
            Value::Null => false,
            Value::Object(map) => redact_map(map, fields),
            other => {
                let changed = *other != marker();
                *other = marker();
                changed
            }
        };
    }
    match value {
        Value::Object(map) => redact_map(map, fields),
        _ => false,
    }
}

/// [`redact_value`] on the fields of a map (a record's `data`).
pub fn redact_map(map: &mut Map<String, Value>, fields: &[Vec<String>]) -> bool {
    let marker = Value::String(ERASED_MARKER.to_owned());
    let mut changed = false;
    if fields.is_empty() {
        for value in map.values_mut() {
            if *value != marker {
                *value = marker.clone();
                changed = true;
            }
        }
        return changed;
    }
    for path in fields {
        changed |= redact_path(map, path, &marker);
    }
    changed
}

/// Replaces the value at `path` (when present) inside `map`.
fn redact_path(map: &mut Map<String, Value>, path: &[String], marker: &Value) -> bool {
    match path {
        [] => false,
        [last] => match map.get_mut(last) {
            Some(value) if value != marker => {
                *value = marker.clone();
                true
            }
            _ => false,
        },
        [name, rest @ ..] => match map.get_mut(name) {
            Some(Value::Object(inner)) => redact_path(inner, rest, marker),
            _ => false,
        },
    }
}

/// The redacted bytes of one stored record: its `data` and `payload` redacted
/// ([`redact_value`]), every other key unchanged. Returns the input bytes when nothing changes.
pub fn redact_record_bytes(
    version: u64,
    bytes: &[u8],
    fields: &[Vec<String>],
) -> Result<Vec<u8>, ChainError> {
    let mut value = cbor::decode(bytes).map_err(|e| ChainError::Undecodable {
        version,
        detail: e.to_string(),
    })?;
    let Value::Object(record) = &mut value else {
        return Err(ChainError::Undecodable {
            version,
            detail: "a record is a map".into(),
        });
    };
    let mut changed = false;
    if let Some(Value::Object(data)) = record.get_mut("data") {
        changed |= redact_map(data, fields);
    }
    if let Some(payload) = record.get_mut("payload") {
        changed |= redact_value(payload, fields);
    }
    Ok(if changed {
        cbor::encode(&value)
    } else {
        bytes.to_vec()
    })
}

/// Who erases, why, and when.
#[derive(Debug, Clone)]
pub struct EraseRequest<'a> {
    /// Data paths to erase (dotted); empty: all data and payloads.
    pub fields: &'a [String],
    pub reason: Option<&'a str>,
    pub actor: &'a str,
    pub now_ms: u64,
    pub trace: Option<TraceContext>,
}

/// Plans the erasure of `instance` from its full stored history (`0..=instance.version`, as
/// stored, possibly redacted before): checks the history (chain and last hash), redacts every
/// record, and builds the `erasure` record. Pure; the store writes the plan in one transaction.
pub fn plan(
    instance: &Instance,
    history: &[SealedRecord],
    request: &EraseRequest<'_>,
) -> Result<ErasurePlan, ErasureError> {
    let fields = parse_fields(request.fields)?;
    if request
        .reason
        .is_some_and(|r| r.len() > ERASE_REASON_LEN_MAX)
    {
        return Err(ErasureError::ReasonTooLong);
    }
    let name = format!("{}/{}", instance.namespace, instance.id);
    let history_error = |detail: String| ErasureError::History {
        instance: name.clone(),
        detail,
    };
    if history.len() as u64 != instance.version + 1 {
        return Err(history_error(format!(
            "{} record(s) for version {}",
            history.len(),
            instance.version
        )));
    }
    let last = verify_chain(&instance.namespace, &instance.id, 0, Hash32::ZERO, history)
        .map_err(|e| history_error(e.to_string()))?;
    if last != instance.last_hash {
        return Err(history_error(
            "its last record is not the instance's last hash".into(),
        ));
    }
    let mut redacted = Vec::new();
    let mut listed = Vec::new();
    for sealed in history {
        let bytes = redact_record_bytes(sealed.version, &sealed.bytes, &fields)
            .map_err(|e| history_error(e.to_string()))?;
        let redacted_hash = Hash32::digest(RECORD_DOMAIN, &bytes);
        if redacted_hash != sealed.hash {
            listed.push(ErasedRecord {
                version: sealed.version,
                original_hash: sealed.hash,
                redacted_hash,
            });
        }
        if bytes != sealed.bytes {
            redacted.push(SealedRecord {
                version: sealed.version,
                bytes,
                hash: sealed.hash,
            });
        }
    }
    let mut data = instance.data.clone();
    redact_map(&mut data, &fields);
    let mut record = StateChangeEvent {
        format: 1,
        namespace: instance.namespace.clone(),
        instance: instance.id.clone(),
        machine: instance.machine.clone(),
        revision: instance.revision,
        revision_hash: instance.revision_hash,
        version: instance.version + 1,
        kind: RecordKind::Erasure,
        from: Some(instance.state.clone()),
        to: instance.state.clone(),
        via: Vec::new(),
        event: None,
        payload: None,
        guards: Vec::new(),
        flags: Vec::new(),
        data,
        status: instance.status,
        phase: instance.phase,
        reason: instance.reason.clone(),
        entry_seq: instance.entry_seq,
        attempt: instance.attempt,
        in_backoff: instance.in_backoff,
        suspended: instance.suspended,
        lock: instance.lock.clone(),
        compensations: instance.compensations.clone(),
        pending_outcome: instance.pending_outcome,
        timer: instance.timer,
        actor: Arc::from(request.actor),
        idempotency_key: None,
        time_ms: request.now_ms,
        trace: request.trace.clone(),
        labels: BTreeMap::new(),
        erasure: Some(Erasure {
            fields: request.fields.to_vec(),
            records: listed,
            reason: request.reason.map(str::to_owned),
        }),
        prev_hash: instance.last_hash,
    };
    record.format = record.min_format();
    let sealed = record.seal();
    let mut after = instance.clone();
    after
        .apply_record(&record, sealed.hash)
        .map_err(|e: ApplyError| history_error(e.to_string()))?;
    Ok(ErasurePlan {
        redacted,
        record,
        sealed,
        instance: after,
    })
}
