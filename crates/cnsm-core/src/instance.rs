//! The current state of one instance: a fold over its history records.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::record::{Hash32, RecordKind, StateChangeEvent, Timer};
use crate::resource::Outcome;

/// Whether an instance is still running, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Status {
    Active,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "active" => Status::Active,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    pub fn is_final(self) -> bool {
        self != Status::Active
    }
}

impl From<Outcome> for Status {
    fn from(outcome: Outcome) -> Status {
        match outcome {
            Outcome::Succeeded => Status::Succeeded,
            Outcome::Failed => Status::Failed,
            Outcome::Cancelled => Status::Cancelled,
        }
    }
}

/// What the instance is doing inside its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    #[default]
    Running,
    /// Running the compensation stack after a failure (a saga rolling back).
    Compensating,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Compensating => "compensating",
        }
    }
}

/// One instance as of its latest committed record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    pub namespace: Arc<str>,
    pub id: Arc<str>,
    pub machine: Arc<str>,
    pub revision: u32,
    pub revision_hash: Hash32,
    pub state: Arc<str>,
    pub status: Status,
    #[serde(default)]
    pub phase: Phase,
    /// Why the instance failed (`Timeout`, `Failed`, `CompensationFailed`), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub data: Map<String, Value>,
    pub version: u64,
    /// Incremented on every entry into a state; timers carry the value that armed them.
    pub entry_seq: u64,
    /// The current attempt in the state, 1-based.
    pub attempt: u32,
    /// True while waiting out a retry back-off.
    #[serde(default)]
    pub in_backoff: bool,
    /// True while an operator holds the instance suspended: events are refused and its timer
    /// does not fire until it is resumed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// A migration's lock (a lease): events are refused with `Locked` until it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<crate::record::MigrationLock>,
    /// Compensation states still to run, the last one first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compensations: Vec<String>,
    /// The outcome a compensating instance ends with once its stack is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<Timer>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The hash of record `version`.
    pub last_hash: Hash32,
}

/// Why a record could not be applied to an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    #[error("record {got} does not follow version {have}")]
    VersionGap { have: u64, got: u64 },
    #[error("record {version} does not chain to the previous record's hash")]
    BrokenChain { version: u64 },
    #[error("record {version} belongs to another instance")]
    WrongInstance { version: u64 },
    #[error("the first record is not a genesis record")]
    NotGenesis,
}

impl Instance {
    /// The instance described by a genesis record (version 0).
    pub fn from_genesis(record: &StateChangeEvent, hash: Hash32) -> Result<Instance, ApplyError> {
        if record.kind != RecordKind::Genesis || record.version != 0 {
            return Err(ApplyError::NotGenesis);
        }
        Ok(Instance {
            namespace: record.namespace.clone(),
            id: record.instance.clone(),
            machine: record.machine.clone(),
            revision: record.revision,
            revision_hash: record.revision_hash,
            state: record.to.clone(),
            status: record.status,
            phase: record.phase,
            reason: record.reason.clone(),
            data: record.data.clone(),
            version: 0,
            entry_seq: record.entry_seq,
            attempt: record.attempt,
            in_backoff: record.in_backoff,
            suspended: record.suspended,
            lock: record.lock.clone(),
            compensations: record.compensations.clone(),
            pending_outcome: record.pending_outcome,
            timer: record.timer,
            labels: record.labels.clone(),
            created_ms: record.time_ms,
            updated_ms: record.time_ms,
            last_hash: hash,
        })
    }

    /// Applies the next record: the one mutation path, used live and on replay.
    ///
    /// Replay never re-runs CEL or flags: the record carries the data delta and every decision.
    pub fn apply_record(
        &mut self,
        record: &StateChangeEvent,
        hash: Hash32,
    ) -> Result<(), ApplyError> {
        if record.version != self.version + 1 {
            return Err(ApplyError::VersionGap {
                have: self.version,
                got: record.version,
            });
        }
        if record.prev_hash != self.last_hash {
            return Err(ApplyError::BrokenChain {
                version: record.version,
            });
        }
        if record.instance != self.id || record.namespace != self.namespace {
            return Err(ApplyError::WrongInstance {
                version: record.version,
            });
        }
        self.revision = record.revision;
        self.revision_hash = record.revision_hash;
        self.machine.clone_from(&record.machine);
        self.state.clone_from(&record.to);
        self.status = record.status;
        self.phase = record.phase;
        self.reason.clone_from(&record.reason);
        for (key, value) in &record.data {
            self.data.insert(key.clone(), value.clone());
        }
        self.version = record.version;
        self.entry_seq = record.entry_seq;
        self.attempt = record.attempt;
        self.in_backoff = record.in_backoff;
        self.suspended = record.suspended;
        self.lock.clone_from(&record.lock);
        self.compensations.clone_from(&record.compensations);
        self.pending_outcome = record.pending_outcome;
        self.timer = record.timer;
        self.updated_ms = record.time_ms;
        self.last_hash = hash;
        Ok(())
    }

    /// Rebuilds an instance from its full history.
    pub fn replay<'a>(
        records: impl IntoIterator<Item = (&'a StateChangeEvent, Hash32)>,
    ) -> Result<Option<Instance>, ApplyError> {
        let mut iter = records.into_iter();
        let Some((first, hash)) = iter.next() else {
            return Ok(None);
        };
        let mut instance = Instance::from_genesis(first, hash)?;
        for (record, hash) in iter {
            instance.apply_record(record, hash)?;
        }
        Ok(Some(instance))
    }
}
