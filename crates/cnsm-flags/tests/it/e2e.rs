//! End to end: `../shared/examples/checkout-canary.yaml` with `../shared/examples/flags.json`
//! through the runtime and the embedded provider.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use cnsm_core::flags::FlagQuery;
use cnsm_core::{Instance, StateChangeEvent};
use cnsm_flags::{Flags, InMemoryProvider, MemoryFlag};
use cnsm_runtime::flags::{FlagEvaluator, FlagFuture};
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeOptions};
use cnsm_store::embedded::EmbeddedStore;

use crate::gherkin_support::shared_dir;

fn examples(name: &str) -> std::path::PathBuf {
    shared_dir().join("examples").join(name)
}

async fn runtime(dir: &std::path::Path, flags: Option<Arc<dyn FlagEvaluator>>) -> Runtime {
    let store = EmbeddedStore::open(dir).expect("store opens");
    let options = RuntimeOptions {
        flags,
        ..RuntimeOptions::default()
    };
    let runtime = Runtime::open(store, options).expect("runtime opens");
    let yaml = std::fs::read_to_string(examples("checkout-canary.yaml")).expect("example exists");
    runtime
        .apply_yaml(&yaml, Some("checkout-canary.yaml"))
        .await
        .expect("the example is admitted");
    runtime
}

async fn checkout(runtime: &Runtime, id: &str, tier: Option<&str>) -> StateChangeEvent {
    let mut create = CreateInstance::new("shop", "checkout").id(id);
    if let Some(tier) = tier {
        create = create.label("tier", tier);
    }
    runtime.create_instance(create).await.expect("created");
    runtime
        .send("shop", id, EventRequest::new("checkout"))
        .await
        .expect("checkout is applied")
        .record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_canary_gold_tier_and_ten_percent_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flags = Arc::new(
        Flags::from_file(examples("flags.json"))
            .await
            .expect("flags load"),
    );
    let rt = runtime(dir.path(), Some(flags.clone())).await;

    // Gold and platinum tiers always take the one-click path, by targeting.
    for (i, tier) in ["gold", "platinum", "gold"].into_iter().enumerate() {
        let record = checkout(&rt, &format!("vip-{i}"), Some(tier)).await;
        assert_eq!(&*record.to, "one-click-review");
        assert_eq!(record.flags.len(), 1);
        let decision = &record.flags[0];
        assert_eq!(decision.key, "one-click-checkout");
        assert_eq!(decision.variant.as_deref(), Some("on"));
        assert_eq!(decision.reason, "TARGETING_MATCH");
        assert!(decision.allowed);
    }

    // 10,000 other instances: about 10% by the fractional split (group commit keeps it quick).
    let n_instances = 10_000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n_instances {
        let rt = rt.clone();
        tasks.spawn(async move {
            let id = format!("order-{i}");
            let tier = if i % 2 == 0 { Some("silver") } else { None };
            let record = checkout(&rt, &id, tier).await;
            (id, record)
        });
    }
    let mut n_one_click = 0;
    let mut sample = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (id, record) = done.expect("task finished");
        let decision = &record.flags[0];
        assert!(decision.error.is_none(), "{decision:?}");
        assert_eq!(decision.allowed, &*record.to == "one-click-review");
        if decision.allowed {
            n_one_click += 1;
        }
        if sample.len() < 200 {
            sample.push((id, decision.allowed));
        }
    }
    let share = n_one_click as f64 / n_instances as f64;
    println!(
        "one-click share over {n_instances} instances: {:.2}%",
        share * 100.0
    );
    assert!((0.085..=0.115).contains(&share), "share {share}");

    // The same instance always gets the same answer.
    for (id, allowed) in &sample {
        for _ in 0..3 {
            let query = FlagQuery {
                key: "one-click-checkout".into(),
                targeting_key: id.clone(),
                targeting_key_error: None,
                context: Default::default(),
                value_type: cnsm_core::flags::FlagValueType::Bool,
            };
            let again = flags.evaluate_one(&query).await;
            assert_eq!(again.value == serde_json::json!(true), *allowed, "{id}");
        }
    }
    assert_eq!(
        flags
            .gates()
            .statuses()
            .get("one-click-checkout")
            .map(String::as_str),
        Some("ACTIVE")
    );
    rt.shutdown();
}

#[tokio::test]
async fn provider_error_denies_the_gate_and_the_fallback_is_taken_and_replay_does_not_reevaluate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = InMemoryProvider::new();
    provider.set_flag("one-click-checkout", MemoryFlag::boolean(true));
    let flags = Arc::new(Flags::new(provider.clone()).await);
    let rt = runtime(dir.path(), Some(flags.clone())).await;

    let record = checkout(&rt, "ok-1", None).await;
    assert_eq!(&*record.to, "one-click-review");
    assert_eq!(record.flags[0].reason, "STATIC");

    provider.set_failure(Some("provider is down"));
    let record = checkout(&rt, "down-1", None).await;
    assert_eq!(&*record.to, "address", "the fallback entry is taken");
    let decision = &record.flags[0];
    assert_eq!(decision.reason, "ERROR");
    assert!(!decision.allowed);
    assert!(
        decision
            .error
            .as_deref()
            .unwrap_or("")
            .contains("provider is down")
    );
    assert_eq!(
        flags
            .gates()
            .statuses()
            .get("one-click-checkout")
            .map(String::as_str),
        Some("DEGRADED")
    );

    // A disabled flag denies too, with reason DISABLED.
    provider.set_failure(None);
    provider.set_flag(
        "one-click-checkout",
        MemoryFlag {
            disabled: true,
            ..MemoryFlag::boolean(true)
        },
    );
    let record = checkout(&rt, "off-1", None).await;
    assert_eq!(&*record.to, "address");
    assert_eq!(record.flags[0].reason, "DISABLED");
    rt.shutdown();
    drop(rt);

    // Replay rebuilds every instance from its recorded decisions: reopen with no evaluator at
    // all, and with one that would now answer differently; nothing changes.
    provider.set_flag("one-click-checkout", MemoryFlag::boolean(false));
    for evaluator in [None, Some(flags.clone() as Arc<dyn FlagEvaluator>)] {
        let store = EmbeddedStore::open(dir.path()).expect("store reopens");
        let options = RuntimeOptions {
            flags: evaluator,
            ..RuntimeOptions::default()
        };
        let rt = Runtime::open(store, options).expect("runtime opens");
        for (id, state) in [
            ("ok-1", "one-click-review"),
            ("down-1", "address"),
            ("off-1", "address"),
        ] {
            let history = rt.history("shop", id, 0, 100).await.expect("history");
            let replayed = Instance::replay(history.iter().map(|h| (&h.record, h.hash)))
                .expect("replays")
                .expect("exists");
            assert_eq!(&*replayed.state, state);
            assert_eq!(&*rt.instance("shop", id).await.expect("read").state, state);
        }
        rt.shutdown();
    }
}

/// Wraps an evaluator and, on its first call, commits another event to the instance, so the
/// decisions it returns are stale by the time they reach the committer.
#[derive(Debug)]
struct Interfering {
    inner: Arc<Flags>,
    runtime: OnceLock<Runtime>,
    n_calls: AtomicUsize,
}

impl FlagEvaluator for Interfering {
    fn evaluate<'a>(&'a self, queries: &'a [FlagQuery]) -> FlagFuture<'a> {
        Box::pin(async move {
            if self.n_calls.fetch_add(1, Ordering::SeqCst) == 0
                && let Some(rt) = self.runtime.get()
            {
                rt.send("shop", "busy-1", EventRequest::new("touch"))
                    .await
                    .expect("touch is applied");
            }
            self.inner.evaluate(queries).await
        })
    }
}

#[tokio::test]
async fn stale_decisions_are_evaluated_again_at_the_new_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = InMemoryProvider::new();
    provider.set_flag("fast-lane", MemoryFlag::boolean(true));
    let evaluator = Arc::new(Interfering {
        inner: Arc::new(Flags::new(provider).await),
        runtime: OnceLock::new(),
        n_calls: AtomicUsize::new(0),
    });
    let store = EmbeddedStore::open(dir.path()).expect("store opens");
    let rt = Runtime::open(
        store,
        RuntimeOptions::default().with_flags(evaluator.clone()),
    )
    .expect("runtime opens");
    let _ = evaluator.runtime.set(rt.clone());
    let yaml = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: lanes, namespace: shop}
spec:
  initialState: queued
  states:
  - name: queued
    type: task
    timeoutSeconds: 60
    onEvent:
    - {event: touch, target: queued}
    - {event: go, target: fast, flag: fast-lane}
    - {event: go, target: slow}
  - {name: fast, type: final}
  - {name: slow, type: final}
"#;
    rt.apply_yaml(yaml, None).await.expect("admitted");
    rt.create_instance(CreateInstance::new("shop", "lanes").id("busy-1"))
        .await
        .expect("created");
    let outcome = rt
        .send("shop", "busy-1", EventRequest::new("go"))
        .await
        .expect("go is applied");
    assert_eq!(&*outcome.record.to, "fast");
    assert_eq!(
        outcome.record.version, 2,
        "touch committed first, at version 1"
    );
    assert_eq!(
        evaluator.n_calls.load(Ordering::SeqCst),
        2,
        "the decisions made at version 0 were stale and evaluated again"
    );
    rt.shutdown();
}
