//! Shared helpers of the cnsm benchmarks: the example machines, timing and percentiles.

use std::path::PathBuf;
use std::time::Duration;

/// The allocator `cnsmctl` runs with, so that library figures match the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The order machine of `shared/examples/order-processing.yaml`, embedded so the benchmarks do
/// not depend on the checkout layout.
pub const ORDER_PROCESSING: &str = include_str!("../machines/order-processing.yaml");

/// The same order lifecycle with a CEL guard on every transition.
pub const ORDER_GUARDED: &str = include_str!("../machines/order-guarded.yaml");

/// The durable benchmarks' machine (`bench/counter`): `inc` loops on one task state, `n + 1`.
pub const COUNTER: &str = include_str!("../machines/counter.yaml");

/// Compiles a machine from YAML, panicking with the admission problems if it is invalid.
pub fn machine(yaml: &str) -> cnsm_core::engine::Machine {
    let definition = cnsm_core::admission::admit_str(yaml, None)
        .into_result()
        .unwrap_or_else(|problems| panic!("invalid benchmark machine: {problems:?}"));
    cnsm_core::engine::Machine::compile(definition)
        .expect("compiles")
        .with_revision(1)
}

/// The embedded store's options of the benches: the defaults, with the log's checkpoints taken
/// on the committer's thread when `CNSM_BENCH_SYNC_CHECKPOINTS` is set (the A/B of checkpoints
/// beside the committer).
pub fn store_options() -> cnsm_store::embedded::EmbeddedOptions {
    let mut options = cnsm_store::embedded::EmbeddedOptions::default();
    options.background_checkpoints = std::env::var_os("CNSM_BENCH_SYNC_CHECKPOINTS").is_none();
    options
}

/// The value at quantile `q` (0..=1) of `samples` (sorted in place).
pub fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort_unstable();
    let index = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[index]
}

/// Resident memory of this process in bytes (Linux `/proc/self/statm`).
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Prints a result line in a stable, greppable form: `bench NAME: VALUE UNIT (detail)`.
pub fn report(name: &str, value: f64, unit: &str, detail: &str) {
    println!("bench {name}: {value:.1} {unit} {detail}");
}

/// Reports the embedded store's checkpoints over a window (`EmbeddedStore::take_checkpoint_stats`
/// at its end, after one at its start): how many, their mean and longest duration, and the log
/// bytes each took in.
pub fn report_checkpoints(name: &str, stats: cnsm_store::embedded::CheckpointStats) {
    let count = stats.count.max(1);
    report(
        name,
        stats.total.as_secs_f64() * 1000.0 / count as f64,
        "ms per checkpoint",
        &format!(
            "({} checkpoints, longest {:.1} ms, {:.0} KiB of log each; {} items acknowledged \
             during them, applied after them in {:.1} ms in all, the committer held at most \
             {:.1} ms by the last round)",
            stats.count,
            stats.max.as_secs_f64() * 1000.0,
            stats.log_bytes as f64 / 1024.0 / count as f64,
            stats.deferred_items,
            stats.apply_total.as_secs_f64() * 1000.0,
            stats.held_max.as_secs_f64() * 1000.0
        ),
    );
}

/// The release `cnsmctl` the process benchmarks run (`CNSMCTL` overrides the path); panics
/// with what to build when it is missing.
pub fn cnsmctl_path() -> PathBuf {
    if let Some(path) = std::env::var_os("CNSMCTL") {
        return PathBuf::from(path);
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let path = target.join("release").join("cnsmctl");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release -p cnsmctl` first",
        path.display()
    );
    path
}
