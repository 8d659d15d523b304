//! Events as CloudEvents 1.0 (structured and binary mode), their idempotency key, and trace
//! context propagation.

use serde_json::{Value, json};

use crate::support::{TestServer, assert_problem, path};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const OTHER_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn structured(id: &str, event_type: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "/shop/checkout",
        "type": event_type,
        "datacontenttype": "application/json",
        "data": data,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_and_binary_cloudevents() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    server.create_counter("shop", "ce-1").await;
    let events = path("shop", "instances/ce-1/events");
    let ce_json = "application/cloudevents+json";

    let first = structured("evt-1", "tick", Value::Null);
    let r = server
        .post_raw(
            &events,
            ce_json,
            first.to_string().as_bytes(),
            &[("traceparent", OTHER_TRACEPARENT)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let record = &r.json()["record"];
    assert_eq!(record["event"], "tick");
    assert_eq!(record["idempotencyKey"], "/shop/checkout evt-1");
    assert_eq!(
        record["trace"]["traceId"],
        "0af7651916cd43dd8448eb211c80319c"
    );

    // The same source and id: a replay, nothing applied twice.
    let again = server
        .post_raw(&events, ce_json, first.to_string().as_bytes(), &[])
        .await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["replayed"], true);
    assert_eq!(again.json()["record"]["version"], 1);

    // The distributed-tracing extension wins over the HTTP header.
    let mut traced = structured("evt-2", "pay", json!({"amount": 12}));
    traced["traceparent"] = json!(TRACEPARENT);
    let r = server
        .post_raw(
            &events,
            ce_json,
            traced.to_string().as_bytes(),
            &[("traceparent", OTHER_TRACEPARENT), ("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let record = &r.json()["record"];
    assert_eq!(record["to"], "paid");
    assert_eq!(record["payload"]["amount"], 12);
    assert_eq!(
        record["trace"]["traceId"],
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(record["trace"]["spanId"], "00f067aa0ba902b7");

    // Binary mode: attributes in ce-* headers, the body is the data.
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "evt-3"),
        ("ce-source", "urn:shop:worker"),
        ("ce-type", "close"),
        ("traceparent", "not-a-traceparent"),
    ];
    let r = server
        .post_raw(
            &events,
            "application/json",
            b"{\"by\": \"worker\"}",
            &binary,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let record = &r.json()["record"];
    assert_eq!(record["to"], "closed");
    assert_eq!(record["payload"]["by"], "worker");
    assert_eq!(record["idempotencyKey"], "urn:shop:worker evt-3");
    assert!(
        record.get("trace").is_none(),
        "an invalid traceparent is ignored: {record}"
    );
    let replay = server
        .post_raw(
            &events,
            "application/json",
            b"{\"by\": \"worker\"}",
            &binary,
        )
        .await;
    assert_eq!(replay.json()["replayed"], true, "{}", replay.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_cloudevents_name_the_attribute() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    server.create_counter("shop", "ce-2").await;
    let events = path("shop", "instances/ce-2/events");
    let before = server.state_of("shop", "ce-2").await;
    let ce_json = "application/cloudevents+json";

    // Structured mode: each required attribute missing in turn, then all of them.
    for attribute in ["specversion", "id", "source", "type"] {
        let mut event = structured("evt-x", "tick", Value::Null);
        event.as_object_mut().expect("object").remove(attribute);
        let r = server
            .post_raw(&events, ce_json, event.to_string().as_bytes(), &[])
            .await;
        let problem = assert_problem(&r, 400, "invalid", "Invalid");
        assert_eq!(problem["attributes"], json!([attribute]), "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("'{attribute}'"))),
            "{problem}"
        );
    }
    let r = server
        .post_raw(&events, ce_json, b"{\"data\": 1}", &[])
        .await;
    let problem = assert_problem(&r, 400, "invalid", "Invalid");
    assert_eq!(
        problem["attributes"],
        json!(["specversion", "id", "source", "type"])
    );

    let cases = [
        ("specversion", json!("0.3")),
        ("id", json!("")),
        ("source", json!(7)),
        ("datacontenttype", json!("text/xml")),
        ("data_base64", json!("AAAA")),
    ];
    for (attribute, value) in cases {
        let mut event = structured("evt-x", "tick", Value::Null);
        event[attribute] = value;
        let r = server
            .post_raw(&events, ce_json, event.to_string().as_bytes(), &[])
            .await;
        let problem = assert_problem(&r, 400, "invalid", "Invalid");
        assert_eq!(problem["attributes"], json!([attribute]), "{problem}");
    }
    assert_problem(
        &server.post_raw(&events, ce_json, b"[1, 2]", &[]).await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server
            .post_raw(&events, ce_json, b"{\"specversion\": ", &[])
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server
            .post_raw(&events, "application/cloudevents-batch+json", b"[]", &[])
            .await,
        415,
        "unsupported-media-type",
        "Invalid",
    );

    // Binary mode: each required header missing in turn.
    let full = [
        ("ce-specversion", "1.0"),
        ("ce-id", "evt-b"),
        ("ce-source", "urn:x"),
        ("ce-type", "tick"),
    ];
    for missing in 0..full.len() {
        let headers: Vec<(&str, &str)> = full
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != missing)
            .map(|(_, h)| *h)
            .collect();
        let r = server
            .post_raw(&events, "application/json", b"", &headers)
            .await;
        let problem = assert_problem(&r, 400, "invalid", "Invalid");
        let attribute = full[missing].0.trim_start_matches("ce-");
        assert_eq!(problem["attributes"], json!([attribute]), "{problem}");
    }
    let mut wrong_version = full;
    wrong_version[0] = ("ce-specversion", "2.0");
    let problem = assert_problem(
        &server
            .post_raw(&events, "application/json", b"", &wrong_version)
            .await,
        400,
        "invalid",
        "Invalid",
    );
    assert_eq!(problem["attributes"], json!(["specversion"]));
    let problem = assert_problem(
        &server.post_raw(&events, "text/csv", b"a,b", &full).await,
        400,
        "invalid",
        "Invalid",
    );
    assert_eq!(problem["attributes"], json!(["datacontenttype"]));
    assert_problem(
        &server
            .post_raw(&events, "application/json", b"{oops", &full)
            .await,
        400,
        "invalid",
        "Invalid",
    );

    assert_eq!(server.state_of("shop", "ce-2").await, before);
}
