//! Snapshot files on disk, streamed: reading the layout of `docs/snapshots.md` (one file, or a
//! payload with a detached bundle) without loading the payload, and [`SignedOutput`], which
//! spools an export to a temporary file while hashing it, signs the digest, and puts the
//! result in place atomically (fsync, rename); nothing is left behind on error.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{FILE_MAGIC, HashingWriter, KeyError, SigningKey, VerifyError, bundle};

/// Buffer size of file readers and writers.
const FILE_BUFFER_LEN: usize = 1 << 20;

/// A snapshot on disk: where its bundle is and where its payload starts.
#[derive(Debug, Clone)]
pub struct SnapshotPaths {
    pub bundle_json: Vec<u8>,
    pub payload_path: PathBuf,
    /// The payload runs from this offset to the end of the file.
    pub payload_offset: u64,
}

impl SnapshotPaths {
    /// Reads the layout: with `bundle`, `path` is the bare payload; without, `path` is a
    /// one-file snapshot whose magic and bundle lines are read here (step 1 on the layout).
    pub fn open(path: &Path, bundle: Option<&Path>) -> Result<SnapshotPaths, VerifyError> {
        let cannot = |p: &Path, e: std::io::Error| {
            VerifyError::Io(format!("cannot read {}: {e}", p.display()))
        };
        if let Some(bundle_path) = bundle {
            let mut bundle_json = Vec::new();
            File::open(bundle_path)
                .and_then(|f| {
                    f.take(bundle::BUNDLE_LEN_MAX as u64 + 1)
                        .read_to_end(&mut bundle_json)
                })
                .map_err(|e| cannot(bundle_path, e))?;
            File::open(path).map_err(|e| cannot(path, e))?;
            return Ok(SnapshotPaths {
                bundle_json,
                payload_path: path.to_owned(),
                payload_offset: 0,
            });
        }
        let file = File::open(path).map_err(|e| cannot(path, e))?;
        let mut head = Vec::new();
        file.take((FILE_MAGIC.len() + bundle::BUNDLE_LEN_MAX + 1) as u64)
            .read_to_end(&mut head)
            .map_err(|e| cannot(path, e))?;
        let (bundle_json, payload_at) = crate::split_head(&head)?;
        Ok(SnapshotPaths {
            bundle_json: bundle_json.to_vec(),
            payload_path: path.to_owned(),
            payload_offset: payload_at as u64,
        })
    }

    /// A buffered reader over the payload.
    pub fn payload(&self) -> Result<BufReader<File>, VerifyError> {
        let mut file = File::open(&self.payload_path).map_err(|e| {
            VerifyError::Io(format!("cannot read {}: {e}", self.payload_path.display()))
        })?;
        file.seek(SeekFrom::Start(self.payload_offset))
            .map_err(|e| VerifyError::Io(e.to_string()))?;
        Ok(BufReader::with_capacity(FILE_BUFFER_LEN, file))
    }
}

/// All six steps over a snapshot on disk, in two streaming passes: the digest and signature
/// (steps 1-3), then encoding, chains and definitions (steps 4-6).
pub fn verify_file(
    paths: &SnapshotPaths,
    public_key: &crate::PublicKey,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<crate::Summary, VerifyError> {
    crate::verify_signature_from(&paths.bundle_json, &mut paths.payload()?, public_key)?;
    let mut summary = crate::verify_payload_from(paths.payload()?, progress)?;
    summary.key_hint = public_key.hint();
    Ok(summary)
}

/// Where an export goes: the payload is written (and hashed) to a temporary file beside the
/// output; [`SignedOutput::finish`] signs the digest and puts the file(s) in place. Dropped
/// unfinished, it removes its temporary files.
#[derive(Debug)]
pub struct SignedOutput {
    output: PathBuf,
    bundle: Option<PathBuf>,
    spool_path: PathBuf,
    spool: Option<HashingWriter<std::io::BufWriter<File>>>,
    temporaries: Vec<PathBuf>,
}

/// What [`SignedOutput::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub payload_len: u64,
    pub digest: [u8; 32],
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

impl SignedOutput {
    /// Creates the spool file beside `output` (same directory, so the rename stays on one
    /// file system).
    pub fn create(output: &Path, bundle: Option<&Path>) -> std::io::Result<SignedOutput> {
        let spool_path = with_suffix(output, ".payload.tmp");
        let file = File::create(&spool_path)?;
        Ok(SignedOutput {
            output: output.to_owned(),
            bundle: bundle.map(Path::to_owned),
            spool_path: spool_path.clone(),
            spool: Some(HashingWriter::new(std::io::BufWriter::with_capacity(
                FILE_BUFFER_LEN,
                file,
            ))),
            temporaries: vec![spool_path],
        })
    }

    /// The payload's writer.
    pub fn writer(&mut self) -> &mut (dyn Write + Send) {
        self.spool.as_mut().expect("the spool is open until finish")
    }

    /// A reader over the payload written so far (to check it before signing).
    pub fn payload(&mut self) -> std::io::Result<BufReader<File>> {
        if let Some(spool) = self.spool.as_mut() {
            spool.flush()?;
        }
        Ok(BufReader::with_capacity(
            FILE_BUFFER_LEN,
            File::open(&self.spool_path)?,
        ))
    }

    /// Signs the payload's digest and writes the snapshot: one file (magic line, bundle
    /// line, payload copied from the spool) or, with a bundle path, the payload renamed into
    /// place and the bundle beside it. Every file is synced before its rename.
    pub fn finish(mut self, key: &SigningKey) -> Result<Written, FinishError> {
        let spool = self.spool.take().expect("the spool is open until finish");
        let (digest, payload_len, writer) = spool.finish();
        let file = writer
            .into_inner()
            .map_err(|e| FinishError::Io(e.to_string()))?;
        file.sync_all()?;
        drop(file);
        let bundle_json = bundle::sign_digest(key, &digest)?;
        match self.bundle.clone() {
            Some(bundle_path) => {
                let temporary = with_suffix(&bundle_path, ".tmp");
                self.temporaries.push(temporary.clone());
                let mut file = File::create(&temporary)?;
                file.write_all(bundle_json.as_bytes())?;
                file.sync_all()?;
                drop(file);
                std::fs::rename(&self.spool_path, &self.output)?;
                std::fs::rename(&temporary, &bundle_path)?;
            }
            None => {
                let temporary = with_suffix(&self.output, ".tmp");
                self.temporaries.push(temporary.clone());
                let mut out =
                    std::io::BufWriter::with_capacity(FILE_BUFFER_LEN, File::create(&temporary)?);
                out.write_all(FILE_MAGIC)?;
                out.write_all(bundle_json.as_bytes())?;
                out.write_all(b"\n")?;
                let mut payload = File::open(&self.spool_path)?;
                std::io::copy(&mut payload, &mut out)?;
                let file = out
                    .into_inner()
                    .map_err(|e| FinishError::Io(e.to_string()))?;
                file.sync_all()?;
                drop(file);
                std::fs::rename(&temporary, &self.output)?;
                let _ = std::fs::remove_file(&self.spool_path);
            }
        }
        if let Some(parent) = self.output.parent() {
            sync_dir(parent);
        }
        self.temporaries.clear();
        Ok(Written {
            payload_len,
            digest,
        })
    }
}

impl Drop for SignedOutput {
    fn drop(&mut self) {
        self.spool = None;
        for path in &self.temporaries {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Why a signed snapshot could not be put in place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FinishError {
    #[error("{0}")]
    Io(String),
    #[error("signing failed: {0}")]
    Sign(#[from] KeyError),
}

impl From<std::io::Error> for FinishError {
    fn from(error: std::io::Error) -> FinishError {
        FinishError::Io(error.to_string())
    }
}

/// Makes renames in `dir` durable (best effort where directories cannot be opened).
fn sync_dir(dir: &Path) {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}
