//! Snapshot files on disk, streamed: reading the layout of `docs/snapshots.md` (one file, or a
//! payload with a detached bundle) without loading the payload, and [`SignedOutput`], which
//! spools an export to a temporary file while hashing it, signs the digest, and puts the
//! result in place atomically (fsync, rename); nothing is left behind on error.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
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

/// Where an export goes. With a detached bundle, the payload is written (and hashed) to a
/// temporary file beside the output, renamed into place by [`SignedOutput::finish`]. In the
/// one-file layout it is written straight into the temporary output file after room reserved
/// for the magic and bundle lines ([`bundle::signed_bundle_len_max`]), and `finish` fills that
/// room (the bundle line padded with spaces), so the payload is written once and never
/// copied. Every file is synced before its rename. Dropped unfinished, it removes its
/// temporary files.
#[derive(Debug)]
pub struct SignedOutput {
    output: PathBuf,
    bundle: Option<PathBuf>,
    spool_path: PathBuf,
    /// Where the payload starts in the spool file (0 with a detached bundle).
    payload_offset: u64,
    spool: Option<HashingWriter<Tee<std::io::BufWriter<File>>>>,
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
    /// Creates the temporary file beside `output` (same directory, so the rename stays on one
    /// file system).
    pub fn create(output: &Path, bundle: Option<&Path>) -> std::io::Result<SignedOutput> {
        let (spool_path, payload_offset) = match bundle {
            Some(_) => (with_suffix(output, ".payload.tmp"), 0),
            None => (
                with_suffix(output, ".tmp"),
                (FILE_MAGIC.len() + bundle::signed_bundle_len_max() + 1) as u64,
            ),
        };
        let mut file = File::create(&spool_path)?;
        file.seek(SeekFrom::Start(payload_offset))?;
        Ok(SignedOutput {
            output: output.to_owned(),
            bundle: bundle.map(Path::to_owned),
            spool_path: spool_path.clone(),
            payload_offset,
            spool: Some(HashingWriter::new(Tee {
                inner: std::io::BufWriter::with_capacity(FILE_BUFFER_LEN, file),
                checker: None,
            })),
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
        let mut file = File::open(&self.spool_path)?;
        file.seek(SeekFrom::Start(self.payload_offset))?;
        Ok(BufReader::with_capacity(FILE_BUFFER_LEN, file))
    }

    /// Checks the payload (steps 4-6, as [`crate::verify_payload_from`]) on a second thread
    /// while it is written, from the bytes passing by, instead of reading it back afterwards;
    /// [`SignedOutput::checked`] gives the verdict. Call before the first write.
    pub fn check_while_writing(&mut self) -> std::io::Result<()> {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(CHECK_CHUNKS_MAX);
        let thread = std::thread::Builder::new()
            .name("cnsm-snapshot-check".into())
            .spawn(move || {
                let chunks = ChunkReader {
                    receiver,
                    chunk: Vec::new(),
                    at: 0,
                };
                crate::verify_payload_from(chunks, &mut |_, _| {})
            })?;
        let spool = self.spool.as_mut().expect("the spool is open until finish");
        spool.inner_mut().checker = Some(Checker {
            sender: Some(sender),
            pending: Vec::with_capacity(CHECK_CHUNK_LEN),
            thread: Some(thread),
        });
        Ok(())
    }

    /// The verdict of the check started by [`SignedOutput::check_while_writing`] on
    /// everything written (waits for the checker to read the end); `None` without one.
    pub fn checked(&mut self) -> Option<Result<crate::Summary, VerifyError>> {
        let spool = self.spool.as_mut()?;
        let checker = spool.inner_mut().checker.as_mut()?;
        checker.send_pending();
        checker.sender = None;
        let thread = checker.thread.take()?;
        Some(
            thread
                .join()
                .unwrap_or_else(|_| Err(VerifyError::Io("the payload checker panicked".into()))),
        )
    }

    /// Signs the payload's digest and writes the snapshot: one file (magic line, bundle
    /// line, payload) or, with a bundle path, the payload renamed into place and the bundle
    /// beside it. Every file is synced before its rename.
    pub fn finish(mut self, key: &SigningKey) -> Result<Written, FinishError> {
        let spool = self.spool.take().expect("the spool is open until finish");
        let (digest, payload_len, tee) = spool.finish();
        let mut file = tee
            .inner
            .into_inner()
            .map_err(|e| FinishError::Io(e.to_string()))?;
        let bundle_json = bundle::sign_digest(key, &digest)?;
        match self.bundle.clone() {
            Some(bundle_path) => {
                file.sync_all()?;
                drop(file);
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
                // The reserved room: the magic line, the bundle JSON padded with spaces to
                // fill it, the newline right before the payload.
                let mut head = Vec::with_capacity(self.payload_offset as usize);
                head.extend_from_slice(FILE_MAGIC);
                head.extend_from_slice(bundle_json.as_bytes());
                let room = self.payload_offset as usize - 1;
                if head.len() > room {
                    return Err(FinishError::Io(format!(
                        "the bundle ({} bytes) is longer than the room reserved for it",
                        bundle_json.len()
                    )));
                }
                head.resize(room, b' ');
                head.push(b'\n');
                file.seek(SeekFrom::Start(0))?;
                file.write_all(&head)?;
                file.sync_all()?;
                drop(file);
                std::fs::rename(&self.spool_path, &self.output)?;
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

/// Bytes the checker of [`SignedOutput::check_while_writing`] gets at a time.
const CHECK_CHUNK_LEN: usize = 1 << 20;
/// Chunks in flight to the checker (memory: this many times [`CHECK_CHUNK_LEN`]).
const CHECK_CHUNKS_MAX: usize = 4;

/// The spool's writer: the file, and a copy of the bytes for the checker when there is one.
#[derive(Debug)]
struct Tee<W> {
    inner: W,
    checker: Option<Checker>,
}

#[derive(Debug)]
struct Checker {
    /// `None` once the payload ended (the checker then reads its end).
    sender: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    pending: Vec<u8>,
    thread: Option<std::thread::JoinHandle<Result<crate::Summary, VerifyError>>>,
}

impl Checker {
    fn send_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(CHECK_CHUNK_LEN));
        // A checker that stopped early has its verdict already; nothing more to feed it.
        if let Some(sender) = &self.sender
            && sender.send(chunk).is_err()
        {
            self.sender = None;
        }
    }
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(bytes)?;
        if let Some(checker) = self.checker.as_mut()
            && checker.sender.is_some()
        {
            checker.pending.extend_from_slice(&bytes[..n]);
            if checker.pending.len() >= CHECK_CHUNK_LEN {
                checker.send_pending();
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The checker's side: the chunks received, read as one stream that ends when the writer's
/// side hangs up.
struct ChunkReader {
    receiver: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.at == self.chunk.len() {
            match self.receiver.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.at = 0;
                }
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.chunk[self.at..])
    }

    fn consume(&mut self, amount: usize) {
        self.at = (self.at + amount).min(self.chunk.len());
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
