//! Flag health on `/health/statez` and gate statuses on `/debug/statemachine`, with a stand-in
//! evaluator (the real one lives in `cnsm-flags`, which the server does not depend on).

use std::collections::BTreeMap;
use std::sync::Arc;

use cnsm_core::flags::FlagQuery;
use cnsm_runtime::flags::{FlagEvaluator, FlagFuture};
use cnsm_runtime::{Runtime, RuntimeOptions};
use cnsm_server::ServerOptions;
use cnsm_server::client::Client;
use cnsm_store::embedded::EmbeddedStore;

#[derive(Debug)]
struct Broken;

impl FlagEvaluator for Broken {
    fn evaluate<'a>(&'a self, queries: &'a [FlagQuery]) -> FlagFuture<'a> {
        Box::pin(async move { queries.iter().map(|_| unreachable_decision()).collect() })
    }
    fn provider_error(&self) -> Option<String> {
        Some("the flag file is not valid JSON".into())
    }
    fn provider_name(&self) -> String {
        "stand-in".into()
    }
    fn gate_statuses(&self) -> BTreeMap<String, String> {
        BTreeMap::from([("one-click-checkout".to_owned(), "DEGRADED".to_owned())])
    }
}

fn unreachable_decision() -> cnsm_core::record::FlagDecision {
    cnsm_core::record::FlagDecision {
        key: String::new(),
        variant: None,
        value: serde_json::Value::Null,
        reason: "ERROR".into(),
        error: Some("GENERAL".into()),
        allowed: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statez_shows_the_flag_provider_and_debug_the_gate_statuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("store");
    let runtime = Runtime::open(
        store,
        RuntimeOptions::default().with_flags(Arc::new(Broken)),
    )
    .expect("runtime");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cnsm_server::serve(
        listener,
        runtime,
        ServerOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = Client::new(&format!("http://{address}")).expect("client");

    let statez = client.get("/health/statez").await.expect("GET").json();
    assert_eq!(statez["status"], "ok", "the last good flags keep serving");
    assert_eq!(statez["flags"]["provider"], "stand-in");
    assert_eq!(statez["flags"]["status"], "error");
    assert_eq!(statez["flags"]["error"], "the flag file is not valid JSON");
    let text = client
        .get("/health/statez?format=text")
        .await
        .expect("GET")
        .text();
    assert!(
        text.contains("flags:             stand-in (error: the flag file is not valid JSON)"),
        "{text}"
    );

    let debug = client.get("/debug/statemachine").await.expect("GET").json();
    assert_eq!(debug["flagGates"]["one-click-checkout"], "DEGRADED");
    let text = client
        .get("/debug/statemachine?format=text")
        .await
        .expect("GET")
        .text();
    assert!(text.contains("  one-click-checkout: DEGRADED"), "{text}");

    let _ = stop.send(());
    server.await.expect("serve task").expect("serve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_evaluator_statez_says_null() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(dir.path()).expect("store");
    let runtime = Runtime::open(store, RuntimeOptions::default()).expect("runtime");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cnsm_server::serve(
        listener,
        runtime,
        ServerOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = Client::new(&format!("http://{address}")).expect("client");
    let statez = client.get("/health/statez").await.expect("GET").json();
    assert!(statez["flags"].is_null(), "{statez}");
    let debug = client.get("/debug/statemachine").await.expect("GET").json();
    assert_eq!(debug["flagGates"], serde_json::json!({}));
    let _ = stop.send(());
    server.await.expect("serve task").expect("serve");
}
