//! `/openapi.json`: the document matches the router, and the statuses it documents are the
//! ones the server produces.

use std::collections::BTreeSet;
use std::sync::Arc;

use cnsm_server::ServerOptions;
use cnsm_server::auth::AuthConfig;
use cnsm_server::client::ClientResponse;
use serde_json::{Value, json};

use crate::support::{COUNTER_YAML, TestServer, path};

const ROOT: &str = "root-admin-token";
const SHOP_READER: &str = "shop-reader-token";

async fn start(options: ServerOptions) -> TestServer {
    let yaml = format!(
        "tokens:
- name: root
  token: {ROOT}
  roles: [{{namespace: \"*\", role: admin}}]
- name: reader
  token: {SHOP_READER}
  roles: [{{namespace: shop, role: reader}}]
"
    );
    let (config, _) = AuthConfig::from_yaml(&yaml).expect("auth file");
    TestServer::start_with(ServerOptions {
        auth: Some(Arc::new(config)),
        ..options
    })
    .await
}

async fn call(
    server: &TestServer,
    token: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> ClientResponse {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    if let Some(bearer) = &bearer {
        all.push(("authorization", bearer.as_str()));
    }
    server
        .client
        .request(method, path, &all, body.to_vec())
        .await
        .expect("request")
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// The statuses the served document gives for an operation.
fn documented(document: &Value, path: &str, method: &str) -> BTreeSet<u16> {
    document["paths"][path][method]["responses"]
        .as_object()
        .unwrap_or_else(|| panic!("{method} {path} is not documented"))
        .keys()
        .map(|k| k.parse().expect("a status"))
        .collect()
}

/// Replaces `{ns}`, `{name}`, `{id}` with values that exist on the test server.
fn concrete(template: &str) -> String {
    template
        .replace("{ns}", "shop")
        .replace("{name}", "counter")
        .replace("{id}", "c-1")
}

async fn prepare(server: &TestServer) {
    let applied = call(
        server,
        Some(ROOT),
        "POST",
        &path("shop", "statemachines"),
        &[("content-type", "application/yaml")],
        COUNTER_YAML.as_bytes(),
    )
    .await;
    assert_eq!(applied.status, 201, "{}", applied.text());
    let created = call(
        server,
        Some(ROOT),
        "POST",
        &path("shop", "instances"),
        &[JSON],
        json!({"id": "c-1", "machine": "counter", "data": {"n": 0}})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_matches_the_router() {
    let server = start(ServerOptions::default()).await;
    prepare(&server).await;
    let served = server.client.get("/openapi.json").await.expect("GET");
    assert_eq!(served.status, 200);
    assert_eq!(served.header("content-type"), Some("application/json"));
    let document: Value = serde_json::from_slice(&served.body).expect("valid JSON");
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    for name in ["Problem", "Instance", "Event", "CloudEvent", "StateMachine"] {
        assert!(
            document["components"]["schemas"][name].is_object(),
            "{name}"
        );
    }
    let events = &document["paths"]["/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/events"]
        ["post"];
    let headers: Vec<&str> = events["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter(|p| p["in"] == "header")
        .filter_map(|p| p["name"].as_str())
        .collect();
    for header in ["If-Match", "Idempotency-Key", "ce-id", "ce-type"] {
        assert!(headers.contains(&header), "{header} in {headers:?}");
    }
    assert!(events["responses"]["200"]["headers"]["ETag"].is_object());
    assert!(events["responses"]["412"]["content"]["application/problem+json"].is_object());

    // Every documented method of every documented path is routed (and answers one of its
    // documented statuses); every other method is 405, so the router has nothing undocumented
    // on these paths.
    let paths = document["paths"].as_object().expect("paths");
    for (template, operations) in paths {
        let target = concrete(template);
        for method in ["get", "post", "delete", "put", "patch"] {
            let response = call(
                &server,
                Some(ROOT),
                &method.to_ascii_uppercase(),
                &target,
                &[JSON],
                b"{}",
            )
            .await;
            if operations.get(method).is_some() {
                let statuses = documented(&document, template, method);
                assert!(
                    statuses.contains(&response.status),
                    "{method} {target}: {} is not documented ({statuses:?}): {}",
                    response.status,
                    response.text()
                );
                assert!(
                    !response.text().contains("no route for"),
                    "{method} {target} is not routed"
                );
                // The answer's media type is one the document lists for that status.
                let media_type = response
                    .header("content-type")
                    .unwrap_or("")
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let content =
                    &operations[method]["responses"][response.status.to_string()]["content"];
                assert!(
                    content.get(&media_type).is_some(),
                    "{method} {target}: {media_type} is not documented for {}",
                    response.status
                );
            } else {
                assert_eq!(
                    response.status, 405,
                    "{method} {target} answers but is not documented"
                );
            }
        }
    }
    // And a path outside the document is not routed.
    let unknown = call(
        &server,
        Some(ROOT),
        "GET",
        &path("shop", "widgets"),
        &[],
        b"",
    )
    .await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_status_of_these_routes_is_produced() {
    let server = start(ServerOptions {
        body_bytes_max: 4096,
        ..ServerOptions::default()
    })
    .await;
    prepare(&server).await;
    // A server that refuses every request for lack of capacity gives the 503s.
    let full = start(ServerOptions {
        requests_in_flight_max: 0,
        ..ServerOptions::default()
    })
    .await;
    let document = server
        .client
        .get("/openapi.json")
        .await
        .expect("GET")
        .json();
    let prefix = "/apis/statemachine.cn/v1alpha1/namespaces/{ns}";

    // GET .../instances/{id}
    let one = path("shop", "instances/c-1");
    let produced: BTreeSet<u16> = [
        call(&server, Some(ROOT), "GET", &one, &[], b"")
            .await
            .status,
        call(
            &server,
            Some(ROOT),
            "GET",
            &path("Bad_NS", "instances/c-1"),
            &[],
            b"",
        )
        .await
        .status,
        call(&server, None, "GET", &one, &[], b"").await.status,
        call(
            &server,
            Some(SHOP_READER),
            "GET",
            &path("other", "instances/c-1"),
            &[],
            b"",
        )
        .await
        .status,
        call(
            &server,
            Some(ROOT),
            "GET",
            &path("shop", "instances/nope"),
            &[],
            b"",
        )
        .await
        .status,
        call(&full, Some(ROOT), "GET", &one, &[], b"").await.status,
    ]
    .into();
    assert_eq!(
        produced,
        documented(&document, &format!("{prefix}/instances/{{id}}"), "get")
    );

    // POST .../instances/{id}/events
    let events = path("shop", "instances/c-1/events");
    let send =
        |token: Option<&'static str>, headers: Vec<(&'static str, &'static str)>, body: Vec<u8>| {
            let server = &server;
            let events = events.clone();
            async move {
                let mut all = vec![JSON];
                all.extend(headers);
                call(server, token, "POST", &events, &all, &body)
                    .await
                    .status
            }
        };
    let tick = json!({"event": "tick"}).to_string().into_bytes();
    let mut produced = BTreeSet::new();
    produced.insert(send(Some(ROOT), vec![("idempotency-key", "k1")], tick.clone()).await);
    produced.insert(send(Some(ROOT), vec![], b"{not json".to_vec()).await);
    produced.insert(send(None, vec![], tick.clone()).await);
    produced.insert(send(Some(SHOP_READER), vec![], tick.clone()).await);
    produced.insert(
        call(
            &server,
            Some(ROOT),
            "POST",
            &path("shop", "instances/nope/events"),
            &[JSON],
            &tick,
        )
        .await
        .status,
    );
    let close = json!({"event": "close"}).to_string().into_bytes();
    produced.insert(send(Some(ROOT), vec![("idempotency-key", "k1")], close).await);
    produced.insert(send(Some(ROOT), vec![("if-match", "\"0\"")], tick.clone()).await);
    produced.insert(send(Some(ROOT), vec![], vec![b' '; 8192]).await);
    produced.insert(
        call(
            &server,
            Some(ROOT),
            "POST",
            &events,
            &[("content-type", "text/csv")],
            b"tick",
        )
        .await
        .status,
    );
    let cheap = json!({"event": "pay", "payload": {"amount": 1}})
        .to_string()
        .into_bytes();
    produced.insert(send(Some(ROOT), vec![], cheap).await);
    produced.insert(
        call(&full, Some(ROOT), "POST", &events, &[JSON], &tick)
            .await
            .status,
    );
    // RaceCondition (also 409) needs concurrent writers; the concurrency tests produce it.
    assert_eq!(
        produced,
        documented(
            &document,
            &format!("{prefix}/instances/{{id}}/events"),
            "post"
        )
    );

    // DELETE .../statemachines/{name}
    let machine = path("shop", "statemachines/counter");
    let mut produced = BTreeSet::new();
    produced.insert(
        call(&server, Some(ROOT), "DELETE", &machine, &[], b"")
            .await
            .status,
    );
    produced.insert(
        call(
            &server,
            Some(ROOT),
            "DELETE",
            &path("Bad_NS", "statemachines/counter"),
            &[],
            b"",
        )
        .await
        .status,
    );
    produced.insert(
        call(&server, None, "DELETE", &machine, &[], b"")
            .await
            .status,
    );
    produced.insert(
        call(&server, Some(SHOP_READER), "DELETE", &machine, &[], b"")
            .await
            .status,
    );
    produced.insert(
        call(
            &server,
            Some(ROOT),
            "DELETE",
            &path("shop", "statemachines/nope"),
            &[],
            b"",
        )
        .await
        .status,
    );
    produced.insert(
        call(&full, Some(ROOT), "DELETE", &machine, &[], b"")
            .await
            .status,
    );
    // Finish the instance, then the machine can go.
    let closed = send(
        Some(ROOT),
        vec![],
        json!({"event": "close"}).to_string().into_bytes(),
    )
    .await;
    assert_eq!(closed, 200);
    produced.insert(
        call(&server, Some(ROOT), "DELETE", &machine, &[], b"")
            .await
            .status,
    );
    assert_eq!(
        produced,
        documented(
            &document,
            &format!("{prefix}/statemachines/{{name}}"),
            "delete"
        )
    );

    // Health: open, and only what is documented.
    let livez = call(&full, None, "GET", "/health/livez", &[], b"").await;
    assert_eq!(
        BTreeSet::from([livez.status]),
        documented(&document, "/health/livez", "get")
    );
}

/// Without --auth-file no operation asks for a token and none documents 401 or 403; with it,
/// every /apis and /debug operation requires the bearer scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_follows_the_auth_configuration() {
    let open = crate::support::TestServer::start().await;
    let served = open.get("/openapi.json").await;
    assert_eq!(served.status, 200);
    let document = served.json();
    assert_eq!(document["security"], serde_json::json!([{}]));
    for (path, operations) in document["paths"].as_object().expect("paths") {
        for (method, operation) in operations.as_object().expect("operations") {
            assert_eq!(
                operation["security"],
                serde_json::json!([{}]),
                "{method} {path}"
            );
            assert!(
                operation["responses"].get("401").is_none(),
                "{method} {path}"
            );
            assert!(
                operation["responses"].get("403").is_none(),
                "{method} {path}"
            );
        }
    }
    let secured = start(ServerOptions::default()).await;
    let document: Value =
        serde_json::from_slice(&secured.client.get("/openapi.json").await.expect("GET").body)
            .expect("json");
    assert_eq!(document["security"], serde_json::json!([{"bearer": []}]));
    let events = &document["paths"]["/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/events"]
        ["post"];
    assert_eq!(events["security"], serde_json::json!([{"bearer": []}]));
    assert!(events["responses"]["401"].is_object());
}
