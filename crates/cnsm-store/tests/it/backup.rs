//! Online backup (a consistent point-in-time copy while commits go on), restore into a new
//! directory, and the refusals of both.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cnsm_core::Instance;
use cnsm_core::engine::revision_hash;
use cnsm_store::conformance::{Driver, T0_MS, job_definition};
use cnsm_store::embedded::backup::{TABLE_NAMES, restore, table_names};
use cnsm_store::embedded::{EmbeddedStore, FILE_NAME, testing};
use cnsm_store::{InstanceQuery, ItemOutcome, Store, StoreError};

/// Every instance as (namespace, id, version, last hash).
fn snapshot_of(store: &dyn Store) -> Vec<(String, String, u64, String)> {
    let query = InstanceQuery {
        limit: 10_000,
        ..InstanceQuery::default()
    };
    store
        .list_instances(&query)
        .expect("list")
        .into_iter()
        .map(|s| {
            (
                s.instance.namespace.to_string(),
                s.instance.id.to_string(),
                s.instance.version,
                s.instance.last_hash.to_hex(),
            )
        })
        .collect()
}

#[test]
fn backups_taken_during_commits_are_consistent_and_restore() {
    let live_dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(EmbeddedStore::open(live_dir.path()).expect("open"));
    let definition = job_definition("default", "backup");
    store
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .expect("definition");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let driver = Driver::new("backup");
            let mut instances: Vec<Instance> = Vec::new();
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) || round < 20 {
                // Each round: a new instance, and one event for every instance so far.
                let mut items = vec![driver.create("default", &format!("i-{round}"), &[], T0_MS)];
                for (n, instance) in instances.iter().enumerate() {
                    items.push(driver.event(instance, "ping", &format!("{round}/{n}"), T0_MS));
                }
                let outcomes = store.commit(&items).expect("commit");
                assert!(
                    outcomes
                        .iter()
                        .all(|o| matches!(o, ItemOutcome::Committed { .. }))
                );
                instances = items.into_iter().map(|i| i.instance).collect();
                round += 1;
                if round > 400 {
                    break;
                }
            }
            round
        })
    };
    // The backups must overlap the commits: wait for the writer's first rounds (on a loaded
    // machine its first commit can take a while).
    let started = std::time::Instant::now();
    while snapshot_of(store.as_ref()).len() < 2 {
        assert!(started.elapsed().as_secs() < 60, "the writer commits");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let out_dir = tempfile::tempdir().expect("tempdir");
    let mut backups = Vec::new();
    for n in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(30));
        let out = out_dir.path().join(format!("backup-{n}.cnsm"));
        let report = store.backup(&out).expect("backup while committing");
        assert!(report.verified.is_ok(), "{:?}", report.verified);
        assert_eq!(report.bytes, std::fs::metadata(&out).expect("file").len());
        backups.push(out);
    }
    stop.store(true, Ordering::SeqCst);
    let n_rounds = writer.join().expect("writer");
    assert!(n_rounds >= 20);
    let live = snapshot_of(store.as_ref());

    // Each backup is a point in time: every instance it has is at most as far as the live one,
    // and its own records verified from genesis (above). Later backups are no further behind.
    let mut previous_total = 0;
    for backup in &backups {
        let restored_dir = tempfile::tempdir().expect("tempdir");
        let target = restored_dir.path().join("data");
        let report = restore(backup, &target).expect("restore");
        assert!(report.verified.is_ok());
        let restored = EmbeddedStore::open(&target).expect("the restored store opens");
        let copy = snapshot_of(&restored);
        assert!(!copy.is_empty());
        let total: u64 = copy.iter().map(|c| c.2 + 1).sum();
        assert!(total >= previous_total, "backups move forward in time");
        previous_total = total;
        for (ns, id, version, _) in &copy {
            let now = live
                .iter()
                .find(|l| &l.0 == ns && &l.1 == id)
                .expect("a backed-up instance exists live");
            assert!(*version <= now.2);
        }
        assert!(restored.verify().expect("verify").is_ok());
    }

    // A final backup of the quiet store equals it exactly.
    let last = out_dir.path().join("final.cnsm");
    store.backup(&last).expect("backup");
    let target = out_dir.path().join("final-data");
    restore(&last, &target).expect("restore");
    let restored = EmbeddedStore::open(&target).expect("open");
    assert_eq!(snapshot_of(&restored), live);
    let timers = |s: &dyn Store| {
        let mut all = Vec::new();
        s.pending_timers(&mut |t| all.push(t)).expect("timers");
        all.sort();
        all
    };
    assert_eq!(timers(&restored), timers(store.as_ref()));

    // Refusals: an existing output file, an existing store, a corrupt backup.
    match store.backup(&last) {
        Err(StoreError::Refused(m)) => assert!(m.contains("exists"), "{m}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    match restore(&last, &target) {
        Err(StoreError::Refused(m)) => assert!(m.contains("already holds a store"), "{m}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    drop(restored);
    let corrupt_dir = out_dir.path().join("corrupt");
    std::fs::create_dir(&corrupt_dir).expect("mkdir");
    std::fs::copy(&last, corrupt_dir.join(FILE_NAME)).expect("copy");
    testing::flip_record_byte(&corrupt_dir, "default", "i-0", 1, 12).expect("flip");
    let refused_target = out_dir.path().join("never");
    match restore(&corrupt_dir.join(FILE_NAME), &refused_target) {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("i-0"), "{m}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(
        !refused_target.join(FILE_NAME).exists(),
        "a refused restore leaves no store behind"
    );
}

#[test]
fn a_backup_copies_every_table_of_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let driver = Driver::new("tables");
    let definition = job_definition("default", "backup");
    store
        .put_definition(&definition, revision_hash(&definition), T0_MS)
        .expect("definition");
    let created = driver.create("default", "a", &[("team", "x")], T0_MS);
    store
        .commit(std::slice::from_ref(&created))
        .expect("commit");
    let keyed = driver.event_with_key(&created.instance, "ping", "n", T0_MS + 1, Some("k1"));
    store.commit(std::slice::from_ref(&keyed)).expect("commit");
    let names = table_names(&store).expect("tables");
    for name in &names {
        assert!(
            TABLE_NAMES.contains(&name.as_str()),
            "table {name} is not in the backup's list"
        );
    }
    let out = dir.path().join("b.cnsm");
    store.backup(&out).expect("backup");
    let copy = EmbeddedStore::open_file(&out, Default::default()).expect("open the copy");
    assert_eq!(table_names(&copy).expect("tables"), names);
}
