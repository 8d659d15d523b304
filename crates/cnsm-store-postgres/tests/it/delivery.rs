//! Push delivery with two nodes over one PostgreSQL schema: each node runs a runtime and a
//! deliverer with the HTTP transport, and a notify target posts to a receiver on loopback. One
//! node holds the target's lease; every transition committed on either node is delivered at
//! least once, signed, in order per instance; when the holder stops as a crash would (its lease
//! not given back), the other node takes the target over once the lease expired and delivers
//! the rest, commits made meanwhile included; a redrive asked on either node is delivered by the
//! holder.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use cnsm_runtime::delivery::{self, Deliverer, DeliveryOptions, RedriveRequest};
use cnsm_runtime::{CreateInstance, EventRequest, Runtime};
use cnsm_server::delivery_transport::HttpTransport;
use cnsm_store::{DeadLetter, Store};

const TARGET: &str = "default/orders/worker";
const SECRET: &[u8] = b"s-worker";
const LEASE_MS: u64 = 1_500;

/// (event id, instance, version, signature verified) of every accepted request, in arrival order.
type Seen = Arc<Mutex<Vec<(String, String, u64, bool)>>>;

async fn receive(State(seen): State<Seen>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let signature = headers
        .get(delivery::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    seen.lock().unwrap().push((
        event["id"].as_str().unwrap_or("").to_owned(),
        event["subject"].as_str().unwrap_or("").to_owned(),
        event["data"]["record"]["version"]
            .as_u64()
            .unwrap_or(u64::MAX),
        signature == delivery::sign(SECRET, &body),
    ));
    StatusCode::NO_CONTENT
}

fn machine(url: &str) -> String {
    format!(
        r#"apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {{name: orders}}
spec:
  initialState: open
  notify:
  - {{name: worker, url: '{url}', secretEnv: WORKER}}
  states:
  - name: open
    type: task
    timeoutSeconds: 86400
    onEvent:
    - {{event: tick, target: open}}
    - {{event: close, target: closed}}
  - {{name: closed, type: final}}
"#
    )
}

fn start_deliverer(runtime: &Runtime, node: &str) -> Deliverer {
    let mut options = DeliveryOptions::new(Arc::new(HttpTransport::new()));
    options.node_id = node.to_owned();
    options.poll_ms = 100;
    options.lease_ms = LEASE_MS;
    options.cursor_flush_ms = 50;
    options.settle_ms = 200;
    options.secrets = Arc::new(|name| (name == "WORKER").then(|| SECRET.to_vec()));
    Deliverer::start(runtime, options).expect("the deliverer starts")
}

/// Sends `n` ticks to each instance, alternating between the nodes (instance i from node i % 2
/// first); returns nothing, every send must commit.
async fn tick(runtimes: &[Runtime], ids: &[String], n: usize) {
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let runtimes = runtimes.to_vec();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..n {
                let runtime = &runtimes[(i + k) % runtimes.len()];
                let send = runtime.send("default", &id, EventRequest::new("tick"));
                tokio::time::timeout(Duration::from_secs(30), send)
                    .await
                    .expect("an answer in 30 s")
                    .expect("the tick commits");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Every committed record's CloudEvent id, and the last commit position.
fn committed(store: &dyn Store) -> (BTreeSet<String>, u64) {
    let mut ids = BTreeSet::new();
    let mut after = 0;
    loop {
        let page = store.records_after(after, 0).unwrap();
        let Some(last) = page.last() else {
            return (ids, after);
        };
        after = last.0;
        for (_, sealed) in &page {
            ids.insert(delivery::event_id(&sealed.open().unwrap(), &sealed.hash));
        }
    }
}

async fn eventually(seconds: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn held(runtime: &Runtime) -> bool {
    runtime
        .delivery_status()
        .unwrap_or_default()
        .iter()
        .any(|t| t.target == TARGET && t.held)
}

/// Every request signed; per instance, no version accepted before every earlier one was.
fn check_order(seen: &Seen) {
    let seen = seen.lock().unwrap();
    let mut firsts: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut once = BTreeSet::new();
    for (id, instance, version, signed) in seen.iter() {
        assert!(signed, "{id}: the signature does not verify");
        if once.insert(id) {
            firsts.entry(instance).or_default().push(*version);
        }
    }
    for (instance, versions) in firsts {
        let expected: Vec<u64> = (0..versions.len() as u64).collect();
        assert_eq!(versions, expected, "order of {instance}");
    }
}

#[test]
fn two_nodes_deliver_every_transition_and_take_over_after_the_lease() {
    let Some(nodes) = crate::nodes(2, false) else {
        return;
    };
    let io = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    io.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = format!("http://{}/hook", listener.local_addr().unwrap());
        let seen: Seen = Arc::default();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(Arc::clone(&seen));
        tokio::spawn(async move { axum::serve(listener, app).await });

        let runtimes = &nodes.runtimes;
        runtimes[0].apply_yaml(&machine(&hook), None).await.unwrap();
        let deliverers = [
            start_deliverer(&runtimes[0], "node-0"),
            start_deliverer(&runtimes[1], "node-1"),
        ];
        let ids: Vec<String> = (0..4).map(|i| format!("o-{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            runtimes[i % 2]
                .create_instance(CreateInstance::new("default", "orders").id(id))
                .await
                .unwrap();
        }
        tick(runtimes, &ids, 5).await;
        let store = Arc::clone(runtimes[0].store());
        let (before, _) = committed(store.as_ref());
        assert_eq!(before.len(), 4 * 6);
        let accepted = |seen: &Seen| -> BTreeSet<String> {
            seen.lock().unwrap().iter().map(|s| s.0.clone()).collect()
        };
        eventually(20, "every transition of both nodes", || {
            accepted(&seen).is_superset(&before)
        })
        .await;
        // One node holds the target.
        let holder = match (held(&runtimes[0]), held(&runtimes[1])) {
            (true, false) => 0,
            (false, true) => 1,
            other => panic!("one holder expected, got {other:?}"),
        };
        let other = 1 - holder;

        // The holder stops as a crash would; the other takes over once its lease expired.
        deliverers[holder].abandon();
        let lease_until_ms = store
            .delivery_cursors()
            .unwrap()
            .into_iter()
            .find(|(t, _)| t == TARGET)
            .map(|(_, c)| {
                assert_eq!(c.lease_node, format!("node-{holder}"));
                c.lease_until_ms
            })
            .unwrap();
        let stopped = Instant::now();
        tick(runtimes, &ids, 2).await;
        for (i, id) in ids.iter().enumerate() {
            runtimes[i % 2]
                .send("default", id, EventRequest::new("close"))
                .await
                .unwrap();
        }
        let (all, end) = committed(store.as_ref());
        assert_eq!(all.len(), 4 * 9);
        eventually(20, "the other node to take over", || held(&runtimes[other])).await;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(
            now_ms >= lease_until_ms,
            "taken over before the lease expired ({now_ms} < {lease_until_ms})"
        );
        eventually(20, "every transition after the takeover", || {
            accepted(&seen).is_superset(&all)
        })
        .await;
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "the takeover took {:?}",
            stopped.elapsed()
        );
        check_order(&seen);
        assert_eq!(
            accepted(&seen),
            all,
            "nothing but committed transitions was delivered"
        );
        eventually(10, "the new holder's cursor at the end of the log", || {
            store.delivery_cursors().unwrap().iter().any(|(t, c)| {
                t == TARGET && c.lease_node == format!("node-{other}") && c.position >= end
            })
        })
        .await;
        // A redrive asked on the node that no longer delivers: the holder reads the mark on
        // its next poll, sends the record again with its CloudEvent id, and the letter goes.
        let (position, sealed) = store.records_after(0, 1).unwrap().remove(0);
        let record = sealed.open().unwrap();
        let id = delivery::event_id(&record, &sealed.hash);
        store
            .put_dead_letter(&DeadLetter {
                target: TARGET.into(),
                position,
                namespace: record.namespace.to_string(),
                instance: record.instance.to_string(),
                version: record.version,
                event_id: id.clone(),
                attempts: 12,
                last_error: "HTTP 503".into(),
                failed_ms: 0,
                redrive: None,
            })
            .unwrap();
        let sent = |seen: &Seen| seen.lock().unwrap().iter().filter(|s| s.0 == id).count();
        let n_sent = sent(&seen);
        let report = runtimes[holder]
            .redrive_dead_letters(&RedriveRequest {
                target: TARGET.into(),
                position: Some(position),
                actor: "oncall".into(),
            })
            .unwrap();
        assert_eq!(report.marked, 1);
        eventually(
            10,
            "the redriven letter to be delivered and removed",
            || sent(&seen) > n_sent && store.dead_letters(None, None, 0).unwrap().is_empty(),
        )
        .await;
        deliverers[other].stop();
    });
}
