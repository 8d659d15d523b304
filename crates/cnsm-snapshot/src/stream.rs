//! Streaming pieces: a writer that hashes what passes through it (export signs the digest),
//! and [`ImportSource`], which turns a payload being read into the items of
//! [`Store::import_stream`](cnsm_store::Store::import_stream), checking each instance on the
//! way and the definitions at the end, so an import never holds the whole snapshot.

use std::collections::BTreeSet;
use std::io::{BufRead, Read, Write};
use std::sync::{Arc, Mutex};

use cnsm_core::snapshot::{PinnedRevision, SnapshotReader, check_pins, pin_of, verify_instance};
use cnsm_store::{DefinitionRow, ImportItem, StoreError};
use sha2::{Digest, Sha256};

use crate::VerifyError;

/// Passes bytes to `inner` while hashing (SHA-256) and counting them.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    n_bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> HashingWriter<W> {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            n_bytes: 0,
        }
    }

    /// The SHA-256 and the length of everything written, and the inner writer.
    pub fn finish(self) -> ([u8; 32], u64, W) {
        (self.hasher.finalize().into(), self.n_bytes, self.inner)
    }

    /// The inner writer.
    pub fn inner_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..n]);
        self.n_bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads from `inner` while hashing (SHA-256) and counting the bytes consumed, through
/// [`Read`] or [`BufRead`] alike: an import checks the payload's digest in the same pass
/// that decodes it ([`ImportSource::open_signed`]).
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    n_bytes: u64,
}

impl<R: BufRead> HashingReader<R> {
    pub fn new(inner: R) -> HashingReader<R> {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            n_bytes: 0,
        }
    }

    /// The SHA-256 and the length of everything consumed so far.
    pub fn digest(&self) -> ([u8; 32], u64) {
        (self.hasher.clone().finalize().into(), self.n_bytes)
    }
}

impl<R: BufRead> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n_bytes += n as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for HashingReader<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        // The bytes being consumed are the front of the buffer `fill_buf` returned; asking
        // for it again does no I/O while it holds them.
        if let Ok(buffered) = self.inner.fill_buf() {
            let n = amount.min(buffered.len());
            self.hasher.update(&buffered[..n]);
            self.n_bytes += n as u64;
        }
        self.inner.consume(amount);
    }
}

/// Why a streamed import stopped on the snapshot's side (the store then wrote nothing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImportFailure {
    /// The payload failed a verification step while it was read.
    #[error("the snapshot does not verify: {0}")]
    Verify(VerifyError),
    /// The snapshot holds something outside the namespace of the import.
    #[error("{0}")]
    Namespace(String),
}

/// The items of a verified payload, read one instance at a time, for
/// [`Store::import_stream`](cnsm_store::Store::import_stream). Each instance is checked
/// (step 5, and that it lies in the import's namespace) before it is handed over; after the
/// last one the definitions and pins are checked (step 6). A failure ends the stream with an
/// error, so the store writes nothing; [`ImportSource::failure`] tells what it was.
pub struct ImportSource<R> {
    reader: SnapshotReader<R>,
    namespace: String,
    pins: BTreeSet<PinnedRevision>,
    n_done: u64,
    finished: bool,
    failure: Arc<Mutex<Option<ImportFailure>>>,
    progress: Box<dyn FnMut(u64, u64) + Send>,
    /// Steps 2-3 on the input once the document ended ([`ImportSource::open_signed`]).
    signature_check: Option<SignatureCheck<R>>,
}

type SignatureCheck<R> = Box<dyn FnOnce(&R) -> Result<(), VerifyError> + Send>;

impl<R> std::fmt::Debug for ImportSource<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportSource")
            .field("namespace", &self.namespace)
            .field("n_done", &self.n_done)
            .finish_non_exhaustive()
    }
}

impl<R: BufRead> ImportSource<R> {
    /// Opens the payload (its head and definitions) for an import into `namespace`. Returns
    /// the source and the definition rows to import first (created at `asOf`).
    pub fn open(
        payload: R,
        namespace: &str,
        progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> Result<(ImportSource<R>, Vec<DefinitionRow>), ImportFailure> {
        let reader =
            SnapshotReader::from_reader(payload).map_err(|e| ImportFailure::Verify(e.into()))?;
        let as_of_ms = reader.as_of_ms();
        if let Some(d) = reader
            .definitions()
            .iter()
            .find(|d| d.namespace != namespace)
        {
            return Err(ImportFailure::Namespace(outside(
                &format!("definition {}/{}", d.namespace, d.name),
                namespace,
            )));
        }
        let definitions = reader
            .definitions()
            .iter()
            .map(|d| DefinitionRow {
                namespace: d.namespace.clone(),
                name: d.name.clone(),
                revision: d.revision,
                hash: d.hash,
                definition: d.spec.clone(),
                created_ms: as_of_ms,
            })
            .collect();
        Ok((
            ImportSource {
                reader,
                namespace: namespace.to_owned(),
                pins: BTreeSet::new(),
                n_done: 0,
                finished: false,
                failure: Arc::new(Mutex::new(None)),
                progress,
                signature_check: None,
            },
            definitions,
        ))
    }

    /// A handle on the failure that ended the stream, readable after the source was moved
    /// into the store call (or onto the committer thread).
    pub fn failure(&self) -> Arc<Mutex<Option<ImportFailure>>> {
        self.failure.clone()
    }

    fn fail(&mut self, failure: ImportFailure) -> Option<Result<ImportItem, StoreError>> {
        self.finished = true;
        let message = format!("import refused: {failure}");
        if let Ok(mut slot) = self.failure.lock() {
            *slot = Some(failure);
        }
        Some(Err(StoreError::Refused(message)))
    }
}

impl<R: BufRead> ImportSource<HashingReader<R>> {
    /// [`ImportSource::open`] over a signed payload, checking its signature in the same pass
    /// that decodes it: the bundle's structure now (step 1), the payload's digest and the
    /// signature against `public_key` (steps 2-3) once the last byte was read, before the
    /// definitions (step 6) and before the stream ends. A store writes the items as they come
    /// but commits only after the stream ended without an error, so a payload whose digest or
    /// signature fails imports nothing; the one read of the file serves every step.
    ///
    /// The order of the errors differs from [`crate::files::verify_file`]'s when a payload
    /// fails several steps (here decoding runs before the digest is known): a caller that
    /// must name the first failing step runs `verify_file` after a failure.
    pub fn open_signed(
        payload: R,
        bundle_json: &[u8],
        public_key: &crate::PublicKey,
        namespace: &str,
        progress: Box<dyn FnMut(u64, u64) + Send>,
    ) -> Result<(ImportSource<HashingReader<R>>, Vec<DefinitionRow>), ImportFailure> {
        let parsed = crate::bundle::parse(bundle_json)
            .map_err(|e| ImportFailure::Verify(VerifyError::Bundle(e)))?;
        let public_key = public_key.clone();
        let (mut source, definitions) =
            ImportSource::open(HashingReader::new(payload), namespace, progress)?;
        source.signature_check = Some(Box::new(move |input: &HashingReader<R>| {
            let (digest, _) = input.digest();
            crate::check_digest_and_signature(&parsed, &digest, &public_key)
        }));
        Ok((source, definitions))
    }
}

impl<R: BufRead> Iterator for ImportSource<R> {
    type Item = Result<ImportItem, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let entry = match self.reader.next_instance() {
            Ok(Some(entry)) => entry,
            Ok(None) => {
                self.finished = true;
                let n_total = self.reader.n_instances();
                (self.progress)(self.n_done, n_total);
                // The whole payload has been read (and hashed): digest and signature first,
                // then the definitions, the order of `verify`.
                if let Some(check) = self.signature_check.take()
                    && let Err(e) = check(self.reader.input())
                {
                    return self.fail(ImportFailure::Verify(e));
                }
                let checked = self
                    .reader
                    .check_definitions()
                    .and_then(|()| check_pins(self.reader.definitions(), &self.pins));
                return match checked {
                    Ok(()) => None,
                    Err(e) => self.fail(ImportFailure::Verify(e.into())),
                };
            }
            Err(e) => return self.fail(ImportFailure::Verify(e.into())),
        };
        if let Err(e) = verify_instance(&entry) {
            return self.fail(ImportFailure::Verify(e.into()));
        }
        if *entry.instance.namespace != *self.namespace {
            let what = format!(
                "instance {}/{}",
                entry.instance.namespace, entry.instance.id
            );
            return self.fail(ImportFailure::Namespace(outside(&what, &self.namespace)));
        }
        self.pins.insert(pin_of(&entry));
        self.n_done += 1;
        if self.n_done.is_multiple_of(1000) {
            (self.progress)(self.n_done, self.reader.n_instances());
        }
        Some(Ok(crate::import_item(entry)))
    }
}

pub(crate) fn outside(what: &str, namespace: &str) -> String {
    format!(
        "the snapshot holds {what}, outside namespace {namespace}; import it into its own namespace"
    )
}
