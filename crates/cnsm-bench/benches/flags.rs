//! Flag-gated transitions (docs/flags.md), on the checkout canary example
//! (`machines/checkout-canary.yaml` with `machines/checkout-flags.json`, copies of
//! `shared/examples/`), one core, no I/O:
//!
//! - `flags.engine.gate_overhead`: what a flag gate adds to `Machine::apply` of one
//!   transition, given the decision made before queueing (the engine path): the gated machine
//!   minus the same machine without the `flag:`.
//! - `flags.query`: building the evaluation context (`Machine::flag_queries`).
//! - `flags.provider.resolve`: the embedded provider evaluating the example's targeting rule
//!   (`in` + `fractional`) directly.
//! - `flags.openfeature.evaluate`: the same through the OpenFeature client with the transition
//!   hook (what `Runtime::send` awaits before queueing).
//!
//! Run: `cargo bench -p cnsm-bench --bench flags` (`CNSM_BENCH_N` sets iterations, default
//! 200,000).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use cnsm_bench::{machine, report};
use cnsm_core::Instance;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use cnsm_core::flags::FlagValueType;
use cnsm_core::record::FlagDecision;
use cnsm_flags::{FlagSource, FlagdFileProvider, Flags};
use serde_json::{Value, json};

const CHECKOUT: &str = include_str!("../machines/checkout-canary.yaml");

fn instance(machine: &Machine, id: &str) -> Instance {
    let mut labels = BTreeMap::new();
    labels.insert("tier".to_owned(), "silver".to_owned());
    let record = machine
        .create(NewInstance {
            namespace: "shop",
            id,
            data: serde_json::Map::new(),
            labels,
            now_ms: 1,
            actor: "bench",
        })
        .expect("create");
    let hash = record.seal().hash;
    Instance::from_genesis(&record, hash).expect("genesis")
}

/// Nanoseconds per `Machine::apply` of `checkout` from `cart`, best of three rounds.
fn apply_ns(machine: &Machine, decisions: &[FlagDecision], n: usize) -> f64 {
    let start = instance(machine, "order-1");
    let actor: std::sync::Arc<str> = std::sync::Arc::from("bench");
    let payload = Value::Null;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        for i in 0..n {
            let mut input = Input::new(
                Trigger::Event {
                    name: "checkout",
                    payload: &payload,
                },
                2 + i as u64,
                actor.clone(),
            );
            input.flags = decisions;
            black_box(machine.apply(&start, &input).expect("transition"));
        }
        best = best.min(started.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

fn time_ns(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        for i in 0..n {
            f(i);
        }
        best = best.min(started.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

fn main() {
    let n = std::env::var("CNSM_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let gated = machine(CHECKOUT);
    let ungated = machine(&CHECKOUT.replace(
        "      flag: one-click-checkout       # boolean flag; see flags.json\n",
        "",
    ));
    let decision = FlagDecision {
        key: "one-click-checkout".into(),
        variant: Some("on".into()),
        value: json!(true),
        reason: "TARGETING_MATCH".into(),
        error: None,
        allowed: false,
    };
    let decisions = [decision];
    apply_ns(&gated, &decisions, n / 10); // warm-up
    let plain = apply_ns(&ungated, &[], n);
    let with_gate = apply_ns(&gated, &decisions, n);
    report(
        "flags.engine.apply_ungated",
        plain,
        "ns/transition",
        "(checkout without the flag)",
    );
    report(
        "flags.engine.apply_gated",
        with_gate,
        "ns/transition",
        "(checkout with the flag gate, decision made before queueing)",
    );
    report(
        "flags.engine.gate_overhead",
        with_gate - plain,
        "ns/transition",
        "(target <= 2000)",
    );

    let inst = instance(&gated, "order-1");
    let query_ns = time_ns(n, |_| {
        black_box(gated.flag_queries(&inst, "checkout", &Value::Null));
    });
    report(
        "flags.query",
        query_ns,
        "ns/transition",
        "(evaluation context: labels, machine, revision, state, event)",
    );

    let dir = std::env::temp_dir().join(format!("cnsm-bench-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("flags.json");
    std::fs::write(&path, include_str!("../machines/checkout-flags.json")).expect("flags file");
    let provider = FlagdFileProvider::open(&path).expect("flags load");
    let queries: Vec<_> = (0..1024)
        .map(|i| {
            let inst = instance(&gated, &format!("order-{i}"));
            gated
                .flag_queries(&inst, "checkout", &Value::Null)
                .remove(0)
        })
        .collect();
    let contexts: Vec<_> = queries
        .iter()
        .map(|q| cnsm_flags::model::context_from_json(Some(&q.targeting_key), &q.context))
        .collect();
    let n_eval = n / 4;
    let resolve_ns = time_ns(n_eval, |i| {
        black_box(
            provider
                .resolve(
                    "one-click-checkout",
                    FlagValueType::Bool,
                    &contexts[i % contexts.len()],
                )
                .expect("resolves"),
        );
    });
    report(
        "flags.provider.resolve",
        resolve_ns,
        "ns/evaluation",
        "(embedded flagd provider, the example's `in` + `fractional` rule)",
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio");
    let flags = rt.block_on(Flags::new(provider));
    let sdk_ns = time_ns(n_eval, |i| {
        black_box(rt.block_on(flags.evaluate_one(&queries[i % queries.len()])));
    });
    report(
        "flags.openfeature.evaluate",
        sdk_ns,
        "ns/evaluation",
        "(OpenFeature client + transition hook + provider, before queueing)",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
