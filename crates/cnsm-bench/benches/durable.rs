//! Durable throughput and latency on the embedded store: every transition is acknowledged only
//! after its group commit is fsynced. Reports the fsync floor of the disk in the same run.
//!
//! Run: `cargo bench -p cnsm-bench --bench durable` (CNSM_BENCH_DIR picks the directory; the
//! default is the system temp dir). Each case runs twice in the same run: with the store's
//! write-ahead log (the default: one `fdatasync` of the log per batch) and without it (a durable
//! redb commit per batch); `CNSM_BENCH_STORE_MODES=log` (or `redb`) runs one of them;
//! `CNSM_BENCH_SYNC_CHECKPOINTS=1` takes the log's checkpoints on the committer's thread.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cnsm_bench::{COUNTER, percentile, report};
use cnsm_runtime::{CommitListener, CreateInstance, EventRequest, Runtime, RuntimeOptions};
use cnsm_store::embedded::EmbeddedStore;

#[derive(Default)]
struct Batches {
    n_commits: AtomicU64,
    n_items: AtomicU64,
    durations: Mutex<Vec<Duration>>,
}

impl CommitListener for Batches {
    fn on_commit(
        &self,
        _: &cnsm_core::StateChangeEvent,
        _: cnsm_core::Hash32,
        _: &cnsm_core::Instance,
    ) {
    }
    fn on_batch(&self, n_items: usize, d: Duration) {
        self.n_commits.fetch_add(1, Ordering::Relaxed);
        self.n_items.fetch_add(n_items as u64, Ordering::Relaxed);
        if let Ok(mut v) = self.durations.lock() {
            v.push(d);
        }
    }
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("CNSM_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    }
}

/// The disk's floor: 4 KiB write + fdatasync, sequentially, for one second.
fn fsync_floor() -> (Duration, Duration) {
    let dir = bench_dir();
    let mut file = std::fs::File::create(dir.path().join("floor")).unwrap();
    let block = [7u8; 4096];
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        let t = Instant::now();
        file.write_all(&block).unwrap();
        file.sync_data().unwrap();
        samples.push(t.elapsed());
    }
    (
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    )
}

async fn setup(
    n_instances: usize,
    log: bool,
) -> (tempfile::TempDir, Runtime, Arc<Batches>, Arc<EmbeddedStore>) {
    let dir = bench_dir();
    let mut options = cnsm_bench::store_options();
    options.write_ahead_log = log;
    let store = Arc::new(EmbeddedStore::open_with_options(dir.path(), options).unwrap());
    let runtime = Runtime::open_shared(store.clone(), RuntimeOptions::default()).unwrap();
    let batches = Arc::new(Batches::default());
    runtime.subscribe(batches.clone());
    runtime.apply_yaml(COUNTER, None).await.unwrap();
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let runtime = runtime.clone();
        tasks.push(tokio::spawn(async move {
            for i in (chunk..n_instances).step_by(8) {
                let mut data = serde_json::Map::new();
                data.insert("n".into(), 0.into());
                runtime
                    .create_instance(
                        CreateInstance::new("bench", "counter")
                            .id(format!("c-{i}"))
                            .data(data),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (dir, runtime, batches, store)
}

/// `n_clients` clients, each on its own instance, sending for `seconds`.
async fn concurrent(n_clients: usize, seconds: u64, log: bool) {
    let (_dir, runtime, batches, store) = setup(n_clients, log).await;
    store.take_checkpoint_stats();
    let n_commits0 = batches.n_commits.load(Ordering::Relaxed);
    let n_items0 = batches.n_items.load(Ordering::Relaxed);
    batches.durations.lock().unwrap().clear();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..n_clients {
        let runtime = runtime.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("c-{c}");
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                runtime
                    .send("bench", &id, EventRequest::new("inc"))
                    .await
                    .unwrap();
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = latencies.len() as f64;
    let n_commits = batches.n_commits.load(Ordering::Relaxed) - n_commits0;
    let n_items = batches.n_items.load(Ordering::Relaxed) - n_items0;
    let mut commits = batches.durations.lock().unwrap().clone();
    report(
        &format!("durable.acked.{}.clients_{n_clients}", mode_name(log)),
        n / elapsed,
        "transitions/s",
        &format!(
            "(latency p50 {:?} p99 {:?}; {} commits, {:.1} transitions/commit; commit p50 {:?} p99 {:?})",
            percentile(&mut latencies, 0.5),
            percentile(&mut latencies, 0.99),
            n_commits,
            n_items as f64 / n_commits.max(1) as f64,
            percentile(&mut commits, 0.5),
            percentile(&mut commits, 0.99),
        ),
    );
    if log {
        cnsm_bench::report_checkpoints(
            &format!("durable.checkpoints.clients_{n_clients}"),
            store.take_checkpoint_stats(),
        );
    }
    runtime.shutdown();
}

fn mode_name(log: bool) -> &'static str {
    if log { "log" } else { "redb" }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let quick = std::env::var("CNSM_BENCH_CLIENTS").is_ok();
    let (p50, p99) = fsync_floor();
    println!("bench durable.fsync_floor: write 4 KiB + fdatasync p50 {p50:?} p99 {p99:?}");
    let modes: Vec<bool> = match std::env::var("CNSM_BENCH_STORE_MODES") {
        Ok(list) => list
            .split(',')
            .filter_map(|m| match m.trim() {
                "log" => Some(true),
                "redb" => Some(false),
                _ => None,
            })
            .collect(),
        Err(_) => vec![true, false],
    };
    rt.block_on(async {
        for &log in &modes {
            // One sequential client.
            let (_dir, runtime, _, _) = setup(1, log).await;
            let sequential_secs = if quick { 0 } else { 3 };
            let mut latencies = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(sequential_secs) {
                let t = Instant::now();
                runtime
                    .send("bench", "c-0", EventRequest::new("inc"))
                    .await
                    .unwrap();
                latencies.push(t.elapsed());
            }
            let rate = latencies.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
            if !quick {
                report(
                    &format!("durable.acked.{}.sequential_client", mode_name(log)),
                    rate,
                    "transitions/s",
                    &format!(
                        "(latency p50 {:?} p99 {:?})",
                        percentile(&mut latencies, 0.5),
                        percentile(&mut latencies, 0.99)
                    ),
                );
            }
            runtime.shutdown();
            let clients: Vec<usize> = match std::env::var("CNSM_BENCH_CLIENTS") {
                Ok(list) => list
                    .split(',')
                    .filter_map(|c| c.trim().parse().ok())
                    .collect(),
                Err(_) => vec![64, 256, 1024],
            };
            for n_clients in clients {
                concurrent(n_clients, 5, log).await;
            }
        }
    });
}
