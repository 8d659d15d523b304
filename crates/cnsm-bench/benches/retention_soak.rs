//! Retention soak: a steady stream of short-lived instances on a machine with
//! `retention: {finishedAfterDays: 1}`. Each simulated half day creates and finishes N
//! instances, advances a virtual clock by 12 hours and applies retention (so the last half day's
//! instances are kept and older ones deleted); the store file's size is printed each time. With
//! retention it levels off after the window (freed pages are reused); the last line compares
//! the end of the run with day 5.
//!
//! Run: `cargo bench -p cnsm-bench --bench retention_soak` (CNSM_SOAK_DAYS, CNSM_SOAK_PER_DAY).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cnsm_bench::{ORDER_PROCESSING, report};
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeOptions, VirtualClock};
use cnsm_store::embedded::{EmbeddedStore, FILE_NAME};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // Half days.
    let days = env_usize("CNSM_SOAK_DAYS", 30) * 2;
    // Per half day.
    let per_day = env_usize("CNSM_SOAK_PER_DAY", 5_000) / 2;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = VirtualClock::new(1_800_000_000_000);
    let store = EmbeddedStore::open(dir.path()).expect("open");
    let options = RuntimeOptions::default().with_clock(Arc::new(clock.clone()));
    let runtime = Arc::new(Runtime::open(store, options).expect("runtime"));
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let yaml = ORDER_PROCESSING.replacen(
        "spec:\n",
        "spec:\n  retention:\n    finishedAfterDays: 1\n",
        1,
    );
    let started = Instant::now();
    let mut sizes = Vec::new();
    tokio.block_on(async {
        runtime.apply_yaml(&yaml, None).await.expect("apply");
        for day in 1..=days {
            let mut tasks = Vec::new();
            for worker in 0..64 {
                let runtime = Arc::clone(&runtime);
                tasks.push(tokio::spawn(async move {
                    let mut i = worker;
                    while i < per_day {
                        let id = format!("d{day}-{i}");
                        let request = CreateInstance::new("shop", "order-processing")
                            .id(id.clone())
                            .data(serde_json::from_str(r#"{"total": 40}"#).expect("json"));
                        runtime.create_instance(request).await.expect("create");
                        for event in ["complete", "cancel"] {
                            runtime
                                .send("shop", &id, EventRequest::new(event))
                                .await
                                .expect("event");
                        }
                        i += 64;
                    }
                }));
            }
            for task in tasks {
                task.await.expect("worker");
            }
            clock.advance_ms(43_200_000 + 60_000);
            let mut deleted = 0;
            // Retention deletes what the background verifier has checked: settle it.
            for _ in 0..200 {
                let n = runtime.apply_retention().await.expect("retention");
                deleted += n;
                if n == 0 && (deleted > 0 || day < 2) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let bytes = std::fs::metadata(dir.path().join(FILE_NAME))
                .map(|m| m.len())
                .unwrap_or(0);
            let live = runtime
                .list_instances(&cnsm_store::InstanceQuery {
                    limit: 10_000,
                    ..Default::default()
                })
                .await
                .map(|l| l.len())
                .unwrap_or(0);
            println!(
                "day {:>5.1}: {:>8.1} MB, {deleted} instances deleted by retention, {live} kept",
                day as f64 / 2.0,
                bytes as f64 / 1e6
            );
            sizes.push(bytes);
        }
    });
    runtime.shutdown();
    let last = *sizes.last().unwrap_or(&0) as f64;
    let day5 = sizes.get(9).or(sizes.first()).copied().unwrap_or(0) as f64;
    report(
        "retention_soak_file",
        last / 1e6,
        "MB",
        &format!(
            "on day {} ({} short-lived instances a day, 1-day retention)",
            days / 2,
            per_day * 2
        ),
    );
    report(
        "retention_soak_growth",
        last / day5.max(1.0),
        "x",
        &format!(
            "file size on day {} / day 5 ({:.0} s)",
            days / 2,
            started.elapsed().as_secs_f64()
        ),
    );
}
