//! `POST .../instances/{id}/erase` over HTTP: the erasure record and the redacted history,
//! and every refusal (unknown instance, bad field path, bad body) changing nothing.

use serde_json::{Value, json};

use crate::support::{TestServer, assert_problem, path};

const EMAIL: &str = "ann@example.com";

/// Every string anywhere in `value`.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

fn contains_string(value: &Value, needle: &str) -> bool {
    let mut all = Vec::new();
    strings(value, &mut all);
    all.iter().any(|s| s.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_over_http_redacts_fields_then_everything() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    let created = server
        .post(
            &path("shop", "instances"),
            &json!({"id": "c-1", "machine": "counter",
                    "data": {"n": 0, "customer": {"email": EMAIL, "zip": "0150"}}}),
            &[],
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let tick = server
        .send(
            "shop",
            "c-1",
            &json!({"event": "tick", "payload": {"email": EMAIL}}),
            &[],
        )
        .await;
    assert_eq!(tick.status, 200, "{}", tick.text());
    let erase = path("shop", "instances/c-1/erase");

    // Refusals first: each is a problem and changes nothing.
    let before = server.state_of("shop", "c-1").await;
    let unknown = server
        .post(&path("shop", "instances/nope/erase"), &json!({}), &[])
        .await;
    assert_problem(&unknown, 404, "not-found", "NotFound");
    let bad_path = server
        .post(&erase, &json!({"fields": ["customer..email"]}), &[])
        .await;
    let problem = assert_problem(&bad_path, 400, "invalid", "Invalid");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or("")
            .contains("fields[0]"),
        "the detail names the field: {problem}"
    );
    let empty = server.post_raw(&erase, "application/json", b"", &[]).await;
    assert_problem(&empty, 400, "invalid", "Invalid");
    let unknown_member = server.post(&erase, &json!({"why": 1}), &[]).await;
    assert_problem(&unknown_member, 400, "invalid", "Invalid");
    let not_json = server.post_raw(&erase, "application/xml", b"{}", &[]).await;
    assert_problem(&not_json, 415, "unsupported-media-type", "Invalid");
    assert_eq!(
        server.state_of("shop", "c-1").await,
        before,
        "refusals change nothing"
    );

    // The e-mail only: in the data and in the tick's payload.
    let erased = server
        .post(
            &erase,
            &json!({"fields": ["customer.email", "email"], "reason": "request 4711", "actor": "dpo"}),
            &[],
        )
        .await;
    assert_eq!(erased.status, 200, "{}", erased.text());
    assert_eq!(erased.header("etag"), Some("\"2\""));
    let body = erased.json();
    assert_eq!(body["record"]["kind"], "erasure", "{body}");
    assert_eq!(body["record"]["actor"], "dpo", "{body}");
    assert_eq!(
        body["record"]["erasure"]["reason"], "request 4711",
        "{body}"
    );
    let versions: Vec<u64> = body["record"]["erasure"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["version"].as_u64())
        .collect();
    assert_eq!(versions, [0, 1], "{body}");
    assert_eq!(
        body["instance"]["data"],
        json!({"n": 1, "customer": {"email": "[erased]", "zip": "0150"}})
    );
    let history = server.get(&path("shop", "instances/c-1/history")).await;
    assert_eq!(history.status, 200, "{}", history.text());
    let history = history.json();
    assert!(!contains_string(&history, EMAIL), "{history}");
    assert!(contains_string(&history, "0150"), "{history}");
    // The instance goes on with the values that were not erased.
    let tick = server
        .send("shop", "c-1", &json!({"event": "tick"}), &[])
        .await;
    assert_eq!(tick.status, 200, "{}", tick.text());
    assert_eq!(tick.json()["instance"]["data"]["n"], 2);

    // Everything: `{}`.
    let all = server.post(&erase, &json!({}), &[]).await;
    assert_eq!(all.status, 200, "{}", all.text());
    let body = all.json();
    assert_eq!(body["instance"]["version"], 4);
    assert_eq!(
        body["instance"]["data"],
        json!({"n": "[erased]", "customer": "[erased]"})
    );
    let history = server
        .get(&path("shop", "instances/c-1/history"))
        .await
        .json();
    assert!(!contains_string(&history, EMAIL), "{history}");
    assert!(!contains_string(&history, "0150"), "{history}");
    server.stop().await.expect("clean stop");
}
