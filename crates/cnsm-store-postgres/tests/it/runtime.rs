//! Two cnsm runtimes (`shared_store`) over one PostgreSQL schema, as two nodes: events without
//! an expected version from both nodes all commit exactly once; with an expected version one
//! wins; a timer fires exactly once.

use std::time::Duration;

use cnsm_core::TransitionError;
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeError};

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn events_from_two_nodes_all_commit_once() {
    let Some(nodes) = crate::nodes(2, false) else {
        return;
    };
    multi_thread().block_on(async {
        let (a, b) = (&nodes.runtimes[0], &nodes.runtimes[1]);
        a.apply_yaml(crate::COUNTER, None).await.unwrap();
        let mut data = serde_json::Map::new();
        data.insert("n".into(), 0.into());
        a.create_instance(CreateInstance::new("default", "counter").id("c").data(data))
            .await
            .unwrap();
        let n_per_node = 40;
        let mut tasks = Vec::new();
        for node in [a, b] {
            for _ in 0..n_per_node {
                let node = node.clone();
                tasks.push(tokio::spawn(async move {
                    node.send("default", "c", EventRequest::new("add")).await
                }));
            }
        }
        let mut versions = Vec::new();
        for task in tasks {
            let outcome = task
                .await
                .unwrap()
                .expect("an event without expected version commits");
            versions.push(outcome.instance.version);
        }
        versions.sort_unstable();
        assert_eq!(
            versions,
            (1..=2 * n_per_node).collect::<Vec<_>>(),
            "each once, no gaps"
        );
        let instance = b.instance("default", "c").await.unwrap();
        assert_eq!(instance.version, 2 * n_per_node);
        assert_eq!(instance.data["n"], serde_json::json!(2 * n_per_node));
        assert!(a.store().verify().unwrap().is_ok());
    });
}

#[test]
fn expected_version_race_across_nodes_has_one_winner() {
    let Some(nodes) = crate::nodes(2, false) else {
        return;
    };
    multi_thread().block_on(async {
        let (a, b) = (&nodes.runtimes[0], &nodes.runtimes[1]);
        a.apply_yaml(crate::COUNTER, None).await.unwrap();
        let mut data = serde_json::Map::new();
        data.insert("n".into(), 0.into());
        a.create_instance(CreateInstance::new("default", "counter").id("c").data(data))
            .await
            .unwrap();
        for round in 0..10u64 {
            // Each send is bounded, so a lost answer fails the test instead of hanging it.
            let (ra, rb) = tokio::join!(bounded_send(a, round), bounded_send(b, round));
            let lost = match (&ra, &rb) {
                (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
                other => panic!("round {round}: expected one winner, got {other:?}"),
            };
            assert!(
                matches!(
                    lost,
                    RuntimeError::Transition(
                        TransitionError::RaceCondition { .. } | TransitionError::StaleState { .. }
                    )
                ),
                "{lost:?}"
            );
        }
        assert_eq!(a.instance("default", "c").await.unwrap().version, 10);
    });
}

#[test]
fn a_timer_fires_exactly_once_across_nodes() {
    let Some(nodes) = crate::nodes(3, false) else {
        return;
    };
    multi_thread().block_on(async {
        let a = &nodes.runtimes[0];
        a.apply_yaml(crate::COUNTER, None).await.unwrap();
        for i in 0..5 {
            let id = format!("w-{i}");
            let mut data = serde_json::Map::new();
            data.insert("n".into(), 0.into());
            a.create_instance(CreateInstance::new("default", "counter").id(&id).data(data))
                .await
                .unwrap();
            nodes.runtimes[i % 3]
                .send("default", &id, EventRequest::new("stop"))
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut n_done = 0;
            for i in 0..5 {
                if a.instance("default", &format!("w-{i}"))
                    .await
                    .unwrap()
                    .status
                    == cnsm_core::Status::Succeeded
                {
                    n_done += 1;
                }
            }
            if n_done == 5 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "timers did not fire");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Give the other nodes a chance to fire again, then check each fired once.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..5 {
            let history = a.history("default", &format!("w-{i}"), 0, 0).await.unwrap();
            assert_eq!(history.len(), 3, "create, stop, the timer: {history:?}");
            assert_eq!(&*history[2].record.actor, cnsm_core::engine::ACTOR_TIMER);
        }
    });
}

/// An `If-Match` send, bounded so that a lost answer fails the test instead of hanging it.
async fn bounded_send(
    runtime: &Runtime,
    round: u64,
) -> Result<cnsm_runtime::TransitionOutcome, RuntimeError> {
    let send = runtime.send(
        "default",
        "c",
        EventRequest::new("add").expected_version(round),
    );
    tokio::time::timeout(Duration::from_secs(30), send)
        .await
        .unwrap_or_else(|_| panic!("round {round}: a send got no answer in 30 s"))
}
