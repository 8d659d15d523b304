//! `keys generate` and `snapshot export|verify|import`, locally and through a server: exit
//! codes, the files written, refusals that change nothing.

use std::process::Stdio;

use super::{Cli, server};

/// Exports shop from `source`, verifies, imports into `target`; checks every refusal.
fn round_trip(source: &Cli, target: &Cli) {
    source.order("o-1", r#"{"total": 40}"#);
    source.order("o-2", r#"{"total": 10}"#);
    source.run(&["-n", "shop", "send", "o-1", "complete"]).ok();
    // Keys and files live in the source's directory.
    let dir = source.dir.path();
    let key = dir.join("signing-key.pem");
    let public = dir.join("signing-key.pub.pem");
    let snapshot = dir.join("shop.snapshot");
    let (key, public, snapshot) = (
        key.to_str().unwrap(),
        public.to_str().unwrap(),
        snapshot.to_str().unwrap(),
    );
    source
        .run(&["keys", "generate", "--out", key])
        .ok()
        .stdout_has("signing-key.pub.pem");
    source
        .run(&["keys", "generate", "--out", key])
        .code(4)
        .stderr_has("--force");
    source
        .run(&[
            "-n", "shop", "snapshot", "export", "--key", key, "-o", snapshot,
        ])
        .code(2);
    source
        .run(&[
            "-n", "shop", "snapshot", "export", "--all", "--key", key, "-o", snapshot,
        ])
        .ok()
        .stdout_has("2 instance(s), 3 record(s), 1 definition revision(s)");
    target
        .run(&["snapshot", "verify", snapshot, "--public-key", public])
        .ok()
        .stdout_has("VERIFIED");

    // A flipped byte: exit 1 naming the step; the import changes nothing.
    let mut bytes = std::fs::read(snapshot).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    let bad = dir.join("bad.snapshot");
    std::fs::write(&bad, &bytes).unwrap();
    let bad = bad.to_str().unwrap();
    target
        .run(&["snapshot", "verify", bad, "--public-key", public])
        .code(1)
        .stderr_has("step 2 (digest)");
    target
        .run(&[
            "-n",
            "shop",
            "snapshot",
            "import",
            bad,
            "--public-key",
            public,
        ])
        .code(1);
    // Nothing there: locally the import read the file once and refused to commit at its end
    // (the digest), leaving at most an empty store; on a server the file was verified before
    // the upload. Either way the namespace is empty.
    let listed = target.run(&["-n", "shop", "get", "instances"]);
    assert!(!listed.stdout.contains("o-1"), "{listed:#?}");

    target
        .run(&[
            "-n",
            "shop",
            "snapshot",
            "import",
            snapshot,
            "--public-key",
            public,
        ])
        .ok()
        .stdout_has("2 instance(s) (0 replaced), 3 record(s)");
    target
        .run(&[
            "-n",
            "shop",
            "snapshot",
            "import",
            snapshot,
            "--public-key",
            public,
        ])
        .code(4)
        .stderr_has("already exist");
    target.run(&["-n", "shop", "send", "o-1", "cancel"]).ok();
    target
        .run(&[
            "-n",
            "shop",
            "snapshot",
            "import",
            snapshot,
            "--public-key",
            public,
            "--replace",
        ])
        .ok()
        .stdout_has("(2 replaced)");
    let o1 = target
        .run(&["-n", "shop", "get", "instances", "o-1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(o1["state"], "validated", "{o1}");
}

#[test]
fn snapshots_round_trip_between_stores() {
    let source = Cli::new();
    let target = Cli::new();
    round_trip(&source, &target);
    target.run(&["store", "verify"]).ok();
}

#[test]
fn snapshots_round_trip_between_servers() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let server_a = server::ServerChild::start(a.path());
    let server_b = server::ServerChild::start(b.path());
    let mut source = Cli::new();
    source.server = Some(server_a.url.clone());
    let mut target = Cli::new();
    target.server = Some(server_b.url.clone());
    round_trip(&source, &target);
}

/// Fills `cli`'s store with `n_instances` instances of 10 records each, every record carrying
/// a note of `note_len` bytes (one import, as the snapshot benchmark does).
fn fill_store(cli: &Cli, n_instances: usize, note_len: usize) {
    use cnsm_store::conformance::{Driver, T0_MS, job_definition_row};
    use cnsm_store::{ImportItem, Store};
    let store = cnsm_store::embedded::EmbeddedStore::open(&cli.data_dir()).unwrap();
    let definitions = [job_definition_row("default", "job", T0_MS)];
    let driver = Driver::new("job");
    let note = "n".repeat(note_len);
    let items: Vec<ImportItem> = (0..n_instances)
        .map(|i| {
            let mut item = driver.create("default", &format!("job-{i:05}"), &[], T0_MS);
            let mut records = vec![item.record.clone()];
            for n in 1..10 {
                item = driver.event(&item.instance, "ping", &note, T0_MS + n);
                records.push(item.record.clone());
            }
            ImportItem {
                instance: item.instance,
                records,
                idempotency: Vec::new(),
            }
        })
        .collect();
    store.import_instances(&definitions, &items, false).unwrap();
}

/// The peak resident memory (VmHWM, in KiB) of one `cnsmctl` run, read from
/// `/proc/PID/status` until the process exits (the figure only grows, so the last reading is
/// the peak up to the last few milliseconds of its life).
fn peak_rss_kib(cli: &Cli, args: &[&str]) -> u64 {
    let mut child = cli
        .command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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
        if let Some(status) = child.try_wait().unwrap() {
            if !status.success() {
                // Run it again to show what went wrong.
                cli.run(args).ok();
            }
            return peak_kib;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Export and import stream: `cnsmctl`'s peak memory does not grow with the snapshot. From
/// 6,000 to 12,000 instances (about 146 and 292 MB of payload), the peak of each command grows
/// by far less than the payload did (measured: about 2 MiB; the store's page cache, 64 MiB
/// for snapshot commands, is full at both sizes).
#[test]
fn snapshot_memory_does_not_grow_with_the_snapshot() {
    const NOTE_LEN: usize = 1024;
    let mut peaks = Vec::new();
    for n_instances in [6_000, 12_000] {
        let source = Cli::new();
        fill_store(&source, n_instances, NOTE_LEN);
        let dir = source.dir.path();
        let key = dir.join("k.pem");
        let public = dir.join("k.pub.pem");
        let file = dir.join("all.snapshot");
        let (key, public, file) = (
            key.to_str().unwrap(),
            public.to_str().unwrap(),
            file.to_str().unwrap(),
        );
        source.run(&["keys", "generate", "--out", key]).ok();
        let export = peak_rss_kib(
            &source,
            &[
                "-n", "default", "snapshot", "export", "--all", "--key", key, "-o", file,
            ],
        );
        let payload_len = std::fs::metadata(file).unwrap().len();
        let target = Cli::new();
        let import = peak_rss_kib(
            &target,
            &[
                "-n",
                "default",
                "snapshot",
                "import",
                file,
                "--public-key",
                public,
            ],
        );
        target
            .run(&["-n", "default", "get", "instances", "job-00019"])
            .ok();
        eprintln!("{n_instances}: {payload_len} bytes, export {export} KiB, import {import} KiB");
        peaks.push((n_instances, payload_len, export, import));
    }
    let (_, small_len, small_export, small_import) = peaks[0];
    let (_, large_len, large_export, large_import) = peaks[1];
    assert!(large_len - small_len > 100_000_000, "{peaks:?}");
    for (what, small, large) in [
        ("export", small_export, large_export),
        ("import", small_import, large_import),
    ] {
        // Holding the payload would add all of the 146 MB it grew by.
        assert!(
            large.saturating_sub(small) < 32 * 1024,
            "{what}: peak {small} KiB for {small_len} bytes, {large} KiB for {large_len} bytes"
        );
    }
}
