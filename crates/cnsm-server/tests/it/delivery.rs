//! Push delivery end to end: a runtime on an embedded store, the deliverer with the HTTP
//! transport, and receivers on loopback (axum) that fail, hang, are down for a while, refuse,
//! or verify signatures. Every committed record must arrive at least once, signed, in order per
//! instance, with a stable CloudEvent id; a restart redelivers from the cursor.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use cnsm_runtime::delivery::{self, Deliverer, DeliveryOptions, SecretSource};
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeOptions};
use cnsm_server::delivery_transport::HttpTransport;
use cnsm_store::Store;
use cnsm_store::embedded::EmbeddedStore;
use serde_json::Value;

/// What a receiver does with the attempts of one event id (`attempt` counts from 1).
#[derive(Clone, Copy)]
enum Behaviour {
    Accept,
    /// 503 for the first N attempts of each id.
    FailFirst(u32),
    /// The first attempt of each id never answers.
    HangFirst,
    /// Accepts, slowly.
    Slow(u64),
    /// 404 for instance `o-1`, 503 for instance `o-2`, accepts the rest.
    RefuseSome,
}

/// One request a receiver got.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    instance: String,
    version: u64,
    attempt: u32,
    signature_ok: bool,
    body: Vec<u8>,
    accepted: bool,
}

#[derive(Clone)]
struct Receiver {
    secret: Vec<u8>,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn receive(State(rx): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let attempt: u32 = text(delivery::ATTEMPT_HEADER).parse().unwrap_or(0);
    let signature_ok = text(delivery::SIGNATURE_HEADER) == recompute(&rx.secret, &body)
        && text("content-type") == delivery::CONTENT_TYPE;
    let instance = event["subject"].as_str().unwrap_or("").to_owned();
    let version = event["data"]["record"]["version"]
        .as_u64()
        .unwrap_or(u64::MAX);
    // (status, how long before answering); the request is recorded on arrival.
    let (status, delay_ms) = match rx.behaviour {
        Behaviour::Accept => (StatusCode::OK, 0),
        Behaviour::FailFirst(n) if attempt <= n => (StatusCode::SERVICE_UNAVAILABLE, 0),
        Behaviour::FailFirst(_) => (StatusCode::NO_CONTENT, 0),
        Behaviour::HangFirst if attempt == 1 => (StatusCode::GATEWAY_TIMEOUT, 3_600_000),
        Behaviour::HangFirst => (StatusCode::OK, 0),
        Behaviour::Slow(ms) => (StatusCode::OK, ms),
        Behaviour::RefuseSome if instance == "o-1" => (StatusCode::NOT_FOUND, 0),
        Behaviour::RefuseSome if instance == "o-2" => (StatusCode::SERVICE_UNAVAILABLE, 0),
        Behaviour::RefuseSome => (StatusCode::OK, 0),
    };
    rx.seen.lock().unwrap().push(Seen {
        id: event["id"].as_str().unwrap_or("").to_owned(),
        instance,
        version,
        attempt,
        signature_ok,
        body: body.to_vec(),
        accepted: status.is_success(),
    });
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    status
}

/// The receiver's own HMAC-SHA256 of the body, as a receiver would verify it (RFC 2104 over
/// SHA-256, written out here so the test does not trust the sender's code).
fn recompute(secret: &[u8], body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut key = [0u8; 64];
    if secret.len() > 64 {
        key[..32].copy_from_slice(&Sha256::digest(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let pad = |byte: u8| key.iter().map(|k| k ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(body)
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    let hex: String = outer.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Serves `receiver` on `listener` until the test ends.
fn serve(listener: tokio::net::TcpListener, receiver: Receiver) {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(receiver);
    tokio::spawn(async move { axum::serve(listener, app).await });
}

async fn receiver_on_loopback(secret: &str, behaviour: Behaviour) -> (Receiver, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let receiver = Receiver {
        secret: secret.as_bytes().to_vec(),
        behaviour,
        seen: Arc::new(Mutex::new(Vec::new())),
    };
    serve(listener, receiver.clone());
    (receiver, url)
}

/// An accepting receiver that is down: its loopback port was taken and let go, so connections
/// are refused until the test serves the receiver there. Returns it, the address and its URL.
fn receiver_down(secret: &str) -> (Receiver, std::net::SocketAddr, String) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap();
    drop(closed);
    let receiver = Receiver {
        secret: secret.as_bytes().to_vec(),
        behaviour: Behaviour::Accept,
        seen: Arc::new(Mutex::new(Vec::new())),
    };
    (receiver, address, format!("http://{address}/hook"))
}

fn secrets(pairs: &[(&str, &str)]) -> SecretSource {
    let map: HashMap<String, Vec<u8>> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
    Arc::new(move |name| map.get(name).cloned())
}

fn options(secrets: SecretSource) -> DeliveryOptions {
    let mut options = DeliveryOptions::new(Arc::new(HttpTransport::new()));
    options.poll_ms = 100;
    options.cursor_flush_ms = 50;
    options.secrets = secrets;
    options
}

/// A counter machine with the given `notify` entries (YAML flow mappings).
fn machine(targets: &[String]) -> String {
    let notify: String = targets.iter().map(|t| format!("  - {t}\n")).collect();
    format!(
        r#"apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata:
  name: orders
spec:
  initialState: open
  notify:
{notify}  states:
  - name: open
    type: task
    timeoutSeconds: 86400
    onEvent:
    - event: tick
      target: open
    - event: close
      target: closed
  - name: closed
    type: final
"#
    )
}

/// Creates `n` instances `o-0..` and sends each `ticks` ticks and a close, instances in
/// parallel; returns every committed (instance, version) with its record hash.
async fn drive(runtime: &Runtime, n: usize, ticks: usize) -> BTreeMap<(String, u64), String> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let runtime = runtime.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("o-{i}");
            runtime
                .create_instance(CreateInstance::new("default", "orders").id(&id))
                .await
                .unwrap();
            for _ in 0..ticks {
                runtime
                    .send("default", &id, EventRequest::new("tick"))
                    .await
                    .unwrap();
            }
            runtime
                .send("default", &id, EventRequest::new("close"))
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    committed(runtime).await
}

async fn committed(runtime: &Runtime) -> BTreeMap<(String, u64), String> {
    let mut all = BTreeMap::new();
    for page in runtime.store().records_after(0, 0).unwrap() {
        let record = page.1.open().unwrap();
        all.insert(
            (record.instance.to_string(), record.version),
            delivery::event_id(&record, &page.1.hash),
        );
    }
    all
}

/// Waits until `done` holds, up to `seconds`.
async fn eventually(seconds: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids a receiver accepted.
fn accepted_ids(receiver: &Receiver) -> std::collections::BTreeSet<String> {
    receiver
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.accepted)
        .map(|s| s.id.clone())
        .collect()
}

/// Every attempt of an id carried the same bytes with consecutive attempt numbers; the signature
/// verified on each; per instance, versions were accepted in order, each once.
fn check_contract(receiver: &Receiver, name: &str) {
    let seen = receiver.seen.lock().unwrap();
    let mut by_id: BTreeMap<&str, Vec<&Seen>> = BTreeMap::new();
    for s in seen.iter() {
        assert!(s.signature_ok, "{name}: a bad signature on {}", s.id);
        by_id.entry(&s.id).or_default().push(s);
    }
    for (id, attempts) in &by_id {
        // Consecutive attempt numbers ending at the accepted one (attempts made while the
        // receiver was down never reached it).
        let mut numbers: Vec<u32> = attempts.iter().map(|s| s.attempt).collect();
        numbers.sort_unstable();
        let first = numbers[0].max(1);
        let expected: Vec<u32> = (first..first + numbers.len() as u32).collect();
        assert_eq!(numbers, expected, "{name}: attempts of {id}");
        assert!(
            attempts.iter().all(|s| s.body == attempts[0].body),
            "{name}: {id} changed between attempts"
        );
        assert!(
            attempts.iter().filter(|s| s.accepted).count() <= 1,
            "{name}: {id} accepted twice in one run"
        );
    }
    let mut accepted: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.accepted) {
        accepted.entry(&s.instance).or_default().push(s.version);
    }
    for (instance, versions) in accepted {
        let expected: Vec<u64> = (0..versions.len() as u64).collect();
        assert_eq!(versions, expected, "{name}: order of {instance}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_survive_failing_hanging_and_down_receivers() {
    let (flaky, flaky_url) = receiver_on_loopback("s-flaky", Behaviour::FailFirst(2)).await;
    let (hangs, hangs_url) = receiver_on_loopback("s-hangs", Behaviour::HangFirst).await;
    // A port with nothing on it: connections are refused until the receiver opens it.
    let (down, down_address, down_url) = receiver_down("s-down");
    let yaml = machine(&[
        format!("{{name: flaky, url: '{flaky_url}', secretEnv: FLAKY}}"),
        format!("{{name: hangs, url: '{hangs_url}', secretEnv: HANGS, timeoutSeconds: 1}}"),
        format!("{{name: down, url: '{down_url}', secretEnv: DOWN}}"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let runtime = Runtime::open_shared(store, RuntimeOptions::default()).unwrap();
    runtime.apply_yaml(&yaml, None).await.unwrap();
    let deliverer = Deliverer::start(
        &runtime,
        options(secrets(&[
            ("FLAKY", "s-flaky"),
            ("HANGS", "s-hangs"),
            ("DOWN", "s-down"),
        ])),
    )
    .unwrap();
    let all = drive(&runtime, 6, 4).await;
    assert_eq!(all.len(), 6 * 6);
    let ids: std::collections::BTreeSet<String> = all.values().cloned().collect();
    // The down receiver comes up after a while.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(accepted_ids(&down).is_empty());
    let status = runtime.delivery_status().unwrap();
    let down_status = status
        .iter()
        .find(|t| t.target == "default/orders/down")
        .unwrap();
    assert!(
        down_status.failed_attempts > 0 && down_status.pending > 0,
        "{down_status:?}"
    );
    assert!(down_status.last_error.is_some());
    serve(
        tokio::net::TcpListener::bind(down_address).await.unwrap(),
        down.clone(),
    );
    for (receiver, name) in [(&flaky, "flaky"), (&hangs, "hangs"), (&down, "down")] {
        eventually(60, name, || accepted_ids(receiver) == ids).await;
        check_contract(receiver, name);
    }
    // The flaky receiver saw exactly three attempts of every id.
    assert_eq!(flaky.seen.lock().unwrap().len(), 3 * ids.len());
    eventually(10, "the cursors to reach the end of the log", || {
        let status = runtime.delivery_status().unwrap();
        status.len() == 3
            && status
                .iter()
                .all(|t| t.held && t.pending == 0 && t.lag == 0 && t.dead_letters == 0)
    })
    .await;
    deliverer.stop();
    let cursors = runtime.store().delivery_cursors().unwrap();
    let end = runtime
        .store()
        .records_after(0, 0)
        .unwrap()
        .last()
        .unwrap()
        .0;
    assert_eq!(cursors.len(), 3);
    assert!(
        cursors.iter().all(|(_, c)| c.position == end),
        "{cursors:?}"
    );
    runtime.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_redelivers_from_the_cursor_without_skipping() {
    let (slow, url) = receiver_on_loopback("s", Behaviour::Slow(40)).await;
    let yaml = machine(&[format!("{{name: slow, url: '{url}', secretEnv: S}}")]);
    let dir = tempfile::tempdir().unwrap();
    let open = || -> Runtime {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        Runtime::open_shared(store, RuntimeOptions::default()).unwrap()
    };
    let runtime = open();
    runtime.apply_yaml(&yaml, None).await.unwrap();
    let mut first_options = options(secrets(&[("S", "s")]));
    first_options.in_flight_max = 2;
    let deliverer = Deliverer::start(&runtime, first_options).unwrap();
    let all = drive(&runtime, 8, 3).await;
    eventually(30, "a few deliveries", || accepted_ids(&slow).len() >= 6).await;
    deliverer.stop();
    runtime.shutdown();
    let before = accepted_ids(&slow);
    assert!(
        before.len() < all.len(),
        "the test needs a stop mid-delivery"
    );
    drop(runtime);

    let runtime = open();
    let cursor = runtime.store().delivery_cursors().unwrap()[0].1.position;
    let after_cursor: Vec<String> = runtime
        .store()
        .records_after(cursor, 0)
        .unwrap()
        .iter()
        .map(|(_, sealed)| delivery::event_id(&sealed.open().unwrap(), &sealed.hash))
        .collect();
    assert!(!after_cursor.is_empty());
    let n_before = slow.seen.lock().unwrap().len();
    let deliverer = Deliverer::start(&runtime, options(secrets(&[("S", "s")]))).unwrap();
    let ids: std::collections::BTreeSet<String> = all.values().cloned().collect();
    eventually(60, "every record after the restart", || {
        let seen = slow.seen.lock().unwrap();
        let again: std::collections::BTreeSet<&str> = seen[n_before..]
            .iter()
            .filter(|s| s.accepted)
            .map(|s| s.id.as_str())
            .collect();
        after_cursor.iter().all(|id| again.contains(id.as_str()))
    })
    .await;
    // Nothing was skipped: the union of both runs is every committed record.
    assert_eq!(accepted_ids(&slow), ids);
    // Everything the first run did not finish is after the cursor.
    for id in ids.difference(&before) {
        assert!(
            after_cursor.contains(id),
            "{id} was below the cursor but never delivered"
        );
    }
    deliverer.stop();
    runtime.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_exhausted_attempts_become_dead_letters_and_the_instance_moves_on() {
    let (receiver, url) = receiver_on_loopback("s", Behaviour::RefuseSome).await;
    let yaml = machine(&[format!(
        "{{name: picky, url: '{url}', secretEnv: S, maxAttempts: 2, events: [tick, close]}}"
    )]);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let runtime = Runtime::open_shared(store, RuntimeOptions::default()).unwrap();
    runtime.apply_yaml(&yaml, None).await.unwrap();
    let deliverer = Deliverer::start(&runtime, options(secrets(&[("S", "s")]))).unwrap();
    drive(&runtime, 3, 1).await;
    // Two matching records (tick, close) per instance; genesis records are filtered out.
    eventually(30, "two dead letters for o-1 and o-2 each", || {
        runtime.store().dead_letters(None, None, 0).unwrap().len() == 4
    })
    .await;
    let letters = runtime
        .store()
        .dead_letters(Some("default/orders/picky"), None, 0)
        .unwrap();
    let summary: Vec<(String, u64, u32)> = letters
        .iter()
        .map(|d| (d.instance.clone(), d.version, d.attempts))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // 404: refused at once; 503: given up after maxAttempts.
    assert_eq!(
        summary,
        [
            ("o-1".to_owned(), 1, 1),
            ("o-1".to_owned(), 2, 1),
            ("o-2".to_owned(), 1, 2),
            ("o-2".to_owned(), 2, 2),
        ]
    );
    assert!(letters[0].last_error.contains("404") || letters[0].last_error.contains("503"));
    let o0: Vec<u64> = receiver
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.instance == "o-0" && s.accepted)
        .map(|s| s.version)
        .collect();
    assert_eq!(o0, [1, 2]);
    eventually(10, "the status to count them", || {
        runtime.delivery_status().unwrap()[0].dead_letters == 4
    })
    .await;
    deliverer.stop();
    runtime.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_degrades_the_target_and_deliveries_wait() {
    let (receiver, url) = receiver_on_loopback("late", Behaviour::Accept).await;
    let yaml = machine(&[format!("{{name: w, url: '{url}', secretEnv: LATE}}")]);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
    let runtime = Runtime::open_shared(store, RuntimeOptions::default()).unwrap();
    runtime.apply_yaml(&yaml, None).await.unwrap();
    let secret: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
    let source = Arc::clone(&secret);
    let deliverer = Deliverer::start(
        &runtime,
        options(Arc::new(move |_: &str| source.lock().unwrap().clone())),
    )
    .unwrap();
    let all = drive(&runtime, 2, 1).await;
    eventually(10, "the degraded status", || {
        runtime.delivery_status().unwrap().first().is_some_and(|t| {
            t.degraded.as_deref().is_some_and(|d| d.contains("LATE")) && t.pending == all.len()
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        receiver.seen.lock().unwrap().is_empty(),
        "nothing goes out unsigned"
    );
    *secret.lock().unwrap() = Some(b"late".to_vec());
    eventually(30, "every record once the secret is there", || {
        accepted_ids(&receiver).len() == all.len()
    })
    .await;
    check_contract(&receiver, "late");
    assert!(runtime.delivery_status().unwrap()[0].degraded.is_none());
    deliverer.stop();
    runtime.shutdown();
}

#[test]
fn cloud_events_are_structured_and_signed_over_the_body() {
    let event = r#"{"a":1}"#;
    assert_eq!(
        delivery::sign(b"key", event.as_bytes()),
        recompute(b"key", event.as_bytes())
    );
    let long_key = vec![7u8; 100];
    assert_eq!(delivery::sign(&long_key, b"x"), recompute(&long_key, b"x"));
}

/// A receiver that is down: every record becomes a dead letter. A redrive while it is still down
/// fails again (the letter stays, unmarked, with its new error). Once it is up, a redrive of
/// every letter, marked while no deliverer runs and across a reopen of the store (durable),
/// delivers each record once more with the CloudEvent id of the first attempts, signed, in
/// order per instance, and empties the dead-letter list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redriven_dead_letters_are_delivered_once_the_receiver_is_up() {
    use cnsm_runtime::delivery::RedriveRequest;
    let (receiver, address, url) = receiver_down("s-back");
    let yaml = machine(&[format!(
        "{{name: back, url: '{url}', secretEnv: BACK, maxAttempts: 2}}"
    )]);
    let target = "default/orders/back";
    let dir = tempfile::tempdir().unwrap();
    let open = || -> Runtime {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        Runtime::open_shared(store, RuntimeOptions::default()).unwrap()
    };
    let runtime = open();
    runtime.apply_yaml(&yaml, None).await.unwrap();
    let deliverer = Deliverer::start(&runtime, options(secrets(&[("BACK", "s-back")]))).unwrap();
    let all = drive(&runtime, 3, 2).await;
    assert_eq!(all.len(), 3 * 4);
    let dead = |runtime: &Runtime| runtime.store().dead_letters(Some(target), None, 0).unwrap();
    eventually(30, "every record to be a dead letter", || {
        dead(&runtime).len() == all.len()
    })
    .await;
    let letters = dead(&runtime);
    let letter_ids: std::collections::BTreeSet<String> =
        letters.iter().map(|d| d.event_id.clone()).collect();
    let ids: std::collections::BTreeSet<String> = all.values().cloned().collect();
    assert_eq!(letter_ids, ids, "a dead letter keeps the CloudEvent id");
    assert!(
        letters
            .iter()
            .all(|d| d.attempts == 2 && d.redrive.is_none())
    );

    // Still down: a redrive of one letter fails again and the letter stays, unmarked.
    let first = letters[0].clone();
    let report = runtime
        .redrive_dead_letters(&RedriveRequest {
            target: target.into(),
            position: Some(first.position),
            actor: "alice".into(),
        })
        .unwrap();
    assert_eq!(report.marked, 1);
    eventually(30, "the redrive to fail again", || {
        let now = dead(&runtime);
        now.len() == all.len()
            && now
                .iter()
                .find(|d| d.position == first.position)
                .is_some_and(|d| d.redrive.is_none() && d.failed_ms > first.failed_ms)
    })
    .await;
    // Refused requests change nothing.
    for (request, error_type) in [
        (
            RedriveRequest {
                target: target.into(),
                position: Some(first.position + 1_000_000),
                actor: "alice".into(),
            },
            "NotFound",
        ),
        (
            RedriveRequest {
                target: "default/orders/nobody".into(),
                position: None,
                actor: "alice".into(),
            },
            "NotFound",
        ),
        (
            RedriveRequest {
                target: "default/orders".into(),
                position: None,
                actor: "alice".into(),
            },
            "Invalid",
        ),
    ] {
        let error = runtime.redrive_dead_letters(&request).unwrap_err();
        assert_eq!(error.error_type(), error_type, "{request:?}: {error}");
    }
    assert!(dead(&runtime).iter().all(|d| d.redrive.is_none()));
    deliverer.stop();
    runtime.shutdown();
    drop(runtime);

    // The receiver comes up; the redrive is marked while no deliverer runs, and survives a
    // reopen of the store.
    serve(
        tokio::net::TcpListener::bind(address).await.unwrap(),
        receiver.clone(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(receiver.seen.lock().unwrap().is_empty());
    let runtime = open();
    let report = runtime
        .redrive_dead_letters(&RedriveRequest {
            target: target.into(),
            position: None,
            actor: "bob".into(),
        })
        .unwrap();
    assert_eq!(report.marked, all.len() as u64);
    runtime.shutdown();
    drop(runtime);
    let runtime = open();
    let marked = dead(&runtime);
    assert!(
        marked
            .iter()
            .all(|d| d.redrive.as_ref().is_some_and(|r| r.actor == "bob")),
        "{marked:?}"
    );
    let deliverer = Deliverer::start(&runtime, options(secrets(&[("BACK", "s-back")]))).unwrap();
    eventually(30, "every dead letter to be delivered", || {
        accepted_ids(&receiver) == ids && dead(&runtime).is_empty()
    })
    .await;
    check_contract(&receiver, "redriven");
    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), ids.len(), "each record was sent once more");
    eventually(10, "the status to count the redrive", || {
        runtime.delivery_status().unwrap().first().is_some_and(|t| {
            t.redriven == ids.len() as u64 && t.redriving == 0 && t.dead_letters == 0
        })
    })
    .await;
    deliverer.stop();
    runtime.shutdown();
}

/// `GET /apis/.../deliveries` pages the dead letters (every cursor on each page);
/// `POST /apis/.../deliveries/redrive` marks one letter or all of a target's, and refuses a bad
/// request with a problem, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deliveries_routes_list_pages_and_mark_redrives() {
    use crate::support::{PREFIX, TestServer, assert_problem};
    use cnsm_store::DeadLetter;
    use serde_json::json;
    let server = TestServer::start().await;
    let store = server.runtime.store();
    let letter = |target: &str, position: u64| DeadLetter {
        target: target.to_owned(),
        position,
        namespace: "default".into(),
        instance: format!("o-{position}"),
        version: 1,
        event_id: format!("default/o-{position}/1/00"),
        attempts: 2,
        last_error: "connection refused".into(),
        failed_ms: 1_000,
        redrive: None,
    };
    let (hook, other) = ("default/counter/hook", "default/counter/other");
    for position in [3, 5, 8, 13, 21] {
        store.put_dead_letter(&letter(hook, position)).unwrap();
    }
    for position in [4, 9] {
        store.put_dead_letter(&letter(other, position)).unwrap();
    }
    store.claim_delivery(hook, "node-a", 1_000, 5_000).unwrap();
    let list = format!("{PREFIX}/deliveries");
    // Pages of two, in (target, position) order, the cursor on every page.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = format!("{list}?limit=2");
        if let Some(t) = &token {
            path.push_str(&format!("&continue={t}"));
        }
        let page = server.get(&path).await;
        assert_eq!(page.status, 200, "{}", page.text());
        let body = page.json();
        assert_eq!(body["cursors"][0]["target"], hook, "{body}");
        assert_eq!(body["cursors"][0]["leaseNode"], "node-a", "{body}");
        for d in body["deadLetters"].as_array().unwrap() {
            seen.push((
                d["target"].as_str().unwrap().to_owned(),
                d["position"].as_u64().unwrap(),
            ));
        }
        match body["metadata"]["continue"].as_str() {
            Some(next) => token = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<(String, u64)> = [3, 5, 8, 13, 21]
        .map(|p| (hook.to_owned(), p))
        .into_iter()
        .chain([4, 9].map(|p| (other.to_owned(), p)))
        .collect();
    assert_eq!(seen, expected);
    let only = server.get(&format!("{list}?target={other}")).await.json();
    assert_eq!(only["deadLetters"].as_array().unwrap().len(), 2, "{only}");
    assert!(only["cursors"].as_array().unwrap().is_empty(), "{only}");
    assert_problem(
        &server.get(&format!("{list}?continue=zz")).await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &server.get(&format!("{list}?limit=many")).await,
        400,
        "invalid",
        "Invalid",
    );

    // Refused requests change nothing.
    let redrive = format!("{PREFIX}/deliveries/redrive");
    for (body, status, slug, error_type) in [
        (json!({"target": hook}), 400, "invalid", "Invalid"),
        (
            json!({"target": hook, "position": 3, "all": true}),
            400,
            "invalid",
            "Invalid",
        ),
        (
            json!({"target": hook, "position": 4}),
            404,
            "not-found",
            "NotFound",
        ),
        (
            json!({"target": "default/counter/none", "all": true}),
            404,
            "not-found",
            "NotFound",
        ),
        (
            json!({"target": "default/counter", "all": true}),
            400,
            "invalid",
            "Invalid",
        ),
        (
            json!({"target": hook, "all": true, "color": "red"}),
            400,
            "invalid",
            "Invalid",
        ),
    ] {
        let response = server.post(&redrive, &body, &[]).await;
        assert_problem(&response, status, slug, error_type);
    }
    assert_problem(
        &server
            .post_raw(&redrive, "application/xml", b"<x/>", &[])
            .await,
        415,
        "unsupported-media-type",
        "Invalid",
    );
    assert!(
        store
            .dead_letters(None, None, 0)
            .unwrap()
            .iter()
            .all(|d| d.redrive.is_none())
    );

    let one = server
        .post(
            &redrive,
            &json!({"target": hook, "position": 8, "actor": "carol"}),
            &[],
        )
        .await;
    assert_eq!(one.status, 200, "{}", one.text());
    assert_eq!(
        one.json(),
        json!({"target": hook, "position": 8, "marked": 1})
    );
    let listed = server.get(&format!("{list}?target={hook}")).await.json();
    let marks: Vec<Value> = listed["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["redrive"]["actor"].clone())
        .collect();
    assert_eq!(
        marks,
        [
            Value::Null,
            Value::Null,
            json!("carol"),
            Value::Null,
            Value::Null
        ]
    );
    let all = server
        .post(&redrive, &json!({"target": hook, "all": true}), &[])
        .await;
    assert_eq!(all.json(), json!({"target": hook, "marked": 5}));
    let marked = store.redrive_requests(hook, None, 0).unwrap();
    assert_eq!(marked.len(), 5);
    assert!(
        marked
            .iter()
            .all(|d| d.redrive.as_ref().is_some_and(|r| r.actor == "anonymous"))
    );
    assert!(store.redrive_requests(other, None, 0).unwrap().is_empty());
    server.stop().await.unwrap();
}
