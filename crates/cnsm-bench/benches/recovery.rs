//! Recovery: reopen a store holding 1,000,000 instances and 5,000,000 history records and be
//! ready to apply events. Measures: store open (tail verification), runtime start (timer index
//! rebuild), and the first acknowledged event.
//!
//! Run: `cargo bench -p cnsm-bench --bench recovery`. Building the store takes a few minutes;
//! set CNSM_BENCH_RECOVERY_DIR to keep it between runs (it is reused when complete).

use std::collections::BTreeMap;
use std::time::Instant;

use cnsm_bench::report;
use cnsm_core::Instance;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use cnsm_runtime::{EventRequest, Runtime, RuntimeOptions};
use cnsm_store::embedded::EmbeddedStore;
use cnsm_store::{CommitItem, Store};
use serde_json::Value;

const COUNTER: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: counter, namespace: bench}
spec:
  initialState: counting
  states:
  - name: counting
    type: task
    timeoutSeconds: 86400
    onEvent:
    - {event: inc, target: counting}
"#;

const N_INSTANCES: usize = 1_000_000;
const N_EVENTS_EACH: usize = 4;

fn build(dir: &std::path::Path) {
    let store = EmbeddedStore::open(dir).unwrap();
    let definition = cnsm_core::admission::admit_str(COUNTER, None)
        .into_result()
        .unwrap();
    let machine = Machine::compile(definition.clone())
        .unwrap()
        .with_revision(1);
    store
        .put_definition(&definition, machine.hash(), 1)
        .unwrap();
    let started = Instant::now();
    let chunk = 2_000;
    for base in (0..N_INSTANCES).step_by(chunk) {
        let mut items = Vec::with_capacity(chunk * (N_EVENTS_EACH + 1));
        for i in base..(base + chunk).min(N_INSTANCES) {
            let id = format!("c-{i}");
            let now_ms = 1_800_000_000_000;
            let genesis = machine
                .create(NewInstance {
                    namespace: "bench",
                    id: &id,
                    data: Default::default(),
                    labels: BTreeMap::new(),
                    now_ms,
                    actor: "bench",
                })
                .unwrap();
            let sealed = genesis.seal();
            let mut instance = Instance::from_genesis(&genesis, sealed.hash).unwrap();
            items.push(CommitItem {
                instance: instance.clone(),
                record: sealed,
                expected_version: None,
                idempotency: None,
            });
            for _ in 0..N_EVENTS_EACH {
                let input = Input::new(
                    Trigger::Event {
                        name: "inc",
                        payload: &Value::Null,
                    },
                    now_ms,
                    "bench",
                );
                let record = machine.apply(&instance, &input).unwrap();
                let sealed = record.seal();
                let expected = instance.version;
                instance.apply_record(&record, sealed.hash).unwrap();
                items.push(CommitItem {
                    instance: instance.clone(),
                    record: sealed,
                    expected_version: Some(expected),
                    idempotency: None,
                });
            }
        }
        store.commit(&items).unwrap();
        if base % 100_000 == 0 {
            eprintln!("built {base} instances in {:.1?}", started.elapsed());
        }
    }
    drop(store);
    std::fs::write(dir.join("COMPLETE"), b"1").unwrap();
}

fn main() {
    let keep = std::env::var_os("CNSM_BENCH_RECOVERY_DIR");
    let temp;
    let dir = match &keep {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            temp = tempfile::tempdir().unwrap();
            temp.path().to_owned()
        }
    };
    if !dir.join("COMPLETE").exists() {
        build(&dir);
    }
    let size = std::fs::metadata(dir.join("cnsm.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let store = EmbeddedStore::open(&dir).unwrap();
    let opened = started.elapsed();
    let runtime = Runtime::open(store, RuntimeOptions::default()).unwrap();
    let runtime_ready = started.elapsed();
    let outcome = rt
        .block_on(runtime.send("bench", "c-123456", EventRequest::new("inc")))
        .unwrap();
    let first_event = started.elapsed();
    assert!(
        outcome.record.version as usize > N_EVENTS_EACH,
        "the instance was restored with its history"
    );
    report(
        "recovery.ready_for_events",
        first_event.as_secs_f64() * 1000.0,
        "ms",
        &format!(
            "(store open {opened:?}, runtime + timer index {:?}, first event acked {first_event:?}; {N_INSTANCES} instances, {} records, {:.1} GiB file)",
            runtime_ready,
            N_INSTANCES * (N_EVENTS_EACH + 1),
            size as f64 / (1u64 << 30) as f64
        ),
    );
    runtime.shutdown();
}
