//! `--auth-file`: bearer tokens with namespace-scoped roles, over real HTTP.

use std::sync::Arc;

use cnsm_server::ServerOptions;
use cnsm_server::auth::{AuthConfig, digest_hex, token_digest};
use cnsm_server::client::ClientResponse;
use serde_json::{Value, json};

use crate::support::{COUNTER_YAML, PREFIX, TestServer, assert_problem, path};

const SHOP_READER: &str = "shop-reader-token";
const SHOP_WRITER: &str = "shop-writer-token";
const SHOP_ADMIN: &str = "shop-admin-token";
const GLOBAL_READER: &str = "global-reader-token";
const ROOT: &str = "root-admin-token";
const WRONG: &str = "not-a-known-token";

fn auth_yaml() -> String {
    format!(
        "tokens:
- name: shop-reader
  tokenSha256: {}
  roles:
  - {{namespace: shop, role: reader}}
- name: ci-bot
  tokenSha256: {}
  roles:
  - {{namespace: shop, role: writer}}
  - {{namespace: other, role: reader}}
- name: shop-admin
  tokenSha256: {}
  roles:
  - {{namespace: shop, role: admin}}
- name: auditor
  tokenSha256: {}
  roles:
  - {{namespace: \"*\", role: reader}}
- name: root
  token: {ROOT}
  roles:
  - {{namespace: \"*\", role: admin}}
",
        digest_hex(&token_digest(SHOP_READER)),
        digest_hex(&token_digest(SHOP_WRITER)),
        digest_hex(&token_digest(SHOP_ADMIN)),
        digest_hex(&token_digest(GLOBAL_READER)),
    )
}

async fn start() -> TestServer {
    let (config, warnings) = AuthConfig::from_yaml(&auth_yaml()).expect("auth file");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(!warnings[0].contains(ROOT));
    TestServer::start_with(ServerOptions {
        auth: Some(Arc::new(config)),
        ..ServerOptions::default()
    })
    .await
}

async fn call(
    server: &TestServer,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> ClientResponse {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", content_type)];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    server
        .client
        .request(method, path, &headers, body.to_vec())
        .await
        .expect("request")
}

async fn get(server: &TestServer, token: Option<&str>, path: &str) -> ClientResponse {
    call(server, token, "GET", path, "application/json", b"").await
}

async fn post(
    server: &TestServer,
    token: Option<&str>,
    path: &str,
    body: &Value,
) -> ClientResponse {
    call(
        server,
        token,
        "POST",
        path,
        "application/json",
        body.to_string().as_bytes(),
    )
    .await
}

async fn apply(server: &TestServer, token: Option<&str>, ns: &str) -> ClientResponse {
    call(
        server,
        token,
        "POST",
        &path(ns, "statemachines"),
        "application/yaml",
        COUNTER_YAML.as_bytes(),
    )
    .await
}

#[track_caller]
fn assert_unauthorized(response: &ClientResponse) {
    assert_problem(response, 401, "unauthorized", "Unauthorized");
    assert_eq!(response.header("www-authenticate"), Some("Bearer"));
    for token in [
        SHOP_READER,
        SHOP_WRITER,
        SHOP_ADMIN,
        GLOBAL_READER,
        ROOT,
        WRONG,
    ] {
        assert!(!response.text().contains(token), "{}", response.text());
    }
}

#[track_caller]
fn assert_forbidden(response: &ClientResponse) -> Value {
    let body = assert_problem(response, 403, "forbidden", "Forbidden");
    for token in [SHOP_READER, SHOP_WRITER, SHOP_ADMIN, GLOBAL_READER, ROOT] {
        assert!(!response.text().contains(token), "{}", response.text());
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_unknown_tokens_get_401_and_health_stays_open() {
    let server = start().await;
    let instances = path("shop", "instances");
    assert_unauthorized(&get(&server, None, &instances).await);
    assert_unauthorized(&get(&server, Some(WRONG), &instances).await);
    assert_unauthorized(&apply(&server, None, "shop").await);
    // Not a bearer scheme, an empty token, and an unknown route all need a token first.
    let basic = server
        .client
        .request(
            "GET",
            &instances,
            &[("authorization", "Basic c2hvcA==")],
            Vec::new(),
        )
        .await
        .expect("request");
    assert_unauthorized(&basic);
    assert_unauthorized(&get(&server, Some(""), &instances).await);
    assert_unauthorized(&get(&server, None, &format!("{PREFIX}/nothing-here")).await);
    assert_unauthorized(&get(&server, None, "/debug/statemachine").await);
    let unknown_route = get(
        &server,
        Some(SHOP_READER),
        &format!("{PREFIX}/nothing-here"),
    )
    .await;
    assert_problem(&unknown_route, 404, "not-found", "NotFound");

    for open in [
        "/health/livez",
        "/health/readyz",
        "/health/statez",
        "/openapi.json",
    ] {
        assert_eq!(get(&server, None, open).await.status, 200, "{open}");
    }
    // Nothing was stored by the refused apply.
    assert_eq!(
        get(&server, Some(ROOT), &path("shop", "statemachines"))
            .await
            .json()["items"],
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_scoped_to_namespaces() {
    let server = start().await;
    // Admin of shop applies; a writer and a reader may not.
    assert_forbidden(&apply(&server, Some(SHOP_READER), "shop").await);
    let refused = assert_forbidden(&apply(&server, Some(SHOP_WRITER), "shop").await);
    assert_eq!(refused["requiredRole"], "admin");
    assert_eq!(refused["namespace"], "shop");
    assert_eq!(apply(&server, Some(SHOP_ADMIN), "shop").await.status, 201);
    // ... but not in another namespace.
    assert_forbidden(&apply(&server, Some(SHOP_ADMIN), "other").await);
    assert_eq!(apply(&server, Some(ROOT), "other").await.status, 201);

    // The writer creates and sends; the reader may only read.
    let instances = path("shop", "instances");
    let create = json!({"id": "c-1", "machine": "counter", "data": {"n": 0}});
    assert_forbidden(&post(&server, Some(SHOP_READER), &instances, &create).await);
    let created = post(&server, Some(SHOP_WRITER), &instances, &create).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let events = path("shop", "instances/c-1/events");
    let tick = json!({"event": "tick", "actor": "mallory"});
    let before = server.state_of("shop", "c-1").await;
    assert_forbidden(&post(&server, Some(SHOP_READER), &events, &tick).await);
    assert_forbidden(&post(&server, Some(GLOBAL_READER), &events, &tick).await);
    assert_eq!(
        server.state_of("shop", "c-1").await,
        before,
        "nothing changed"
    );
    let sent = post(&server, Some(SHOP_WRITER), &events, &tick).await;
    assert_eq!(sent.status, 200, "{}", sent.text());

    // Reads: the namespace's reader, a "*" reader; not a reader of another namespace.
    let one = path("shop", "instances/c-1");
    assert_eq!(get(&server, Some(SHOP_READER), &one).await.status, 200);
    assert_eq!(get(&server, Some(GLOBAL_READER), &one).await.status, 200);
    assert_eq!(
        get(&server, Some(SHOP_WRITER), &path("other", "instances"))
            .await
            .status,
        200
    );
    assert_forbidden(&get(&server, Some(SHOP_READER), &path("other", "instances")).await);
    assert_forbidden(
        &get(
            &server,
            Some(SHOP_READER),
            &path("other", "statemachines/counter"),
        )
        .await,
    );

    // Cross-namespace lists need a grant on "*"; diagnostics need admin on "*".
    let all = format!("{PREFIX}/instances");
    assert_forbidden(&get(&server, Some(SHOP_ADMIN), &all).await);
    assert_eq!(get(&server, Some(GLOBAL_READER), &all).await.status, 200);
    assert_forbidden(&get(&server, Some(GLOBAL_READER), "/debug/statemachine").await);
    assert_forbidden(&get(&server, Some(SHOP_ADMIN), "/debug/statemachine").await);
    assert_eq!(
        get(&server, Some(ROOT), "/debug/statemachine").await.status,
        200
    );

    // Delete: admin only.
    let machine = path("other", "statemachines/counter");
    assert_forbidden(&call(&server, Some(SHOP_WRITER), "DELETE", &machine, "", b"").await);
    let deleted = call(&server, Some(ROOT), "DELETE", &machine, "", b"").await;
    assert_eq!(deleted.status, 200, "{}", deleted.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actor_is_the_token_name() {
    let server = start().await;
    assert_eq!(apply(&server, Some(SHOP_ADMIN), "shop").await.status, 201);
    let created = post(
        &server,
        Some(SHOP_WRITER),
        &path("shop", "instances"),
        &json!({"id": "c-1", "machine": "counter", "data": {"n": 0}, "actor": "mallory"}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text());
    let events = path("shop", "instances/c-1/events");
    let plain = post(
        &server,
        Some(SHOP_WRITER),
        &events,
        &json!({"event": "tick", "actor": "mallory"}),
    )
    .await;
    assert_eq!(plain.status, 200, "{}", plain.text());
    let cloudevent = json!({
        "specversion": "1.0", "id": "e-1", "source": "test", "type": "tick", "data": {}
    });
    let structured = call(
        &server,
        Some(SHOP_ADMIN),
        "POST",
        &events,
        "application/cloudevents+json",
        cloudevent.to_string().as_bytes(),
    )
    .await;
    assert_eq!(structured.status, 200, "{}", structured.text());
    let history = get(
        &server,
        Some(SHOP_READER),
        &path("shop", "instances/c-1/history"),
    )
    .await;
    let actors: Vec<Value> = history.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["record"]["actor"].clone())
        .collect();
    assert_eq!(
        actors,
        vec![json!("ci-bot"), json!("ci-bot"), json!("shop-admin")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_need_a_reader() {
    let server = start().await;
    assert_eq!(apply(&server, Some(SHOP_ADMIN), "shop").await.status, 201);
    let created = post(
        &server,
        Some(SHOP_WRITER),
        &path("shop", "instances"),
        &json!({"id": "w-1", "machine": "counter", "data": {"n": 0}}),
    )
    .await;
    assert_eq!(created.status, 201);
    let one = path("shop", "instances/w-1?watch=true");
    let collection = path("shop", "instances?watch=true");
    for target in [&one, &collection] {
        let refused = server.client.stream(target, &[]).await.expect("stream");
        assert_unauthorized(&refused.expect_err("needs a token"));
        let other = server
            .client
            .stream(target, &[("authorization", "Bearer shop-admin-token")])
            .await
            .expect("stream");
        assert!(other.is_ok(), "the shop admin may watch");
    }
    let outsider = server
        .client
        .stream(
            &path("other", "instances?watch=true"),
            &[("authorization", "Bearer shop-admin-token")],
        )
        .await
        .expect("stream");
    assert_forbidden(&outsider.expect_err("another namespace"));

    let reader = server.client.clone().with_bearer_token(SHOP_READER);
    let mut stream = reader
        .stream(&one, &[])
        .await
        .expect("stream")
        .expect("a reader may watch");
    let first = stream.next_event().await.expect("event").expect("open");
    assert_eq!(first.event, "instance");
    let sent = post(
        &server,
        Some(SHOP_WRITER),
        &path("shop", "instances/w-1/events"),
        &json!({"event": "tick"}),
    )
    .await;
    assert_eq!(sent.status, 200);
    let next = stream
        .next_event()
        .await
        .expect("event")
        .expect("transition");
    assert_eq!(next.event, "transition");
    let data: Value = serde_json::from_str(&next.data).expect("json");
    assert_eq!(data["record"]["actor"], "ci-bot");
}
