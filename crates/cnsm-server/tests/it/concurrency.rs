//! Compare-and-swap under contention: 50 clients race `If-Match` on one instance.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use crate::support::{TestServer, path};

/// One attempt: the version the client read and what it got.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    read_version: u64,
    status: u16,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_race_if_match() {
    let server = Arc::new(TestServer::start().await);
    server.apply_counter("race").await;
    server.create_counter("race", "hot").await;
    const N_CLIENTS: usize = 50;
    const N_ATTEMPTS: usize = 6;

    let barrier = Arc::new(tokio::sync::Barrier::new(N_CLIENTS));
    let mut tasks = Vec::new();
    for _ in 0..N_CLIENTS {
        let server = Arc::clone(&server);
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut attempts = Vec::new();
            for _ in 0..N_ATTEMPTS {
                let got = server.get(&path("race", "instances/hot")).await;
                assert_eq!(got.status, 200, "{}", got.text());
                let etag = got.header("etag").unwrap_or_default().to_owned();
                let read_version: u64 = etag.trim_matches('"').parse().expect("etag is a version");
                let r = server
                    .send(
                        "race",
                        "hot",
                        &json!({"event": "tick"}),
                        &[("if-match", &etag)],
                    )
                    .await;
                if r.status == 200 {
                    assert_eq!(r.json()["record"]["version"], read_version + 1);
                    assert_eq!(
                        r.header("etag"),
                        Some(format!("\"{}\"", read_version + 1).as_str())
                    );
                } else {
                    let body = r.json();
                    let expected_type = match r.status {
                        409 => "RaceCondition",
                        412 => "StaleState",
                        other => panic!("unexpected status {other}: {body}"),
                    };
                    assert_eq!(body["errorType"], expected_type, "{body}");
                    assert_eq!(body["expectedVersion"], read_version, "{body}");
                }
                attempts.push(Attempt {
                    read_version,
                    status: r.status,
                });
            }
            attempts
        }));
    }
    let mut attempts = Vec::new();
    for task in tasks {
        attempts.extend(task.await.expect("client task"));
    }

    let mut winners: BTreeMap<u64, usize> = BTreeMap::new();
    let mut n_lost = 0;
    for a in &attempts {
        if a.status == 200 {
            *winners.entry(a.read_version).or_default() += 1;
        } else {
            n_lost += 1;
        }
    }
    let final_version = server
        .runtime
        .instance("race", "hot")
        .await
        .expect("instance")
        .version;
    // Exactly one winner per version, and every version was won by someone.
    assert!(winners.values().all(|&n| n == 1), "{winners:?}");
    assert_eq!(
        winners.keys().copied().collect::<Vec<_>>(),
        (0..final_version).collect::<Vec<_>>()
    );
    assert_eq!(n_lost + final_version as usize, N_CLIENTS * N_ATTEMPTS);
    assert!(n_lost > 0, "50 clients never collided");

    // The history has no gaps and counts every win.
    let history = server
        .runtime
        .history("race", "hot", 0, 10_000)
        .await
        .expect("history");
    let versions: Vec<u64> = history.iter().map(|e| e.record.version).collect();
    assert_eq!(versions, (0..=final_version).collect::<Vec<_>>());
    let last = server
        .runtime
        .instance("race", "hot")
        .await
        .expect("instance");
    assert_eq!(last.data["n"], json!(final_version));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_race_is_409_and_a_stale_read_412() {
    let server = Arc::new(TestServer::start().await);
    server.apply_counter("race").await;
    server.create_counter("race", "burst").await;
    let mut seen_race = false;
    for round in 0..20u64 {
        // Everyone read version `round`; they all send at once.
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let server = Arc::clone(&server);
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                let etag = format!("\"{round}\"");
                barrier.wait().await;
                server
                    .send(
                        "race",
                        "burst",
                        &json!({"event": "tick"}),
                        &[("if-match", &etag)],
                    )
                    .await
                    .status
            }));
        }
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.expect("task"));
        }
        assert_eq!(
            statuses.iter().filter(|&&s| s == 200).count(),
            1,
            "{statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| [200, 409, 412].contains(s)),
            "{statuses:?}"
        );
        seen_race |= statuses.contains(&409);
        if seen_race {
            break;
        }
    }
    assert!(seen_race, "no request ever lost a race inside a batch");
    let problem = server
        .send(
            "race",
            "burst",
            &json!({"event": "tick"}),
            &[("if-match", "\"0\"")],
        )
        .await;
    assert_eq!(problem.status, 412, "{}", problem.text());
    assert_eq!(
        problem.json()["type"],
        "https://statemachine.cn/problems/stale-state"
    );
}
