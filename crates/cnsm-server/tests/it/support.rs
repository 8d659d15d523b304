//! A server on a temporary store, a client for it, and helpers shared by the tests.

use std::sync::Arc;

use cnsm_runtime::{Runtime, RuntimeOptions};
use cnsm_server::client::{Client, ClientResponse};
use cnsm_server::{ServeError, ServerOptions};
use cnsm_store::Store;
use cnsm_store::embedded::EmbeddedStore;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A machine with a self-loop (`tick`, adds 1 to `data.n`), a guarded event (`pay`, needs
/// `amount >= 10`) and a final state.
pub const COUNTER_YAML: &str = r#"apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata:
  name: counter
spec:
  initialState: open
  states:
  - name: open
    type: task
    timeoutSeconds: 86400
    onEvent:
    - event: tick
      target: open
      assign:
        n: "data.n + 1"
    - event: pay
      target: paid
      guard: "event.amount >= 10"
    - event: close
      target: closed
  - name: paid
    type: task
    timeoutSeconds: 86400
    onEvent:
    - event: close
      target: closed
  - name: closed
    type: final
"#;

pub const PREFIX: &str = "/apis/statemachine.cn/v1alpha1";

/// `PREFIX/namespaces/{ns}/{rest}`.
pub fn path(ns: &str, rest: &str) -> String {
    format!("{PREFIX}/namespaces/{ns}/{rest}")
}

/// A running server on a temporary store.
pub struct TestServer {
    pub client: Client,
    pub runtime: Runtime,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(ServerOptions::default()).await
    }

    pub async fn start_with(options: ServerOptions) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(dir.path()).expect("store"));
        let runtime =
            Runtime::open_shared(Arc::clone(&store), RuntimeOptions::default()).expect("runtime");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(cnsm_server::serve(
            listener,
            runtime.clone(),
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        TestServer {
            client: Client::new(&format!("http://{address}")).expect("client"),
            runtime,
            stop: Some(stop),
            handle: Some(handle),
            _dir: dir,
        }
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.handle.take() {
            Some(handle) => handle.await.expect("serve task"),
            None => Ok(()),
        }
    }

    pub async fn get(&self, path: &str) -> ClientResponse {
        self.client.get(path).await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> ClientResponse {
        self.client
            .post_json(path, body, headers)
            .await
            .expect("POST")
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) -> ClientResponse {
        let mut all = vec![("content-type", content_type)];
        all.extend_from_slice(headers);
        self.client
            .request("POST", path, &all, body.to_vec())
            .await
            .expect("POST")
    }

    pub async fn delete(&self, path: &str) -> ClientResponse {
        self.client
            .request("DELETE", path, &[], Vec::new())
            .await
            .expect("DELETE")
    }

    /// Applies the counter machine in `ns`.
    pub async fn apply_counter(&self, ns: &str) {
        let r = self
            .post_raw(
                &path(ns, "statemachines"),
                "application/yaml",
                COUNTER_YAML.as_bytes(),
                &[],
            )
            .await;
        assert!(r.status == 201 || r.status == 200, "{}", r.text());
    }

    /// Creates a counter instance `id` in `ns` with `n = 0`.
    pub async fn create_counter(&self, ns: &str, id: &str) -> ClientResponse {
        let r = self
            .post(
                &path(ns, "instances"),
                &json!({"id": id, "machine": "counter", "data": {"n": 0}}),
                &[],
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        r
    }

    /// Sends a plain event.
    pub async fn send(
        &self,
        ns: &str,
        id: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> ClientResponse {
        self.post(&path(ns, &format!("instances/{id}/events")), body, headers)
            .await
    }

    /// The instance and its whole history, to check that a rejected request changed nothing.
    pub async fn state_of(&self, ns: &str, id: &str) -> Value {
        let instance = self.runtime.instance(ns, id).await.ok();
        let history = self
            .runtime
            .history(ns, id, 0, 10_000)
            .await
            .map(|h| h.iter().map(|e| e.hash.to_hex()).collect::<Vec<_>>())
            .ok();
        json!({
            "instance": instance.map(|i| serde_json::to_value(i).expect("json")),
            "history": history,
        })
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Asserts a problem+json answer: status, `type` slug, `errorType`, and the required members.
#[track_caller]
pub fn assert_problem(
    response: &ClientResponse,
    status: u16,
    slug: &str,
    error_type: &str,
) -> Value {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/problem+json"),
        "{}",
        response.text()
    );
    let body = response.json();
    assert_eq!(
        body["type"],
        format!("https://statemachine.cn/problems/{slug}"),
        "{body}"
    );
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["errorType"], error_type, "{body}");
    for member in ["title", "detail", "instance"] {
        assert!(
            body[member].as_str().is_some_and(|s| !s.is_empty()),
            "{member} missing: {body}"
        );
    }
    body
}
