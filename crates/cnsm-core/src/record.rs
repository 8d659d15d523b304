//! The history record (`StateChangeEvent`) and its per-instance hash chain.
//!
//! A record is encoded once, in deterministic CBOR ([`crate::cbor`]); its hash is SHA-256 over
//! [`RECORD_DOMAIN`] followed by those bytes. Stores keep the exact bytes, and verification
//! hashes the stored bytes, never a re-encoding.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::cbor;
use crate::instance::{Phase, Status};
use crate::resource::Outcome;

/// Domain separation tag for record hashes.
pub const RECORD_DOMAIN: &[u8] = b"cnsm/StateChangeEvent/v1\0";
/// Domain separation tag for revision hashes.
pub const REVISION_DOMAIN: &[u8] = b"cnsm/StateMachineRevision/v1\0";
/// The newest record format this code reads and writes; readers accept this and older.
///
/// Each record carries the lowest format that can read it ([`StateChangeEvent::min_format`]):
/// 1 for everything but operator controls, 2 for records that an older binary would misread
/// (the `cancel`/`suspend`/`resume`/`redrive`/`lock`/`migration` kinds, `suspended: true`), 3 for
/// `erasure` records (whose chain rule an older binary would not know). A binary that knows
/// only format 1 refuses those with a clear error instead of ignoring a suspension.
pub const RECORD_FORMAT: u32 = 3;

/// The value that replaces erased content in a redacted record (see [`Erasure`]).
pub const ERASED_MARKER: &str = "[erased]";

/// A SHA-256 digest; hex in JSON and CBOR documents.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Hash32(pub [u8; 32]);

impl Hash32 {
    /// The previous hash of a genesis record.
    pub const ZERO: Hash32 = Hash32([0; 32]);

    /// SHA-256 of `domain` followed by `bytes`.
    pub fn digest(domain: &[u8], bytes: &[u8]) -> Hash32 {
        let mut hasher = Sha256::new();
        hasher.update(domain);
        hasher.update(bytes);
        Hash32(hasher.finalize().into())
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0'));
            s.push(char::from_digit((b & 15) as u32, 16).unwrap_or('0'));
        }
        s
    }

    pub fn from_hex(s: &str) -> Option<Hash32> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hi = (chunk[0] as char).to_digit(16)?;
            let lo = (chunk[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Hash32(out))
    }
}

impl fmt::Debug for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl fmt::Display for Hash32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

impl Serialize for Hash32 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash32 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Hash32::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// What caused a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RecordKind {
    /// Creation: record 0.
    Genesis,
    /// An applied event.
    Event,
    /// A timer fired (state timeout or wait elapsed).
    Timer,
    /// A retry back-off ended and the state was re-entered.
    Retry,
    /// An operator cancelled the instance (compensations, if any, run first).
    Cancel,
    /// An operator suspended the instance: events are refused and timers held.
    Suspend,
    /// An operator resumed a suspended instance; held timers are re-armed.
    Resume,
    /// An operator re-entered the state a failed instance failed in.
    Redrive,
    /// A migration's `pre` phase locked the instance (events refused until the lease ends).
    Lock,
    /// A migration moved the instance to another revision (and unlocked it).
    Migration,
    /// An operator erased personal data from earlier records (the tombstone; see [`Erasure`]).
    Erasure,
}

/// One record rewritten by an erasure: the chain keeps linking through `original_hash`, and the
/// stored bytes now hash to `redacted_hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErasedRecord {
    pub version: u64,
    /// The hash the record was sealed with (its first one, however often it was redacted).
    pub original_hash: Hash32,
    /// SHA-256 (with [`RECORD_DOMAIN`]) of the redacted bytes now stored.
    pub redacted_hash: Hash32,
}

/// The body of an `erasure` record: which earlier records of the chain were redacted, and what
/// was erased from them. The record itself is an ordinary chained record, so the chain covers
/// this list; verification accepts a redacted record only through it
/// ([`erased_record_accepted`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Erasure {
    /// The data paths erased (dotted, `a.b`), also erased from event payloads; empty: all data
    /// and all payloads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// Every record of the chain whose stored bytes differ from the bytes it was sealed with,
    /// in version order.
    pub records: Vec<ErasedRecord>,
    /// Why the operator erased (free text; not personal data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A migration's lock on an instance: a lease, so an abandoned migration never locks forever.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationLock {
    /// The `StateMigrationPolicy` name.
    pub migration: String,
    pub until_ms: u64,
}

/// What a durable timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TimerKind {
    /// A task state's deadline.
    Timeout,
    /// A wait state's duration.
    Wait,
    /// A retry back-off.
    Backoff,
}

/// A timer armed by a record; an instance has at most one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timer {
    pub due_ms: u64,
    /// The instance's `entry_seq` when armed; a mismatch at firing time drops the timer.
    pub entry_seq: u64,
    pub kind: TimerKind,
}

/// The result of one guard evaluated while choosing a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuardTrace {
    /// Where the guard is: `onEvent[1]` or `choices[0]` of `state`.
    pub state: Arc<str>,
    pub entry: Arc<str>,
    pub result: bool,
}

/// A recorded feature-flag decision (DESIGN.md §6); replay never re-evaluates it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlagDecision {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default)]
    pub value: Value,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the gate let the transition through.
    pub allowed: bool,
}

/// W3C trace context of the request that caused a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceContext {
    pub trace_id: String,
    pub span_id: String,
}

/// The durable history record of one committed transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StateChangeEvent {
    pub format: u32,
    pub namespace: Arc<str>,
    pub instance: Arc<str>,
    pub machine: Arc<str>,
    pub revision: u32,
    pub revision_hash: Hash32,
    /// Record N is version N.
    pub version: u64,
    pub kind: RecordKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Arc<str>>,
    pub to: Arc<str>,
    /// Choice states passed through between `from` and `to`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub via: Vec<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<GuardTrace>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<FlagDecision>,
    /// Genesis: the initial data. Later records: the fields this transition set.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub data: Map<String, Value>,
    pub status: Status,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub entry_seq: u64,
    pub attempt: u32,
    #[serde(default)]
    pub in_backoff: bool,
    /// True while an operator holds the instance suspended (absent when false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub suspended: bool,
    /// The migration lock the instance holds after this record (absent when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<MigrationLock>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compensations: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer: Option<Timer>,
    /// Who caused it: the authenticated subject, or `system:timer`.
    pub actor: Arc<str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub time_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    /// Genesis only: the instance labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Erasure records only: the records redacted and what was erased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub erasure: Option<Erasure>,
    pub prev_hash: Hash32,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A record with its exact stored bytes and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    pub version: u64,
    pub bytes: Vec<u8>,
    pub hash: Hash32,
}

/// Why a record or a chain did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    #[error("record {version}: bytes are not a valid record: {detail}")]
    Undecodable { version: u64, detail: String },
    #[error("record {version}: format {format} is newer than this binary reads ({RECORD_FORMAT})")]
    FutureFormat { version: u64, format: u32 },
    #[error("record {version}: stored hash does not match its bytes")]
    HashMismatch { version: u64 },
    #[error("record {version}: previous hash does not match record {}", version.saturating_sub(1))]
    BrokenLink { version: u64 },
    #[error("expected record {expected}, found record {found}")]
    VersionGap { expected: u64, found: u64 },
    #[error("record {version} belongs to {found}, not {expected}")]
    WrongInstance {
        version: u64,
        expected: String,
        found: String,
    },
}

impl StateChangeEvent {
    /// The lowest record format that can read this record (see [`RECORD_FORMAT`]).
    pub fn min_format(&self) -> u32 {
        let newer = matches!(
            self.kind,
            RecordKind::Cancel
                | RecordKind::Suspend
                | RecordKind::Resume
                | RecordKind::Redrive
                | RecordKind::Lock
                | RecordKind::Migration
        );
        if self.kind == RecordKind::Erasure || self.erasure.is_some() {
            3
        } else if newer || self.suspended || self.lock.is_some() {
            2
        } else {
            1
        }
    }

    /// Encodes and hashes the record.
    pub fn seal(&self) -> SealedRecord {
        let bytes = self.encode();
        debug_assert_eq!(
            bytes,
            self.encode_generic(),
            "the direct encoder drifted from the serde form"
        );
        let hash = Hash32::digest(RECORD_DOMAIN, &bytes);
        SealedRecord {
            version: self.version,
            bytes,
            hash,
        }
    }

    /// The record's bytes: deterministic CBOR of its serde (JSON) form, written directly.
    ///
    /// Equal to [`StateChangeEvent::encode_generic`] by construction (checked on every seal in
    /// debug builds, so by every test); this one skips building a JSON tree first.
    pub fn encode(&self) -> Vec<u8> {
        use crate::cbor::{encode_into, encode_text, write_head};
        let mut out = Vec::with_capacity(384);
        let present = |key: &str| -> bool {
            match key {
                "from" => self.from.is_some(),
                "via" => !self.via.is_empty(),
                "event" => self.event.is_some(),
                "payload" => self.payload.is_some(),
                "guards" => !self.guards.is_empty(),
                "flags" => !self.flags.is_empty(),
                "data" => !self.data.is_empty(),
                "reason" => self.reason.is_some(),
                "compensations" => !self.compensations.is_empty(),
                "pendingOutcome" => self.pending_outcome.is_some(),
                "timer" => self.timer.is_some(),
                "idempotencyKey" => self.idempotency_key.is_some(),
                "trace" => self.trace.is_some(),
                "labels" => !self.labels.is_empty(),
                "suspended" => self.suspended,
                "lock" => self.lock.is_some(),
                "erasure" => self.erasure.is_some(),
                _ => true,
            }
        };
        let n = RECORD_KEYS_CANONICAL.iter().filter(|k| present(k)).count();
        write_head(&mut out, 5, n as u64);
        let uint = |out: &mut Vec<u8>, v: u64| write_head(out, 0, v);
        let text = |out: &mut Vec<u8>, v: &str| encode_text(out, v);
        for key in RECORD_KEYS_CANONICAL {
            if !present(key) {
                continue;
            }
            encode_text(&mut out, key);
            match key {
                "to" => text(&mut out, &self.to),
                "via" => {
                    write_head(&mut out, 4, self.via.len() as u64);
                    for v in &self.via {
                        text(&mut out, v);
                    }
                }
                "data" => crate::cbor::encode_map(&mut out, &self.data),
                "from" => text(&mut out, self.from.as_deref().unwrap_or_default()),
                "kind" => text(&mut out, self.kind.as_str()),
                "actor" => text(&mut out, &self.actor),
                "event" => text(&mut out, self.event.as_deref().unwrap_or_default()),
                "flags" | "guards" | "trace" | "labels" | "timer" | "lock" | "erasure" => {
                    let value = match key {
                        "flags" => serde_json::to_value(&self.flags),
                        "erasure" => serde_json::to_value(&self.erasure),
                        "lock" => serde_json::to_value(&self.lock),
                        "guards" => serde_json::to_value(&self.guards),
                        "trace" => serde_json::to_value(&self.trace),
                        "labels" => serde_json::to_value(&self.labels),
                        _ => serde_json::to_value(self.timer),
                    };
                    encode_into(&mut out, &value.unwrap_or(Value::Null));
                }
                "phase" => text(&mut out, self.phase.as_str()),
                "format" => uint(&mut out, u64::from(self.format)),
                "reason" => text(&mut out, self.reason.as_deref().unwrap_or_default()),
                "status" => text(&mut out, self.status.as_str()),
                "timeMs" => uint(&mut out, self.time_ms),
                "attempt" => uint(&mut out, u64::from(self.attempt)),
                "machine" => text(&mut out, &self.machine),
                "payload" => encode_into(&mut out, self.payload.as_ref().unwrap_or(&Value::Null)),
                "version" => uint(&mut out, self.version),
                "entrySeq" => uint(&mut out, self.entry_seq),
                "instance" => text(&mut out, &self.instance),
                "prevHash" => text(&mut out, &self.prev_hash.to_hex()),
                "revision" => uint(&mut out, u64::from(self.revision)),
                "inBackoff" => out.push(if self.in_backoff { 0xf5 } else { 0xf4 }),
                "namespace" => text(&mut out, &self.namespace),
                "suspended" => out.push(0xf5),
                "revisionHash" => text(&mut out, &self.revision_hash.to_hex()),
                "compensations" => {
                    write_head(&mut out, 4, self.compensations.len() as u64);
                    for c in &self.compensations {
                        text(&mut out, c);
                    }
                }
                "idempotencyKey" => text(
                    &mut out,
                    self.idempotency_key.as_deref().unwrap_or_default(),
                ),
                "pendingOutcome" => text(
                    &mut out,
                    self.pending_outcome
                        .map(Outcome::as_str)
                        .unwrap_or_default(),
                ),
                _ => out.push(0xf6),
            }
        }
        out
    }

    /// The reference encoding: deterministic CBOR of `serde_json::to_value(self)`.
    pub fn encode_generic(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        cbor::encode(&value)
    }
}

/// Every key a record may have, in core deterministic order (shorter first, then bytewise).
const RECORD_KEYS_CANONICAL: [&str; 34] = [
    "to",
    "via",
    "data",
    "from",
    "kind",
    "lock",
    "actor",
    "event",
    "flags",
    "phase",
    "timer",
    "trace",
    "format",
    "guards",
    "labels",
    "reason",
    "status",
    "timeMs",
    "attempt",
    "erasure",
    "machine",
    "payload",
    "version",
    "entrySeq",
    "instance",
    "prevHash",
    "revision",
    "inBackoff",
    "namespace",
    "suspended",
    "revisionHash",
    "compensations",
    "idempotencyKey",
    "pendingOutcome",
];

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Genesis => "genesis",
            RecordKind::Event => "event",
            RecordKind::Timer => "timer",
            RecordKind::Retry => "retry",
            RecordKind::Cancel => "cancel",
            RecordKind::Suspend => "suspend",
            RecordKind::Resume => "resume",
            RecordKind::Redrive => "redrive",
            RecordKind::Lock => "lock",
            RecordKind::Migration => "migration",
            RecordKind::Erasure => "erasure",
        }
    }
}

impl SealedRecord {
    /// Decodes the stored bytes, checking the stored hash first.
    pub fn open(&self) -> Result<StateChangeEvent, ChainError> {
        if Hash32::digest(RECORD_DOMAIN, &self.bytes) != self.hash {
            return Err(ChainError::HashMismatch {
                version: self.version,
            });
        }
        decode_record(self.version, &self.bytes)
    }
}

/// Decodes record bytes without checking a hash.
pub fn decode_record(version: u64, bytes: &[u8]) -> Result<StateChangeEvent, ChainError> {
    let undecodable = |detail: String| ChainError::Undecodable { version, detail };
    let value = cbor::decode(bytes).map_err(|e| undecodable(e.to_string()))?;
    let format = value.get("format").and_then(Value::as_u64).unwrap_or(0);
    if format > RECORD_FORMAT as u64 {
        return Err(ChainError::FutureFormat {
            version,
            format: format as u32,
        });
    }
    let record: StateChangeEvent =
        serde_json::from_value(value).map_err(|e| undecodable(e.to_string()))?;
    if record.version != version {
        return Err(ChainError::VersionGap {
            expected: version,
            found: record.version,
        });
    }
    Ok(record)
}

/// The chain rule for redacted records, the one place it is decided: record `version`, whose
/// stored (sealed) hash is `stored_hash` but whose bytes hash to `bytes_hash`, is accepted only
/// when an erasure record *later* in the same chain (`later`: each listed entry with the version
/// of the erasure record that lists it) names that version with `originalHash == stored_hash`
/// and `redactedHash == bytes_hash`. The chain links keep using `stored_hash`.
pub fn erased_record_accepted(
    version: u64,
    stored_hash: Hash32,
    bytes_hash: Hash32,
    later: &[(u64, ErasedRecord)],
) -> bool {
    later.iter().any(|(listed_by, entry)| {
        *listed_by > version
            && entry.version == version
            && entry.original_hash == stored_hash
            && entry.redacted_hash == bytes_hash
    })
}

/// Whether record bytes are an `erasure` record (reads the top-level `kind` only).
pub fn is_erasure_bytes(bytes: &[u8]) -> bool {
    cbor::top_level_texts(bytes, &["kind"])
        .is_ok_and(|fields| fields[0] == Some(RecordKind::Erasure.as_str()))
}

/// Applies [`erased_record_accepted`] along one chain read in version order: a record whose bytes
/// do not hash to its stored hash is held until the end of the chain, the lists of the erasure
/// records met after it are collected, and [`ErasureCheck::finish`] decides. Every verifier
/// (core chains, stores, imports, snapshots, the test kit) goes through it.
///
/// ```
/// use cnsm_core::record::{ErasureCheck, Hash32};
/// let mut check = ErasureCheck::default();
/// // Bytes that do not hash to the stored hash, and no erasure record lists them: refused.
/// check.check_hash(0, Hash32::ZERO, b"not the sealed bytes");
/// assert!(check.finish().is_err());
/// ```
#[derive(Debug, Clone, Default)]
pub struct ErasureCheck {
    /// (version, stored hash, hash of the stored bytes) of records that did not match.
    pending: Vec<(u64, Hash32, Hash32)>,
    /// Entries of erasure records met after the first pending record, with their version.
    listed: Vec<(u64, ErasedRecord)>,
}

impl ErasureCheck {
    /// Checks record `version`'s bytes against its stored hash; a mismatch is held for
    /// [`ErasureCheck::finish`]. Returns whether they matched.
    pub fn check_hash(&mut self, version: u64, stored_hash: Hash32, bytes: &[u8]) -> bool {
        let bytes_hash = Hash32::digest(RECORD_DOMAIN, bytes);
        if bytes_hash == stored_hash {
            return true;
        }
        self.pending.push((version, stored_hash, bytes_hash));
        false
    }

    /// Notes the list of an erasure record (decoded by the caller) at `version`.
    pub fn note(&mut self, version: u64, erasure: &Erasure) {
        if !self.pending.is_empty() {
            self.listed
                .extend(erasure.records.iter().map(|entry| (version, *entry)));
        }
    }

    /// Notes record bytes at `version` if they are an erasure record (decoding it only then,
    /// and only while something is held).
    pub fn note_bytes(&mut self, version: u64, bytes: &[u8]) -> Result<(), ChainError> {
        if self.pending.is_empty() || !is_erasure_bytes(bytes) {
            return Ok(());
        }
        let record = decode_record(version, bytes)?;
        if let Some(erasure) = &record.erasure {
            self.note(version, erasure);
        }
        Ok(())
    }

    /// Whether a record is held (some later erasure record must accept it).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The first held record as an error, in place of `error` met after it (the held record is
    /// the earlier problem); `error` itself when nothing is held before it.
    pub fn earliest(&self, error: ChainError) -> ChainError {
        match self.pending.first() {
            Some((version, _, _)) => ChainError::HashMismatch { version: *version },
            None => error,
        }
    }

    /// Every held record must be accepted by [`erased_record_accepted`]; the first one that is
    /// not is a [`ChainError::HashMismatch`].
    pub fn finish(&self) -> Result<(), ChainError> {
        for (version, stored_hash, bytes_hash) in &self.pending {
            if !erased_record_accepted(*version, *stored_hash, *bytes_hash, &self.listed) {
                return Err(ChainError::HashMismatch { version: *version });
            }
        }
        Ok(())
    }
}

/// Gives each redacted record of one chain (hashes computed from the bytes, as a snapshot reader
/// does) back the hash it was sealed with, taken from the erasure records of the chain, so that
/// the links and the stores see the original hashes. Records no erasure record lists keep their
/// hash; [`verify_chain_links`] still checks everything.
pub fn restore_sealed_hashes(records: &mut [SealedRecord]) {
    const ERASURE_KEY: &[u8] = b"\x67erasure";
    // Every snapshot read passes each record through here: a vectorized search, not a
    // comparison at every offset.
    let finder = memchr::memmem::Finder::new(ERASURE_KEY);
    if !records.iter().any(|r| finder.find(&r.bytes).is_some()) {
        return;
    }
    let mut listed: Vec<(u64, ErasedRecord)> = Vec::new();
    for sealed in records.iter() {
        if is_erasure_bytes(&sealed.bytes)
            && let Ok(record) = decode_record(sealed.version, &sealed.bytes)
            && let Some(erasure) = record.erasure
        {
            listed.extend(erasure.records.iter().map(|e| (sealed.version, *e)));
        }
    }
    for sealed in records.iter_mut() {
        if let Some((_, entry)) = listed.iter().find(|(by, e)| {
            *by > sealed.version && e.version == sealed.version && e.redacted_hash == sealed.hash
        }) {
            sealed.hash = entry.original_hash;
        }
    }
}

/// Checks one instance's records, in order, starting at `first_version` with `prev_hash` the
/// hash of the record before it (`Hash32::ZERO` for a chain that starts at genesis). Redacted
/// records are accepted by the erasure records that follow them ([`ErasureCheck`]).
///
/// Returns the hash of the last record.
pub fn verify_chain<'a>(
    namespace: &str,
    instance: &str,
    first_version: u64,
    prev_hash: Hash32,
    records: impl IntoIterator<Item = &'a SealedRecord>,
) -> Result<Hash32, ChainError> {
    let mut prev = prev_hash;
    let mut erasures = ErasureCheck::default();
    for (expected_version, sealed) in (first_version..).zip(records) {
        if sealed.version != expected_version {
            return Err(erasures.earliest(ChainError::VersionGap {
                expected: expected_version,
                found: sealed.version,
            }));
        }
        let matched = erasures.check_hash(sealed.version, sealed.hash, &sealed.bytes);
        let record = match decode_record(sealed.version, &sealed.bytes) {
            Ok(record) => record,
            Err(_) if !matched => {
                return Err(erasures.earliest(ChainError::HashMismatch {
                    version: sealed.version,
                }));
            }
            Err(e) => return Err(erasures.earliest(e)),
        };
        if &*record.instance != instance || &*record.namespace != namespace {
            return Err(erasures.earliest(ChainError::WrongInstance {
                version: sealed.version,
                expected: format!("{namespace}/{instance}"),
                found: format!("{}/{}", record.namespace, record.instance),
            }));
        }
        if record.prev_hash != prev {
            return Err(erasures.earliest(ChainError::BrokenLink {
                version: sealed.version,
            }));
        }
        if let Some(erasure) = &record.erasure {
            erasures.note(sealed.version, erasure);
        }
        prev = sealed.hash;
    }
    erasures.finish()?;
    Ok(prev)
}

/// Checks one instance's chain from genesis like [`verify_chain`], but reads only each
/// record's identity and link (`format`, `version`, `namespace`, `instance`, `prevHash`)
/// instead of decoding it: for snapshot verification and imports, where the bytes are already
/// covered by a signature or were hash-checked by the exporting store. With `rehash` each
/// stored hash is recomputed from the bytes (redacted records are accepted through
/// [`ErasureCheck`]); without it the caller guarantees the hashes were computed from these bytes
/// (or restored by [`restore_sealed_hashes`]) and a record the next one does not link to is
/// accepted only as a redacted record. Returns the hash of the last record.
pub fn verify_chain_links<'a>(
    namespace: &str,
    instance: &str,
    rehash: bool,
    records: impl IntoIterator<Item = &'a SealedRecord>,
) -> Result<Hash32, ChainError> {
    use crate::cbor::Scalar;
    let mut prev = Hash32::ZERO;
    let mut erasures = ErasureCheck::default();
    for (expected_version, sealed) in (0u64..).zip(records) {
        let version = sealed.version;
        if version != expected_version {
            return Err(erasures.earliest(ChainError::VersionGap {
                expected: expected_version,
                found: version,
            }));
        }
        let matched = !rehash || erasures.check_hash(version, sealed.hash, &sealed.bytes);
        let fields = cbor::top_level_scalars(
            &sealed.bytes,
            &["format", "version", "instance", "prevHash", "namespace"],
        )
        .map_err(|e| {
            erasures.earliest(if matched {
                ChainError::Undecodable {
                    version,
                    detail: e.to_string(),
                }
            } else {
                ChainError::HashMismatch { version }
            })
        })?;
        let (
            Some(Scalar::Uint(format)),
            Some(Scalar::Uint(record_version)),
            Some(Scalar::Text(record_instance)),
            Some(Scalar::Text(prev_hex)),
            Some(Scalar::Text(record_namespace)),
        ) = (fields[0], fields[1], fields[2], fields[3], fields[4])
        else {
            return Err(erasures.earliest(ChainError::Undecodable {
                version,
                detail: "identity or link fields missing".into(),
            }));
        };
        if format > u64::from(RECORD_FORMAT) {
            return Err(erasures.earliest(ChainError::FutureFormat {
                version,
                format: u32::try_from(format).unwrap_or(u32::MAX),
            }));
        }
        if record_version != version {
            return Err(erasures.earliest(ChainError::VersionGap {
                expected: version,
                found: record_version,
            }));
        }
        if record_instance != instance || record_namespace != namespace {
            return Err(erasures.earliest(ChainError::WrongInstance {
                version,
                expected: format!("{namespace}/{instance}"),
                found: format!("{record_namespace}/{record_instance}"),
            }));
        }
        if Hash32::from_hex(prev_hex) != Some(prev) {
            return Err(erasures.earliest(ChainError::BrokenLink { version }));
        }
        erasures.note_bytes(version, &sealed.bytes)?;
        prev = sealed.hash;
    }
    erasures.finish()?;
    Ok(prev)
}

#[cfg(test)]
mod tests {
    use super::RECORD_KEYS_CANONICAL;

    #[test]
    fn record_keys_are_in_deterministic_order() {
        for pair in RECORD_KEYS_CANONICAL.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                (a.len(), a.as_bytes()) < (b.len(), b.as_bytes()),
                "{a} before {b}"
            );
        }
    }
}
