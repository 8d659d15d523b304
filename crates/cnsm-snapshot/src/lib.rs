//! Signed portable snapshots (DESIGN.md §7, `docs/snapshots.md`): export instances with their
//! full history from a [`Store`] into the deterministic CBOR payload of
//! [`cnsm_core::snapshot`], sign it as a Sigstore bundle ([`bundle`]), verify a snapshot in a
//! fixed order with one error per step ([`VerifyError`]), and turn a verified payload into the
//! [`ImportItem`]s of [`Store::import_stream`] ([`ImportSource`]) or
//! [`Store::import_instances`] ([`plan_import`]).
//!
//! Everything streams: [`export_to`] writes to any `Write`, the signature is made over the
//! SHA-256 computed on the way ([`files::SignedOutput`]), [`files::verify_file`] reads a file
//! in two passes, and [`ImportSource`] hands the store one instance at a time, so no side holds
//! a whole snapshot (`docs/snapshots.md`, "Streaming and memory"). The in-memory forms
//! ([`SnapshotFile`], [`export`], [`verify`], [`plan_import`]) remain for small snapshots and
//! tests.
//!
//! ```
//! use cnsm_snapshot::{SigningKey, SnapshotFile, verify};
//! let key = SigningKey::generate().unwrap();
//! let payload = cnsm_snapshot::empty_payload(1_700_000_000_000);
//! let file = SnapshotFile::sign(&key, payload).unwrap();
//! let bytes = file.to_bytes();
//! let file = SnapshotFile::from_bytes(&bytes).unwrap();
//! let summary = verify(&file, &key.public_key()).unwrap();
//! assert_eq!(summary.n_instances, 0);
//! ```

use std::collections::BTreeSet;
use std::io::{BufRead, Read, Write};

use cnsm_core::Instance;
use cnsm_core::record::{Hash32, SealedRecord};
use cnsm_core::snapshot::{
    PinnedRevision, SnapshotDefinition, SnapshotError, SnapshotIdempotency, SnapshotReader,
    SnapshotWriter, check_pins, pin_of, verify_instance,
};
use cnsm_store::{
    DefinitionRow, IdempotencyEntry, ImportItem, InstanceQuery, PAGE_LEN_MAX, Store, StoreError,
};
use sha2::{Digest, Sha256};

pub mod bundle;
pub mod files;
pub mod keys;
mod stream;

pub use stream::{HashingReader, HashingWriter, ImportFailure, ImportSource};

pub use keys::{KeyError, PublicKey, SigningKey};

/// The first line of a one-file snapshot.
pub const FILE_MAGIC: &[u8] = b"cnsm-snapshot v1\n";

/// A snapshot as it travels: the bundle JSON and the CBOR payload it signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    pub bundle_json: Vec<u8>,
    pub payload: Vec<u8>,
}

impl SnapshotFile {
    /// Signs a payload.
    pub fn sign(key: &SigningKey, payload: Vec<u8>) -> Result<SnapshotFile, KeyError> {
        let bundle_json = bundle::sign(key, &payload)?.into_bytes();
        Ok(SnapshotFile {
            bundle_json,
            payload,
        })
    }

    /// The one-file layout: [`FILE_MAGIC`], the bundle JSON on one line, a newline, then the
    /// payload bytes to the end of the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(FILE_MAGIC.len() + self.bundle_json.len() + 1 + self.payload.len());
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&self.bundle_json);
        out.push(b'\n');
        out.extend_from_slice(&self.payload);
        out
    }

    /// Splits a one-file snapshot; a missing magic line or bundle line is a
    /// [`VerifyError::Bundle`] (step 1).
    pub fn from_bytes(bytes: &[u8]) -> Result<SnapshotFile, VerifyError> {
        let (bundle_json, payload_at) = split_head(bytes)?;
        Ok(SnapshotFile {
            bundle_json: bundle_json.to_vec(),
            payload: bytes[payload_at..].to_vec(),
        })
    }
}

/// The head of a one-file snapshot: the bundle JSON, and where the payload starts. A missing
/// magic line or an unterminated bundle line is a [`VerifyError::Bundle`] (step 1). The bundle
/// line may end in spaces (a streamed export reserves room for the longest bundle before it
/// writes the payload); they are not part of the bundle JSON, and the JSON must end right
/// before them, so no other byte of the line goes unchecked.
pub(crate) fn split_head(head: &[u8]) -> Result<(&[u8], usize), VerifyError> {
    let rest = head.strip_prefix(FILE_MAGIC).ok_or_else(|| {
        VerifyError::Bundle(
            "not a one-file cnsm snapshot (no `cnsm-snapshot v1` first line); \
             for a detached bundle pass --bundle"
                .into(),
        )
    })?;
    let end = rest
        .iter()
        .take(bundle::BUNDLE_LEN_MAX + 1)
        .position(|b| *b == b'\n')
        .ok_or_else(|| VerifyError::Bundle("the bundle line is not terminated".into()))?;
    let line = &rest[..end];
    let json_len = line.len() - line.iter().rev().take_while(|b| **b == b' ').count();
    let json = &line[..json_len];
    if json.last() != Some(&b'}') {
        return Err(VerifyError::Bundle(
            "the bundle line does not end with the bundle's closing brace".into(),
        ));
    }
    Ok((json, FILE_MAGIC.len() + end + 1))
}

/// A snapshot entry as the store imports it.
pub(crate) fn import_item(entry: cnsm_core::snapshot::SnapshotInstance) -> ImportItem {
    ImportItem {
        instance: entry.instance,
        records: entry.records,
        idempotency: entry
            .idempotency
            .into_iter()
            .map(|k| IdempotencyEntry {
                key: k.key,
                request_hash: k.request_hash,
                version: k.version,
                expires_ms: k.expires_ms,
            })
            .collect(),
    }
}

/// Why a snapshot was rejected, one variant per verification step, in the order they run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Step 1: the file layout or the bundle's structure or media type.
    #[error("bundle: {0}")]
    Bundle(String),
    /// Step 2: the payload's SHA-256 is not the bundle's digest (changed or truncated).
    #[error("digest: the payload's SHA-256 is {actual}, the bundle says {expected}")]
    Digest { expected: String, actual: String },
    /// Step 3: the signature does not verify against the given public key.
    #[error("signature: {0}")]
    Signature(String),
    /// Step 4: the payload is not core deterministic CBOR of the snapshot schema.
    #[error("encoding: {0}")]
    Encoding(SnapshotError),
    /// Step 4: a snapshot format version this binary does not read.
    #[error("format: {0}")]
    Format(SnapshotError),
    /// Step 5: an instance's hash chain or version continuity.
    #[error("chain: {0}")]
    Chain(SnapshotError),
    /// Step 6: a definition's content hash, or a pinned revision the snapshot lacks.
    #[error("definition: {0}")]
    Definition(SnapshotError),
    /// The snapshot could not be read (a file or stream error, not a verdict on its bytes).
    #[error("cannot read the snapshot: {0}")]
    Io(String),
}

impl From<SnapshotError> for VerifyError {
    fn from(error: SnapshotError) -> VerifyError {
        match error {
            SnapshotError::UnsupportedFormat { .. } => VerifyError::Format(error),
            SnapshotError::Chain { .. } => VerifyError::Chain(error),
            SnapshotError::Definition { .. } => VerifyError::Definition(error),
            SnapshotError::Io(detail) => VerifyError::Io(detail),
            other => VerifyError::Encoding(other),
        }
    }
}

/// What a verified snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub as_of_ms: u64,
    pub n_definitions: u64,
    pub n_instances: u64,
    pub n_records: u64,
    pub payload_len: u64,
    /// The signer's key hint (empty when only the payload was checked).
    pub key_hint: String,
}

/// Steps 1-3: bundle structure and media type, digest, signature against `public_key`.
pub fn verify_signature(file: &SnapshotFile, public_key: &PublicKey) -> Result<(), VerifyError> {
    verify_signature_from(&file.bundle_json, &mut file.payload.as_slice(), public_key).map(|_| ())
}

/// Steps 1-3 over a payload that streams past: the bundle is checked first (step 1), then the
/// payload is hashed in one pass (step 2) and the signature checked against that digest
/// (step 3, ECDSA over the SHA-256 of the payload). Returns the payload's length.
pub fn verify_signature_from(
    bundle_json: &[u8],
    payload: &mut dyn Read,
    public_key: &PublicKey,
) -> Result<u64, VerifyError> {
    let parsed = bundle::parse(bundle_json).map_err(VerifyError::Bundle)?;
    let mut hashing = HashingWriter::new(std::io::sink());
    std::io::copy(payload, &mut hashing).map_err(|e| VerifyError::Io(e.to_string()))?;
    let (actual, payload_len, _) = hashing.finish();
    check_digest_and_signature(&parsed, &actual, public_key)?;
    Ok(payload_len)
}

/// Steps 2 and 3 once the payload's SHA-256 (`actual`) is known: it must be the bundle's
/// digest, and the bundle's signature must verify against `public_key`.
pub(crate) fn check_digest_and_signature(
    parsed: &bundle::Bundle,
    actual: &[u8; 32],
    public_key: &PublicKey,
) -> Result<(), VerifyError> {
    if *actual != parsed.digest {
        return Err(VerifyError::Digest {
            expected: hex(&parsed.digest),
            actual: hex(actual),
        });
    }
    if parsed.hint != public_key.hint() {
        return Err(VerifyError::Signature(format!(
            "signed by key {}, not by the given public key {}",
            short(&parsed.hint),
            short(&public_key.hint())
        )));
    }
    if !public_key.verify_digest(actual, &parsed.signature) {
        return Err(VerifyError::Signature(
            "the signature does not verify against the given public key".into(),
        ));
    }
    Ok(())
}

/// All six steps, in order (`docs/snapshots.md`).
pub fn verify(file: &SnapshotFile, public_key: &PublicKey) -> Result<Summary, VerifyError> {
    verify_signature(file, public_key)?;
    let mut summary = verify_payload(&file.payload)?;
    summary.key_hint = public_key.hint();
    Ok(summary)
}

/// Steps 4-6 on a payload alone (the server's check of an uploaded payload; the client checked
/// the signature).
pub fn verify_payload(payload: &[u8]) -> Result<Summary, VerifyError> {
    verify_payload_from(payload, &mut |_, _| {})
}

/// [`verify_payload`] over a payload that streams past (one instance in memory at a time).
pub fn verify_payload_from(
    payload: impl BufRead,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary, VerifyError> {
    read_payload(payload, &mut |_| Ok(()), progress).map(|(summary, _)| summary)
}

/// A payload holding no instance (for examples and tests).
pub fn empty_payload(as_of_ms: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let writer = SnapshotWriter::begin(&mut out, as_of_ms, &[], 0);
    let _ = writer.finish();
    out
}

/// Walks a payload: steps 4 (while reading), 5 (each instance), 6 (definitions, pins), handing
/// each verified instance to `visit`. Returns the summary and the definitions.
fn read_payload(
    payload: impl BufRead,
    visit: &mut dyn FnMut(cnsm_core::snapshot::SnapshotInstance) -> Result<(), VerifyError>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Summary, Vec<SnapshotDefinition>), VerifyError> {
    let mut reader = SnapshotReader::from_reader(payload)?;
    let mut summary = Summary {
        as_of_ms: reader.as_of_ms(),
        n_definitions: reader.definitions().len() as u64,
        ..Summary::default()
    };
    let n_total = reader.n_instances();
    // Step 4 must hold for the whole payload before step 5 reports anything: read everything
    // first when a chain breaks, so an encoding problem later in the file wins.
    let mut chain_error: Option<VerifyError> = None;
    let mut pins: BTreeSet<PinnedRevision> = BTreeSet::new();
    while let Some(entry) = reader.next_instance()? {
        summary.n_instances += 1;
        summary.n_records += entry.records.len() as u64;
        if chain_error.is_some() {
            continue;
        }
        if let Err(e) = verify_instance(&entry) {
            chain_error = Some(e.into());
            continue;
        }
        pins.insert(pin_of(&entry));
        visit(entry)?;
        if summary.n_instances.is_multiple_of(1000) {
            progress(summary.n_instances, n_total);
        }
    }
    progress(summary.n_instances, n_total);
    if let Some(error) = chain_error {
        return Err(error);
    }
    summary.payload_len = reader.position();
    reader.check_definitions()?;
    check_pins(reader.definitions(), &pins)?;
    Ok((summary, reader.definitions().to_vec()))
}

/// A verified payload as the store imports it.
#[derive(Debug, Clone)]
pub struct ImportPlan {
    pub summary: Summary,
    pub definitions: Vec<DefinitionRow>,
    pub items: Vec<ImportItem>,
}

/// Checks steps 4-6 of a payload and converts it for [`Store::import_instances`]. Definition
/// rows get `as_of` as their creation time (snapshots do not carry it).
pub fn plan_import(
    payload: &[u8],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportPlan, VerifyError> {
    let mut items = Vec::new();
    let (summary, definitions) = read_payload(
        payload,
        &mut |entry| {
            items.push(import_item(entry));
            Ok(())
        },
        progress,
    )?;
    let definitions = definitions
        .into_iter()
        .map(|d| DefinitionRow {
            namespace: d.namespace,
            name: d.name,
            revision: d.revision,
            hash: d.hash,
            definition: d.spec,
            created_ms: summary.as_of_ms,
        })
        .collect();
    Ok(ImportPlan {
        summary,
        definitions,
        items,
    })
}

/// Instances (with their histories) an export reads per store call.
const EXPORT_PAGE_LEN: usize = 250;
/// Pages an export reads ahead of the one it writes (memory: this many pages, the one being
/// written and the one being read; a page of 250 instances of 10 records of 500 bytes is
/// about 1.5 MB).
const EXPORT_PAGES_AHEAD: usize = 2;

/// Which instances of a namespace an export takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    All,
    Instance(String),
    /// Every pair must match a label.
    Labels(Vec<(String, String)>),
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("instance {0} not found")]
    NotFound(String),
    /// Something changed under the export (an instance moved to a revision that was not
    /// collected): run it again.
    #[error("{0}; run the export again")]
    Changed(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Exports the selected instances of `namespace` as a snapshot payload taken `as_of_ms`.
///
/// Memory: the payload itself plus one instance at a time (instances are listed by key first,
/// then read and written one by one). Each instance is read consistently (its row, then its
/// records up to the row's version). `progress(done, total)` is called every 1000 instances
/// and at the end.
pub fn export(
    store: &dyn Store,
    namespace: &str,
    selection: &Selection,
    as_of_ms: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<u8>, ExportError> {
    let mut out = Vec::with_capacity(1 << 20);
    export_to(store, namespace, selection, as_of_ms, &mut out, progress)?;
    Ok(out)
}

/// [`export`] written to `out` as it is produced: memory is a few pages of instances plus the
/// writer's buffer, whatever the size of the snapshot. Returns the payload's length.
///
/// For a selection of many instances, every store read (the listing by key, then the pages of
/// instances with their histories, up to two pages ahead) runs on one second
/// thread, so reading and decoding rows overlap with encoding, hashing and writing here, and
/// the pages the store caches are allocated by one thread only.
pub fn export_to(
    store: &dyn Store,
    namespace: &str,
    selection: &Selection,
    as_of_ms: u64,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, ExportError> {
    std::thread::scope(|scope| {
        let reader = match selection {
            Selection::Instance(_) => None,
            Selection::All | Selection::Labels(_) => {
                let (sender, receiver) = std::sync::mpsc::sync_channel(EXPORT_PAGES_AHEAD);
                let thread = std::thread::Builder::new()
                    .name("cnsm-export-read".into())
                    .spawn_scoped(scope, move || {
                        read_selection(store, namespace, selection, &sender)
                    })
                    .map_err(|e| {
                        ExportError::Store(StoreError::Io(format!(
                            "cannot start the export reader: {e}"
                        )))
                    })?;
                Some((receiver, thread))
            }
        };
        let stopped =
            || ExportError::Store(StoreError::Io("the export reader stopped early".into()));
        let mut out = HashingWriter::new(out);
        let mut keys: Vec<String> = Vec::new();
        let mut pins: BTreeSet<(String, u32)> = BTreeSet::new();
        match (selection, &reader) {
            (Selection::Instance(id), _) => {
                let stored = store
                    .instance(namespace, id)?
                    .ok_or_else(|| ExportError::NotFound(format!("{namespace}/{id}")))?;
                pins.insert((
                    stored.instance.machine.to_string(),
                    stored.instance.revision,
                ));
                keys.push(id.clone());
            }
            (_, Some((receiver, _))) => match receiver.recv() {
                Ok(Ok(SelectionRead::Listed(listed_keys, listed_pins))) => {
                    (keys, pins) = (listed_keys, listed_pins);
                }
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(SelectionRead::Page(_))) | Err(_) => return Err(stopped()),
            },
            (_, None) => return Err(stopped()),
        }
        let mut definitions = Vec::with_capacity(pins.len());
        for (name, revision) in &pins {
            let row = store
                .definition(namespace, name, Some(*revision))?
                .ok_or_else(|| {
                    ExportError::Changed(format!(
                        "definition {namespace}/{name}@{revision} is not in the store"
                    ))
                })?;
            definitions.push(SnapshotDefinition {
                namespace: row.namespace,
                name: row.name,
                revision: row.revision,
                hash: row.hash,
                spec: row.definition,
            });
        }

        let n_total = keys.len() as u64;
        let mut writer = SnapshotWriter::begin(&mut out, as_of_ms, &definitions, n_total);
        let mut n_written = 0u64;
        let mut write_one = |writer: &mut SnapshotWriter<&mut HashingWriter<&mut dyn Write>>,
                             instance: &Instance,
                             records: &[SealedRecord]|
         -> Result<(), ExportError> {
            write_instance(store, writer, instance, records, &definitions, as_of_ms)?;
            n_written += 1;
            if n_written.is_multiple_of(1000) {
                progress(n_written, n_total);
            }
            Ok(())
        };
        match (selection, reader) {
            (Selection::Instance(id), _) => {
                let instance = store
                    .instance(namespace, id)?
                    .ok_or_else(|| {
                        ExportError::Changed(format!("instance {namespace}/{id} vanished"))
                    })?
                    .instance;
                let mut records: Vec<SealedRecord> = Vec::new();
                while (records.len() as u64) <= instance.version {
                    let from = records.len() as u64;
                    let want = (instance.version + 1 - from).min(PAGE_LEN_MAX as u64) as usize;
                    let page = store.history(namespace, id, from, want)?;
                    if page.is_empty() {
                        return Err(ExportError::Store(StoreError::Corrupt(format!(
                            "instance {namespace}/{id}: record {from} is missing"
                        ))));
                    }
                    records.extend(page);
                }
                records.truncate(instance.version as usize + 1);
                write_one(&mut writer, &instance, &records)?;
            }
            (_, Some((receiver, thread))) => {
                // Second pass over the same pages: the listed rows are the instances to write
                // (no read per instance); ones created since the first pass are left out.
                let mut next_key = keys.iter().peekable();
                for page in receiver.iter() {
                    let SelectionRead::Page(page) = page? else {
                        return Err(stopped());
                    };
                    for (stored, records) in &page {
                        let id = &*stored.instance.id;
                        if let Some(wanted) = next_key.peek()
                            && wanted.as_str() < id
                        {
                            return Err(ExportError::Changed(format!(
                                "instance {namespace}/{wanted} left the selection during the export"
                            )));
                        }
                        if next_key.peek().is_some_and(|wanted| wanted.as_str() == id) {
                            next_key.next();
                            write_one(&mut writer, &stored.instance, records)?;
                        }
                    }
                }
                thread.join().map_err(|_| stopped())?;
                if let Some(wanted) = next_key.next() {
                    return Err(ExportError::Changed(format!(
                        "instance {namespace}/{wanted} left the selection during the export"
                    )));
                }
            }
            (_, None) => return Err(stopped()),
        }
        writer.finish()?;
        progress(n_total, n_total);
        Ok(out.finish().1)
    })
}

/// What the export's reading thread hands over: first the selected keys and the revisions
/// they pin, then the pages of instances with their histories.
enum SelectionRead {
    Listed(Vec<String>, BTreeSet<(String, u32)>),
    Page(Vec<(cnsm_store::StoredInstance, Vec<SealedRecord>)>),
}

/// The export's reading thread: the instances of the selection by key (to count them and
/// collect their pins), then the same instances again a page at a time with their
/// histories. Stops at the first error (handed over) or when the writer hung up.
fn read_selection(
    store: &dyn Store,
    namespace: &str,
    selection: &Selection,
    sender: &std::sync::mpsc::SyncSender<Result<SelectionRead, StoreError>>,
) {
    let labels = labels_of(selection);
    let mut keys: Vec<String> = Vec::new();
    let mut pins: BTreeSet<(String, u32)> = BTreeSet::new();
    let mut after = None;
    loop {
        let page = match store.list_instances(&InstanceQuery {
            namespace: Some(namespace.to_owned()),
            labels: labels.clone(),
            after: after.take(),
            limit: PAGE_LEN_MAX,
            ..InstanceQuery::default()
        }) {
            Ok(page) => page,
            Err(e) => {
                let _ = sender.send(Err(e));
                return;
            }
        };
        let full = page.len() == PAGE_LEN_MAX;
        for stored in &page {
            pins.insert((
                stored.instance.machine.to_string(),
                stored.instance.revision,
            ));
            keys.push(stored.instance.id.to_string());
        }
        match page.last() {
            Some(last) if full => {
                after = Some((namespace.to_owned(), last.instance.id.to_string()));
            }
            _ => break,
        }
    }
    if sender.send(Ok(SelectionRead::Listed(keys, pins))).is_err() {
        return;
    }
    let mut after = None;
    loop {
        let page = store.list_instances_with_history(&InstanceQuery {
            namespace: Some(namespace.to_owned()),
            labels: labels.clone(),
            after: after.take(),
            limit: EXPORT_PAGE_LEN,
            ..InstanceQuery::default()
        });
        let next = match &page {
            Ok(page) if page.len() == EXPORT_PAGE_LEN => {
                page.last().map(|(last, _)| last.instance.id.to_string())
            }
            _ => None,
        };
        if sender.send(page.map(SelectionRead::Page)).is_err() {
            return;
        }
        match next {
            Some(id) => after = Some((namespace.to_owned(), id)),
            None => return,
        }
    }
}

fn labels_of(selection: &Selection) -> Vec<(String, String)> {
    match selection {
        Selection::Labels(labels) => labels.clone(),
        _ => Vec::new(),
    }
}

/// The CBOR text `idempotencyKey` (head 0x6e: a text of 14 bytes), as a record's map holds
/// the key.
const IDEMPOTENCY_KEY_NAME: &[u8] = b"\x6eidempotencyKey";

/// Writes one instance with its records `0..=version` and its live idempotency keys.
fn write_instance<W: Write>(
    store: &dyn Store,
    writer: &mut SnapshotWriter<W>,
    instance: &Instance,
    records: &[SealedRecord],
    definitions: &[SnapshotDefinition],
    as_of_ms: u64,
) -> Result<(), ExportError> {
    let (namespace, id) = (&*instance.namespace, &*instance.id);
    let pinned = definitions.iter().any(|d| {
        d.name == *instance.machine
            && d.revision == instance.revision
            && d.hash == instance.revision_hash
    });
    if !pinned {
        return Err(ExportError::Changed(format!(
            "instance {namespace}/{id} moved to {}@{} during the export",
            instance.machine, instance.revision
        )));
    }
    if records.len() as u64 != instance.version + 1 {
        return Err(ExportError::Store(StoreError::Corrupt(format!(
            "instance {namespace}/{id}: {} records for version {}",
            records.len(),
            instance.version
        ))));
    }
    let mut idempotency: Vec<SnapshotIdempotency> = Vec::new();
    // Most records carry no key: their bytes do not even hold the key's encoded name, which a
    // vectorized search tells without decoding them.
    let key_name = memchr::memmem::Finder::new(IDEMPOTENCY_KEY_NAME);
    for record in records {
        if key_name.find(&record.bytes).is_none() {
            continue;
        }
        let fields =
            cnsm_core::cbor::top_level_texts(&record.bytes, &["idempotencyKey"]).map_err(|e| {
                StoreError::Corrupt(format!(
                    "instance {namespace}/{id} record {}: {e}",
                    record.version
                ))
            })?;
        if let Some(key) = fields[0]
            && !idempotency.iter().any(|k| k.key == key)
            && let Some(entry) = store.idempotency(namespace, id, key)?
            && entry.expires_ms > as_of_ms
            && entry.version <= instance.version
        {
            idempotency.push(SnapshotIdempotency {
                key: entry.key,
                request_hash: entry.request_hash,
                version: entry.version,
                expires_ms: entry.expires_ms,
            });
        }
    }
    writer.write_instance(instance, records, &idempotency)?;
    Ok(())
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn short(hint: &str) -> &str {
    hint.get(..16).unwrap_or(hint)
}

/// The digest the bundle of a payload carries (for reports).
pub fn payload_digest(payload: &[u8]) -> Hash32 {
    Hash32(Sha256::digest(payload).into())
}

impl ImportPlan {
    /// Refuses a plan that holds anything outside `namespace` (an import into a namespace
    /// must not write elsewhere: access is granted per namespace).
    pub fn check_namespace(&self, namespace: &str) -> Result<(), String> {
        let outside = self
            .definitions
            .iter()
            .map(|d| {
                (
                    d.namespace.as_str(),
                    format!("definition {}/{}", d.namespace, d.name),
                )
            })
            .chain(self.items.iter().map(|i| {
                (
                    &*i.instance.namespace,
                    format!("instance {}/{}", i.instance.namespace, i.instance.id),
                )
            }))
            .find(|(ns, _)| *ns != namespace);
        match outside {
            Some((_, what)) => Err(format!(
                "the snapshot holds {what}, outside namespace {namespace}; import it into its own namespace"
            )),
            None => Ok(()),
        }
    }
}
