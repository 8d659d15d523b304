//! Migration throughput: 10,000 running orders spread over the active states of
//! order-processing, migrated from revision 1 to revision 2 (a state renamed, one added, one
//! removed with a mapping, data defaults and a CEL transform) on the embedded store, both
//! phases (lock, then migrate), durable. Target: ≥ 5,000 instances/s.
//!
//! Run: `cargo bench -p cnsm-bench --bench migration` (CNSM_BENCH_MIGRATION_N to change N).

use std::sync::Arc;
use std::time::Instant;

use cnsm_bench::{ORDER_PROCESSING, report};
use cnsm_runtime::{CreateInstance, EventRequest, MigrationRequest, Runtime, RuntimeOptions};
use cnsm_store::embedded::EmbeddedStore;

const V2: &str = include_str!("../machines/order-processing-v2.yaml");
const POLICY: &str = include_str!("../machines/order-migration.yaml");

fn main() {
    let n: usize = std::env::var("CNSM_BENCH_MIGRATION_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let runtime = Arc::new(Runtime::open(store, RuntimeOptions::default()).expect("runtime"));
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    tokio.block_on(async {
        runtime
            .apply_yaml(ORDER_PROCESSING, None)
            .await
            .expect("apply v1");
        let paths: [&[(&str, &str)]; 4] = [
            &[],
            &[("complete", "null")],
            &[("complete", "null"), ("pay", r#"{"amount": 40}"#)],
            &[
                ("complete", "null"),
                ("pay", r#"{"amount": 40}"#),
                ("ship", "null"),
            ],
        ];
        let mut tasks = Vec::new();
        for worker in 0..128 {
            let runtime = Arc::clone(&runtime);
            tasks.push(tokio::spawn(async move {
                let mut i = worker;
                while i < n {
                    let id = format!("o-{i}");
                    runtime
                        .create_instance(
                            CreateInstance::new("shop", "order-processing")
                                .id(id.clone())
                                .data(serde_json::from_str(r#"{"total": 40}"#).expect("json")),
                        )
                        .await
                        .expect("create");
                    for (event, payload) in paths[i % paths.len()] {
                        let payload = serde_json::from_str(payload).expect("json");
                        runtime
                            .send("shop", &id, EventRequest::new(*event).payload(payload))
                            .await
                            .expect("event");
                    }
                    i += 128;
                }
            }));
        }
        for task in tasks {
            task.await.expect("worker");
        }
        runtime.apply_yaml(V2, None).await.expect("apply v2");
        let policy = cnsm_core::migration::parse_policy(POLICY).expect("policy");
        let request = MigrationRequest::new(policy, 1, 2);
        let started = Instant::now();
        let result = runtime
            .migrate(&request, &mut |_, _| {})
            .await
            .expect("migrate");
        let elapsed = started.elapsed();
        assert_eq!(result.n_migrated(), n, "every instance migrates");
        report(
            "migration",
            n as f64 / elapsed.as_secs_f64(),
            "instances/s",
            &format!(
                "({n} instances, lock + migrate, durable, {:.2} s)",
                elapsed.as_secs_f64()
            ),
        );
    });
    runtime.shutdown();
}
