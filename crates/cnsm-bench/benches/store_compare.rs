//! redb vs SQLite under the embedded store's write pattern: each durable transaction (group
//! commit) writes, per transition, an instance row update, a history record and a log entry.
//! Both engines are configured for durability (redb `Durability::Immediate`; SQLite WAL with
//! `synchronous=FULL`).
//!
//! Run: `cargo bench -p cnsm-bench --features sqlite --bench store_compare`

use std::time::{Duration, Instant};

use cnsm_bench::{percentile, report};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const RECORDS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("records");
const LOG: TableDefinition<u64, (u64, u64)> = TableDefinition::new("log");
const RECORDS_BY_SEQ: TableDefinition<u64, &[u8]> = TableDefinition::new("records_by_seq");
const RECORD_INDEX: TableDefinition<(u64, u64), u64> = TableDefinition::new("record_index");

const INSTANCE_ROW: [u8; 320] = [1; 320];
const RECORD_ROW: [u8; 420] = [2; 420];
const N_INSTANCES: u64 = 4096;

fn dir() -> tempfile::TempDir {
    match std::env::var_os("CNSM_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn redb_run(batch: u64, seconds: f64) -> (f64, Duration, Duration) {
    let dir = dir();
    let db = redb::Database::create(dir.path().join("bench.redb")).unwrap();
    let mut versions = vec![0u64; N_INSTANCES as usize];
    let mut seq = 0u64;
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        let mut tx = db.begin_write().unwrap();
        tx.set_durability(redb::Durability::Immediate).unwrap();
        {
            let mut instances = tx.open_table(INSTANCES).unwrap();
            let mut records = tx.open_table(RECORDS).unwrap();
            let mut log = tx.open_table(LOG).unwrap();
            for _ in 0..batch {
                let uid = n % N_INSTANCES;
                let key = format!("bench/c-{uid}");
                // Read-check-write, as the compare-and-swap does.
                let _ = instances
                    .get(key.as_str())
                    .unwrap()
                    .map(|v| v.value().len());
                versions[uid as usize] += 1;
                instances
                    .insert(key.as_str(), INSTANCE_ROW.as_slice())
                    .unwrap();
                records
                    .insert((uid, versions[uid as usize]), RECORD_ROW.as_slice())
                    .unwrap();
                seq += 1;
                log.insert(seq, (uid, versions[uid as usize])).unwrap();
                n += 1;
            }
        }
        tx.commit().unwrap();
        samples.push(t.elapsed());
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = db.begin_read().unwrap();
    (
        rate,
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

/// The same writes with records keyed by commit sequence (append-only pages) and a small
/// (uid, version) -> sequence index: the layout alternative to scattered record pages.
fn redb_seq_run(batch: u64, seconds: f64) -> (f64, Duration, Duration) {
    let dir = dir();
    let db = redb::Database::create(dir.path().join("bench.redb")).unwrap();
    let mut versions = vec![0u64; N_INSTANCES as usize];
    let mut seq = 0u64;
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        let mut tx = db.begin_write().unwrap();
        tx.set_durability(redb::Durability::Immediate).unwrap();
        {
            let mut instances = tx.open_table(INSTANCES).unwrap();
            let mut records = tx.open_table(RECORDS_BY_SEQ).unwrap();
            let mut index = tx.open_table(RECORD_INDEX).unwrap();
            for _ in 0..batch {
                let uid = n % N_INSTANCES;
                let key = format!("bench/c-{uid}");
                let _ = instances
                    .get(key.as_str())
                    .unwrap()
                    .map(|v| v.value().len());
                versions[uid as usize] += 1;
                instances
                    .insert(key.as_str(), INSTANCE_ROW.as_slice())
                    .unwrap();
                seq += 1;
                records.insert(seq, RECORD_ROW.as_slice()).unwrap();
                index.insert((uid, versions[uid as usize]), seq).unwrap();
                n += 1;
            }
        }
        tx.commit().unwrap();
        samples.push(t.elapsed());
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    (
        rate,
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

fn sqlite_run(batch: u64, seconds: f64) -> (f64, Duration, Duration) {
    let dir = dir();
    let mut conn = rusqlite::Connection::open(dir.path().join("bench.sqlite")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE instances (key TEXT PRIMARY KEY, row BLOB NOT NULL) WITHOUT ROWID;
         CREATE TABLE records (uid INTEGER, version INTEGER, bytes BLOB NOT NULL, PRIMARY KEY (uid, version)) WITHOUT ROWID;
         CREATE TABLE log (seq INTEGER PRIMARY KEY, uid INTEGER, version INTEGER);",
    )
    .unwrap();
    let mut versions = vec![0u64; N_INSTANCES as usize];
    let mut seq = 0u64;
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        let tx = conn.transaction().unwrap();
        {
            let mut get = tx
                .prepare_cached("SELECT length(row) FROM instances WHERE key = ?1")
                .unwrap();
            let mut put = tx
                .prepare_cached("INSERT OR REPLACE INTO instances (key, row) VALUES (?1, ?2)")
                .unwrap();
            let mut rec = tx
                .prepare_cached("INSERT INTO records (uid, version, bytes) VALUES (?1, ?2, ?3)")
                .unwrap();
            let mut log = tx
                .prepare_cached("INSERT INTO log (seq, uid, version) VALUES (?1, ?2, ?3)")
                .unwrap();
            for _ in 0..batch {
                let uid = n % N_INSTANCES;
                let key = format!("bench/c-{uid}");
                let _: Option<i64> = get.query_row([&key], |r| r.get(0)).ok();
                versions[uid as usize] += 1;
                put.execute(rusqlite::params![key, INSTANCE_ROW.as_slice()])
                    .unwrap();
                rec.execute(rusqlite::params![
                    uid as i64,
                    versions[uid as usize] as i64,
                    RECORD_ROW.as_slice()
                ])
                .unwrap();
                seq += 1;
                log.execute(rusqlite::params![
                    seq as i64,
                    uid as i64,
                    versions[uid as usize] as i64
                ])
                .unwrap();
                n += 1;
            }
        }
        tx.commit().unwrap();
        samples.push(t.elapsed());
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    (
        rate,
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

fn main() {
    for batch in [1u64, 64, 256, 1024] {
        let (rate, p50, p99) = redb_run(batch, 3.0);
        report(
            &format!("store_compare.redb.batch_{batch}"),
            rate,
            "transitions/s",
            &format!("(commit p50 {p50:?} p99 {p99:?})"),
        );
        let (rate, p50, p99) = redb_seq_run(batch, 3.0);
        report(
            &format!("store_compare.redb_seq_keyed.batch_{batch}"),
            rate,
            "transitions/s",
            &format!("(commit p50 {p50:?} p99 {p99:?})"),
        );
        let (rate, p50, p99) = sqlite_run(batch, 3.0);
        report(
            &format!("store_compare.sqlite.batch_{batch}"),
            rate,
            "transitions/s",
            &format!("(commit p50 {p50:?} p99 {p99:?})"),
        );
    }
}
