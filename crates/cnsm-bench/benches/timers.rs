//! Timers: memory per pending timer in the in-memory index, and firing lateness with 1,000,000
//! timers pending in a running runtime on the durable embedded store.
//!
//! Run: `cargo bench -p cnsm-bench --bench timers` (CNSM_BENCH_TIMERS=N changes the number of
//! pending timers; CNSM_BENCH_DIR the directory; CNSM_BENCH_SYNC_CHECKPOINTS=1 takes the
//! store's checkpoints on the committer's thread; CNSM_BENCH_NO_QUICK_REPAIR=1 turns redb's quick
//! repair off; CNSM_BENCH_LATENESS_CSV=FILE writes each firing's `durable ms since the first,
//! lateness ms` to FILE and each commit's `ms since the first firing, items, µs` to FILE.batches).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cnsm_bench::{percentile, report, rss_bytes};
use cnsm_core::record::RecordKind;
use cnsm_runtime::clock::{Clock, SystemClock};
use cnsm_runtime::timers::TimerIndex;
use cnsm_runtime::{CommitListener, CreateInstance, Runtime, RuntimeOptions};
use cnsm_store::TimerRef;
use cnsm_store::embedded::EmbeddedStore;

const MACHINES: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: long, namespace: bench}
spec:
  initialState: waiting
  states:
  - {name: waiting, type: task, timeoutSeconds: 86400, onTimeout: expired}
  - {name: expired, type: final}
"#;

const SHORT: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: short, namespace: bench}
spec:
  initialState: waiting
  states:
  - {name: waiting, type: task, timeoutSeconds: 3, onTimeout: expired}
  - {name: expired, type: final}
"#;

/// Lateness of timer firings: durable commit time minus due time.
#[derive(Default)]
struct Lateness {
    /// Due time to durable commit.
    samples: Mutex<Vec<Duration>>,
    /// Due time to the engine applying the firing (the record's time).
    applied: Mutex<Vec<Duration>>,
    /// When each firing was durable (ms since the epoch), in the order of `samples`.
    at_ms: Mutex<Vec<u64>>,
    /// Every commit: (when, items, duration), with CNSM_BENCH_LATENESS_CSV.
    batches: Mutex<Vec<(u64, usize, Duration)>>,
}

impl CommitListener for Lateness {
    fn on_batch(&self, n_items: usize, commit_duration: Duration) {
        if std::env::var_os("CNSM_BENCH_LATENESS_CSV").is_some()
            && let Ok(mut b) = self.batches.lock()
        {
            b.push((SystemClock.now_ms(), n_items, commit_duration));
        }
    }

    fn on_commit(
        &self,
        record: &cnsm_core::StateChangeEvent,
        _: cnsm_core::Hash32,
        instance: &cnsm_core::Instance,
    ) {
        if record.kind == RecordKind::Timer {
            let due_ms = instance.created_ms + 3_000;
            let now_ms = SystemClock.now_ms();
            if let (Ok(mut v), Ok(mut at)) = (self.samples.lock(), self.at_ms.lock()) {
                v.push(Duration::from_millis(now_ms.saturating_sub(due_ms)));
                at.push(now_ms);
            }
            if let Ok(mut v) = self.applied.lock() {
                v.push(Duration::from_millis(record.time_ms.saturating_sub(due_ms)));
            }
        }
    }
}

fn index_memory(n: u64) {
    let before = rss_bytes();
    let mut index = TimerIndex::default();
    let mut x = 12345u64;
    for uid in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        index.insert_ref(TimerRef {
            due_ms: 1_800_000_000_000 + (x >> 40),
            uid,
            entry_seq: 1,
            kind: cnsm_core::record::TimerKind::Timeout,
        });
    }
    let after = rss_bytes();
    report(
        "timers.index_memory_per_timer",
        (after.saturating_sub(before)) as f64 / n as f64,
        "bytes",
        &format!("({} timers in the index, RSS delta)", index.len()),
    );
}

fn main() {
    let n_pending: usize = std::env::var("CNSM_BENCH_TIMERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    index_memory(n_pending as u64);
    let dir = match std::env::var_os("CNSM_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // CNSM_BENCH_NO_QUICK_REPAIR=1 measures the store without redb's quick repair.
        let mut options = cnsm_bench::store_options();
        options.quick_repair = std::env::var_os("CNSM_BENCH_NO_QUICK_REPAIR").is_none();
        let store = Arc::new(EmbeddedStore::open_with_options(dir.path(), options).unwrap());
        let runtime = Runtime::open_shared(store.clone(), RuntimeOptions::default()).unwrap();
        runtime.apply_yaml(MACHINES, None).await.unwrap();
        runtime.apply_yaml(SHORT, None).await.unwrap();
        let started = Instant::now();
        let n_tasks = 256;
        let mut tasks = Vec::new();
        for t in 0..n_tasks {
            let runtime = runtime.clone();
            tasks.push(tokio::spawn(async move {
                for i in (t..n_pending).step_by(n_tasks) {
                    runtime.create_instance(CreateInstance::new("bench", "long").id(format!("l-{i}"))).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "created {n_pending} instances with day-long timeouts in {:.1?}; pending timers: {}",
            started.elapsed(),
            runtime.pending_timers().await.unwrap()
        );
        // Steady state: let the background verifier read back the million creations first (it
        // shares the two cores with the committer while it catches up).
        let waited = Instant::now();
        let last_seq = store.checkpoint().unwrap().last_seq;
        while store.verified_in_memory() < last_seq && waited.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("verifier caught up with {last_seq} records in {:.1?}", waited.elapsed());
        // 10,000 short timers created at a steady 2,000/s fall due 3 s later, with the long ones
        // still pending in the index.
        let lateness = Arc::new(Lateness::default());
        runtime.subscribe(lateness.clone());
        store.take_checkpoint_stats();
        let n_short = 10_000;
        // Per create: how late it was sent against its schedule, and how long it took.
        let create_times: Arc<Mutex<Vec<(Duration, Duration)>>> = Arc::default();
        let pace = Duration::from_micros(500);
        let started = Instant::now();
        for i in 0..n_short {
            let target = started + pace * i as u32;
            let now = Instant::now();
            if target > now {
                tokio::time::sleep(target - now).await;
            }
            let runtime = runtime.clone();
            let create_times = create_times.clone();
            tokio::spawn(async move {
                let spawned = Instant::now();
                runtime.create_instance(CreateInstance::new("bench", "short").id(format!("s-{i}"))).await.unwrap();
                create_times.lock().unwrap().push((
                    spawned.saturating_duration_since(target),
                    spawned.elapsed(),
                ));
            });
        }
        while lateness.samples.lock().unwrap().len() < n_short {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(60) {
                panic!("timers did not all fire");
            }
        }
        let mut samples = lateness.samples.lock().unwrap().clone();
        {
            let times = create_times.lock().unwrap();
            let mut sent: Vec<Duration> = times.iter().map(|t| t.0).collect();
            let mut took: Vec<Duration> = times.iter().map(|t| t.1).collect();
            println!(
                "creates of the timed instances: sent late p99 {:?} (max {:?}), answered in p99 {:?} (max {:?})",
                percentile(&mut sent, 0.99),
                percentile(&mut sent, 1.0),
                percentile(&mut took, 0.99),
                percentile(&mut took, 1.0)
            );
        }
        if let Some(path) = std::env::var_os("CNSM_BENCH_LATENESS_CSV") {
            // Every firing's (durable commit ms since the first, lateness ms), to see when the
            // late ones happened.
            let at = lateness.at_ms.lock().unwrap().clone();
            let first = at.iter().copied().min().unwrap_or(0);
            let lines: Vec<String> = at
                .iter()
                .zip(&samples)
                .map(|(t, l)| format!("{},{}", t - first, l.as_millis()))
                .collect();
            std::fs::write(&path, lines.join("\n")).unwrap();
            let batches: Vec<String> = lateness
                .batches
                .lock()
                .unwrap()
                .iter()
                .map(|(t, n, d)| format!("{},{},{}", *t as i64 - first as i64, n, d.as_micros()))
                .collect();
            let mut batches_path = path.clone();
            batches_path.push(".batches");
            std::fs::write(batches_path, batches.join("\n")).unwrap();
        }
        let mut applied = lateness.applied.lock().unwrap().clone();
        report(
            "timers.fire_lateness_p99",
            percentile(&mut applied, 0.99).as_secs_f64() * 1000.0,
            "ms",
            &format!(
                "(p50 {:?}, max {:?}; due -> the engine applies the firing, before its commit)",
                percentile(&mut applied, 0.5),
                percentile(&mut applied, 1.0),
            ),
        );
        report(
            "timers.lateness_p99",
            percentile(&mut samples, 0.99).as_secs_f64() * 1000.0,
            "ms",
            &format!(
                "(p50 {:?}, max {:?}; {} firings at 2,000/s with {} timers pending; due -> durable commit)",
                percentile(&mut samples, 0.5),
                percentile(&mut samples, 1.0),
                samples.len(),
                n_pending
            ),
        );
        cnsm_bench::report_checkpoints("timers.checkpoints", store.take_checkpoint_stats());
        runtime.shutdown();
    });
}
