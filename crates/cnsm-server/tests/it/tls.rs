//! HTTPS with rustls: a self-signed certificate made in the test (rcgen), requests over TLS,
//! plain HTTP refused on the TLS port, untrusted certificates refused by the client, clear
//! errors for bad files, and a graceful shutdown that ends TLS watch streams.

use std::path::{Path, PathBuf};

use cnsm_server::ServerOptions;
use cnsm_server::client::{Client, ClientError};
use cnsm_server::tls::{TlsError, client_config, server_config};

use crate::support::{TestServer, path};

/// A self-signed certificate for `localhost` and 127.0.0.1: (cert.pem, key.pem) in `dir`.
pub fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("generate a certificate");
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (cert, key)
}

/// A TLS server; its `client` speaks https to 127.0.0.1 and trusts `cert`.
async fn start_tls(cert: &Path, key: &Path) -> (TestServer, Client) {
    let mut server = TestServer::start_with(ServerOptions {
        tls: Some(server_config(cert, key).expect("server config")),
        ..ServerOptions::default()
    })
    .await;
    let plain = server.client.clone();
    let https = server.client.url().replacen("http://", "https://", 1);
    server.client = Client::new(&https)
        .expect("https url")
        .with_tls(client_config(cert).expect("client config"));
    (server, plain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_requests_work_and_plain_http_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path(), "server");
    let (server, plain) = start_tls(&cert, &key).await;

    assert!(server.client.url().starts_with("https://127.0.0.1:"));
    let r = server.get("/health/livez").await;
    assert_eq!(r.status, 200, "{}", r.text());
    server.apply_counter("shop").await;
    let r = server.create_counter("shop", "t-1").await;
    assert_eq!(r.status, 201, "{}", r.text());

    // By name too (the certificate holds both names).
    let port = server
        .client
        .url()
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    let by_name = Client::new(&format!("https://localhost:{port}"))
        .expect("url")
        .with_tls(client_config(&cert).expect("client config"));
    let r = by_name
        .get(&path("shop", "instances/t-1"))
        .await
        .expect("GET");
    assert_eq!(r.status, 200, "{}", r.text());

    // Plain HTTP to the TLS port gets no HTTP answer.
    assert!(plain.get("/health/livez").await.is_err());

    // https without certificates to trust: a clear error, nothing sent.
    let untrusting = Client::new(server.client.url()).expect("url");
    match untrusting.get("/health/livez").await {
        Err(ClientError::Url { reason, .. }) => assert!(reason.contains("--ca-cert"), "{reason}"),
        other => panic!("expected a URL error, got {other:?}"),
    }

    // A client that trusts another certificate refuses the server.
    let (other_cert, _) = self_signed(dir.path(), "other");
    let wrong = Client::new(server.client.url())
        .expect("url")
        .with_tls(client_config(&other_cert).expect("client config"));
    match wrong.get("/health/livez").await {
        Err(ClientError::Connect { reason, .. }) => {
            assert!(reason.contains("TLS handshake failed"), "{reason}")
        }
        other => panic!("expected a handshake failure, got {other:?}"),
    }

    // The server still answers after the failed handshakes.
    assert_eq!(server.get("/health/livez").await.status, 200);
    server.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_ends_tls_watch_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path(), "server");
    let (server, _) = start_tls(&cert, &key).await;
    server.apply_counter("shop").await;
    server.create_counter("shop", "w-1").await;
    let mut stream = match server
        .client
        .stream(&path("shop", "instances/w-1?watch=true"), &[])
        .await
        .expect("connect")
    {
        Ok(stream) => stream,
        Err(response) => panic!("watch refused: {} {}", response.status, response.text()),
    };
    let first = stream.next_event().await.expect("event");
    assert!(first.is_some());
    let stopping = tokio::spawn(server.stop());
    // The stream ends (the server closes it), and serve returns Ok: drained.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        // Until the end of the stream (None) or a broken connection (Err).
        while let Ok(Some(_)) = stream.next_event().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch stream did not end");
    tokio::time::timeout(std::time::Duration::from_secs(30), stopping)
        .await
        .expect("serve returned")
        .expect("serve task")
        .expect("clean stop");
}

#[test]
fn bad_files_give_errors_naming_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path(), "a");
    let (_, other_key) = self_signed(dir.path(), "b");
    let missing = dir.path().join("missing.pem");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").expect("write");

    let message = |e: TlsError| e.to_string();
    let e = message(server_config(&missing, &key).expect_err("missing cert"));
    assert!(
        e.contains("certificate") && e.contains("missing.pem"),
        "{e}"
    );
    let e = message(server_config(&cert, &missing).expect_err("missing key"));
    assert!(e.contains("key") && e.contains("missing.pem"), "{e}");
    let e = message(server_config(&garbage, &key).expect_err("garbage cert"));
    assert!(
        e.contains("garbage.pem") && e.contains("CERTIFICATE"),
        "{e}"
    );
    let e = message(server_config(&cert, &garbage).expect_err("garbage key"));
    assert!(e.contains("key file") && e.contains("garbage.pem"), "{e}");
    // The certificate file given as the key holds no key.
    let e = message(server_config(&cert, &cert).expect_err("cert as key"));
    assert!(e.contains("key file") && e.contains("a-cert.pem"), "{e}");
    let e = message(server_config(&cert, &other_key).expect_err("mismatch"));
    assert!(
        e.contains("does not match") && e.contains("b-key.pem") && e.contains("a-cert.pem"),
        "{e}"
    );
    let e = message(client_config(&garbage).expect_err("garbage CA"));
    assert!(
        e.contains("CA certificate") && e.contains("garbage.pem"),
        "{e}"
    );
    assert!(client_config(&cert).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_and_a_ca_flagged_self_signed_certificate_are_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A private CA and a server certificate it signed: --ca-cert is the CA only.
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    let ca_file = dir.path().join("ca.pem");
    let cert_file = dir.path().join("leaf-cert.pem");
    let key_file = dir.path().join("leaf-key.pem");
    std::fs::write(&ca_file, ca_cert.pem()).expect("write");
    std::fs::write(&cert_file, leaf.pem()).expect("write");
    std::fs::write(&key_file, leaf_key.serialize_pem()).expect("write");
    let mut server = TestServer::start_with(ServerOptions {
        tls: Some(server_config(&cert_file, &key_file).expect("server config")),
        ..ServerOptions::default()
    })
    .await;
    let https = server.client.url().replacen("http://", "https://", 1);
    server.client = Client::new(&https)
        .expect("url")
        .with_tls(client_config(&ca_file).expect("client config"));
    assert_eq!(server.get("/health/livez").await.status, 200);
    server.stop().await.expect("clean stop");

    // A self-signed certificate marked as a CA (what `openssl req -x509` makes) is refused by
    // WebPKI as a server certificate, but trusted when given as --ca-cert: it is pinned.
    let own_key = rcgen::KeyPair::generate().expect("key");
    let mut own_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    own_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let own = own_params.self_signed(&own_key).expect("cert");
    let own_cert = dir.path().join("own-cert.pem");
    let own_key_file = dir.path().join("own-key.pem");
    std::fs::write(&own_cert, own.pem()).expect("write");
    std::fs::write(&own_key_file, own_key.serialize_pem()).expect("write");
    let (server, _) = start_tls(&own_cert, &own_key_file).await;
    assert_eq!(server.get("/health/livez").await.status, 200);
    server.stop().await.expect("clean stop");
}
