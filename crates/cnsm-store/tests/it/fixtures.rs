//! Stores written by older formats open, verify and replay in this binary (see
//! `tests/fixtures/README.md`).

use cnsm_core::Instance;
use cnsm_core::record::decode_record;
use cnsm_store::embedded::{EmbeddedStore, FILE_NAME};
use cnsm_store::{InstanceQuery, STORE_FORMAT, Store};

/// A private copy of a fixture store (opening writes to the file).
fn fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = format!(
        "{}/tests/fixtures/{name}/{FILE_NAME}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::copy(&source, dir.path().join(FILE_NAME)).unwrap_or_else(|e| panic!("{source}: {e}"));
    dir
}

#[test]
fn store_format_1_opens_verifies_and_replays() {
    const { assert!(STORE_FORMAT >= 1) };
    let dir = fixture("store-format-1");
    let store = EmbeddedStore::open(dir.path()).expect("a format-1 store opens");
    let report = store.verify().expect("verify");
    assert!(report.is_ok(), "{:?}", report.problems);
    assert_eq!(
        (report.n_definitions, report.n_instances, report.n_records),
        (4, 3, 7)
    );
    let instances = store
        .list_instances(&InstanceQuery {
            namespace: Some("shop".into()),
            limit: 100,
            ..InstanceQuery::default()
        })
        .expect("list");
    let summary: Vec<(String, String, String, u64)> = instances
        .iter()
        .map(|s| {
            let i = &s.instance;
            (
                i.id.to_string(),
                i.state.to_string(),
                i.status.as_str().to_owned(),
                i.version,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("o-1".into(), "paid".into(), "active".into(), 2),
            ("o-2".into(), "cancelled".into(), "cancelled".into(), 1),
            ("p-1".into(), "reserve-stock".into(), "active".into(), 1),
        ]
    );
    // Every history replays to the stored instance; every record is format 1.
    for stored in &instances {
        let i = &stored.instance;
        let sealed = store.history(&i.namespace, &i.id, 0, 100).expect("history");
        let records: Vec<_> = sealed
            .iter()
            .map(|s| (decode_record(s.version, &s.bytes).expect("decodes"), s.hash))
            .collect();
        assert!(records.iter().all(|(r, _)| r.format == 1));
        let replayed = Instance::replay(records.iter().map(|(r, h)| (r, *h)))
            .expect("replays")
            .expect("an instance");
        assert_eq!(&replayed, i);
    }
    let mut timers = Vec::new();
    store
        .pending_timers(&mut |t| timers.push(t))
        .expect("timers");
    assert_eq!(timers.len(), 2);
    assert!(
        store
            .idempotency("shop", "o-1", "k1")
            .expect("idempotency")
            .is_some()
    );
}
