//! Copying an embedded store into PostgreSQL: everything arrives, byte for byte, and verifies.

use cnsm_core::engine::revision_hash;
use cnsm_core::record::Hash32;
use cnsm_store::conformance::{Driver, T0_MS, job_definition};
use cnsm_store::embedded::EmbeddedStore;
use cnsm_store::{IdempotencyEntry, InstanceQuery, Store, StoreError};
use cnsm_store_postgres::PostgresStore;
use cnsm_store_postgres::copy::copy_store;

use crate::{drop_schema, options, test_url, unique_schema};

#[test]
fn an_embedded_store_copies_into_postgres_exactly() {
    let Some(url) = test_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = EmbeddedStore::open(dir.path()).unwrap();
    let first = job_definition("default", "job");
    source
        .put_definition(&first, revision_hash(&first), T0_MS)
        .unwrap();
    let mut second = first.clone();
    second.spec.states[0].timeout_seconds = Some(61);
    source
        .put_definition(&second, revision_hash(&second), T0_MS + 5)
        .unwrap();
    let other = job_definition("shop", "report");
    source
        .put_definition(&other, revision_hash(&other), T0_MS)
        .unwrap();

    let driver = Driver::new("job");
    let mut n_records = 0;
    for i in 0..30 {
        let namespace = if i % 3 == 0 { "shop" } else { "default" };
        let create = driver.create(namespace, &format!("j-{i:02}"), &[("tier", "gold")], T0_MS);
        source.commit(std::slice::from_ref(&create)).unwrap();
        n_records += 1;
        let mut current = create.instance;
        for k in 0..(i % 7) {
            let mut item = driver.event_with_key(
                &current,
                "ping",
                &format!("p{k}"),
                T0_MS + 10 + k,
                Some(&format!("key-{k}")),
            );
            item.idempotency = Some(IdempotencyEntry {
                key: format!("key-{k}"),
                request_hash: Hash32([k as u8; 32]),
                version: item.record.version,
                expires_ms: T0_MS + 1_000_000,
            });
            source.commit(std::slice::from_ref(&item)).unwrap();
            n_records += 1;
            current = item.instance;
        }
        if i % 5 == 0 {
            let started = driver.event(&current, "start", "", T0_MS + 100);
            let done = driver.event(&started.instance, "complete", "", T0_MS + 101);
            source.commit(&[started, done]).unwrap();
            n_records += 2;
        }
    }

    let schema = unique_schema();
    let target = PostgresStore::open(&url, options(&schema)).unwrap();
    let mut seen = 0;
    let report = copy_store(&source, &target, &mut |n| seen = n).unwrap();
    assert_eq!(seen, 30);
    assert_eq!(
        (
            report.n_definitions,
            report.n_revisions,
            report.n_instances,
            report.n_records
        ),
        (2, 3, 30, n_records)
    );
    assert!(report.n_idempotency_keys > 0);
    assert_eq!(
        report.n_timers, 24,
        "the six completed instances have no timer"
    );
    assert_eq!(
        target
            .definition("default", "job", Some(1))
            .unwrap()
            .unwrap()
            .definition,
        first
    );
    let all = InstanceQuery::default();
    assert_eq!(source.list_instances(&all).unwrap().len(), 30);
    assert_eq!(
        target.idempotency("default", "j-01", "key-0").unwrap(),
        source.idempotency("default", "j-01", "key-0").unwrap()
    );
    assert!(target.verify().unwrap().is_ok());

    // A second copy into the same (no longer empty) target is refused and changes nothing.
    match copy_store(&source, &target, &mut |_| {}) {
        Err(StoreError::Refused(message)) => assert!(message.contains("not empty")),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(target.list_definitions(None).unwrap().len(), 2);
    drop(target);
    drop_schema(&url, &schema);
}
