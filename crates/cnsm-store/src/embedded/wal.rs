//! The write-ahead log in front of redb (`cnsm.redb.wal` and `cnsm.redb.wal.1` beside the
//! database file).
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
//! non-durable commit, after which the log starts again at its first byte. A checkpoint that
//! runs beside the committer (`super::checkpointer`) switches the appends to the log's other
//! file instead, from its first byte: the batches acknowledged meanwhile are not covered by it.
//!
//! # The file is recycled, never truncated
//!
//! Starting again does not truncate the file: the next frames overwrite the old ones in place,
//! and the file grows in zeroed steps of [`GROWTH_BYTES`] before frames go past its end. An
//! `fdatasync` of blocks that already exist only writes data, where one that grows the file
//! also commits the file system's journal for the new size (measured on this project's machine:
//! p50 0.11 against 0.21 ms). What tells live frames from stale ones is the commit sequence:
//! each frame names the sequence of its first record, and a batch's committed items take
//! consecutive sequences (one record each). The live log is the chain of intact frames that
//! starts at the store's durable `next_seq` and in which each frame starts where the one before
//! it ended. Every stale frame was covered by a durable commit, so it starts below that
//! sequence and ends the chain wherever it is met; a frame whose batch failed to commit in redb
//! (never acknowledged) has its header zeroed.
//!
//! After a crash redb reopens at its last durable commit and [`live_chain`] picks the frames
//! to re-apply, in order, in one durable transaction. A torn last frame (a crash during the
//! append: never acknowledged) fails its checksum and ends the log.
//!
//! # Frame layout
//!
//! `"cnsV"`, payload length (u32 LE), the sequence of the frame's first record (u64 LE), the
//! first 16 bytes of SHA-256 over the domain tag, that sequence and the payload, then the
//! payload: the item count (u32 LE) and per item the expected version (u64 LE, `u64::MAX` for a
//! create), the record's version (u64 LE), hash (32 bytes) and bytes (u32 LE length + bytes),
//! the instance row (u32 LE length + its JSON, as the `instances` table holds it), and the
//! idempotency entry (a 0/1 byte, then the key as u32 LE length + UTF-8, the request hash,
//! version and expiry as u64 LE).
//!
//! Logs written before frames carried their sequence (`"cnsW"` frames, no sequence field, the
//! file truncated at each checkpoint) are still read: every intact frame is replayed, skipping
//! items already stored with the same hash, and the file is then emptied.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cnsm_core::record::{Hash32, SealedRecord};

use super::tables::decode_row;
use crate::{CommitItem, IdempotencyEntry, StoreError};

/// A frame that names the sequence of its first record.
const FRAME_MAGIC: [u8; 4] = *b"cnsV";
const FRAME_HEADER: usize = 4 + 4 + 8 + 16;
const CHECKSUM_DOMAIN: &[u8] = b"cnsm.wal.frame.v2";
/// A frame of the first format (no sequence; the file was truncated at each checkpoint).
const LEGACY_MAGIC: [u8; 4] = *b"cnsW";
const LEGACY_HEADER: usize = 4 + 4 + 16;
const LEGACY_CHECKSUM_DOMAIN: &[u8] = b"cnsm.wal.frame.v1";
/// Largest frame the reader accepts (a batch is at most `COMMIT_ITEMS_MAX` items).
const FRAME_LEN_MAX: usize = 1 << 30;

/// Take a checkpoint (a durable redb commit, then start the log again) at least this often
/// while transitions are committed. Short on purpose: a checkpoint flushes what the non-durable
/// commits since the last one dirtied; when the committer waited for each, a store of a million
/// instances stalled 20-40 ms per checkpoint with 2 s, a few with 250 ms, at no throughput cost
/// (BENCHMARKS.md). It also bounds how many batches a checkpoint beside the committer defers.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// ... or when the log grows past this many bytes.
pub(crate) const CHECKPOINT_BYTES: u64 = 64 << 20;
/// The log file grows in steps of this many zero bytes (made durable with the new size before
/// a frame goes there), so that an append mostly overwrites blocks that exist.
pub(crate) const GROWTH_BYTES: u64 = 1 << 20;

/// The log of one store: two files, one of which takes the appends. Held under the store's
/// write lock.
///
/// A checkpoint that runs beside the committer ([`Wal::switch`]) covers the frames of the file
/// in use when it started; the batches acknowledged while it runs go to the other file, from its
/// first byte, so that nothing they need is overwritten before a durable commit covers it. After
/// a crash the live chain starts in one file at the store's durable next sequence and may go on
/// in the other one ([`live_chain`]).
pub(crate) struct Wal {
    segments: [Segment; 2],
    /// The segment that takes the appends.
    active: usize,
    /// When the log was last started again (or opened).
    since: Instant,
}

/// One file of the log.
struct Segment {
    path: PathBuf,
    /// Opened on the first append.
    file: Option<File>,
    /// Bytes of live frames at the start of the file.
    len: u64,
    /// The file's size (zeros or stale frames past `len`).
    size: u64,
}

/// What the checkpoints of a store have cost (see `EmbeddedStore::take_checkpoint_stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Checkpoints taken (durable redb commits that took in the log's frames).
    pub count: u64,
    /// Their total duration.
    pub total: Duration,
    /// The longest one.
    pub max: Duration,
    /// Bytes of log frames they took in.
    pub log_bytes: u64,
    /// Items acknowledged during background checkpoints and applied to redb after them.
    pub deferred_items: u64,
    /// How long applying those items took in all (the committer goes on meanwhile, except in
    /// the last round of each checkpoint; see `held_max`).
    pub apply_total: Duration,
    /// Rounds of applying that ran while the committer went on (at most a few per checkpoint).
    pub free_rounds: u64,
    /// The longest time a checkpoint's last round of applying held the committer.
    pub held_max: Duration,
}

impl CheckpointStats {
    /// Counts one checkpoint of `took` that took in `log_bytes` of frames.
    pub(crate) fn record(&mut self, took: Duration, log_bytes: u64) {
        self.count += 1;
        self.total += took;
        self.max = self.max.max(took);
        self.log_bytes += log_bytes;
    }

    /// Counts `items` deferred items applied in one round of `took`.
    pub(crate) fn count_applied(&mut self, items: usize, took: Duration) {
        self.deferred_items += items as u64;
        self.apply_total += took;
    }
}

/// The two files of the log beside a database file: `<file>.wal` and `<file>.wal.1`.
pub(crate) fn paths_for(db_path: &Path) -> [PathBuf; 2] {
    let mut name = db_path.as_os_str().to_owned();
    name.push(".wal");
    let first = PathBuf::from(&name);
    name.push(".1");
    [first, PathBuf::from(name)]
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("write-ahead log {}: {what}: {e}", path.display()))
}

impl Wal {
    /// The log in `paths`, empty (whatever the files hold is covered by a durable commit);
    /// nothing is created until the first append.
    pub(crate) fn new(paths: [PathBuf; 2]) -> Wal {
        let [first, second] = paths;
        Wal {
            segments: [Segment::new(first), Segment::new(second)],
            active: 0,
            since: Instant::now(),
        }
    }

    /// Whether a checkpoint is due.
    pub(crate) fn checkpoint_due(&self) -> bool {
        let len = self.len();
        len > 0 && (len >= CHECKPOINT_BYTES || self.since.elapsed() >= CHECKPOINT_INTERVAL)
    }

    /// Bytes of frames appended since the log was last started again or switched.
    pub(crate) fn len(&self) -> u64 {
        self.segments[self.active].len
    }

    /// Appends the committed items of one batch as one frame and makes it durable. `first_seq`
    /// is the sequence the batch gave its first committed item (the next ones follow). Returns
    /// the length before the frame, for [`Wal::truncate_to`] should the redb commit fail.
    /// `rows[i]` is the encoded instance row of `items[i]` (as the batch stored it).
    pub(crate) fn append(
        &mut self,
        first_seq: u64,
        items: &[&CommitItem],
        rows: &[Vec<u8>],
    ) -> Result<u64, StoreError> {
        let frame = encode_frame(first_seq, items, rows)?;
        self.segments[self.active].append(&frame)
    }

    /// Takes back the frames from byte `len` on, durably (a frame whose batch did not commit):
    /// the header there is zeroed, so the frame can never be read as live.
    pub(crate) fn truncate_to(&mut self, len: u64) -> Result<(), StoreError> {
        self.segments[self.active].truncate_to(len)
    }

    /// Starts the log again after a durable redb commit covered every frame in it. No I/O: the
    /// next frames overwrite these, which no longer start at the store's next sequence.
    pub(crate) fn reset(&mut self) {
        for segment in &mut self.segments {
            segment.len = 0;
        }
        self.active = 0;
        self.since = Instant::now();
    }

    /// Sends the next appends to the other file, from its first byte, for a checkpoint that
    /// covers the frames of this one and runs while they are appended; returns the bytes of
    /// frames the checkpoint covers. The other file's frames are stale: the previous checkpoint
    /// covered them (it finished before this one starts).
    pub(crate) fn switch(&mut self) -> u64 {
        let covered = self.len();
        self.active = 1 - self.active;
        self.segments[self.active].len = 0;
        self.since = Instant::now();
        covered
    }
}

impl Segment {
    fn new(path: PathBuf) -> Segment {
        Segment {
            path,
            file: None,
            len: 0,
            size: 0,
        }
    }

    /// Opens the file (and reads its size) on first use.
    fn open(&mut self) -> Result<(), StoreError> {
        if self.file.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.path)
                .map_err(|e| io_error(&self.path, "cannot open", e))?;
            self.size = file
                .metadata()
                .map_err(|e| io_error(&self.path, "cannot read the size", e))?
                .len();
            // The file's directory entry must be durable before a frame in it counts.
            super::backup::sync_parent(&self.path)?;
            self.file = Some(file);
        }
        Ok(())
    }

    fn append(&mut self, frame: &[u8]) -> Result<u64, StoreError> {
        self.open()?;
        let Segment {
            path,
            file,
            len,
            size,
        } = self;
        let file = file.as_ref().expect("opened above");
        let at = *len;
        let end = at + frame.len() as u64;
        if end > *size {
            let grown = end.div_ceil(GROWTH_BYTES) * GROWTH_BYTES;
            grow(file, (*size).max(at), grown).map_err(|e| io_error(path, "cannot grow", e))?;
            *size = grown;
        }
        if let Err(e) = file.write_all_at(frame, at).and_then(|()| file.sync_data()) {
            // Not acknowledged: best effort so that the frame, which may have reached the disk
            // whole, is never read as live.
            let _ = file
                .write_all_at(&[0u8; FRAME_HEADER], at)
                .and_then(|()| file.sync_data());
            return Err(io_error(path, "cannot append", e));
        }
        *len = end;
        Ok(at)
    }

    fn truncate_to(&mut self, len: u64) -> Result<(), StoreError> {
        self.open()?;
        let file = self.file.as_ref().expect("opened above");
        file.write_all_at(&[0u8; FRAME_HEADER], len)
            .and_then(|()| file.sync_data())
            .map_err(|e| io_error(&self.path, "cannot take a frame back", e))?;
        self.len = len;
        Ok(())
    }
}

/// Fills `file` with zeros from `from` to `to`, durably with its new size.
fn grow(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; GROWTH_BYTES as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(GROWTH_BYTES) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

/// A log file as read on open; frames are decoded only as far as they are live.
pub(crate) struct LogFile {
    path: PathBuf,
    bytes: Vec<u8>,
    /// The sequence the intact frame at the first byte names, if there is one (checked once).
    first_seq: Option<u64>,
}

/// Reads the log at `path` (empty when it does not exist).
pub(crate) fn read_log(path: &Path) -> Result<LogFile, StoreError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)
                .map_err(|e| io_error(path, "cannot read", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(path, "cannot open", e)),
    }
    let first_seq = frame_at(&bytes, 0).map(|(seq, _)| seq);
    Ok(LogFile {
        path: path.to_owned(),
        bytes,
        first_seq,
    })
}

impl LogFile {
    /// Whether the log holds frames of the first format.
    pub(crate) fn is_legacy(&self) -> bool {
        self.bytes.starts_with(&LEGACY_MAGIC)
    }

    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::Corrupt(format!("write-ahead log {}: {detail}", self.path.display()))
    }

    /// Every intact frame of the first format, in order.
    fn legacy_batches(&self) -> Result<Vec<Vec<CommitItem>>, StoreError> {
        let mut batches = Vec::new();
        let mut at = 0usize;
        while let Some(payload) = legacy_frame_at(&self.bytes, at) {
            batches.push(decode_payload(payload).map_err(|detail| self.undecodable(at, detail))?);
            at += LEGACY_HEADER + payload.len();
        }
        Ok(batches)
    }

    fn undecodable(&self, at: usize, detail: String) -> StoreError {
        self.corrupt(format!(
            "frame at byte {at} has a valid checksum but {detail}"
        ))
    }

    /// The chain of intact frames from the first byte, which starts at sequence `from`, each
    /// frame starting where the one before it ended; and the sequence after its last record.
    fn chain(&self, from: u64) -> Result<(Vec<Vec<CommitItem>>, u64), StoreError> {
        let mut batches = Vec::new();
        let mut at = 0usize;
        let mut expected = from;
        while let Some((first_seq, payload)) = frame_at(&self.bytes, at) {
            if first_seq != expected {
                break;
            }
            let items = decode_payload(payload).map_err(|detail| self.undecodable(at, detail))?;
            expected += items.len() as u64;
            at += FRAME_HEADER + payload.len();
            batches.push(items);
        }
        Ok((batches, expected))
    }
}

/// The batches to re-apply on a store whose durable next sequence is `next_seq`, from the log's
/// files: the chain of intact frames that starts at the first byte of the file whose first frame
/// names `next_seq`, and goes on at the first byte of the other file if that one's first frame
/// names the sequence where the chain stopped (a checkpoint ran beside the committer, which wrote
/// there meanwhile). In a file, a torn or corrupt frame, a frame of the other format, or one that
/// does not start where the chain expects ends it: nothing from there on was acknowledged since
/// the last durable commit. A file whose first frame names a sequence below `next_seq` is stale
/// (covered by a durable commit); one that names a later sequence that the chain does not reach
/// means the log belongs to another state of this store. A file of the first format is
/// re-applied whole (replay skips what redb has).
pub(crate) fn live_chain(
    logs: &[LogFile],
    next_seq: u64,
) -> Result<Vec<Vec<CommitItem>>, StoreError> {
    let mut batches = Vec::new();
    for log in logs.iter().filter(|log| log.is_legacy()) {
        batches.extend(log.legacy_batches()?);
    }
    let mut used = vec![false; logs.len()];
    let mut expected = next_seq;
    while let Some(i) = (0..logs.len())
        .find(|&i| !used[i] && !logs[i].is_legacy() && logs[i].first_seq == Some(expected))
    {
        used[i] = true;
        let (chain, end) = logs[i].chain(expected)?;
        batches.extend(chain);
        expected = end;
    }
    for (log, _) in logs.iter().zip(&used).filter(|(_, used)| !**used) {
        if let Some(first_seq) = log.first_seq
            && first_seq >= next_seq
        {
            return Err(log.corrupt(format!(
                "starts at commit sequence {first_seq}, which the store (next sequence \
                 {next_seq}) and the log's live frames (up to {expected}) do not reach: the log \
                 belongs to another state of this store"
            )));
        }
    }
    Ok(batches)
}

/// The first 16 bytes of SHA-256 over `domain`, `seq` (8 bytes LE, absent in the first format)
/// and `payload`.
fn checksum(domain: &[u8], seq: Option<&[u8]>, payload: &[u8]) -> [u8; 16] {
    let mut prefix = domain.to_vec();
    prefix.extend_from_slice(seq.unwrap_or_default());
    let hash = Hash32::digest(&prefix, payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.0[..16]);
    out
}

/// The header and payload of the complete frame with `magic` and a header of `header_len`
/// bytes at `at`, if there is one (its checksum not checked yet).
fn framed(bytes: &[u8], at: usize, magic: [u8; 4], header_len: usize) -> Option<(&[u8], &[u8])> {
    let header = bytes.get(at..at.checked_add(header_len)?)?;
    if header[..4] != magic {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    if len > FRAME_LEN_MAX {
        return None;
    }
    let payload = bytes.get(at + header_len..at + header_len + len)?;
    Some((header, payload))
}

/// The first sequence and payload of the complete, intact frame at `at`, if there is one.
fn frame_at(bytes: &[u8], at: usize) -> Option<(u64, &[u8])> {
    let (header, payload) = framed(bytes, at, FRAME_MAGIC, FRAME_HEADER)?;
    let seq_bytes = &header[8..16];
    (checksum(CHECKSUM_DOMAIN, Some(seq_bytes), payload)[..] == header[16..32]).then(|| {
        (
            u64::from_le_bytes(seq_bytes.try_into().expect("8 bytes")),
            payload,
        )
    })
}

/// The payload of the complete, intact frame of the first format at `at`, if there is one.
fn legacy_frame_at(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let (header, payload) = framed(bytes, at, LEGACY_MAGIC, LEGACY_HEADER)?;
    (checksum(LEGACY_CHECKSUM_DOMAIN, None, payload)[..] == header[8..24]).then_some(payload)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| StoreError::Refused("a commit item field exceeds 4 GiB".into()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn encode_frame(
    first_seq: u64,
    items: &[&CommitItem],
    rows: &[Vec<u8>],
) -> Result<Vec<u8>, StoreError> {
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
    let seq_bytes = first_seq.to_le_bytes();
    frame.extend_from_slice(&seq_bytes);
    frame.extend_from_slice(&checksum(CHECKSUM_DOMAIN, Some(&seq_bytes), &payload));
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

    /// How many batches of the log at `path` are live for a store at `next_seq` (frames here
    /// are empty batches, so a chain's frames all name the same sequence).
    fn live(path: &Path, next_seq: u64) -> usize {
        live_chain(&[read_log(path).unwrap()], next_seq)
            .unwrap()
            .len()
    }

    fn segments(dir: &Path) -> [PathBuf; 2] {
        paths_for(&dir.join("x"))
    }

    #[test]
    fn a_log_grows_in_zeroed_steps_and_a_damaged_frame_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let [path, _] = segments(dir.path());
        let mut wal = Wal::new(segments(dir.path()));
        wal.append(7, &[], &[]).unwrap();
        let second = wal.append(7, &[], &[]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), GROWTH_BYTES);
        assert_eq!(live(&path, 7), 2);
        let mut flipped = std::fs::read(&path).unwrap();
        flipped[second as usize + FRAME_HEADER] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(live(&path, 7), 1);
    }

    #[test]
    fn frames_after_a_restart_overwrite_the_stale_ones_which_end_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let [path, _] = segments(dir.path());
        let mut wal = Wal::new(segments(dir.path()));
        for _ in 0..3 {
            wal.append(1, &[], &[]).unwrap();
        }
        wal.reset();
        // The stale second and third frames stay in the file, naming sequence 1.
        wal.append(4, &[], &[]).unwrap();
        assert_eq!(live(&path, 4), 1);
        assert_eq!(wal.len(), (FRAME_HEADER + 4) as u64);
        // A frame taken back (its batch failed in redb) is never read as live.
        let at = wal.append(4, &[], &[]).unwrap();
        assert_eq!(live(&path, 4), 2);
        wal.truncate_to(at).unwrap();
        assert_eq!(live(&path, 4), 1);
    }

    #[test]
    fn live_frames_start_at_the_store_next_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let [path, _] = segments(dir.path());
        assert_eq!(live(&path, 9), 0, "no log");
        let mut wal = Wal::new(segments(dir.path()));
        wal.append(5, &[], &[]).unwrap();
        wal.append(5, &[], &[]).unwrap();
        assert_eq!(live(&path, 5), 2);
        assert_eq!(live(&path, 6), 0, "covered by a durable commit");
        let error = live_chain(&[read_log(&path).unwrap()], 4)
            .unwrap_err()
            .to_string();
        assert!(error.contains("another state of this store"), "{error}");
    }

    #[test]
    fn a_log_of_the_first_format_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.wal");
        let payload = 0u32.to_le_bytes();
        let mut frame = LEGACY_MAGIC.to_vec();
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&checksum(LEGACY_CHECKSUM_DOMAIN, None, &payload));
        frame.extend_from_slice(&payload);
        let mut bytes = frame.repeat(2);
        bytes.extend_from_slice(b"cnsWtorn");
        std::fs::write(&path, &bytes).unwrap();
        let log = read_log(&path).unwrap();
        assert!(log.is_legacy());
        assert_eq!(live_chain(&[log], 123).unwrap().len(), 2);
    }

    /// One item and its instance row.
    fn one_item() -> (CommitItem, Vec<u8>) {
        let item = crate::conformance::Driver::new("job").create("ns", "i-1", &[], 1);
        let row = super::super::tables::encode_row(&item.instance).unwrap();
        (item, row)
    }

    /// Frames with one item each, so that a chain's sequences advance.
    fn one_item_frames(wal: &mut Wal, first_seq: u64, n: u64) {
        let (item, row) = one_item();
        for seq in first_seq..first_seq + n {
            wal.append(seq, &[&item], std::slice::from_ref(&row))
                .unwrap();
        }
    }

    fn live_in(dir: &Path, next_seq: u64) -> Result<usize, StoreError> {
        let logs = segments(dir).map(|path| read_log(&path).unwrap());
        Ok(live_chain(&logs, next_seq)?.len())
    }

    #[test]
    fn the_chain_goes_on_in_the_other_file_after_a_switch() {
        let dir = tempfile::tempdir().unwrap();
        let mut wal = Wal::new(segments(dir.path()));
        one_item_frames(&mut wal, 10, 3);
        assert_eq!(wal.switch(), wal_len_of(3));
        one_item_frames(&mut wal, 13, 2);
        // A crash while the checkpoint ran: redb is at 10.
        assert_eq!(live_in(dir.path(), 10).unwrap(), 5);
        // The checkpoint finished: redb is at 13, the first file is stale.
        assert_eq!(live_in(dir.path(), 13).unwrap(), 2);
        // The next switch overwrites the first file from its first byte.
        wal.switch();
        assert_eq!(live_in(dir.path(), 13).unwrap(), 2, "no frame there yet");
        one_item_frames(&mut wal, 15, 1);
        assert_eq!(live_in(dir.path(), 13).unwrap(), 3);
        assert_eq!(live_in(dir.path(), 15).unwrap(), 1);
        // Frames that the chain does not reach are refused, not skipped.
        let error = live_in(dir.path(), 12).unwrap_err().to_string();
        assert!(error.contains("another state of this store"), "{error}");
    }

    fn wal_len_of(frames: u64) -> u64 {
        let (item, row) = one_item();
        frames
            * encode_frame(0, &[&item], std::slice::from_ref(&row))
                .unwrap()
                .len() as u64
    }
}
