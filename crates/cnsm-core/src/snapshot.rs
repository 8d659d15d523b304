//! The snapshot codec: a versioned, deterministic-CBOR document (RFC 8949 §4.2.1) holding the
//! pinned definition revisions and, per instance, its current state, pending timer, live
//! idempotency keys and every history record as the exact stored bytes (DESIGN.md §7).
//!
//! Pure: the writer appends to a `Vec<u8>` the caller flushes wherever it likes, and the reader
//! walks a byte slice, one instance at a time. Deterministic CBOR allows only definite lengths,
//! so the writer is told the number of instances up front and checks it at the end. The same
//! state written twice gives the same bytes. The schema (CDDL) is in `docs/snapshots.md`:
//!
//! ```text
//! snapshot = { "asOf": uint, "defs": [* definition], "kind": "cnsm.snapshot",
//!              "format": 1, "instances": [* instance] }
//! definition = { "hash": text, "name": text, "spec": StateMachine, "revision": uint,
//!                "namespace": text }
//! instance = { "state": Instance, "records": [+ bstr], "idempotency": [* idempotency] }
//! idempotency = { "key": text, "version": uint, "expiresMs": uint, "requestHash": text }
//! ```
//!
//! ```
//! use cnsm_core::snapshot::{SnapshotReader, SnapshotWriter};
//! let mut out = Vec::new();
//! let writer = SnapshotWriter::begin(&mut out, 1_700_000_000_000, &[], 0);
//! writer.finish().unwrap();
//! let mut reader = SnapshotReader::open(&out).unwrap();
//! assert_eq!(reader.as_of_ms(), 1_700_000_000_000);
//! assert!(reader.next_instance().unwrap().is_none());
//! ```

use std::collections::BTreeSet;

use serde_json::Value;

use crate::Instance;
use crate::cbor::{self, CborError};
use crate::engine::revision_hash;
use crate::record::{ChainError, Hash32, REVISION_DOMAIN, SealedRecord, verify_chain_links};
use crate::resource::StateMachine;

/// The snapshot format this code writes and reads.
pub const SNAPSHOT_FORMAT: u64 = 1;
/// The value of the document's `kind` field.
pub const SNAPSHOT_KIND: &str = "cnsm.snapshot";
/// Most records one instance may carry in a snapshot (a limit on untrusted input).
pub const RECORDS_PER_INSTANCE_MAX: u64 = 10_000_000;

/// A pinned definition revision, with its full spec.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotDefinition {
    pub namespace: String,
    pub name: String,
    pub revision: u32,
    /// The revision hash ([`revision_hash`] of `spec`).
    pub hash: Hash32,
    pub spec: StateMachine,
}

/// An idempotency key still inside its window at `asOf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotIdempotency {
    pub key: String,
    pub request_hash: Hash32,
    pub version: u64,
    pub expires_ms: u64,
}

/// One instance as a snapshot carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInstance {
    /// The state as of its last record (timer due times are absolute).
    pub instance: Instance,
    /// Records `0..=instance.version`, exact stored bytes; hashes recomputed from the bytes.
    pub records: Vec<SealedRecord>,
    /// Sorted by key.
    pub idempotency: Vec<SnapshotIdempotency>,
}

/// Why a snapshot document was refused. Variants follow the verification order of
/// `docs/snapshots.md` (encoding, then chains, then definitions).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Not core deterministic CBOR, or not the snapshot schema.
    #[error(
        "snapshot payload is not a valid deterministic CBOR snapshot at byte {offset}: {detail}"
    )]
    Encoding { offset: usize, detail: String },
    /// A format version this binary does not read.
    #[error(
        "snapshot format {found} is not supported (this binary reads format {SNAPSHOT_FORMAT})"
    )]
    UnsupportedFormat { found: u64 },
    /// An instance's records do not form an unbroken chain that ends at its state.
    #[error("instance {namespace}/{id}: history does not verify: {detail}")]
    Chain {
        namespace: String,
        id: String,
        detail: String,
    },
    /// A definition's content hash does not match, or an instance pins a revision the snapshot
    /// does not carry.
    #[error("definition {namespace}/{name}@{revision}: {detail}")]
    Definition {
        namespace: String,
        name: String,
        revision: u32,
        detail: String,
    },
    /// The writer was used against its contract (a programming error of the caller).
    #[error("snapshot writer: {0}")]
    Writer(String),
}

/// Writes a snapshot one instance at a time.
#[derive(Debug)]
#[must_use = "call finish() to check that every announced instance was written"]
pub struct SnapshotWriter {
    n_left: u64,
}

impl SnapshotWriter {
    /// Writes the document head, the definitions (sorted here by namespace, name, revision)
    /// and the head of the instance array, which will hold exactly `n_instances` entries.
    pub fn begin(
        out: &mut Vec<u8>,
        as_of_ms: u64,
        definitions: &[SnapshotDefinition],
        n_instances: u64,
    ) -> SnapshotWriter {
        cbor::write_head(out, 5, 5);
        cbor::encode_text(out, "asOf");
        cbor::write_head(out, 0, as_of_ms);
        cbor::encode_text(out, "defs");
        let mut sorted: Vec<&SnapshotDefinition> = definitions.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.namespace, &a.name, a.revision).cmp(&(&b.namespace, &b.name, b.revision))
        });
        sorted.dedup_by(|a, b| {
            (&a.namespace, &a.name, a.revision) == (&b.namespace, &b.name, b.revision)
        });
        cbor::write_head(out, 4, sorted.len() as u64);
        for definition in sorted {
            let spec = serde_json::to_value(&definition.spec).unwrap_or(Value::Null);
            cbor::write_head(out, 5, 5);
            cbor::encode_text(out, "hash");
            cbor::encode_text(out, &definition.hash.to_hex());
            cbor::encode_text(out, "name");
            cbor::encode_text(out, &definition.name);
            cbor::encode_text(out, "spec");
            cbor::encode_into(out, &spec);
            cbor::encode_text(out, "revision");
            cbor::write_head(out, 0, u64::from(definition.revision));
            cbor::encode_text(out, "namespace");
            cbor::encode_text(out, &definition.namespace);
        }
        cbor::encode_text(out, "kind");
        cbor::encode_text(out, SNAPSHOT_KIND);
        cbor::encode_text(out, "format");
        cbor::write_head(out, 0, SNAPSHOT_FORMAT);
        cbor::encode_text(out, "instances");
        cbor::write_head(out, 4, n_instances);
        SnapshotWriter {
            n_left: n_instances,
        }
    }

    /// Appends one instance: its state, its records (exact bytes) and its idempotency keys
    /// (sorted here by key).
    pub fn write_instance(
        &mut self,
        out: &mut Vec<u8>,
        instance: &Instance,
        records: &[SealedRecord],
        idempotency: &[SnapshotIdempotency],
    ) -> Result<(), SnapshotError> {
        if self.n_left == 0 {
            return Err(SnapshotError::Writer(format!(
                "more instances than announced ({}/{} is one too many)",
                instance.namespace, instance.id
            )));
        }
        self.n_left -= 1;
        let state = serde_json::to_value(instance)
            .map_err(|e| SnapshotError::Writer(format!("instance does not serialize: {e}")))?;
        cbor::write_head(out, 5, 3);
        cbor::encode_text(out, "state");
        cbor::encode_into(out, &state);
        cbor::encode_text(out, "records");
        cbor::write_head(out, 4, records.len() as u64);
        for record in records {
            cbor::encode_bytes(out, &record.bytes);
        }
        cbor::encode_text(out, "idempotency");
        let mut keys: Vec<&SnapshotIdempotency> = idempotency.iter().collect();
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        cbor::write_head(out, 4, keys.len() as u64);
        for entry in keys {
            cbor::write_head(out, 5, 4);
            cbor::encode_text(out, "key");
            cbor::encode_text(out, &entry.key);
            cbor::encode_text(out, "version");
            cbor::write_head(out, 0, entry.version);
            cbor::encode_text(out, "expiresMs");
            cbor::write_head(out, 0, entry.expires_ms);
            cbor::encode_text(out, "requestHash");
            cbor::encode_text(out, &entry.request_hash.to_hex());
        }
        Ok(())
    }

    /// Checks that exactly the announced number of instances was written.
    pub fn finish(self) -> Result<(), SnapshotError> {
        if self.n_left != 0 {
            return Err(SnapshotError::Writer(format!(
                "{} announced instance(s) were not written",
                self.n_left
            )));
        }
        Ok(())
    }
}

/// Reads a snapshot one instance at a time from its bytes. Strict: every head must be in
/// shortest form, every map must have exactly the schema's keys in deterministic order, and
/// nothing may follow the document, so an accepted document re-encodes to the same bytes.
#[derive(Debug)]
pub struct SnapshotReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    as_of_ms: u64,
    definitions: Vec<SnapshotDefinition>,
    /// The raw CBOR of each definition's spec, for the content hash check.
    spec_bytes: Vec<&'a [u8]>,
    n_instances: u64,
    n_read: u64,
    /// The (namespace, id) of the last instance read: instances come in strictly increasing
    /// order, so none repeats and the order is the one the exporter writes.
    last_key: Option<(std::sync::Arc<str>, std::sync::Arc<str>)>,
}

impl<'a> SnapshotReader<'a> {
    /// Reads the document head and the definitions. Refuses a format other than
    /// [`SNAPSHOT_FORMAT`] with [`SnapshotError::UnsupportedFormat`].
    pub fn open(bytes: &'a [u8]) -> Result<SnapshotReader<'a>, SnapshotError> {
        let mut reader = SnapshotReader {
            bytes,
            pos: 0,
            as_of_ms: 0,
            definitions: Vec::new(),
            spec_bytes: Vec::new(),
            n_instances: 0,
            n_read: 0,
            last_key: None,
        };
        reader.expect_map(5)?;
        reader.expect_key("asOf")?;
        reader.as_of_ms = reader.uint()?;
        reader.expect_key("defs")?;
        let n_definitions = reader.array()?;
        for _ in 0..n_definitions {
            let definition = reader.definition()?;
            reader.definitions.push(definition);
        }
        reader.expect_key("kind")?;
        let at = reader.pos;
        let kind = reader.text()?;
        if kind != SNAPSHOT_KIND {
            return Err(encoding(
                at,
                format!("kind is {kind:?}, not {SNAPSHOT_KIND:?}"),
            ));
        }
        reader.expect_key("format")?;
        let format = reader.uint()?;
        if format != SNAPSHOT_FORMAT {
            return Err(SnapshotError::UnsupportedFormat { found: format });
        }
        reader.expect_key("instances")?;
        reader.n_instances = reader.array()?;
        let mut previous: Option<(&str, &str, u32)> = None;
        for d in &reader.definitions {
            let key = (d.namespace.as_str(), d.name.as_str(), d.revision);
            if previous.is_some_and(|p| p >= key) {
                return Err(encoding(0, "definitions are not sorted or repeat".into()));
            }
            previous = Some(key);
        }
        Ok(reader)
    }

    /// The export time the snapshot was taken at.
    pub fn as_of_ms(&self) -> u64 {
        self.as_of_ms
    }

    /// The pinned definition revisions, sorted by (namespace, name, revision).
    pub fn definitions(&self) -> &[SnapshotDefinition] {
        &self.definitions
    }

    /// How many instances the document announces.
    pub fn n_instances(&self) -> u64 {
        self.n_instances
    }

    /// The next instance, or `None` after the last one (then the document must end).
    pub fn next_instance(&mut self) -> Result<Option<SnapshotInstance>, SnapshotError> {
        if self.n_read == self.n_instances {
            if self.pos != self.bytes.len() {
                return Err(encoding(
                    self.pos,
                    format!("{} trailing bytes", self.bytes.len() - self.pos),
                ));
            }
            return Ok(None);
        }
        self.n_read += 1;
        self.expect_map(3)?;
        self.expect_key("state")?;
        let at = self.pos;
        let (state, len) =
            cbor::decode_prefix(&self.bytes[self.pos..]).map_err(|e| cbor_error(self.pos, e))?;
        self.pos += len;
        let instance: Instance = serde_json::from_value(state)
            .map_err(|e| encoding(at, format!("instance state: {e}")))?;
        // Only the canonical form of an instance is accepted (no unknown or defaulted keys),
        // so a re-export of the imported state gives the same bytes.
        let canonical = serde_json::to_value(&instance)
            .map(|v| cbor::encode(&v))
            .unwrap_or_default();
        if canonical.as_slice() != &self.bytes[at..at + len] {
            return Err(encoding(
                at,
                "instance state is not the canonical encoding of an instance".into(),
            ));
        }
        let key = (instance.namespace.clone(), instance.id.clone());
        if self.last_key.as_ref().is_some_and(|last| *last >= key) {
            return Err(encoding(
                at,
                format!(
                    "instance {}/{} is out of order or repeated",
                    instance.namespace, instance.id
                ),
            ));
        }
        self.last_key = Some(key);
        self.expect_key("records")?;
        let n_records = self.array()?;
        if n_records > RECORDS_PER_INSTANCE_MAX {
            return Err(encoding(
                self.pos,
                format!("{n_records} records is too many"),
            ));
        }
        let mut records = Vec::with_capacity(n_records.min(1024) as usize);
        for version in 0..n_records {
            let bytes = self.byte_string()?;
            records.push(SealedRecord {
                version,
                hash: Hash32::digest(crate::record::RECORD_DOMAIN, bytes),
                bytes: bytes.to_vec(),
            });
        }
        // Redacted records link through the hash they were sealed with (their erasure record
        // lists it); the chain check below still decides whether each is accepted.
        crate::record::restore_sealed_hashes(&mut records);
        self.expect_key("idempotency")?;
        let n_keys = self.array()?;
        let mut idempotency = Vec::with_capacity(n_keys.min(1024) as usize);
        for _ in 0..n_keys {
            self.expect_map(4)?;
            self.expect_key("key")?;
            let key = self.text()?.to_owned();
            self.expect_key("version")?;
            let version = self.uint()?;
            self.expect_key("expiresMs")?;
            let expires_ms = self.uint()?;
            self.expect_key("requestHash")?;
            let request_hash = self.hash()?;
            if idempotency
                .last()
                .is_some_and(|p: &SnapshotIdempotency| p.key >= key)
            {
                return Err(encoding(self.pos, "idempotency keys not sorted".into()));
            }
            idempotency.push(SnapshotIdempotency {
                key,
                request_hash,
                version,
                expires_ms,
            });
        }
        Ok(Some(SnapshotInstance {
            instance,
            records,
            idempotency,
        }))
    }

    /// Checks every definition's content hash: the hash over its stored spec bytes, and the
    /// revision hash of the parsed spec ([`revision_hash`]), must both equal the stated hash.
    pub fn check_definitions(&self) -> Result<(), SnapshotError> {
        for (definition, spec_bytes) in self.definitions.iter().zip(&self.spec_bytes) {
            let fail = |detail: &str| SnapshotError::Definition {
                namespace: definition.namespace.clone(),
                name: definition.name.clone(),
                revision: definition.revision,
                detail: detail.to_owned(),
            };
            if Hash32::digest(REVISION_DOMAIN, spec_bytes) != definition.hash {
                return Err(fail("content hash does not match the spec"));
            }
            if revision_hash(&definition.spec) != definition.hash {
                return Err(fail(
                    "the spec is not in normalized form (its revision hash differs)",
                ));
            }
            if definition.spec.metadata.namespace != definition.namespace
                || definition.spec.metadata.name != definition.name
            {
                return Err(fail("the spec names another definition"));
            }
        }
        Ok(())
    }

    fn definition(&mut self) -> Result<SnapshotDefinition, SnapshotError> {
        self.expect_map(5)?;
        self.expect_key("hash")?;
        let hash = self.hash()?;
        self.expect_key("name")?;
        let name = self.text()?.to_owned();
        self.expect_key("spec")?;
        let at = self.pos;
        let (spec, len) =
            cbor::decode_prefix(&self.bytes[self.pos..]).map_err(|e| cbor_error(at, e))?;
        self.spec_bytes.push(&self.bytes[at..at + len]);
        self.pos += len;
        let spec: StateMachine =
            serde_json::from_value(spec).map_err(|e| encoding(at, format!("spec: {e}")))?;
        self.expect_key("revision")?;
        let at = self.pos;
        let revision = u32::try_from(self.uint()?)
            .map_err(|_| encoding(at, "revision out of range".into()))?;
        self.expect_key("namespace")?;
        let namespace = self.text()?.to_owned();
        Ok(SnapshotDefinition {
            namespace,
            name,
            revision,
            hash,
            spec,
        })
    }

    fn head(&mut self) -> Result<(u8, u64), SnapshotError> {
        let (major, arg, len) =
            cbor::read_head(&self.bytes[self.pos..]).map_err(|e| cbor_error(self.pos, e))?;
        self.pos += len;
        Ok((major, arg))
    }

    fn expect(&mut self, major: u8, what: &str) -> Result<u64, SnapshotError> {
        let at = self.pos;
        let (found, arg) = self.head()?;
        if found != major {
            return Err(encoding(at, format!("expected {what}")));
        }
        Ok(arg)
    }

    fn expect_map(&mut self, n_entries: u64) -> Result<(), SnapshotError> {
        let at = self.pos;
        let n = self.expect(5, "a map")?;
        if n != n_entries {
            return Err(encoding(
                at,
                format!("a map of {n} entries, expected {n_entries}"),
            ));
        }
        Ok(())
    }

    fn expect_key(&mut self, key: &str) -> Result<(), SnapshotError> {
        let at = self.pos;
        let found = self.text()?;
        if found != key {
            return Err(encoding(at, format!("key {found:?} where {key:?} belongs")));
        }
        Ok(())
    }

    fn uint(&mut self) -> Result<u64, SnapshotError> {
        self.expect(0, "an unsigned integer")
    }

    fn array(&mut self) -> Result<u64, SnapshotError> {
        self.expect(4, "an array")
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], SnapshotError> {
        let at = self.pos;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| at.checked_add(len))
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| encoding(at, "ends early".into()))?;
        self.pos = end;
        Ok(&self.bytes[at..end])
    }

    fn text(&mut self) -> Result<&'a str, SnapshotError> {
        let at = self.pos;
        let len = self.expect(3, "a text string")?;
        let raw = self.take(len)?;
        std::str::from_utf8(raw).map_err(|_| encoding(at, "text is not UTF-8".into()))
    }

    fn byte_string(&mut self) -> Result<&'a [u8], SnapshotError> {
        let len = self.expect(2, "a byte string")?;
        self.take(len)
    }

    fn hash(&mut self) -> Result<Hash32, SnapshotError> {
        let at = self.pos;
        let text = self.text()?;
        Hash32::from_hex(text).ok_or_else(|| encoding(at, "hash is not 64 hex digits".into()))
    }
}

/// Checks one instance: records `0..=version` form an unbroken hash chain of this instance
/// ([`verify_chain_links`] on hashes as [`SnapshotReader`] computes them from the bytes), their
/// versions run without gaps, and the state's version and last hash are those of the last
/// record.
pub fn verify_instance(entry: &SnapshotInstance) -> Result<(), SnapshotError> {
    let instance = &entry.instance;
    let fail = |detail: String| SnapshotError::Chain {
        namespace: instance.namespace.to_string(),
        id: instance.id.to_string(),
        detail,
    };
    // The reader computed each hash from the bytes it read.
    let last = verify_chain_links(&instance.namespace, &instance.id, false, &entry.records)
        .map_err(|e: ChainError| fail(e.to_string()))?;
    let n_records = entry.records.len() as u64;
    if n_records != instance.version + 1 {
        return Err(fail(format!(
            "{n_records} record(s) for an instance at version {}",
            instance.version
        )));
    }
    if last != instance.last_hash {
        return Err(fail(
            "the state's last hash is not the last record's hash".into(),
        ));
    }
    for key in &entry.idempotency {
        if key.version > instance.version {
            return Err(fail(format!(
                "idempotency key {:?} names version {}, past the history",
                key.key, key.version
            )));
        }
    }
    Ok(())
}

/// The (namespace, name, revision, hash) an instance pins, for checking against the snapshot's
/// definitions.
pub type PinnedRevision = (String, String, u32, Hash32);

/// Checks that every pinned revision is carried by the snapshot with the same hash.
pub fn check_pins(
    definitions: &[SnapshotDefinition],
    pins: &BTreeSet<PinnedRevision>,
) -> Result<(), SnapshotError> {
    for (namespace, name, revision, hash) in pins {
        let found = definitions
            .iter()
            .find(|d| &d.namespace == namespace && &d.name == name && d.revision == *revision);
        let detail = match found {
            None => "pinned by an instance but not in the snapshot",
            Some(d) if d.hash != *hash => "an instance pins it with another hash",
            Some(_) => continue,
        };
        return Err(SnapshotError::Definition {
            namespace: namespace.clone(),
            name: name.clone(),
            revision: *revision,
            detail: detail.into(),
        });
    }
    Ok(())
}

/// The revision an instance is pinned to (its current one; the exporter carries that one).
pub fn pin_of(entry: &SnapshotInstance) -> PinnedRevision {
    let instance = &entry.instance;
    (
        instance.namespace.to_string(),
        instance.machine.to_string(),
        instance.revision,
        instance.revision_hash,
    )
}

fn encoding(offset: usize, detail: String) -> SnapshotError {
    SnapshotError::Encoding { offset, detail }
}

fn cbor_error(base: usize, error: CborError) -> SnapshotError {
    let (offset, detail) = match &error {
        CborError::Truncated(at) => (base + at, "ends early".to_owned()),
        CborError::NotDeterministic { offset, reason } => {
            (base + offset, format!("not deterministic: {reason}"))
        }
        CborError::Unsupported { offset, reason } => (base + offset, (*reason).to_owned()),
        other => (base, other.to_string()),
    };
    SnapshotError::Encoding { offset, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of `docs/snapshots.md`: an empty snapshot taken at
    /// 2025-11-27T09:40:00Z.
    const EMPTY_HEX: &str = "a56461734f661b0000019ac4af1580646465667380646b696e646d636e736d2e736e617073686f7466666f726d61740169696e7374616e63657380";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn empty_snapshot_bytes_match_the_documented_example() {
        let mut out = Vec::new();
        SnapshotWriter::begin(&mut out, 1_764_236_400_000, &[], 0)
            .finish()
            .unwrap();
        assert_eq!(hex(&out), EMPTY_HEX);
        let mut reader = SnapshotReader::open(&out).unwrap();
        assert_eq!(reader.as_of_ms(), 1_764_236_400_000);
        assert_eq!(reader.next_instance().unwrap(), None);
    }

    #[test]
    fn reader_refuses_trailing_bytes_truncation_and_other_formats() {
        let mut out = Vec::new();
        SnapshotWriter::begin(&mut out, 5, &[], 0).finish().unwrap();
        let mut trailing = out.clone();
        trailing.push(0);
        let mut reader = SnapshotReader::open(&trailing).unwrap();
        assert!(matches!(
            reader.next_instance(),
            Err(SnapshotError::Encoding { .. })
        ));
        for len in 0..out.len() - 1 {
            assert!(
                SnapshotReader::open(&out[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
        let future: Vec<u8> = {
            let text = hex(&out).replace("666f726d617401", "666f726d617402");
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
                .collect()
        };
        assert_eq!(
            SnapshotReader::open(&future).unwrap_err(),
            SnapshotError::UnsupportedFormat { found: 2 }
        );
    }

    #[test]
    fn writer_checks_the_announced_count() {
        let mut out = Vec::new();
        let writer = SnapshotWriter::begin(&mut out, 5, &[], 1);
        assert!(matches!(writer.finish(), Err(SnapshotError::Writer(_))));
    }
}
