//! The snapshot codec: a versioned, deterministic-CBOR document (RFC 8949 §4.2.1) holding the
//! pinned definition revisions and, per instance, its current state, pending timer, live
//! idempotency keys and every history record as the exact stored bytes (DESIGN.md §7).
//!
//! Streaming: the writer encodes into a bounded buffer it flushes to any `std::io::Write`, and
//! the reader pulls from any `std::io::BufRead` (a byte slice, a buffered file), one instance at
//! a time; neither ever holds the whole document. Deterministic CBOR allows only definite lengths,
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
use std::io::{BufRead, Read, Write};

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
    /// The snapshot could not be read from or written to its file or stream.
    #[error("snapshot input/output: {0}")]
    Io(String),
    /// The writer was used against its contract (a programming error of the caller).
    #[error("snapshot writer: {0}")]
    Writer(String),
}

/// Writes a snapshot one instance at a time to any [`Write`] (a `Vec<u8>`, a file, a hashing
/// writer). Encoding happens in a reused buffer that is flushed to the output every
/// [`WRITE_BUFFER_LEN`] bytes, so memory stays one instance plus the buffer.
#[derive(Debug)]
#[must_use = "call finish() to check that every announced instance was written"]
pub struct SnapshotWriter<W: Write> {
    out: W,
    buffer: Vec<u8>,
    n_left: u64,
}

/// Bytes the writer gathers before it writes them to its output.
pub const WRITE_BUFFER_LEN: usize = 256 * 1024;

impl<W: Write> SnapshotWriter<W> {
    /// Starts the document: its head, the definitions (sorted here by namespace, name,
    /// revision) and the head of the instance array, which will hold exactly `n_instances`
    /// entries. Nothing reaches `out` before the first flush, so this cannot fail; output
    /// errors surface from [`SnapshotWriter::write_instance`] and [`SnapshotWriter::finish`].
    pub fn begin(
        out: W,
        as_of_ms: u64,
        definitions: &[SnapshotDefinition],
        n_instances: u64,
    ) -> SnapshotWriter<W> {
        let mut head = Vec::with_capacity(WRITE_BUFFER_LEN);
        cbor::write_head(&mut head, 5, 5);
        cbor::encode_text(&mut head, "asOf");
        cbor::write_head(&mut head, 0, as_of_ms);
        cbor::encode_text(&mut head, "defs");
        let mut sorted: Vec<&SnapshotDefinition> = definitions.iter().collect();
        sorted.sort_by(|a, b| {
            (&a.namespace, &a.name, a.revision).cmp(&(&b.namespace, &b.name, b.revision))
        });
        sorted.dedup_by(|a, b| {
            (&a.namespace, &a.name, a.revision) == (&b.namespace, &b.name, b.revision)
        });
        cbor::write_head(&mut head, 4, sorted.len() as u64);
        for definition in sorted {
            let spec = serde_json::to_value(&definition.spec).unwrap_or(Value::Null);
            cbor::write_head(&mut head, 5, 5);
            cbor::encode_text(&mut head, "hash");
            cbor::encode_text(&mut head, &definition.hash.to_hex());
            cbor::encode_text(&mut head, "name");
            cbor::encode_text(&mut head, &definition.name);
            cbor::encode_text(&mut head, "spec");
            cbor::encode_into(&mut head, &spec);
            cbor::encode_text(&mut head, "revision");
            cbor::write_head(&mut head, 0, u64::from(definition.revision));
            cbor::encode_text(&mut head, "namespace");
            cbor::encode_text(&mut head, &definition.namespace);
        }
        cbor::encode_text(&mut head, "kind");
        cbor::encode_text(&mut head, SNAPSHOT_KIND);
        cbor::encode_text(&mut head, "format");
        cbor::write_head(&mut head, 0, SNAPSHOT_FORMAT);
        cbor::encode_text(&mut head, "instances");
        cbor::write_head(&mut head, 4, n_instances);
        SnapshotWriter {
            out,
            buffer: head,
            n_left: n_instances,
        }
    }

    /// Appends one instance: its state, its records (exact bytes) and its idempotency keys
    /// (sorted here by key).
    pub fn write_instance(
        &mut self,
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
        let out = &mut self.buffer;
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
        if self.buffer.len() >= WRITE_BUFFER_LEN {
            self.flush()?;
        }
        Ok(())
    }

    /// Checks that exactly the announced number of instances was written, writes what is
    /// still buffered and hands the output back.
    pub fn finish(mut self) -> Result<W, SnapshotError> {
        if self.n_left != 0 {
            return Err(SnapshotError::Writer(format!(
                "{} announced instance(s) were not written",
                self.n_left
            )));
        }
        self.flush()?;
        self.out.flush().map_err(io_error)?;
        Ok(self.out)
    }

    fn flush(&mut self) -> Result<(), SnapshotError> {
        self.out.write_all(&self.buffer).map_err(io_error)?;
        self.buffer.clear();
        Ok(())
    }
}

/// Most bytes one item of a snapshot may take (a record, a state, a spec, a text): a limit
/// on untrusted lengths, so a forged length cannot make the reader allocate without bound.
pub const ITEM_LEN_MAX: u64 = 64 * 1024 * 1024;

/// Reads a snapshot one instance at a time from any [`BufRead`] (a byte slice, a buffered
/// file). Strict: every head must be in shortest form, every map must have exactly the
/// schema's keys in deterministic order, and nothing may follow the document, so an accepted
/// document re-encodes to the same bytes. Memory: the definitions plus one instance.
#[derive(Debug)]
pub struct SnapshotReader<R> {
    input: R,
    pos: usize,
    as_of_ms: u64,
    definitions: Vec<SnapshotDefinition>,
    /// The raw CBOR of each definition's spec, for the content hash check.
    spec_bytes: Vec<Vec<u8>>,
    n_instances: u64,
    n_read: u64,
    /// The (namespace, id) of the last instance read: instances come in strictly increasing
    /// order, so none repeats and the order is the one the exporter writes.
    last_key: Option<(std::sync::Arc<str>, std::sync::Arc<str>)>,
    /// A reused buffer for texts and whole items.
    scratch: Vec<u8>,
}

impl<'a> SnapshotReader<&'a [u8]> {
    /// [`SnapshotReader::from_reader`] over bytes in memory.
    pub fn open(bytes: &'a [u8]) -> Result<SnapshotReader<&'a [u8]>, SnapshotError> {
        SnapshotReader::from_reader(bytes)
    }
}

impl<R: BufRead> SnapshotReader<R> {
    /// Reads the document head and the definitions. Refuses a format other than
    /// [`SNAPSHOT_FORMAT`] with [`SnapshotError::UnsupportedFormat`].
    pub fn from_reader(input: R) -> Result<SnapshotReader<R>, SnapshotError> {
        let mut reader = SnapshotReader {
            input,
            pos: 0,
            as_of_ms: 0,
            definitions: Vec::new(),
            spec_bytes: Vec::new(),
            n_instances: 0,
            n_read: 0,
            last_key: None,
            scratch: Vec::new(),
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

    /// How many bytes were read so far.
    pub fn position(&self) -> u64 {
        self.pos as u64
    }

    /// The input the document is read from (e.g. to take the digest of a hashing reader once
    /// the document ended).
    pub fn input(&self) -> &R {
        &self.input
    }

    /// The next instance, or `None` after the last one (then the document must end).
    pub fn next_instance(&mut self) -> Result<Option<SnapshotInstance>, SnapshotError> {
        if self.n_read == self.n_instances {
            let n_trailing =
                std::io::copy(&mut self.input, &mut std::io::sink()).map_err(io_error)?;
            if n_trailing != 0 {
                return Err(encoding(self.pos, format!("{n_trailing} trailing bytes")));
            }
            return Ok(None);
        }
        self.n_read += 1;
        self.expect_map(3)?;
        self.expect_key("state")?;
        let at = self.pos;
        let state = self.item_value()?;
        let instance: Instance = serde_json::from_value(state)
            .map_err(|e| encoding(at, format!("instance state: {e}")))?;
        // Only the canonical form of an instance is accepted (no unknown or defaulted keys),
        // so a re-export of the imported state gives the same bytes.
        let canonical = serde_json::to_value(&instance)
            .map(|v| cbor::encode(&v))
            .unwrap_or_default();
        if canonical != self.scratch {
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
                hash: Hash32::digest(crate::record::RECORD_DOMAIN, &bytes),
                bytes,
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
            let key = self.text()?;
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
        let name = self.text()?;
        self.expect_key("spec")?;
        let at = self.pos;
        let spec = self.item_value()?;
        self.spec_bytes.push(self.scratch.clone());
        let spec: StateMachine =
            serde_json::from_value(spec).map_err(|e| encoding(at, format!("spec: {e}")))?;
        self.expect_key("revision")?;
        let at = self.pos;
        let revision = u32::try_from(self.uint()?)
            .map_err(|_| encoding(at, "revision out of range".into()))?;
        self.expect_key("namespace")?;
        let namespace = self.text()?;
        Ok(SnapshotDefinition {
            namespace,
            name,
            revision,
            hash,
            spec,
        })
    }

    /// Reads exactly `buf.len()` bytes; the end of the input is "ends early".
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        match self.input.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len();
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(encoding(self.pos, "ends early".into()))
            }
            Err(e) => Err(io_error(e)),
        }
    }

    /// Reads one head; its bytes are also appended to `copy` when given.
    fn head_into(&mut self, copy: Option<&mut Vec<u8>>) -> Result<(u8, u64), SnapshotError> {
        let at = self.pos;
        let mut raw = [0u8; 9];
        self.fill(&mut raw[..1])?;
        let n_extra = match raw[0] & 0x1f {
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => 0,
        };
        self.fill(&mut raw[1..1 + n_extra])?;
        let (major, arg, _) =
            cbor::read_head(&raw[..1 + n_extra]).map_err(|e| cbor_error(at, e))?;
        if let Some(copy) = copy {
            copy.extend_from_slice(&raw[..1 + n_extra]);
        }
        Ok((major, arg))
    }

    fn head(&mut self) -> Result<(u8, u64), SnapshotError> {
        self.head_into(None)
    }

    /// Reads one whole data item into `self.scratch` (its exact bytes) and decodes it.
    fn item_value(&mut self) -> Result<Value, SnapshotError> {
        let at = self.pos;
        let mut raw = std::mem::take(&mut self.scratch);
        raw.clear();
        let copied = self.copy_item(&mut raw, at, 0);
        self.scratch = raw;
        copied?;
        let (value, len) = cbor::decode_prefix(&self.scratch).map_err(|e| cbor_error(at, e))?;
        if len != self.scratch.len() {
            return Err(encoding(
                at + len,
                "the item does not end where it should".into(),
            ));
        }
        Ok(value)
    }

    /// Copies one data item's bytes (heads and contents, nested items included) to `raw`.
    fn copy_item(
        &mut self,
        raw: &mut Vec<u8>,
        at: usize,
        depth: usize,
    ) -> Result<(), SnapshotError> {
        if depth > cbor::DEPTH_MAX {
            return Err(encoding(
                self.pos,
                format!("nesting deeper than {}", cbor::DEPTH_MAX),
            ));
        }
        let (major, arg) = self.head_into(Some(raw))?;
        match major {
            2 | 3 => self.read_into(raw, arg)?,
            4 | 5 => {
                let n_items = if major == 5 {
                    arg.saturating_mul(2)
                } else {
                    arg
                };
                for _ in 0..n_items {
                    self.copy_item(raw, at, depth + 1)?;
                }
            }
            6 => self.copy_item(raw, at, depth + 1)?,
            _ => {}
        }
        if raw.len() as u64 > ITEM_LEN_MAX {
            return Err(encoding(
                at,
                format!("an item longer than {ITEM_LEN_MAX} bytes"),
            ));
        }
        Ok(())
    }

    /// Appends `len` bytes of content to `out`, refusing lengths over [`ITEM_LEN_MAX`].
    fn read_into(&mut self, out: &mut Vec<u8>, len: u64) -> Result<(), SnapshotError> {
        let at = self.pos;
        if len > ITEM_LEN_MAX {
            return Err(encoding(
                at,
                format!("a length of {len} bytes is over the limit of {ITEM_LEN_MAX}"),
            ));
        }
        let start = out.len();
        // Grows with the bytes that really arrive, so a forged length costs nothing.
        let n_read = (&mut self.input)
            .take(len)
            .read_to_end(out)
            .map_err(io_error)?;
        self.pos += n_read;
        if (n_read as u64) < len {
            out.truncate(start);
            return Err(encoding(at, "ends early".into()));
        }
        Ok(())
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
        let len = self.expect(3, "a text string")?;
        let mut raw = std::mem::take(&mut self.scratch);
        raw.clear();
        let read = self.read_into(&mut raw, len);
        self.scratch = raw;
        read?;
        if self.scratch.as_slice() != key.as_bytes() {
            let found = String::from_utf8_lossy(&self.scratch);
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

    fn text(&mut self) -> Result<String, SnapshotError> {
        let at = self.pos;
        let len = self.expect(3, "a text string")?;
        let mut raw = Vec::new();
        self.read_into(&mut raw, len)?;
        String::from_utf8(raw).map_err(|_| encoding(at, "text is not UTF-8".into()))
    }

    fn byte_string(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let len = self.expect(2, "a byte string")?;
        let mut raw = Vec::with_capacity(len.min(64 * 1024) as usize);
        self.read_into(&mut raw, len)?;
        Ok(raw)
    }

    fn hash(&mut self) -> Result<Hash32, SnapshotError> {
        let at = self.pos;
        let text = self.text()?;
        Hash32::from_hex(&text).ok_or_else(|| encoding(at, "hash is not 64 hex digits".into()))
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

fn io_error(error: std::io::Error) -> SnapshotError {
    SnapshotError::Io(error.to_string())
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
