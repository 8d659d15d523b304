//! Behaviour of the embedded store beyond the conformance suite: locking, format versions,
//! verification checkpoints, and corruption found on open and by `verify`.

use std::path::Path;

use cnsm_core::Instance;
use cnsm_store::conformance::{Driver, T0_MS};
use cnsm_store::embedded::{EmbeddedOptions, EmbeddedStore, FILE_NAME, testing};
use cnsm_store::{CommitItem, ItemOutcome, STORE_FORMAT, Store, StoreError};

fn commit(store: &EmbeddedStore, items: &[CommitItem]) {
    let outcomes = store.commit(items).expect("the commit succeeds");
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, ItemOutcome::Committed { .. })),
        "{outcomes:?}"
    );
}

/// Commits `n_records` records of `default/{id}` one per commit; returns the items.
fn chain(store: &EmbeddedStore, driver: &Driver, id: &str, n_records: u64) -> Vec<CommitItem> {
    let mut items = vec![driver.create("default", id, &[], T0_MS)];
    commit(store, &items[..1]);
    for i in 1..n_records {
        let last: &Instance = &items.last().expect("genesis").instance;
        let next = driver.event(last, "ping", &format!("ping {i}"), T0_MS + i);
        commit(store, std::slice::from_ref(&next));
        items.push(next);
    }
    items
}

fn expect_corrupt(result: Result<EmbeddedStore, StoreError>) -> String {
    match result {
        Err(StoreError::Corrupt(message)) => message,
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("expected Corrupt, the store opened"),
    }
}

/// A store with two instances, closed cleanly, everything checkpointed.
fn closed_store(dir: &Path) -> (Vec<CommitItem>, Vec<CommitItem>) {
    let store = EmbeddedStore::open(dir).unwrap();
    let driver = Driver::new("job");
    let one = chain(&store, &driver, "one", 5);
    let two = chain(&store, &driver, "two", 5);
    store.close().unwrap();
    (one, two)
}

#[test]
fn open_creates_the_directory_and_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/data");
    let store = EmbeddedStore::open(&nested).unwrap();
    assert_eq!(store.path(), nested.join(FILE_NAME));
    assert!(store.path().is_file());
    assert_eq!(store.checkpoint().unwrap().n_unverified(), 0);
}

#[test]
fn a_second_open_of_an_open_store_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    match EmbeddedStore::open(dir.path()) {
        Err(StoreError::Locked(message)) => assert!(message.contains(FILE_NAME), "{message}"),
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("expected Locked, the store opened twice"),
    }
    assert!(matches!(
        EmbeddedStore::open_unverified(dir.path()),
        Err(StoreError::Locked(_))
    ));
    drop(store);
    EmbeddedStore::open(dir.path()).expect("the lock is released when the store is dropped");
}

#[test]
fn a_newer_format_is_refused_without_touching_the_file() {
    let dir = tempfile::tempdir().unwrap();
    closed_store(dir.path());
    testing::set_meta(
        dir.path(),
        testing::META_FORMAT_KEY,
        u64::from(STORE_FORMAT) + 1,
    )
    .unwrap();
    for _ in 0..2 {
        match EmbeddedStore::open(dir.path()) {
            Err(StoreError::FormatTooNew { found, supported }) => {
                assert_eq!((found, supported), (STORE_FORMAT + 1, STORE_FORMAT));
            }
            Err(other) => panic!("expected FormatTooNew, got {other}"),
            Ok(_) => panic!("expected FormatTooNew, the store opened"),
        }
    }
    let message = EmbeddedStore::open_unverified(dir.path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(message.contains("upgrade"), "{message}");
    testing::set_meta(
        dir.path(),
        testing::META_FORMAT_KEY,
        u64::from(STORE_FORMAT),
    )
    .unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_background_verifier_reads_back_commits_and_the_next_commit_persists_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let driver = Driver::new("job");
    chain(&store, &driver, "one", 30);
    assert_eq!(store.checkpoint().unwrap().last_seq, 30);
    let waited = std::time::Instant::now();
    while store.verified_in_memory() < 30 {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(10),
            "the verifier never caught up"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Commits do no verification themselves; the next one persists the verifier's watermark.
    chain(&store, &driver, "after", 1);
    let checkpoint = store.checkpoint().unwrap();
    assert!(checkpoint.verified_seq >= 30, "{checkpoint:?}");
    assert!(checkpoint.n_unverified() <= 1, "{checkpoint:?}");

    let batch: Vec<CommitItem> = (0..300)
        .map(|i| driver.create("default", &format!("b-{i}"), &[], T0_MS))
        .collect();
    commit(&store, &batch);
    store.close().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let checkpoint = store.checkpoint().unwrap();
    assert_eq!(
        (checkpoint.verified_seq, checkpoint.n_unverified()),
        (331, 0),
        "close checked the tail"
    );
}

#[test]
fn open_checks_the_unverified_tail_and_names_the_broken_record() {
    let dir = tempfile::tempdir().unwrap();
    closed_store(dir.path());
    testing::flip_record_byte(dir.path(), "default", "one", 2, 10).unwrap();
    // Behind the checkpoint, open does not look (that is what keeps it fast)...
    drop(EmbeddedStore::open(dir.path()).expect("the damage is behind the checkpoint"));
    // ...but once the checkpoint is moved back, open finds it.
    testing::set_meta(dir.path(), testing::META_VERIFIED_SEQ_KEY, 0).unwrap();
    let message = expect_corrupt(EmbeddedStore::open(dir.path()));
    assert!(
        message.contains("default/one") && message.contains("record 2"),
        "{message}"
    );
    // Refused again: the checkpoint did not move past it.
    expect_corrupt(EmbeddedStore::open(dir.path()));

    let store = EmbeddedStore::open_unverified(dir.path()).unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("default/one"),
        "{:?}",
        report.problems
    );
    // Looking does not move the checkpoint: the store stays refused until repaired.
    store
        .close()
        .expect("an unverified store closes without a check");
    expect_corrupt(EmbeddedStore::open(dir.path()));
}

#[test]
fn verify_reports_every_damaged_instance() {
    let dir = tempfile::tempdir().unwrap();
    closed_store(dir.path());
    testing::flip_record_byte(dir.path(), "default", "one", 3, 0).unwrap();
    testing::flip_record_byte(dir.path(), "default", "two", 4, 20).unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let report = store.verify().unwrap();
    assert_eq!((report.n_instances, report.n_records), (2, 10));
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("default/one") && report.problems[0].contains("record 3"),
        "{report:?}"
    );
    assert!(
        report.problems[1].contains("default/two") && report.problems[1].contains("record 4"),
        "{report:?}"
    );
}

#[test]
fn a_replaced_record_breaks_the_link_of_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (one, _) = closed_store(dir.path());
    // A well-formed record 2 with a consistent hash, but not the one record 3 chains to.
    let driver = Driver::new("job");
    let forged = driver.event(&one[1].instance, "ping", "forged", T0_MS + 99);
    assert_ne!(forged.record.hash, one[2].record.hash);
    testing::replace_record(dir.path(), "default", "one", &forged.record).unwrap();
    testing::set_meta(dir.path(), testing::META_VERIFIED_SEQ_KEY, 0).unwrap();

    let message = expect_corrupt(EmbeddedStore::open(dir.path()));
    assert!(
        message.contains("default/one") && message.contains("record 3"),
        "{message}"
    );
    let store = EmbeddedStore::open_unverified(dir.path()).unwrap();
    let report = store.verify().unwrap();
    assert!(!report.is_ok());
    assert!(
        report.problems.iter().all(|p| p.contains("default/one")),
        "{:?}",
        report.problems
    );
    assert!(
        report.problems.iter().any(|p| p.contains("record 3")),
        "{:?}",
        report.problems
    );
}

#[test]
fn verify_reports_a_damaged_timer_index() {
    let dir = tempfile::tempdir().unwrap();
    closed_store(dir.path());
    assert_eq!(testing::clear_timers(dir.path()).unwrap(), 2);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 2, "{:?}", report.problems);
    assert!(
        report
            .problems
            .iter()
            .all(|p| p.contains("missing from the timer index")),
        "{:?}",
        report.problems
    );
}

#[test]
fn a_record_that_does_not_chain_to_the_stored_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let driver = Driver::new("job");
    let stored = driver.create("default", "one", &[], T0_MS);
    commit(&store, std::slice::from_ref(&stored));
    // Another genesis of the same id (another time): a fork the store never saw.
    let other = driver.create("default", "one", &[], T0_MS + 1);
    let forked = driver.event(&other.instance, "start", "", T0_MS + 2);
    match store.commit(&[forked]) {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("chain"), "{message}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        store
            .instance("default", "one")
            .unwrap()
            .map(|s| s.instance),
        Some(stored.instance)
    );
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn close_leaves_nothing_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let driver = Driver::new("job");
    let batch: Vec<CommitItem> = (0..50)
        .map(|i| driver.create("default", &format!("j-{i}"), &[], T0_MS))
        .collect();
    commit(&store, &batch);
    assert_eq!(store.checkpoint().unwrap().n_unverified(), 50);
    store.close().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.checkpoint().unwrap().n_unverified(), 0);
    drop(store);
    // Dropping without close leaves the tail for the next open, which checks it.
    let store = EmbeddedStore::open(dir.path()).unwrap();
    commit(&store, &[driver.create("default", "late", &[], T0_MS)]);
    drop(store);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let checkpoint = store.checkpoint().unwrap();
    assert_eq!(
        (checkpoint.verified_seq, checkpoint.n_unverified()),
        (51, 0)
    );
}

/// Set in a child process of this test binary: what the child does and where
/// (`crash-quick-repair:<dir>`, `crash-full-repair:<dir>` or `hold:<dir>`).
const CHILD_ENV: &str = "CNSM_STORE_TEST_CHILD";

/// Runs test `name` of this binary in a child process, in child mode.
fn spawn_child(name: &str, mode: &str, dir: &Path) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{mode}:{}", dir.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the child starts")
}

/// The child mode of a test, when this process is a child.
fn child_mode() -> Option<(String, std::path::PathBuf)> {
    let value = std::env::var(CHILD_ENV).ok()?;
    let (mode, dir) = value.split_once(':')?;
    Some((mode.to_owned(), dir.into()))
}

/// Reads the child's stdout lines until `want` of them hold `prefix`; returns what follows it.
fn read_lines(child: &mut std::process::Child, prefix: &str, want: usize) -> Vec<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut found = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        // libtest may print the test's name on the same line, before the output.
        if let Some(at) = line.find(prefix) {
            found.push(line[at + prefix.len()..].to_owned());
            if found.len() == want {
                break;
            }
        }
    }
    found
}

#[test]
fn a_store_held_by_another_process_is_locked() {
    if let Some((_, dir)) = child_mode() {
        let _store = EmbeddedStore::open(&dir).expect("the child opens the store");
        println!("@@open");
        std::thread::sleep(std::time::Duration::from_secs(60));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_child(
        "embedded::a_store_held_by_another_process_is_locked",
        "hold",
        dir.path(),
    );
    assert_eq!(
        read_lines(&mut child, "@@open", 1).len(),
        1,
        "the child opened the store"
    );
    let result = EmbeddedStore::open(dir.path());
    child.kill().expect("kill the child");
    child.wait().expect("reap the child");
    match result {
        Err(StoreError::Locked(message)) => {
            assert!(message.contains("another process"), "{message}")
        }
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("expected Locked, two processes opened the store"),
    }
    let store = EmbeddedStore::open(dir.path()).expect("the lock dies with the process");
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_killed_writer_loses_no_acknowledged_commit() {
    let driver = Driver::new("job");
    if let Some((mode, dir)) = child_mode() {
        // Commits forever, printing each acknowledged (id, version), until killed.
        use std::io::Write;
        let mut options = EmbeddedOptions::default();
        options.quick_repair = mode != "crash-full-repair";
        options.write_ahead_log = mode != "crash-no-log";
        let checkpoints = mode == "crash-checkpoints";
        let background = mode == "crash-background";
        let store =
            EmbeddedStore::open_with_options(&dir, options).expect("the child opens the store");
        let pid = std::process::id();
        let mut instances: Vec<Instance> = Vec::new();
        for round in 0u64.. {
            let mut batch =
                vec![driver.create("default", &format!("p{pid}-{round}"), &[], T0_MS + round)];
            batch.extend(
                instances
                    .iter()
                    .map(|i| driver.event(i, "ping", &format!("round {round}"), T0_MS + round)),
            );
            let outcomes = store.commit(&batch).expect("the child commits");
            assert!(
                outcomes
                    .iter()
                    .all(|o| matches!(o, ItemOutcome::Committed { .. })),
                "{outcomes:?}"
            );
            let mut out = std::io::stdout().lock();
            for item in &batch {
                writeln!(out, "@@ack {} {}", item.instance.id, item.instance.version)
                    .expect("stdout");
            }
            out.flush().expect("stdout");
            instances = batch.into_iter().map(|item| item.instance).collect();
            if checkpoints && round % 64 == 63 {
                store.checkpoint_now().expect("a checkpoint");
            }
            if background && round % 16 == 15 {
                // Beside the committer: the next batches are decided and logged while it runs.
                store.start_checkpoint_now().expect("a checkpoint");
            }
            // Keep the batch size bounded: the oldest instances stop.
            if instances.len() > 20 {
                instances.remove(0);
            }
        }
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for attempt in 0..5 {
        let mut child = spawn_child(
            "embedded::a_killed_writer_loses_no_acknowledged_commit",
            // Both ways redb recovers (from the allocator state saved by the last durable
            // commit, or by walking the file), batches in the write-ahead log only or with
            // checkpoints between them (on the committer's thread, or beside it, killed while
            // one runs), and without the log (a durable redb commit each).
            [
                "crash-quick-repair",
                "crash-full-repair",
                "crash-checkpoints",
                "crash-background",
                "crash-no-log",
            ][attempt],
            dir.path(),
        );
        // Kill at a different point each time, mid-stream.
        let acks = read_lines(&mut child, "@@ack ", 300 + attempt * 137);
        child.kill().expect("kill the child");
        child.wait().expect("reap the child");
        assert!(!acks.is_empty(), "the child acknowledged commits");

        let store = EmbeddedStore::open(dir.path()).expect("the store opens after the kill");
        for ack in &acks {
            let (id, version) = ack.split_once(' ').expect("id and version");
            let version: u64 = version.parse().expect("a version");
            let row = store
                .instance("default", id)
                .unwrap()
                .unwrap_or_else(|| panic!("{id} survived"));
            assert!(
                row.instance.version >= version,
                "{id} lost version {version}"
            );
        }
        let report = store.verify().unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        // The next child goes on writing to the same store.
    }
}

#[test]
fn any_flipped_byte_of_a_record_or_an_instance_row_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = closed_store(dir.path());
    let record_len = one[2].record.bytes.len();
    let row_len = cnsm_core::cbor::encode(&serde_json::to_value(&two[4].instance).unwrap()).len();
    // A spread of positions: the first bytes (headers), then every 7th.
    let positions = |len: usize| {
        (0..len)
            .filter(|i| *i < 8 || i % 7 == 0)
            .collect::<Vec<_>>()
    };
    for at in positions(record_len) {
        testing::flip_record_byte(dir.path(), "default", "one", 2, at).unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let report = store.verify().unwrap();
        assert!(
            !report.problems.is_empty()
                && report.problems.iter().all(|p| p.contains("default/one")),
            "record byte {at}: {:?}",
            report.problems
        );
        store.close().unwrap();
        testing::flip_record_byte(dir.path(), "default", "one", 2, at).unwrap();
    }
    for at in positions(row_len) {
        testing::flip_instance_row_byte(dir.path(), "default", "two", at).unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let report = store.verify().unwrap();
        assert!(
            !report.problems.is_empty()
                && report.problems.iter().all(|p| p.contains("default/two")),
            "row byte {at}: {:?}",
            report.problems
        );
        // Reads of the damaged row fail cleanly or return something; they never panic.
        let _ = store.instance("default", "two");
        store.close().unwrap();
        testing::flip_instance_row_byte(dir.path(), "default", "two", at).unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert!(store.verify().unwrap().is_ok(), "every flip was undone");
}

#[test]
fn history_reads_records_through_the_index_across_interleaved_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let driver = Driver::new("job");
    // Interleave two instances in the same batches so that their records alternate in the
    // commit log.
    let mut one = vec![driver.create("default", "one", &[], T0_MS)];
    let mut two = vec![driver.create("default", "two", &[], T0_MS)];
    commit(&store, &[one[0].clone(), two[0].clone()]);
    for i in 1..6u64 {
        let a = driver.event(&one.last().unwrap().instance, "ping", "a", T0_MS + i);
        let b = driver.event(&two.last().unwrap().instance, "ping", "b", T0_MS + i);
        let a2 = driver.event(&a.instance, "ping", "a2", T0_MS + i);
        commit(&store, &[a.clone(), b.clone(), a2.clone()]);
        one.extend([a, a2]);
        two.push(b);
    }
    for (id, items) in [("one", &one), ("two", &two)] {
        let history = store.history("default", id, 0, 0).unwrap();
        assert_eq!(history.len(), items.len());
        for (record, item) in history.iter().zip(items.iter()) {
            assert_eq!(record, &item.record);
        }
        let tail = store.history("default", id, 3, 2).unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0], items[3].record);
        assert_eq!(tail[1], items[4].record);
    }
    assert!(store.history("default", "one", 100, 0).unwrap().is_empty());
    let checkpoint = store.checkpoint().unwrap();
    assert_eq!(checkpoint.last_seq, (one.len() + two.len()) as u64);
    assert!(store.verify().unwrap().is_ok());
    store.close().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.checkpoint().unwrap().n_unverified(), 0);
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_row_whose_last_hash_column_is_wrong_refuses_the_next_commit_and_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (one, _) = closed_store(dir.path());
    testing::set_row_last_hash(dir.path(), "default", "one", [7; 32]).unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        report.problems[0].contains("default/one") && report.problems[0].contains("fixed columns"),
        "{:?}",
        report.problems
    );
    // The commit path links the new record against the column, not the stored record.
    let driver = Driver::new("job");
    let next = driver.event(&one.last().unwrap().instance, "ping", "next", T0_MS + 50);
    match store.commit(&[next]) {
        Err(StoreError::Corrupt(message)) => {
            assert!(
                message.contains("default/one") && message.contains("chain"),
                "{message}"
            )
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    store.close().unwrap();
    testing::set_row_last_hash(
        dir.path(),
        "default",
        "one",
        one.last().unwrap().record.hash.0,
    )
    .unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert!(store.verify().unwrap().is_ok());
}

#[test]
fn a_missing_record_index_entry_is_found_on_open_and_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    closed_store(dir.path());
    testing::remove_record_index_entry(dir.path(), "default", "two", 3).unwrap();
    // Behind the checkpoint, open does not look...
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let report = store.verify().unwrap();
    assert!(!report.is_ok());
    assert!(
        report.problems.iter().all(|p| p.contains("default/two")),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("record 3") && p.contains("record index")),
        "{:?}",
        report.problems
    );
    drop(store);
    // ...but the tail check does: record 3 of `two` is not indexed, so record 4's link cannot
    // be followed and record 3 is not found at its sequence.
    testing::set_meta(dir.path(), testing::META_VERIFIED_SEQ_KEY, 0).unwrap();
    let message = expect_corrupt(EmbeddedStore::open(dir.path()));
    assert!(
        message.contains("default/two") && message.contains("record 3"),
        "{message}"
    );
}

/// `records_after` reads the commit log in commit order, from any position, in pages.
#[test]
fn records_after_reads_the_commit_log_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let driver = Driver::new("job");
    let a = chain(&store, &driver, "a", 3);
    let b = chain(&store, &driver, "b", 2);
    let all = store.records_after(0, 0).unwrap();
    let hashes: Vec<_> = all.iter().map(|(_, s)| s.hash).collect();
    let expected: Vec<_> = a.iter().chain(&b).map(|i| i.record.hash).collect();
    assert_eq!(hashes, expected, "commit order");
    let seqs: Vec<u64> = all.iter().map(|(seq, _)| *seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // From a position: strictly after it; pages of `limit`.
    let tail = store.records_after(seqs[2], 2).unwrap();
    assert_eq!(
        tail.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        seqs[3..5].to_vec()
    );
    assert!(store.records_after(seqs[4], 0).unwrap().is_empty());
    // The bytes are the stored record bytes.
    assert_eq!(all[0].1.bytes, a[0].record.bytes);
}

/// The write-ahead log's file beside the store's database file.
fn log_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join(format!("{}.wal", cnsm_store::embedded::FILE_NAME))
}

/// A store holding instance `a` at version 1 (two batches through the log), and `a`'s last item.
fn store_with_a_at_version_1() -> (Driver, tempfile::TempDir, EmbeddedStore, CommitItem) {
    let driver = Driver::new("job");
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let a = driver.create("default", "a", &[], T0_MS);
    store.commit(std::slice::from_ref(&a)).unwrap();
    let a1 = driver.event(&a.instance, "ping", "one", T0_MS + 1);
    store.commit(std::slice::from_ref(&a1)).unwrap();
    (driver, dir, store, a1)
}

fn version_of_a(store: &EmbeddedStore) -> u64 {
    store
        .instance("default", "a")
        .unwrap()
        .unwrap()
        .instance
        .version
}

#[test]
fn the_log_replays_once_and_a_torn_tail_is_cut_off() {
    let (driver, dir, store, a1) = store_with_a_at_version_1();

    // A crash right after a checkpoint: the log still holds both frames (it is never
    // truncated), and redb has them already; they start below the store's next sequence.
    store.checkpoint_now().unwrap();
    drop(store);
    let mut logged = std::fs::read(log_path(dir.path())).unwrap();
    assert!(
        logged.starts_with(b"cnsV"),
        "the batches went through the log"
    );
    // ... and a torn frame after them (a batch never acknowledged).
    let end = logged.iter().rposition(|&b| b != 0).unwrap() + 1;
    logged[end..end + 12].copy_from_slice(b"cnsV\x10\x00\x00\x00garb");
    std::fs::write(log_path(dir.path()), &logged).unwrap();
    for _ in 0..2 {
        let store = EmbeddedStore::open(dir.path()).expect("the stale log replays as a no-op");
        assert_eq!(version_of_a(&store), 1);
        assert_eq!(store.history("default", "a", 0, 10).unwrap().len(), 2);
        assert!(store.verify().unwrap().is_ok());
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let a2 = driver.event(&a1.instance, "ping", "two", T0_MS + 2);
    assert!(matches!(
        store.commit(std::slice::from_ref(&a2)).unwrap()[0],
        ItemOutcome::Committed { .. }
    ));
    store.close().unwrap();

    // A log from another store is refused, naming the log, and nothing is written: one that
    // starts at this store's next sequence (4) but does not follow its instances (here: an
    // instance `a` created at another time), and one that starts past it.
    for n_before in [3, 5] {
        let elsewhere = tempfile::tempdir().unwrap();
        let other = EmbeddedStore::open(elsewhere.path()).unwrap();
        for n in 0..n_before {
            other
                .commit(&[driver.create("default", &format!("x{n}"), &[], T0_MS)])
                .unwrap();
        }
        other.checkpoint_now().unwrap();
        other
            .commit(&[driver.create("default", "a", &[], T0_MS + 5)])
            .unwrap();
        let foreign = std::fs::read(log_path(elsewhere.path())).unwrap();
        drop(other);
        let saved = std::fs::read(log_path(dir.path())).unwrap();
        std::fs::write(log_path(dir.path()), &foreign).unwrap();
        match EmbeddedStore::open(dir.path()) {
            Err(StoreError::Corrupt(message)) => {
                assert!(message.contains("write-ahead log"), "{message}")
            }
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("a log that does not follow the store was replayed"),
        }
        std::fs::write(log_path(dir.path()), &saved).unwrap();
    }
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(version_of_a(&store), 2);
}

#[test]
fn checkpoints_are_counted_with_the_log_bytes_they_took_in() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(store.take_checkpoint_stats(), Default::default());
    drop(store);
    let (_driver, _dir, store, _a1) = store_with_a_at_version_1();
    store.checkpoint_now().unwrap();
    // A checkpoint took the two batches in, by itself or when asked.
    let stats = store.take_checkpoint_stats();
    assert!(stats.count >= 1, "{stats:?}");
    assert!(stats.log_bytes > 0 && stats.max <= stats.total, "{stats:?}");
    assert_eq!(store.take_checkpoint_stats(), Default::default(), "taken");
}

/// A log written before frames named their sequence (`cnsW` frames, the file truncated at each
/// checkpoint) is still replayed, and emptied once it is in a durable commit.
#[test]
fn a_log_of_the_first_format_is_replayed() {
    let (driver, dir, store, a1) = store_with_a_at_version_1();
    store.checkpoint_now().unwrap();
    drop(store);
    // The first format's frame of a batch holding `a2`: its payload is the new format's.
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let a2 = driver.event(&a1.instance, "ping", "two", T0_MS + 2);
    store.commit(std::slice::from_ref(&a2)).unwrap();
    let logged = std::fs::read(log_path(dir.path())).unwrap();
    drop(store);
    // The same batch as a frame of the first format: no sequence field, its own checksum.
    let len = u32::from_le_bytes(logged[4..8].try_into().unwrap()) as usize;
    let payload = &logged[32..32 + len];
    let mut legacy = b"cnsW".to_vec();
    legacy.extend_from_slice(&logged[4..8]);
    let sum = cnsm_core::Hash32::digest(b"cnsm.wal.frame.v1", payload);
    legacy.extend_from_slice(&sum.0[..16]);
    legacy.extend_from_slice(payload);
    std::fs::write(log_path(dir.path()), &legacy).unwrap();
    // Whether or not redb kept `a2` when the store was dropped, the replay leaves `a` at
    // version 2 (the first format's rule skips an item already stored), and the log is emptied
    // after the open's durable commit.
    let store = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(version_of_a(&store), 2);
    assert_eq!(std::fs::metadata(log_path(dir.path())).unwrap().len(), 0);
    assert!(store.verify().unwrap().is_ok());
}

/// A streamed import reads its source on a second thread: a source that panics midway (after
/// items were written into the transaction) fails the import instead of committing the items
/// before it, and the store stays empty; the same items without the panic import.
#[test]
fn streamed_import_whose_source_panics_writes_nothing() {
    let definitions = vec![cnsm_store::conformance::job_definition_row(
        "default", "job", T0_MS,
    )];
    let driver = Driver::new("job");
    let items: Vec<cnsm_store::ImportItem> = (0..3)
        .map(|i| {
            let created = driver.create("default", &format!("i-{i}"), &[], T0_MS);
            cnsm_store::ImportItem {
                instance: created.instance,
                records: vec![created.record],
                idempotency: Vec::new(),
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let mut panicking = items.clone().into_iter().enumerate().map(|(i, item)| {
        assert!(i < 2, "the source breaks down");
        Ok(item)
    });
    match store.import_stream(&definitions, &mut panicking, false) {
        Err(StoreError::Io(message)) => assert!(message.contains("import reader"), "{message}"),
        other => panic!("expected an Io error, got {other:?}"),
    }
    assert!(store.records_after(0, 10).unwrap().is_empty());
    assert!(store.list_definitions(None).unwrap().is_empty());

    let report = store
        .import_stream(&definitions, &mut items.into_iter().map(Ok), false)
        .unwrap();
    assert_eq!((report.n_instances, report.n_records), (3, 3));
    assert!(store.verify().unwrap().is_ok());
}

/// Copies the files of a data directory (a crash image when nothing writes meanwhile).
fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A checkpoint beside the committer: batches that arrive while it runs are decided (on the
/// heads earlier deferred batches left), logged and acknowledged without redb's write lock; reads
/// of the instances they changed wait for them, other reads do not; and a crash while it runs
/// loses none of them (replay goes from the first log file into the second).
#[test]
fn batches_acknowledged_during_a_background_checkpoint_are_kept_and_read_back() {
    let (driver, dir, store, a1) = store_with_a_at_version_1();
    let b = driver.create("default", "b", &[], T0_MS);
    commit(&store, std::slice::from_ref(&b));
    store.hold_checkpoints(true);
    store.start_checkpoint_now().unwrap();

    let a2 = driver.event(&a1.instance, "ping", "two", T0_MS + 2);
    let a3 = driver.event(&a2.instance, "ping", "three", T0_MS + 3);
    let c = driver.create("default", "c", &[], T0_MS + 3);
    commit(&store, &[a2.clone(), a3.clone(), c.clone()]);
    // Compare-and-swap against the deferred heads: a stale version, a second create of `c`, and
    // one batch whose second item loses to its first.
    let late = driver.event(&a1.instance, "ping", "late", T0_MS + 4);
    let c_again = driver.create("default", "c", &[], T0_MS + 4);
    let b1 = driver.event(&b.instance, "ping", "one", T0_MS + 4);
    let b1_twice = driver.event(&b.instance, "ping", "other", T0_MS + 5);
    let outcomes = store
        .commit(&[late, c_again, b1.clone(), b1_twice])
        .unwrap();
    assert_eq!(outcomes[0], ItemOutcome::Conflict { actual: Some(3) });
    assert_eq!(outcomes[1], ItemOutcome::Conflict { actual: Some(0) });
    assert!(matches!(outcomes[2], ItemOutcome::Committed { .. }));
    assert_eq!(outcomes[3], ItemOutcome::Conflict { actual: Some(1) });
    // Instance reads do not wait: a changed instance is read as the deferred batch left it,
    // others from redb; so do idempotency keys.
    assert_eq!(version_of_a(&store), 3);
    assert_eq!(
        store
            .instance("default", "c")
            .unwrap()
            .unwrap()
            .instance
            .version,
        0
    );
    let d = driver.create("default", "d", &[], T0_MS);
    assert!(store.instance("default", "d").unwrap().is_none());
    let mut b2 = driver.event_with_key(&b1.instance, "ping", "two", T0_MS + 6, Some("k-2"));
    b2.idempotency = Some(cnsm_store::IdempotencyEntry {
        key: "k-2".into(),
        request_hash: cnsm_core::Hash32([7; 32]),
        version: 2,
        expires_ms: T0_MS + 86_400_000,
    });
    commit(&store, std::slice::from_ref(&b2));
    let entry = store.idempotency("default", "b", "k-2").unwrap().unwrap();
    assert_eq!(entry.version, 2);

    // A crash while the checkpoint runs: redb does not write while it is held.
    let image = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), image.path());

    store.hold_checkpoints(false);
    // History waits for the deferred batches to be applied.
    assert_eq!(store.history("default", "a", 0, 10).unwrap().len(), 4);
    assert_eq!(
        store.idempotency("default", "b", "k-2").unwrap(),
        Some(entry)
    );
    assert_eq!(store.list_instances(&Default::default()).unwrap().len(), 3);
    // Back on the committer's path.
    let a4 = driver.event(&a3.instance, "ping", "four", T0_MS + 5);
    commit(&store, &[a4, d]);
    assert!(store.verify().unwrap().is_ok());
    let stats = store.take_checkpoint_stats();
    assert!(stats.count >= 1, "{stats:?}");
    store.close().unwrap();

    let crashed = EmbeddedStore::open(image.path()).expect("the crash image opens");
    assert_eq!(version_of_a(&crashed), 3);
    assert_eq!(
        crashed
            .instance("default", "b")
            .unwrap()
            .unwrap()
            .instance
            .version,
        2
    );
    assert_eq!(
        crashed
            .instance("default", "c")
            .unwrap()
            .unwrap()
            .instance
            .version,
        0
    );
    assert!(crashed.verify().unwrap().is_ok());
    // ... and goes on from there.
    let a4 = driver.event(&a3.instance, "ping", "four", T0_MS + 5);
    commit(&crashed, std::slice::from_ref(&a4));
    drop(crashed);
    let crashed = EmbeddedStore::open(image.path()).unwrap();
    assert_eq!(version_of_a(&crashed), 4);

    let reopened = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(version_of_a(&reopened), 4);
    assert!(reopened.instance("default", "d").unwrap().is_some());
    assert!(reopened.verify().unwrap().is_ok());
}

#[test]
fn many_deferred_batches_are_applied_in_rounds_while_the_committer_goes_on() {
    let driver = Driver::new("job");
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let seed = driver.create("default", "seed", &[], T0_MS);
    commit(&store, std::slice::from_ref(&seed));
    store.hold_checkpoints(true);
    store.start_checkpoint_now().unwrap();
    // More deferred items than the last round applies under the lock: 20 batches of 20 creates.
    let mut heads: Vec<CommitItem> = Vec::new();
    for batch in 0..20 {
        let items: Vec<CommitItem> = (0..20)
            .map(|i| driver.create("default", &format!("i-{batch}-{i}"), &[], T0_MS))
            .collect();
        commit(&store, &items);
        heads.extend(items);
    }
    store.hold_checkpoints(false);
    // While the checkpoint thread applies them, keep committing to the same instances and read
    // each back (its row, and its history, which waits until its batches are applied).
    for round in 1..=3u64 {
        for head in heads.iter_mut() {
            let next = driver.event(&head.instance, "ping", "again", T0_MS + round);
            commit(&store, std::slice::from_ref(&next));
            let id = &*head.instance.id;
            let stored = store.instance("default", id).unwrap().unwrap();
            assert_eq!(stored.instance.version, round, "{id}");
            assert_eq!(
                store.history("default", id, 0, 10).unwrap().len() as u64,
                round + 1
            );
            *head = next;
        }
    }
    store.checkpoint_now().unwrap();
    let stats = store.take_checkpoint_stats();
    assert!(stats.deferred_items >= 400, "{stats:?}");
    assert!(stats.free_rounds >= 1, "{stats:?}");
    assert!(store.verify().unwrap().is_ok());
    store.close().unwrap();
    let reopened = EmbeddedStore::open(dir.path()).unwrap();
    for head in &heads {
        let stored = reopened.instance("default", &head.instance.id).unwrap();
        assert_eq!(stored.unwrap().instance.version, 3);
    }
    assert!(reopened.verify().unwrap().is_ok());
}

/// The nice value in a `/proc/.../stat` line: field 19, counting from the pid; the fields after
/// the command name, which ends at the last ')', start at field 3.
#[cfg(target_os = "linux")]
fn nice_in_stat(stat: &str) -> i64 {
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    after
        .split_whitespace()
        .nth(19 - 3)
        .unwrap()
        .parse()
        .unwrap()
}

/// The nice value of each thread of this process with the name `name`, from `/proc`.
#[cfg(target_os = "linux")]
fn nice_of_threads(name: &str) -> Vec<i64> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue; // the thread ended meanwhile
        };
        found.push(nice_in_stat(&stat));
    }
    found
}

/// The nice value of the calling thread.
#[cfg(target_os = "linux")]
fn own_nice() -> i64 {
    nice_in_stat(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
}

#[cfg(target_os = "linux")]
#[test]
fn background_threads_run_at_a_lower_cpu_priority_than_the_committer() {
    let driver = Driver::new("job");
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    commit(&store, &[driver.create("default", "seed", &[], T0_MS)]);
    store.hold_checkpoints(true);
    store.start_checkpoint_now().unwrap();
    // The test runs at some nice value of its own (0 unless started under `nice`); a thread can
    // raise its nice value but not lower it.
    let own = own_nice();
    let expected = own.max(10);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let checkpoint = nice_of_threads("cnsm-checkpoint");
        let verifier = nice_of_threads("cnsm-verifier");
        // Other tests of this binary may run stores of their own: every such thread is lowered.
        if !checkpoint.is_empty()
            && !verifier.is_empty()
            && checkpoint
                .iter()
                .chain(&verifier)
                .all(|&nice| nice == expected)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "checkpoint threads at nice {checkpoint:?}, verifiers at {verifier:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The calling thread (the committer, in the runtime) keeps its priority.
    assert_eq!(own_nice(), own);
    store.hold_checkpoints(false);
    store.checkpoint_now().unwrap();
    store.close().unwrap();
}
