//! `GET`/`POST .../namespaces/{ns}/snapshot`: payload export and verified, all-or-nothing
//! import over real HTTP.

use serde_json::json;

use crate::support::{TestServer, assert_problem, path};

#[tokio::test]
async fn export_then_import_into_another_server() {
    let a = TestServer::start().await;
    a.apply_counter("shop").await;
    a.create_counter("shop", "c-1").await;
    a.create_counter("shop", "c-2").await;
    let r = a.send("shop", "c-1", &json!({"event": "tick"}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let r = a.get(&path("shop", "snapshot")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/cbor"));
    let payload = r.body.clone();
    let summary = cnsm_snapshot::verify_payload(&payload).unwrap();
    assert_eq!((summary.n_instances, summary.n_records), (2, 3));
    let one = a.get(&path("shop", "snapshot?instance=c-2")).await;
    assert_eq!(
        cnsm_snapshot::verify_payload(&one.body)
            .unwrap()
            .n_instances,
        1
    );
    assert_problem(
        &a.get(&path("shop", "snapshot?instance=nope")).await,
        404,
        "not-found",
        "NotFound",
    );
    assert_problem(
        &a.get(&path("shop", "snapshot?instance=c-1&labelSelector=a=b"))
            .await,
        400,
        "invalid",
        "Invalid",
    );

    let b = TestServer::start().await;
    let import = |ns: &'static str, query: &'static str, body: Vec<u8>, media: &'static str| {
        let b = &b;
        async move {
            b.post_raw(&path(ns, &format!("snapshot{query}")), media, &body, &[])
                .await
        }
    };
    assert_problem(
        &import("shop", "", payload.clone(), "text/plain").await,
        415,
        "unsupported-media-type",
        "Invalid",
    );
    let mut tampered = payload.clone();
    let at = tampered.len() - 40;
    tampered[at] ^= 0x01;
    assert_problem(
        &import("shop", "", tampered, "application/cbor").await,
        400,
        "invalid",
        "Invalid",
    );
    assert_problem(
        &import("other", "", payload.clone(), "application/cbor").await,
        400,
        "invalid",
        "Invalid",
    );
    assert!(
        b.runtime.instance("shop", "c-1").await.is_err(),
        "nothing imported"
    );

    let r = import("shop", "", payload.clone(), "application/cbor").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["nInstances"], 2);
    assert_eq!(r.json()["nRecords"], 3);
    let c1 = b.runtime.instance("shop", "c-1").await.unwrap();
    assert_eq!(c1.version, 1);
    let r = b.send("shop", "c-1", &json!({"event": "tick"}), &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());

    assert_problem(
        &import("shop", "", payload.clone(), "application/cbor").await,
        409,
        "conflict",
        "Conflict",
    );
    assert_eq!(b.runtime.instance("shop", "c-1").await.unwrap().version, 2);
    let r = import("shop", "?replace=true", payload, "application/cbor").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["nReplaced"], 2);
    assert_eq!(b.runtime.instance("shop", "c-1").await.unwrap().version, 1);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Export and import are for admins of the namespace: a writer gets 403, no token 401.
#[tokio::test]
async fn snapshot_routes_are_admin_only() {
    use std::sync::Arc;

    use cnsm_server::ServerOptions;
    use cnsm_server::auth::AuthConfig;

    let yaml = "tokens:
- name: writer
  token: shop-writer-token
  roles:
  - {namespace: shop, role: writer}
- name: admin
  token: shop-admin-token
  roles:
  - {namespace: shop, role: admin}
";
    let (config, _warnings) = AuthConfig::from_yaml(yaml).expect("auth file");
    let server = TestServer::start_with(ServerOptions {
        auth: Some(Arc::new(config)),
        ..ServerOptions::default()
    })
    .await;
    let call = |token: Option<&'static str>, method: &'static str, body: Vec<u8>| {
        let server = &server;
        async move {
            let bearer = token.map(|t| format!("Bearer {t}"));
            let mut headers = vec![("content-type", "application/cbor")];
            if let Some(bearer) = &bearer {
                headers.push(("authorization", bearer.as_str()));
            }
            server
                .client
                .request(method, &path("shop", "snapshot"), &headers, body)
                .await
                .expect("request")
        }
    };
    let empty = cnsm_snapshot::empty_payload(1);
    assert_eq!(call(None, "GET", Vec::new()).await.status, 401);
    assert_eq!(
        call(Some("shop-writer-token"), "GET", Vec::new())
            .await
            .status,
        403
    );
    assert_eq!(
        call(Some("shop-writer-token"), "POST", empty.clone())
            .await
            .status,
        403
    );
    let r = call(Some("shop-admin-token"), "GET", Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(Some("shop-admin-token"), "POST", empty).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["nInstances"], 0);
    server.stop().await.unwrap();
}
