//! `/health/*` and `/debug/statemachine`, as JSON and as text.

use serde_json::json;

use crate::support::{TestServer, assert_problem, path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints() {
    let server = TestServer::start().await;
    let livez = server.get("/health/livez").await;
    assert_eq!((livez.status, livez.text().as_str()), (200, "ok\n"));
    let readyz = server.get("/health/readyz").await;
    assert_eq!((readyz.status, readyz.text().as_str()), (200, "ok\n"));

    server.apply_counter("shop").await;
    server.create_counter("shop", "h-1").await;
    server.create_counter("shop", "h-2").await;
    server
        .send("shop", "h-2", &json!({"event": "close"}), &[])
        .await;

    let statez = server.get("/health/statez").await;
    assert_eq!(statez.status, 200, "{}", statez.text());
    let body = statez.json();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["store"]["kind"], "embedded");
    assert_eq!(body["store"]["status"], "ok");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["uptimeSeconds"].as_u64().is_some(), "{body}");
    assert!(
        body["commits"]["lastCommitMs"]
            .as_u64()
            .is_some_and(|t| t > 0),
        "{body}"
    );
    assert!(
        body["commits"]["records"].as_u64().is_some_and(|n| n >= 3),
        "{body}"
    );
    assert_eq!(body["instances"]["active"], 1);
    assert_eq!(body["instances"]["activeCapped"], false);
    assert_eq!(body["timers"]["pending"], 1, "{body}");
    assert_eq!(body["timers"]["stored"], 1, "{body}");
    assert!(body["timers"]["nextDueMs"].as_u64().is_some(), "{body}");
    assert!(
        body["queue"]["requestsInFlight"].as_u64().is_some(),
        "{body}"
    );

    let text = server.get("/health/statez?format=text").await;
    assert_eq!(text.status, 200);
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    let text = text.text();
    assert!(text.contains("status:            ok"), "{text}");
    assert!(text.contains("store:             embedded (ok)"), "{text}");
    assert!(text.contains("instances active:  1"), "{text}");
    assert_problem(
        &server.get("/health/statez?format=xml").await,
        400,
        "invalid",
        "Invalid",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_counts_transitions_and_errors() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    for id in ["d-1", "d-2", "d-3"] {
        server.create_counter("shop", id).await;
    }
    server
        .send("shop", "d-1", &json!({"event": "close"}), &[])
        .await;
    server
        .send(
            "shop",
            "d-2",
            &json!({"event": "pay", "payload": {"amount": 1}}),
            &[],
        )
        .await;
    server.get(&path("shop", "instances/ghost")).await;

    let debug = server.get("/debug/statemachine").await;
    assert_eq!(debug.status, 200, "{}", debug.text());
    let body = debug.json();
    let machine = &body["machines"][0];
    assert_eq!(machine["namespace"], "shop");
    assert_eq!(machine["name"], "counter");
    assert_eq!(machine["revisions"][0]["revision"], 1);
    assert_eq!(machine["revisions"][0]["instances"], 3);
    assert_eq!(
        machine["revisions"][0]["byState"],
        json!({"closed": 1, "open": 2})
    );
    assert_eq!(
        machine["revisions"][0]["byStatus"],
        json!({"active": 2, "succeeded": 1})
    );
    let transitions = body["recentTransitions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(transitions.len(), 4, "{body:#}");
    assert_eq!(transitions[0]["instance"], "d-1");
    assert_eq!(transitions[0]["to"], "closed");
    let errors = body["recentErrors"].as_array().cloned().unwrap_or_default();
    assert_eq!(errors.len(), 2, "{body:#}");
    assert_eq!(errors[0]["errorType"], "NotFound");
    assert_eq!(errors[1]["errorType"], "TransitionFailure");
    assert_eq!(errors[1]["state"], "open");
    assert_eq!(errors[1]["event"], "pay");
    assert_eq!(errors[1]["status"], 422);

    let text = server.get("/debug/statemachine?format=text").await.text();
    assert!(text.contains("shop/counter"), "{text}");
    assert!(
        text.contains("revision 1: 3 instance(s): closed=1, open=2"),
        "{text}"
    );
    assert!(
        text.contains("shop/d-1 v1 open -> closed on close by anonymous"),
        "{text}"
    );
    assert!(text.contains("422 TransitionFailure POST"), "{text}");

    // The ring buffers keep the last 50.
    for _ in 0..60 {
        server.get(&path("shop", "instances/ghost")).await;
    }
    let body = server.get("/debug/statemachine").await.json();
    assert_eq!(body["recentErrors"].as_array().map(Vec::len), Some(50));
}
