//! Streaming pieces: a writer that hashes what passes through it (export signs the digest),
//! and [`ImportSource`], which turns a payload being read into the items of
//! [`Store::import_stream`](cnsm_store::Store::import_stream), checking each instance on the
//! way and the definitions at the end, so an import never holds the whole snapshot.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
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
}

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
