//! Embedding cnsm in a Rust service: the runtime in-process on the embedded store.
//!
//! Run with `cargo run -p embedded-example`. It opens a store in a temporary directory, applies
//! a machine, drives one instance through it, shows a rejected event, and reads the
//! hash-chained history back.

use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeError, RuntimeOptions};
use cnsm_store::embedded::EmbeddedStore;
use serde_json::json;

const ORDER: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata:
  name: order
  namespace: shop
spec:
  initialState: created
  states:
  - name: created
    type: task
    timeoutSeconds: 30
    onTimeout: cancelled
    onEvent:
    - event: pay
      target: paid
      guard: "event.amount >= data.total"
      assign: {paidAmount: "event.amount"}
  - name: paid
    type: task
    timeoutSeconds: 604800
    transition: shipped
  - {name: shipped, type: final}
  - {name: cancelled, type: final, outcome: cancelled}
"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("cnsm-embedded-example-{}", std::process::id()));
    // The embedded store: one file, durable, crash-safe. Opening it verifies the history tail.
    let store = EmbeddedStore::open(&dir)?;
    let runtime = Runtime::open(store, RuntimeOptions::default())?;

    let applied = runtime.apply_yaml(ORDER, Some("order.yaml")).await?;
    println!(
        "applied {}/{} revision {} ({})",
        applied.namespace, applied.name, applied.revision, applied.hash
    );

    let mut data = serde_json::Map::new();
    data.insert("total".into(), json!(40));
    let order = runtime
        .create_instance(
            CreateInstance::new("shop", "order")
                .id("o-1")
                .data(data)
                .label("channel", "web"),
        )
        .await?;
    println!(
        "created {} in state {} (version {})",
        order.id, order.state, order.version
    );

    // A guard that says no is a typed error, and nothing changes.
    match runtime
        .send(
            "shop",
            "o-1",
            EventRequest::new("pay").payload(json!({"amount": 10})),
        )
        .await
    {
        Err(RuntimeError::Transition(e)) => println!("rejected as expected: {e}"),
        other => return Err(format!("expected a TransitionFailure, got {other:?}").into()),
    }

    // Compare-and-swap on the version, with an idempotency key.
    let paid = runtime
        .send(
            "shop",
            "o-1",
            EventRequest::new("pay")
                .payload(json!({"amount": 40}))
                .expected_version(0)
                .idempotency_key("pay-1"),
        )
        .await?;
    println!(
        "{} -> {} (version {})",
        paid.record.from.as_deref().unwrap_or("-"),
        paid.instance.state,
        paid.instance.version
    );
    let shipped = runtime
        .send("shop", "o-1", EventRequest::new("complete"))
        .await?;
    println!(
        "now {} with status {}",
        shipped.instance.state,
        shipped.instance.status.as_str()
    );

    for entry in runtime.history("shop", "o-1", 0, 100).await? {
        println!(
            "  v{} {:?} {} -> {} prev={} hash={}",
            entry.record.version,
            entry.record.kind,
            entry.record.from.as_deref().unwrap_or("-"),
            entry.record.to,
            &entry.record.prev_hash.to_hex()[..12],
            &entry.hash.to_hex()[..12]
        );
    }
    runtime.shutdown();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
