//! Operator controls over HTTP: each is a record with the acting subject; refusals are
//! TransitionFailure problems and change nothing.

use serde_json::{Value, json};

use crate::support::{TestServer, assert_problem, path};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_resume_cancel_over_http() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    server.create_counter("shop", "c-1").await;
    let control = |action: &str| path("shop", &format!("instances/c-1/{action}"));

    // An empty body is fine.
    let suspended = server
        .post_raw(&control("suspend"), "application/json", b"", &[])
        .await;
    assert_eq!(suspended.status, 200, "{}", suspended.text());
    assert_eq!(suspended.header("etag"), Some("\"1\""));
    let body = suspended.json();
    assert_eq!(body["record"]["kind"], "suspend");
    assert_eq!(body["instance"]["suspended"], true);

    let before = server.state_of("shop", "c-1").await;
    let refused = server
        .send("shop", "c-1", &json!({"event": "tick"}), &[])
        .await;
    let problem = assert_problem(&refused, 422, "transition-failure", "TransitionFailure");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("suspended"),
        "{problem}"
    );
    let again = server.post(&control("suspend"), &json!({}), &[]).await;
    assert_problem(&again, 422, "transition-failure", "TransitionFailure");
    assert_eq!(
        server.state_of("shop", "c-1").await,
        before,
        "refusals change nothing"
    );

    let resumed = server.post(&control("resume"), &json!({}), &[]).await;
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    assert_eq!(resumed.json()["instance"]["suspended"], Value::Null);
    let tick = server
        .send("shop", "c-1", &json!({"event": "tick"}), &[])
        .await;
    assert_eq!(tick.status, 200, "{}", tick.text());

    let cancelled = server
        .post(
            &control("cancel"),
            &json!({"reason": "customer request", "actor": "oncall"}),
            &[],
        )
        .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.text());
    let body = cancelled.json();
    assert_eq!(body["instance"]["status"], "cancelled");
    assert_eq!(body["record"]["reason"], "customer request");
    assert_eq!(body["record"]["actor"], "oncall");

    let redrive = server.post(&control("redrive"), &json!({}), &[]).await;
    let problem = assert_problem(&redrive, 422, "transition-failure", "TransitionFailure");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("only a failed instance"),
        "{problem}"
    );
    let unknown = server
        .post(&path("shop", "instances/nope/cancel"), &json!({}), &[])
        .await;
    assert_problem(&unknown, 404, "not-found", "NotFound");
    let bad = server
        .post(&control("resume"), &json!({"why": 1}), &[])
        .await;
    assert_problem(&bad, 400, "invalid", "Invalid");
    server.stop().await.expect("clean stop");
}
