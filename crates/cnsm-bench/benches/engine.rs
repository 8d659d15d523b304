//! Engine apply path, no I/O, one core: lookup + guard + transition + record (+ fold into the
//! instance), on the order-processing machine; then with a CEL guard on every transition; then
//! with sealing (deterministic CBOR + SHA-256) included; then with the guards of the second
//! case evaluated by the CEL interpreter (they are outside the fast path of
//! `cnsm_core::fastexpr`).
//!
//! Run: `cargo bench -p cnsm-bench --bench engine`
//!
//! `CNSM_BENCH_ORDERS=N` sets the orders per round (default 250,000); `CNSM_BENCH_ONLY=guarded`
//! (a comma-separated list of `plain`, `guarded`, `sealed`, `interpreted`) runs only those cases, e.g. to count
//! instructions of one case under `valgrind --tool=callgrind`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use cnsm_bench::{ORDER_GUARDED, ORDER_PROCESSING, machine, report};
use cnsm_core::Instance;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use serde_json::{Value, json};

/// The event sequence of one order: four transitions, one of them guarded in the plain machine.
fn events() -> [(&'static str, Value); 4] {
    [
        ("complete", Value::Null),
        ("pay", json!({"amount": 40})),
        ("ship", Value::Null),
        ("deliver", Value::Null),
    ]
}

fn genesis(machine: &Machine) -> Instance {
    let mut data = serde_json::Map::new();
    data.insert("total".into(), json!(40));
    let record = machine
        .create(NewInstance {
            namespace: "shop",
            id: "o-1",
            data,
            labels: BTreeMap::new(),
            now_ms: 1,
            actor: "bench",
        })
        .expect("create");
    let hash = record.seal().hash;
    Instance::from_genesis(&record, hash).expect("genesis")
}

/// Runs `n_orders` orders through the machine; returns transitions per second.
fn run(machine: &Machine, n_orders: usize, seal: bool) -> f64 {
    let start_instance = genesis(machine);
    let events = events();
    // The caller's identity, shared: a service keeps one per authenticated subject.
    let actor: std::sync::Arc<str> = std::sync::Arc::from("bench");
    let started = Instant::now();
    let mut n = 0u64;
    for i in 0..n_orders {
        let mut instance = start_instance.clone();
        for (name, payload) in &events {
            let input = Input::new(
                Trigger::Event { name, payload },
                2 + i as u64,
                actor.clone(),
            );
            let record = machine.apply(&instance, &input).expect("transition");
            let hash = if seal {
                record.seal().hash
            } else {
                instance.last_hash
            };
            instance.apply_record(&record, hash).expect("applies");
            n += 1;
        }
        black_box(&instance);
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn n_orders_warmup() -> usize {
    std::env::var("CNSM_BENCH_ORDERS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .map(|n| n / 10)
        .unwrap_or(10_000)
}

fn best_of(rounds: usize, f: impl Fn() -> f64) -> f64 {
    (0..rounds).map(|_| f()).fold(0.0, f64::max)
}

/// [`ORDER_GUARDED`] with every guard wrapped in `int()`, which only the CEL interpreter
/// evaluates.
fn interpreted_yaml() -> String {
    let mut yaml = ORDER_GUARDED.to_owned();
    for (guard, interpreted) in [
        ("data.total > 0", "int(data.total) > 0"),
        (
            "event.amount >= data.total",
            "int(event.amount) >= int(data.total)",
        ),
        ("instance.version == 2", "int(instance.version) == 2"),
        ("data.total < 1000", "int(data.total) < 1000"),
    ] {
        let quoted = format!("\"{guard}\"");
        assert!(
            yaml.contains(&quoted),
            "the guarded machine has no guard `{guard}`"
        );
        yaml = yaml.replace(&quoted, &format!("\"{interpreted}\""));
    }
    yaml
}

/// Whether the case `name` is selected by `CNSM_BENCH_ONLY` (all are when it is unset).
fn selected(name: &str) -> bool {
    match std::env::var("CNSM_BENCH_ONLY") {
        Ok(only) => only.split(',').any(|s| s.trim() == name),
        Err(_) => true,
    }
}

fn main() {
    let plain = machine(ORDER_PROCESSING);
    let guarded = machine(ORDER_GUARDED);
    let n_orders = std::env::var("CNSM_BENCH_ORDERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(250_000);
    if selected("plain") {
        run(&plain, n_orders_warmup(), false); // warm-up
        let plain_rate = best_of(3, || run(&plain, n_orders, false));
        report(
            "engine.apply.order_processing",
            plain_rate,
            "transitions/s",
            "(1 of 4 guarded, no I/O, one core)",
        );
    }
    if selected("guarded") {
        run(&guarded, n_orders_warmup(), false); // warm-up
        let guarded_rate = best_of(3, || run(&guarded, n_orders / 2, false));
        report(
            "engine.apply.cel_guard_every_transition",
            guarded_rate,
            "transitions/s",
            "(4 of 4 guarded)",
        );
    }
    if selected("sealed") {
        run(&plain, n_orders_warmup(), true); // warm-up
        let sealed_rate = best_of(3, || run(&plain, n_orders / 2, true));
        report(
            "engine.apply_and_seal.order_processing",
            sealed_rate,
            "transitions/s",
            "(+ CBOR encode + SHA-256 chain)",
        );
    }
    if selected("interpreted") {
        let interpreted = machine(&interpreted_yaml());
        run(&interpreted, n_orders_warmup(), false); // warm-up
        let rate = best_of(3, || run(&interpreted, n_orders / 2, false));
        report(
            "engine.apply.cel_interpreter_every_transition",
            rate,
            "transitions/s",
            "(4 of 4 guarded, all by the CEL interpreter)",
        );
    }
}
