//! Stress: two runtimes (`shared_store`) over one PostgreSQL schema race many `If-Match`
//! (expected version) events on a few instances, with one transaction per batch and with one
//! per item, from tasks on the workers and from the future `block_on` runs (both nodes' sends
//! in one `join!`). Every send is bounded: each must be answered (committed, `StaleState` or
//! `RaceCondition`) well within the bound, and the instances' versions, data and histories must
//! agree with the answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cnsm_core::TransitionError;
use cnsm_runtime::{CreateInstance, EventRequest, RuntimeError};

/// Instances raced on, tasks per node, and how long each mode runs.
const N_INSTANCES: usize = 3;
const N_TASKS_PER_NODE: usize = 6;
const RUN_FOR: Duration = Duration::from_secs(4);
/// Far above any honest answer time on a loaded machine, far below a hang.
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

fn race(per_item: bool) {
    let Some(cluster) = crate::nodes(2, per_item) else {
        return;
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    tokio.block_on(async {
        let first = &cluster.runtimes[0];
        first.apply_yaml(crate::COUNTER, None).await.unwrap();
        for i in 0..N_INSTANCES {
            let mut data = serde_json::Map::new();
            data.insert("n".into(), 0.into());
            first
                .create_instance(
                    CreateInstance::new("default", "counter")
                        .id(format!("c{i}"))
                        .data(data),
                )
                .await
                .unwrap();
        }
        let committed: Arc<Vec<AtomicU64>> =
            Arc::new((0..N_INSTANCES).map(|_| AtomicU64::new(0)).collect());
        let n_answers = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + RUN_FOR;
        let mut tasks = Vec::new();
        for (n, node) in cluster.runtimes.iter().enumerate() {
            for t in 0..N_TASKS_PER_NODE {
                let node = node.clone();
                let committed = Arc::clone(&committed);
                let n_answers = Arc::clone(&n_answers);
                tasks.push(tokio::spawn(async move {
                    let mut round = 0usize;
                    while Instant::now() < until {
                        let i = (n + t + round) % N_INSTANCES;
                        round += 1;
                        let id = format!("c{i}");
                        let version = node.instance("default", &id).await.unwrap().version;
                        let send = node.send(
                            "default",
                            &id,
                            EventRequest::new("add").expected_version(version),
                        );
                        let Ok(result) = tokio::time::timeout(ANSWER_WITHIN, send).await else {
                            panic!(
                                "per_item={per_item}: node {n} task {t}: a send on {id} at \
                                 version {version} got no answer in {ANSWER_WITHIN:?}"
                            );
                        };
                        match result {
                            Ok(outcome) => {
                                assert_eq!(outcome.instance.version, version + 1);
                                committed[i].fetch_add(1, Ordering::SeqCst);
                            }
                            Err(RuntimeError::Transition(
                                TransitionError::StaleState { .. }
                                | TransitionError::RaceCondition { .. },
                            )) => {}
                            Err(other) => panic!("per_item={per_item}: unexpected {other:?}"),
                        }
                        n_answers.fetch_add(1, Ordering::SeqCst);
                    }
                }));
            }
        }
        // Meanwhile the future `block_on` runs races both nodes in one `join!` (store calls of
        // one send block this thread while the other's answer may arrive).
        let mut round = 0usize;
        while Instant::now() < until {
            let i = round % N_INSTANCES;
            round += 1;
            let id = format!("c{i}");
            let version = first.instance("default", &id).await.unwrap().version;
            let sends = cluster.runtimes.iter().map(|node| {
                let send = node.send(
                    "default",
                    &id,
                    EventRequest::new("add").expected_version(version),
                );
                tokio::time::timeout(ANSWER_WITHIN, send)
            });
            let (a, b) = {
                let mut sends = sends;
                let (a, b) = (sends.next().unwrap(), sends.next().unwrap());
                tokio::join!(a, b)
            };
            for result in [a, b] {
                let Ok(result) = result else {
                    panic!(
                        "per_item={per_item}: a joined send on {id} at version {version} got \
                         no answer in {ANSWER_WITHIN:?}"
                    );
                };
                match result {
                    Ok(outcome) => {
                        assert_eq!(outcome.instance.version, version + 1);
                        committed[i].fetch_add(1, Ordering::SeqCst);
                    }
                    Err(RuntimeError::Transition(
                        TransitionError::StaleState { .. } | TransitionError::RaceCondition { .. },
                    )) => {}
                    Err(other) => panic!("per_item={per_item}: unexpected {other:?}"),
                }
                n_answers.fetch_add(1, Ordering::SeqCst);
            }
        }
        for task in tasks {
            task.await.expect("a racing task panicked");
        }
        let mut n_committed = 0;
        for (i, count) in committed.iter().enumerate() {
            let count = count.load(Ordering::SeqCst);
            n_committed += count;
            let id = format!("c{i}");
            for node in &cluster.runtimes {
                let instance = node.instance("default", &id).await.unwrap();
                assert_eq!(
                    instance.version, count,
                    "{id}: one version per committed send"
                );
                assert_eq!(instance.data["n"], serde_json::json!(count));
            }
            let history = first.history("default", &id, 0, 0).await.unwrap();
            assert_eq!(
                history.len() as u64,
                count + 1,
                "{id}: genesis and each commit"
            );
        }
        assert!(n_committed > 0, "some sends committed");
        assert!(first.store().verify().unwrap().is_ok());
        eprintln!(
            "per_item={per_item}: {} answers, {n_committed} committed",
            n_answers.load(Ordering::SeqCst)
        );
    });
}

#[test]
fn if_match_race_across_nodes_answers_every_send() {
    race(false);
}

#[test]
fn if_match_race_across_nodes_answers_every_send_per_item() {
    race(true);
}
