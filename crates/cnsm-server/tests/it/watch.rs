//! Watch streams: every transition of one instance exactly once, resumption with
//! `Last-Event-ID`, collection filters, lagging watchers, and shutdown ending the streams.

use std::time::Duration;

use cnsm_server::client::{EventStream, SseEvent};
use serde_json::{Value, json};

use crate::support::{PREFIX, TestServer, path};

async fn next(stream: &mut EventStream) -> SseEvent {
    tokio::time::timeout(Duration::from_secs(20), stream.next_event())
        .await
        .expect("an event within 20 s")
        .expect("stream readable")
        .expect("stream still open")
}

fn data(event: &SseEvent) -> Value {
    serde_json::from_str(&event.data).expect("event data is JSON")
}

async fn open(server: &TestServer, url: &str, headers: &[(&str, &str)]) -> EventStream {
    match server.client.stream(url, headers).await.expect("connect") {
        Ok(stream) => stream,
        Err(response) => panic!("watch refused: {} {}", response.status, response.text()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_every_transition_then_resume() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    server.create_counter("shop", "w-1").await;
    let url = path("shop", "instances/w-1?watch=true");

    let mut stream = open(&server, &url, &[]).await;
    let first = next(&mut stream).await;
    assert_eq!(first.event, "instance");
    assert_eq!(first.id.as_deref(), Some("0"));
    assert_eq!(data(&first)["instance"]["state"], "open");

    // Events sent concurrently with the stream: each version arrives once, in order.
    let sender = {
        let client = server.client.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                let r = client
                    .post_json(
                        &path("shop", "instances/w-1/events"),
                        &json!({"event": "tick"}),
                        &[],
                    )
                    .await
                    .expect("send");
                assert_eq!(r.status, 200, "{}", r.text());
            }
        })
    };
    for version in 1..=20u64 {
        let event = next(&mut stream).await;
        assert_eq!(event.event, "transition");
        assert_eq!(event.id, Some(version.to_string()));
        let body = data(&event);
        assert_eq!(body["record"]["version"], version);
        assert_eq!(body["instance"]["version"], version);
        assert_eq!(body["instance"]["data"]["n"], version);
        assert_eq!(body["hash"].as_str().map(str::len), Some(64));
    }
    sender.await.expect("sender");
    drop(stream);

    // Five more while nobody watches; resuming after version 20 gets exactly those.
    for _ in 0..5 {
        server
            .send("shop", "w-1", &json!({"event": "tick"}), &[])
            .await;
    }
    let mut resumed = open(&server, &url, &[("last-event-id", "20")]).await;
    for version in 21..=25u64 {
        let event = next(&mut resumed).await;
        assert_eq!(event.event, "transition");
        assert_eq!(event.id, Some(version.to_string()));
        assert_eq!(data(&event)["record"]["version"], version);
    }
    // ...and then goes on live, without a duplicate.
    server
        .send("shop", "w-1", &json!({"event": "close"}), &[])
        .await;
    let live = next(&mut resumed).await;
    assert_eq!(live.id.as_deref(), Some("26"));
    assert_eq!(data(&live)["instance"]["status"], "succeeded");

    // ?resourceVersion= works like Last-Event-ID; `instance@version` ids are accepted.
    let mut from_query = open(&server, &format!("{url}&resourceVersion=24"), &[]).await;
    assert_eq!(next(&mut from_query).await.id.as_deref(), Some("25"));
    assert_eq!(next(&mut from_query).await.id.as_deref(), Some("26"));
    let mut from_qualified = open(&server, &url, &[("last-event-id", "shop/w-1@25")]).await;
    assert_eq!(next(&mut from_qualified).await.id.as_deref(), Some("26"));

    // Errors before the stream starts are problems.
    let ahead = server
        .client
        .stream(&url, &[("last-event-id", "99")])
        .await
        .expect("connect");
    assert_eq!(ahead.err().map(|r| r.status), Some(400));
    let bad = server
        .client
        .stream(&url, &[("last-event-id", "x")])
        .await
        .expect("connect");
    assert_eq!(bad.err().map(|r| r.status), Some(400));
    let missing = server
        .client
        .stream(&path("shop", "instances/none?watch=true"), &[])
        .await
        .expect("connect");
    let missing = missing.expect_err("refused");
    assert_eq!(missing.status, 404);
    assert_eq!(
        missing.header("content-type"),
        Some("application/problem+json")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collection_watch_filters() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    server.apply_counter("other").await;
    let mut paid = open(
        &server,
        &path("shop", "instances?watch=true&state=paid"),
        &[],
    )
    .await;
    let mut everything = open(&server, &format!("{PREFIX}/instances?watch=true"), &[]).await;

    server.create_counter("shop", "c-1").await;
    server.create_counter("other", "c-2").await;
    server
        .send("shop", "c-1", &json!({"event": "tick"}), &[])
        .await;
    server
        .send(
            "shop",
            "c-1",
            &json!({"event": "pay", "payload": {"amount": 50}}),
            &[],
        )
        .await;
    server
        .send(
            "other",
            "c-2",
            &json!({"event": "pay", "payload": {"amount": 50}}),
            &[],
        )
        .await;

    let event = next(&mut paid).await;
    assert_eq!(event.event, "transition");
    assert_eq!(event.id.as_deref(), Some("shop/c-1@2"));
    assert_eq!(data(&event)["record"]["to"], "paid");

    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(next(&mut everything).await.id.unwrap_or_default());
        }
        ids
    };
    assert_eq!(
        ids,
        [
            "shop/c-1@0",
            "other/c-2@0",
            "shop/c-1@1",
            "shop/c-1@2",
            "other/c-2@1"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_collection_watcher_is_told_to_resync() {
    const N_EVENTS: usize = 100;
    let server = TestServer::start_with(cnsm_server::ServerOptions {
        watch_buffer_len: 4,
        ..cnsm_server::ServerOptions::default()
    })
    .await;
    server.apply_counter("shop").await;
    server.create_counter("shop", "lag").await;
    let mut slow = open(&server, &path("shop", "instances?watch=true"), &[]).await;
    let mut single = open(&server, &path("shop", "instances/lag?watch=true"), &[]).await;
    assert_eq!(next(&mut single).await.event, "instance");
    // Concurrent events commit in a few large batches: far more than 4 at once.
    let mut senders = Vec::new();
    for _ in 0..N_EVENTS {
        let client = server.client.clone();
        senders.push(tokio::spawn(async move {
            client
                .post_json(
                    &path("shop", "instances/lag/events"),
                    &json!({"event": "tick"}),
                    &[],
                )
                .await
                .map(|r| r.status)
        }));
    }
    for sender in senders {
        assert_eq!(sender.await.expect("task").expect("send"), 200);
    }
    let mut saw_error = false;
    for _ in 0..=N_EVENTS {
        let event = match tokio::time::timeout(Duration::from_secs(20), slow.next_event()).await {
            Ok(Ok(Some(event))) => event,
            _ => break,
        };
        if event.event == "error" {
            assert_eq!(data(&event)["reason"], "lagged");
            saw_error = true;
            break;
        }
    }
    assert!(saw_error, "the lagging watcher was not told to resync");
    let after = tokio::time::timeout(Duration::from_secs(20), slow.next_event())
        .await
        .expect("stream ends");
    assert!(matches!(after, Ok(None)), "{after:?}");

    // A single-instance watcher catches up from the store instead: every version, once.
    for version in 1..=N_EVENTS as u64 {
        let event = next(&mut single).await;
        assert_eq!(event.id, Some(version.to_string()), "{event:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_watch_streams_and_drains() {
    let server = TestServer::start().await;
    server.apply_counter("shop").await;
    server.create_counter("shop", "s-1").await;
    let mut stream = open(&server, &path("shop", "instances/s-1?watch=true"), &[]).await;
    assert_eq!(next(&mut stream).await.event, "instance");
    let runtime = server.runtime.clone();
    tokio::time::timeout(Duration::from_secs(30), server.stop())
        .await
        .expect("serve returns despite an open watch stream")
        .expect("clean stop");
    let end = tokio::time::timeout(Duration::from_secs(10), stream.next_event())
        .await
        .expect("stream ends");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    // The runtime was shut down after the drain.
    assert!(runtime.instance("shop", "s-1").await.is_ok());
    assert!(runtime.pending_timers().await.is_err());
}
