//! Snapshot export, verify and import of many instances (default 100,000 with 10 history
//! records each) on the embedded store. Targets (issue 6): export and import >= 50,000
//! instances/s, verify >= 100 MB/s of snapshot.
//!
//! Phases: the instances are built in memory with the engine (conformance `Driver`) and loaded
//! with one `import_instances` (the "store import" figure: one durable transaction); then
//! `export` reads them back into a payload; `verify` runs the six steps (signature included)
//! on the signed file; `import` decodes and checks the payload (`plan_import`) and imports it
//! into an empty store. A second export of the imported store must give identical bytes.
//!
//!   cargo bench -p cnsm-bench --bench snapshot              # 100,000 instances
//!   CNSM_BENCH_SNAPSHOT_INSTANCES=10000 cargo bench -p cnsm-bench --bench snapshot

use std::time::Instant;

use cnsm_bench::{report, rss_bytes};
use cnsm_core::engine::revision_hash;
use cnsm_store::conformance::{Driver, T0_MS, job_definition};
use cnsm_store::embedded::EmbeddedStore;
use cnsm_store::{DefinitionRow, ImportItem, Store};

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
    let definition = job_definition("default", "job");
    let definitions = vec![DefinitionRow {
        namespace: "default".into(),
        name: "job".into(),
        revision: 1,
        hash: revision_hash(&definition),
        definition,
        created_ms: T0_MS,
    }];
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
    let started = Instant::now();
    let payload = cnsm_snapshot::export(
        &source,
        "default",
        &cnsm_snapshot::Selection::All,
        as_of_ms,
        &mut |_, _| {},
    )
    .expect("export");
    let export = started.elapsed();
    let mb = payload.len() as f64 / 1e6;
    report(
        "snapshot_export",
        n_instances as f64 / export.as_secs_f64(),
        "instances/s",
        &format!("({export:.2?}, payload {mb:.1} MB)"),
    );

    let key = cnsm_snapshot::SigningKey::generate().expect("key");
    let started = Instant::now();
    let file = cnsm_snapshot::SnapshotFile::sign(&key, payload.clone()).expect("sign");
    let sign = started.elapsed();
    report(
        "snapshot_sign",
        mb / sign.as_secs_f64(),
        "MB/s",
        &format!("({sign:.2?})"),
    );
    let started = Instant::now();
    let summary = cnsm_snapshot::verify(&file, &key.public_key()).expect("verify");
    let verify = started.elapsed();
    assert_eq!(summary.n_instances, n_instances as u64);
    report(
        "snapshot_verify",
        mb / verify.as_secs_f64(),
        "MB/s",
        &format!("({verify:.2?}, all six steps)"),
    );

    let target_dir = tempfile::tempdir().expect("tempdir");
    let target = EmbeddedStore::open(target_dir.path()).expect("store");
    let started = Instant::now();
    let plan = cnsm_snapshot::plan_import(&file.payload, &mut |_, _| {}).expect("plan");
    let decoded = started.elapsed();
    target
        .import_instances(&plan.definitions, &plan.items, false)
        .expect("import");
    let import = started.elapsed();
    report(
        "snapshot_import",
        n_instances as f64 / import.as_secs_f64(),
        "instances/s",
        &format!(
            "({import:.2?}: decode+check {decoded:.2?}, store transaction {:.2?})",
            import - decoded
        ),
    );
    drop(plan);
    let again = cnsm_snapshot::export(
        &target,
        "default",
        &cnsm_snapshot::Selection::All,
        as_of_ms,
        &mut |_, _| {},
    )
    .expect("export again");
    assert!(again == payload, "re-export of the imported store differs");
    println!(
        "re-export identical ({} bytes); peak RSS {:.0} MB",
        again.len(),
        rss_bytes() as f64 / 1e6
    );
}
