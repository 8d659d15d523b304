//! Snapshot export, verify and import of many instances (default 100,000 with 10 history
//! records each) on the embedded store. Targets (issue 6): export and import >= 50,000
//! instances/s, verify >= 100 MB/s of snapshot.
//!
//! Phases, all streamed through files as `cnsmctl` does: the instances are built in memory
//! with the engine (conformance `Driver`) and loaded with one `import_instances` (the "store
//! import" figure: one durable transaction); `export` streams them into the one-file layout's
//! temporary file while hashing (`export_to` into `SignedOutput`), `sign` signs the digest,
//! writes the magic and bundle lines into the room reserved before the payload, syncs and
//! renames; `verify` runs the six steps over the file in two streaming passes; `import` streams
//! the payload (`ImportSource`) into `Store::import_stream` on an empty store (the store reads
//! and checks the items on a second thread). A second export of the imported store must hash
//! to the same digest.
//!
//! Then the same export and import run as `cnsmctl` child processes (release build), and their
//! peak resident memory (VmHWM from `/proc/PID/status`) must stay under a fixed bound
//! (256 MiB) that does not depend on the number of instances (the payload of 100,000 is about
//! 500 MB). The peak of a `cnsmctl get` on the same store (default page cache) is printed
//! beside it for comparison.
//!
//!   cargo build --release -p cnsmctl
//!   cargo bench -p cnsm-bench --bench snapshot              # 100,000 instances
//!   CNSM_BENCH_SNAPSHOT_INSTANCES=10000 cargo bench -p cnsm-bench --bench snapshot

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use cnsm_bench::{report, rss_bytes};
use cnsm_snapshot::files::{SignedOutput, SnapshotPaths};
use cnsm_store::conformance::{Driver, T0_MS, job_definition_row};
use cnsm_store::embedded::EmbeddedStore;
use cnsm_store::{ImportItem, Store};

const RECORDS_PER_INSTANCE: usize = 10;

fn main() {
    let n_instances: usize = std::env::var("CNSM_BENCH_SNAPSHOT_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    println!(
        "snapshot: {n_instances} instances x {RECORDS_PER_INSTANCE} records, embedded store (redb, durable)"
    );

    // The instances, built in memory through the engine.
    let started = Instant::now();
    let driver = Driver::new("job");
    let definitions = vec![job_definition_row("default", "job", T0_MS)];
    let mut items = Vec::with_capacity(n_instances);
    for i in 0..n_instances {
        let id = format!("job-{i:07}");
        let mut item = driver.create("default", &id, &[("batch", "bench")], T0_MS);
        let mut records = vec![item.record.clone()];
        for n in 1..RECORDS_PER_INSTANCE {
            item = driver.event(
                &item.instance,
                "ping",
                &format!("note {n}"),
                T0_MS + n as u64,
            );
            records.push(item.record.clone());
        }
        items.push(ImportItem {
            instance: item.instance,
            records,
            idempotency: Vec::new(),
        });
    }
    println!("built in memory in {:.1?}", started.elapsed());

    let source_dir = tempfile::tempdir().expect("tempdir");
    let source = EmbeddedStore::open(source_dir.path()).expect("store");
    let started = Instant::now();
    source
        .import_instances(&definitions, &items, false)
        .expect("store import");
    let store_import = started.elapsed();
    drop(items);
    report(
        "snapshot_store_import",
        n_instances as f64 / store_import.as_secs_f64(),
        "instances/s",
        &format!("(Store::import_instances, one durable transaction, {store_import:.2?})"),
    );

    let as_of_ms = T0_MS + 1_000_000;
    let files = tempfile::tempdir().expect("tempdir");
    let snapshot_path = files.path().join("all.snapshot");
    let key = cnsm_snapshot::SigningKey::generate().expect("key");
    let started = Instant::now();
    let mut output = SignedOutput::create(&snapshot_path, None).expect("spool");
    cnsm_snapshot::export_to(
        &source,
        "default",
        &cnsm_snapshot::Selection::All,
        as_of_ms,
        output.writer(),
        &mut |_, _| {},
    )
    .expect("export");
    let export = started.elapsed();
    let started = Instant::now();
    let written = output.finish(&key).expect("sign and write");
    let sign = started.elapsed();
    let mb = written.payload_len as f64 / 1e6;
    report(
        "snapshot_export",
        n_instances as f64 / export.as_secs_f64(),
        "instances/s",
        &format!("({export:.2?}, payload {mb:.1} MB streamed to a spool file while hashed)"),
    );
    report(
        "snapshot_sign",
        mb / sign.as_secs_f64(),
        "MB/s",
        &format!("({sign:.2?}: sign the digest, write the magic and bundle lines, fsync, rename)"),
    );

    let paths = SnapshotPaths::open(&snapshot_path, None).expect("layout");
    let started = Instant::now();
    let summary = cnsm_snapshot::files::verify_file(&paths, &key.public_key(), &mut |_, _| {})
        .expect("verify");
    let verify = started.elapsed();
    assert_eq!(summary.n_instances, n_instances as u64);
    report(
        "snapshot_verify",
        mb / verify.as_secs_f64(),
        "MB/s",
        &format!("({verify:.2?}, all six steps, two streaming passes over the file)"),
    );

    let target_dir = tempfile::tempdir().expect("tempdir");
    let target = EmbeddedStore::open(target_dir.path()).expect("store");
    let started = Instant::now();
    let (items, definitions) = cnsm_snapshot::ImportSource::open(
        paths.payload().expect("payload"),
        "default",
        Box::new(|_, _| {}),
    )
    .expect("open payload");
    let mut items = items;
    let imported = target
        .import_stream(&definitions, &mut items, false)
        .expect("import");
    let import = started.elapsed();
    assert_eq!(imported.n_instances, n_instances as u64);
    report(
        "snapshot_import",
        n_instances as f64 / import.as_secs_f64(),
        "instances/s",
        &format!("({import:.2?}: decode, check and write in one streamed durable transaction)"),
    );
    let mut again = cnsm_snapshot::HashingWriter::new(std::io::sink());
    cnsm_snapshot::export_to(
        &target,
        "default",
        &cnsm_snapshot::Selection::All,
        as_of_ms,
        &mut again,
        &mut |_, _| {},
    )
    .expect("export again");
    let (digest, _, _) = again.finish();
    assert!(
        digest == written.digest,
        "re-export of the imported store differs"
    );
    println!(
        "re-export identical ({} bytes); peak RSS of this process {:.0} MB",
        written.payload_len,
        rss_bytes() as f64 / 1e6
    );
    drop(target);
    drop(source);

    // The same through cnsmctl, in child processes whose peak memory is read from /proc.
    let cnsmctl = cnsm_bench::cnsmctl_path();
    let key_path = files.path().join("k.pem");
    std::fs::write(&key_path, key.to_pem()).expect("key file");
    std::fs::write(files.path().join("k.pub.pem"), key.public_key().to_pem()).expect("key");
    let source_path = source_dir.path().to_str().expect("utf-8");
    let (opened_kib, _) = peak_rss_kib(
        &cnsmctl,
        &[
            "--data-dir",
            source_path,
            "-n",
            "default",
            "get",
            "instances",
            "job-0000000",
        ],
    );
    let out_path = files.path().join("cli.snapshot");
    let (export_kib, export_time) = peak_rss_kib(
        &cnsmctl,
        &[
            "--data-dir",
            source_path,
            "-n",
            "default",
            "snapshot",
            "export",
            "--all",
            "--key",
            key_path.to_str().expect("utf-8"),
            "-o",
            out_path.to_str().expect("utf-8"),
        ],
    );
    let empty_dir = tempfile::tempdir().expect("tempdir");
    let (import_kib, import_time) = peak_rss_kib(
        &cnsmctl,
        &[
            "--data-dir",
            empty_dir.path().to_str().expect("utf-8"),
            "-n",
            "default",
            "snapshot",
            "import",
            out_path.to_str().expect("utf-8"),
            "--public-key",
            files.path().join("k.pub.pem").to_str().expect("utf-8"),
        ],
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    report(
        "snapshot_cnsmctl_export",
        n_instances as f64 / export_time.as_secs_f64(),
        "instances/s",
        &format!(
            "({export_time:.2?} end to end: open, export (checked on a second thread), sign, \
             write the bundle line, fsync; peak RSS {:.0} MiB; \
             `cnsmctl get` on the same store, default page cache: {:.0} MiB)",
            mib(export_kib),
            mib(opened_kib)
        ),
    );
    report(
        "snapshot_cnsmctl_import",
        n_instances as f64 / import_time.as_secs_f64(),
        "instances/s",
        &format!(
            "({import_time:.2?} end to end: one read of the file that decodes, checks, hashes \
             and writes, digest and signature checked before the commit; peak RSS {:.0} MiB)",
            mib(import_kib)
        ),
    );
    // Streaming: neither command holds the payload, and the store they open keeps a 64 MiB
    // page cache, so both stay under a fixed bound however many instances there are.
    let bound_kib = 256 * 1024;
    assert!(
        export_kib < bound_kib && import_kib < bound_kib,
        "peak RSS beyond the bound: export {export_kib} KiB, import {import_kib} KiB, \
         payload {mb:.0} MB"
    );
    println!(
        "cnsmctl peak RSS under {} MiB (payload {mb:.0} MB)",
        bound_kib / 1024
    );
}

/// Runs `cnsmctl args` to its end; returns its peak resident memory (VmHWM, KiB, read from
/// `/proc/PID/status` while it runs: the figure only grows) and how long it took.
fn peak_rss_kib(cnsmctl: &Path, args: &[&str]) -> (u64, std::time::Duration) {
    let started = Instant::now();
    let mut child = Command::new(cnsmctl)
        .args(args)
        .env_remove("CNSM_SERVER")
        .env_remove("CNSM_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn cnsmctl");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0;
    loop {
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(kib) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "cnsmctl {args:?} failed: {status}");
            return (peak_kib, started.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
