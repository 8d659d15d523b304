//! The write-ahead log in front of redb (`cnsm.redb.wal` beside the database file).
//!
//! A durable redb commit writes the changed B-tree pages and fsyncs them (twice with quick
//! repair); on a large store that costs several milliseconds and has long tails. Transition
//! batches therefore take a cheaper path:
//!
//! 1. the batch is applied in a redb write transaction with [`redb::Durability::None`];
//! 2. the items that committed are appended to this log as one checksummed frame and the log is
//!    made durable (`fdatasync`, one sequential write);
//! 3. only then is the redb transaction committed (in memory: readers see it from now on).
//!
//! So no reader, and no waiter, ever sees a batch before it is durable in the log. A durable redb
//! commit (a checkpoint, taken every [`CHECKPOINT_INTERVAL`] or [`CHECKPOINT_BYTES`], and every
//! other write of the store: definitions, retention, imports, close) persists every earlier
//! non-durable commit, after which the log is emptied.
//!
//! After a crash redb reopens at its last durable commit and [`replay`] re-applies the log's
//! frames in order in one durable transaction. Because the log is emptied only after a durable
//! commit, and frames are appended only while no other write is in progress, redb's state is
//! always exactly "the last checkpoint", possibly plus a prefix of the frames (a crash between a
//! checkpoint and the emptying of the log): replay skips items whose record is already stored
//! with the same hash. A torn last frame (a crash during the append: never acknowledged) fails its
//! checksum and is cut off.
//!
//! # Frame layout
//!
//! `"cnsW"`, payload length (u32 LE), the first 16 bytes of SHA-256 over the domain tag and the
//! payload, then the payload: the item count (u32 LE) and per item the expected version (u64 LE,
//! `u64::MAX` for a create), the record's version (u64 LE), hash (32 bytes) and bytes (u32 LE
//! length + bytes), the instance row (u32 LE length + its JSON, as the `instances` table holds it),
//! and the idempotency entry (a 0/1 byte, then the key as u32 LE length + UTF-8, the request hash,
//! version and expiry as u64 LE).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cnsm_core::record::{Hash32, SealedRecord};

use super::tables::decode_row;
use crate::{CommitItem, IdempotencyEntry, StoreError};

const FRAME_MAGIC: [u8; 4] = *b"cnsW";
const FRAME_HEADER: usize = 4 + 4 + 16;
const CHECKSUM_DOMAIN: &[u8] = b"cnsm.wal.frame.v1";
/// Largest frame the reader accepts (a batch is at most `COMMIT_ITEMS_MAX` items).
const FRAME_LEN_MAX: usize = 1 << 30;

/// Take a checkpoint (a durable redb commit, then empty the log) at least this often while
/// transitions are committed. Short on purpose: a checkpoint flushes what the non-durable
/// commits since the last one dirtied, and the committer waits for it; with 2 s a store of a
/// million instances stalled 20-40 ms per checkpoint (timer lateness p99 20-28 ms), with 250 ms
/// a few (p99 9-11 ms), at no throughput cost (BENCHMARKS.md).
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// ... or when the log grows past this many bytes.
pub(crate) const CHECKPOINT_BYTES: u64 = 64 << 20;

/// The log file of one store. Held under the store's write lock.
pub(crate) struct Wal {
    path: PathBuf,
    /// Opened on the first append.
    file: Option<File>,
    /// Bytes of complete frames in the file.
    len: u64,
    /// When the log was last emptied (or opened).
    since: Instant,
}

/// The log beside a database file.
pub(crate) fn path_for(db_path: &Path) -> PathBuf {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("write-ahead log {}: {what}: {e}", path.display()))
}

impl Wal {
    /// The log at `path`; nothing is created until the first append.
    pub(crate) fn new(path: PathBuf) -> Wal {
        Wal {
            path,
            file: None,
            len: 0,
            since: Instant::now(),
        }
    }

    /// Whether a checkpoint is due.
    pub(crate) fn checkpoint_due(&self) -> bool {
        self.len > 0
            && (self.len >= CHECKPOINT_BYTES || self.since.elapsed() >= CHECKPOINT_INTERVAL)
    }

    /// Bytes of frames not yet covered by a durable redb commit.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn file(&mut self) -> Result<&File, StoreError> {
        if self.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .map_err(|e| io_error(&self.path, "cannot open", e))?;
            // The file's directory entry must be durable before a frame in it counts.
            super::backup::sync_parent(&self.path)?;
            // Anything past the complete frames (there is none after `replay`) is dropped.
            file.set_len(self.len)
                .map_err(|e| io_error(&self.path, "cannot truncate", e))?;
            self.file = Some(file);
        }
        Ok(self.file.as_ref().expect("opened above"))
    }

    /// Appends the committed items of one batch as one frame and makes it durable. Returns the
    /// length before the frame, for [`Wal::truncate_to`] should the redb commit fail.
    /// `rows[i]` is the encoded instance row of `items[i]` (as the batch stored it).
    pub(crate) fn append(
        &mut self,
        items: &[&CommitItem],
        rows: &[Vec<u8>],
    ) -> Result<u64, StoreError> {
        let frame = encode_frame(items, rows)?;
        let at = self.len;
        let path = self.path.clone();
        let file = self.file()?;
        file.write_all_at(&frame, at)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error(&path, "cannot append", e))?;
        self.len = at + frame.len() as u64;
        Ok(at)
    }

    /// Cuts the log back to `len` bytes, durably (a frame whose batch did not commit).
    pub(crate) fn truncate_to(&mut self, len: u64) -> Result<(), StoreError> {
        let path = self.path.clone();
        let file = self.file()?;
        file.set_len(len)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error(&path, "cannot truncate", e))?;
        self.len = len;
        Ok(())
    }

    /// Empties the log after a durable redb commit covered every frame in it.
    pub(crate) fn reset(&mut self) -> Result<(), StoreError> {
        if self.len > 0 {
            self.truncate_to(0)?;
        }
        self.since = Instant::now();
        Ok(())
    }
}

/// Reads every complete frame of the log at `path` (none when it does not exist). A torn or
/// corrupt frame ends the log: it was never acknowledged. Returns the batches and whether
/// anything had to be cut off.
pub(crate) fn read_frames(path: &Path) -> Result<(Vec<Vec<CommitItem>>, bool), StoreError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)
                .map_err(|e| io_error(path, "cannot read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(io_error(path, "cannot open", e)),
    }
    let mut batches = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let Some(payload) = frame_at(&bytes, at) else {
            return Ok((batches, true));
        };
        let items = decode_payload(payload).map_err(|detail| {
            StoreError::Corrupt(format!(
                "write-ahead log {}: frame at byte {at} has a valid checksum but {detail}",
                path.display()
            ))
        })?;
        batches.push(items);
        at += FRAME_HEADER + payload.len();
    }
    Ok((batches, false))
}

fn checksum(payload: &[u8]) -> [u8; 16] {
    let hash = Hash32::digest(CHECKSUM_DOMAIN, payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.0[..16]);
    out
}

/// The payload of the complete, intact frame at `at`, if there is one.
fn frame_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let header = bytes.get(at..at + FRAME_HEADER)?;
    if header[..4] != FRAME_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    if len > FRAME_LEN_MAX {
        return None;
    }
    let payload = bytes.get(at + FRAME_HEADER..at + FRAME_HEADER + len)?;
    (checksum(payload)[..] == header[8..24]).then_some(payload)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| StoreError::Refused("a commit item field exceeds 4 GiB".into()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn encode_frame(items: &[&CommitItem], rows: &[Vec<u8>]) -> Result<Vec<u8>, StoreError> {
    if rows.len() != items.len() {
        return Err(StoreError::Corrupt(format!(
            "a log frame of {} items was given {} instance rows",
            items.len(),
            rows.len()
        )));
    }
    let mut payload = Vec::with_capacity(items.len() * 1024);
    let count = u32::try_from(items.len())
        .map_err(|_| StoreError::Refused("too many items in one batch".into()))?;
    payload.extend_from_slice(&count.to_le_bytes());
    for (item, row) in items.iter().zip(rows) {
        payload.extend_from_slice(&item.expected_version.unwrap_or(u64::MAX).to_le_bytes());
        payload.extend_from_slice(&item.record.version.to_le_bytes());
        payload.extend_from_slice(&item.record.hash.0);
        put_bytes(&mut payload, &item.record.bytes)?;
        put_bytes(&mut payload, row)?;
        match &item.idempotency {
            None => payload.push(0),
            Some(entry) => {
                payload.push(1);
                put_bytes(&mut payload, entry.key.as_bytes())?;
                payload.extend_from_slice(&entry.request_hash.0);
                payload.extend_from_slice(&entry.version.to_le_bytes());
                payload.extend_from_slice(&entry.expires_ms.to_le_bytes());
            }
        }
    }
    if payload.len() > FRAME_LEN_MAX {
        return Err(StoreError::Refused(format!(
            "a batch of {} bytes exceeds the write-ahead log's frame limit",
            payload.len()
        )));
    }
    let mut frame = Vec::with_capacity(FRAME_HEADER + payload.len());
    frame.extend_from_slice(&FRAME_MAGIC);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&checksum(&payload));
    frame.extend_from_slice(&payload);
    Ok(frame)
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("is truncated inside an item".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn hash(&mut self) -> Result<Hash32, String> {
        Ok(Hash32(self.take(32)?.try_into().expect("32 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.u32()? as usize;
        self.take(len)
    }
}

fn decode_payload(payload: &[u8]) -> Result<Vec<CommitItem>, String> {
    let mut c = Cursor { bytes: payload };
    let count = c.u32()? as usize;
    let mut items = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let expected = c.u64()?;
        let version = c.u64()?;
        let hash = c.hash()?;
        let bytes = c.bytes()?.to_vec();
        let row = c.bytes()?;
        let instance =
            decode_row(row, &|| "an instance row".to_owned()).map_err(|e| e.to_string())?;
        let idempotency = match c.take(1)?[0] {
            0 => None,
            1 => {
                let key = std::str::from_utf8(c.bytes()?)
                    .map_err(|_| "has an idempotency key that is not UTF-8".to_owned())?
                    .to_owned();
                Some(IdempotencyEntry {
                    key,
                    request_hash: c.hash()?,
                    version: c.u64()?,
                    expires_ms: c.u64()?,
                })
            }
            other => return Err(format!("has an unknown idempotency tag {other}")),
        };
        items.push(CommitItem {
            instance,
            record: SealedRecord {
                version,
                bytes,
                hash,
            },
            expected_version: (expected != u64::MAX).then_some(expected),
            idempotency,
        });
    }
    if !c.bytes.is_empty() {
        return Err("has bytes after its last item".into());
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_frame_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let mut wal = Wal::new(path.clone());
        wal.append(&[], &[]).unwrap();
        wal.append(&[], &[]).unwrap();
        let whole = std::fs::read(&path).unwrap();
        assert_eq!(read_frames(&path).unwrap().0.len(), 2);
        std::fs::write(&path, &whole[..whole.len() - 1]).unwrap();
        let (batches, cut) = read_frames(&path).unwrap();
        assert_eq!((batches.len(), cut), (1, true));
        let mut flipped = whole.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(read_frames(&path).unwrap().0.len(), 1);
    }
}
