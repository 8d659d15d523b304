//! `cnsmctl serve` as a real child process: client mode (`--server`), watch (`-w`), the
//! loopback default, and what survives SIGTERM (a clean drain, exit 0) and SIGKILL.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cnsm_server::client::Client;
use cnsm_store::Store;
use cnsm_store::embedded::EmbeddedStore;
use serde_json::json;

use super::{Cli, output_of};

/// A machine with a self-loop (`tick`) and a final state (`close`).
const COUNTER_YAML: &str = "apiVersion: statemachine.cn/v1alpha1
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
    - event: close
      target: closed
  - name: closed
    type: final
";

const PREFIX: &str = "/apis/statemachine.cn/v1alpha1/namespaces";

/// A `cnsmctl serve --listen 127.0.0.1:0` child on `data_dir`.
pub struct ServerChild {
    child: Child,
    pub url: String,
    _stdout: BufReader<ChildStdout>,
}

impl ServerChild {
    pub fn start(data_dir: &Path) -> ServerChild {
        ServerChild::start_with(data_dir, &["--listen", "127.0.0.1:0"])
    }

    /// `cnsmctl serve` with `serve_args` (which must make it listen on port 0).
    pub fn start_with(data_dir: &Path, serve_args: &[&str]) -> ServerChild {
        let data_dir = data_dir.to_str().expect("a UTF-8 data directory");
        ServerChild::spawn(&["--data-dir", data_dir], serve_args, &[], Stdio::piped())
    }

    /// `cnsmctl GLOBAL_ARGS serve SERVE_ARGS` (which must make it listen on port 0), with the
    /// `CNSM_*`/`OTEL_*` settings of the test's own environment removed and `env` set; its
    /// stderr goes to `stderr` (piped: read by [`ServerChild::wait`]; a chatty child that is
    /// never waited for wants `Stdio::null()`). Returns once it printed its address.
    pub fn spawn(
        global_args: &[&str],
        serve_args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
    ) -> ServerChild {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cnsmctl"));
        command
            .args(global_args)
            .arg("serve")
            .args(serve_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for name in [
            "CNSM_SERVER",
            "CNSM_LISTEN",
            "CNSM_AUTH_FILE",
            "CNSM_DATA_DIR",
            "CNSM_TLS_CERT",
            "CNSM_TLS_KEY",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SDK_DISABLED",
        ] {
            command.env_remove(name);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn cnsmctl serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the address line");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        ServerChild {
            child,
            url,
            _stdout: stdout,
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL cnsmctl serve");
        let _ = self.child.wait();
    }

    /// Sends a signal with `kill(1)` (no extra crate for one syscall).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (at most 60 s) for the process to exit; returns its status and stderr.
    pub fn wait(&mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return (status, stderr);
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within 60 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Applies the counter machine and creates `n` instances in namespace `load`.
async fn prepare(client: &Client, n_instances: usize) {
    let r = client
        .request(
            "POST",
            &format!("{PREFIX}/load/statemachines"),
            &[("content-type", "application/yaml")],
            COUNTER_YAML.as_bytes().to_vec(),
        )
        .await
        .expect("apply");
    assert_eq!(r.status, 201, "{}", r.text());
    for i in 0..n_instances {
        let r = client
            .post_json(
                &format!("{PREFIX}/load/instances"),
                &json!({"id": format!("i-{i}"), "machine": "counter"}),
                &[],
            )
            .await
            .expect("create");
        assert_eq!(r.status, 201, "{}", r.text());
    }
}

/// Sends `tick`s to every instance from one task per instance until the server stops
/// answering; returns the highest acknowledged version of each instance.
async fn load_until_stopped(
    client: &Client,
    n_instances: usize,
    stop_after: Duration,
    stop: impl FnOnce(),
) -> BTreeMap<String, u64> {
    let mut tasks = Vec::new();
    for i in 0..n_instances {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("i-{i}");
            let mut acknowledged = 0u64;
            // Bounded: at most 10 000 events per instance, or until the server goes away.
            for _ in 0..10_000 {
                let sent = client
                    .post_json(
                        &format!("{PREFIX}/load/instances/{id}/events"),
                        &json!({"event": "tick"}),
                        &[],
                    )
                    .await;
                match sent {
                    Ok(r) if r.status == 200 => {
                        let version = r.json()["record"]["version"].as_u64().expect("version");
                        assert!(version > acknowledged, "versions go up");
                        acknowledged = version;
                    }
                    // 503 while draining, or a refused connection: the server is stopping.
                    Ok(r) if r.status == 503 => break,
                    Ok(r) => panic!("unexpected answer {}: {}", r.status, r.text()),
                    Err(_) => break,
                }
            }
            (id, acknowledged)
        }));
    }
    tokio::time::sleep(stop_after).await;
    // Requests in flight at the signal are answered or refused, never half-done; every task
    // keeps sending until the server refuses.
    stop();
    let mut out = BTreeMap::new();
    for task in tasks {
        let (id, acknowledged) = task.await.expect("load task");
        out.insert(id, acknowledged);
    }
    out
}

/// Every acknowledged version is in the store, and the store verifies.
fn assert_durable(data_dir: &Path, acknowledged: &BTreeMap<String, u64>) {
    let store = EmbeddedStore::open(data_dir).expect("reopen the store");
    for (id, &version) in acknowledged {
        let stored = store
            .instance("load", id)
            .expect("read")
            .unwrap_or_else(|| panic!("{id} missing"));
        assert!(
            stored.instance.version >= version,
            "{id}: acknowledged version {version}, stored {}",
            stored.instance.version
        );
        let history = store.history("load", id, 0, 100_000).expect("history");
        assert_eq!(history.len() as u64, stored.instance.version + 1, "{id}");
    }
    let report = store.verify().expect("verify");
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn sigterm_drains_and_exits_0_with_every_acknowledged_event_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerChild::start(dir.path());
    let client = Client::new(&server.url).expect("client");
    let runtime = tokio_runtime();
    runtime.block_on(prepare(&client, 16));
    let acknowledged = runtime.block_on(load_until_stopped(
        &client,
        16,
        Duration::from_millis(500),
        || server.signal("TERM"),
    ));
    let (status, stderr) = server.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("every acknowledged event is durable"),
        "{stderr}"
    );
    assert!(
        acknowledged.values().sum::<u64>() > 0,
        "no event was acknowledged before the signal"
    );
    assert_durable(dir.path(), &acknowledged);
}

#[test]
fn sigkill_keeps_every_acknowledged_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerChild::start(dir.path());
    let client = Client::new(&server.url).expect("client");
    let runtime = tokio_runtime();
    runtime.block_on(prepare(&client, 16));
    let acknowledged = runtime.block_on(load_until_stopped(
        &client,
        16,
        Duration::from_millis(500),
        || server.signal("KILL"),
    ));
    let (status, _) = server.wait();
    assert!(!status.success(), "SIGKILL must not look like a clean exit");
    assert!(acknowledged.values().sum::<u64>() > 0);
    assert_durable(dir.path(), &acknowledged);

    // A restarted server serves them.
    let mut restarted = ServerChild::start(dir.path());
    let client = Client::new(&restarted.url).expect("client");
    runtime.block_on(async {
        for (id, &version) in &acknowledged {
            let r = client
                .get(&format!("{PREFIX}/load/instances/{id}"))
                .await
                .expect("get");
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(r.json()["version"].as_u64().expect("version") >= version);
        }
    });
    restarted.signal("TERM");
    assert_eq!(restarted.wait().0.code(), Some(0));
}

#[test]
fn serve_is_loopback_only_without_insecure() {
    let cli = Cli::new();
    let refused = cli.run(&["serve", "--listen", "0.0.0.0:0"]);
    refused.code(1);
    let line = refused.error_line();
    assert!(
        line.starts_with("error: Invalid: refusing to listen on 0.0.0.0:0"),
        "{line}"
    );
    assert!(line.contains("--auth-file"), "{line}");
    assert!(line.contains("--insecure"), "{line}");
    assert!(!cli.data_dir().exists(), "nothing was created");
    let with_server = cli.run(&["--server", "http://127.0.0.1:1", "serve"]);
    with_server.code(1).stderr_has("does not take --server");
}

#[test]
fn client_mode_errors_keep_their_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerChild::start(dir.path());
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    let file = cli.dir.path().join("counter.yaml");
    std::fs::write(&file, COUNTER_YAML).expect("write");
    let file = file.to_string_lossy().into_owned();
    cli.run(&["-n", "x", "apply", "-f", &file]).ok();
    cli.run(&["-n", "x", "create", "instance", "counter", "--id", "c-1"])
        .ok()
        .stdout_has("instance/c-1 created (state open, version 0)");

    let not_found = cli.run(&["-n", "x", "get", "instance", "nope"]);
    assert_eq!(
        not_found.code(3).error_line(),
        "error: NotFound: instance x/nope not found"
    );
    let rejected = cli.run(&["-n", "x", "send", "c-1", "fly"]);
    assert!(
        rejected
            .code(4)
            .error_line()
            .starts_with("error: TransitionFailure: no transition for event 'fly' in state 'open'"),
        "{rejected:#?}"
    );
    let stale = cli.run(&["-n", "x", "send", "c-1", "tick", "--expected-version", "7"]);
    assert_eq!(
        stale.code(4).error_line(),
        "error: StaleState: expected version 7, but the instance is at version 0"
    );
    let exists = cli.run(&["-n", "x", "create", "instance", "counter", "--id", "c-1"]);
    assert!(
        exists.code(4).error_line().starts_with("error: Conflict: "),
        "{exists:#?}"
    );
    cli.run(&["-n", "x", "delete", "machine", "counter"])
        .code(4)
        .stderr_has("1 active instance(s) (c-1)");
    cli.run(&["store", "verify"])
        .code(1)
        .stderr_has("does not work with --server");
    cli.run(&["-n", "x", "get", "machine", "counter", "--revision", "3"])
        .code(3)
        .stderr_has("statemachine x/counter revision 3 not found");
    cli.run(&["-n", "Bad_Namespace", "get", "instances"])
        .code(1)
        .stderr_has("error: Invalid: namespace 'Bad_Namespace'");

    // No server there: unavailable (exit 5); a malformed URL: invalid input (exit 1).
    let mut unreachable = Cli::new();
    unreachable.server = Some("http://127.0.0.1:1".into());
    unreachable
        .run(&["get", "instances"])
        .code(5)
        .stderr_has("error: Unavailable: cannot reach the server at http://127.0.0.1:1");
    unreachable.server = Some("ftp://x".into());
    unreachable
        .run(&["get", "instances"])
        .code(1)
        .stderr_has("--server");
}

#[test]
fn get_instances_watch_prints_one_line_per_transition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerChild::start(dir.path());
    let mut cli = Cli::new();
    cli.run(&["get", "instances", "-w"])
        .code(1)
        .stderr_has("watching (-w) needs a server");
    cli.server = Some(server.url.clone());
    let file = cli.dir.path().join("counter.yaml");
    std::fs::write(&file, COUNTER_YAML).expect("write");
    cli.run(&["-n", "w", "apply", "-f", &file.to_string_lossy()])
        .ok();
    cli.run(&["-n", "w", "create", "instance", "counter", "--id", "w-1"])
        .ok();

    let mut watcher = cli
        .command(&["-n", "w", "get", "instances", "-w"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the watcher");
    let stdout = watcher.stdout.take().expect("stdout");
    let (lines_sender, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_sender.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = || {
        lines
            .recv_timeout(Duration::from_secs(30))
            .expect("a line from the watcher within 30 s")
    };
    // The listing comes after the stream is open, so nothing sent from now on is missed.
    assert!(next_line().starts_with("ID "), "the table header first");
    assert!(next_line().starts_with("w-1 "), "then the instance");
    cli.run(&["-n", "w", "send", "w-1", "tick"]).ok();
    cli.run(&["-n", "w", "create", "instance", "counter", "--id", "w-2"])
        .ok();
    cli.run(&["-n", "w", "send", "w-1", "close"]).ok();
    assert_eq!(
        next_line(),
        "instance/w-1: open -> open (version 1) on tick"
    );
    assert_eq!(next_line(), "instance/w-2 created (state open, version 0)");
    assert_eq!(
        next_line(),
        "instance/w-1: open -> closed (version 2) on close [succeeded]"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}

/// Writes an auth file with a plaintext admin token and a hashed writer and reader.
fn write_auth_file(dir: &Path) -> std::path::PathBuf {
    use cnsm_server::auth::{digest_hex, token_digest};
    let file = dir.join("tokens.yaml");
    let text = format!(
        "tokens:
- name: ops
  token: ops-admin-token
  roles:
  - {{namespace: \"*\", role: admin}}
- name: ci-bot
  tokenSha256: {}
  roles:
  - {{namespace: shop, role: writer}}
- name: viewer
  tokenSha256: {}
  roles:
  - {{namespace: shop, role: reader}}
",
        digest_hex(&token_digest("ci-bot-token")),
        digest_hex(&token_digest("viewer-token")),
    );
    std::fs::write(&file, text).expect("write the auth file");
    file
}

#[test]
fn serve_with_an_auth_file_takes_tokens_from_flag_or_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth_file = write_auth_file(dir.path());
    let auth_file = auth_file.to_string_lossy();
    // With tokens, a non-loopback address is allowed.
    let mut server = ServerChild::start_with(
        &dir.path().join("data"),
        &["--listen", "0.0.0.0:0", "--auth-file", &auth_file],
    );
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    let file = cli.dir.path().join("counter.yaml");
    std::fs::write(&file, COUNTER_YAML).expect("write");
    let file = file.to_string_lossy();

    let anonymous = cli.run(&["-n", "shop", "get", "instances"]);
    anonymous.code(1);
    assert!(
        anonymous.error_line().starts_with("error: Unauthorized: "),
        "{anonymous:?}"
    );
    let wrong = cli.run(&[
        "--token",
        "nope-nope-nope",
        "-n",
        "shop",
        "get",
        "instances",
    ]);
    wrong.code(1);
    assert!(!wrong.stderr.contains("nope-nope-nope"), "{wrong:?}");

    let writer_apply = cli.run(&[
        "--token",
        "ci-bot-token",
        "-n",
        "shop",
        "apply",
        "-f",
        &file,
    ]);
    writer_apply.code(1);
    assert!(
        writer_apply.error_line().starts_with("error: Forbidden: "),
        "{writer_apply:?}"
    );
    cli.run(&[
        "--token",
        "ops-admin-token",
        "-n",
        "shop",
        "apply",
        "-f",
        &file,
    ])
    .ok();
    cli.run(&[
        "--token",
        "ci-bot-token",
        "-n",
        "shop",
        "create",
        "instance",
        "counter",
        "--id",
        "c-1",
    ])
    .ok();
    cli.run(&[
        "--token",
        "ci-bot-token",
        "-n",
        "shop",
        "send",
        "c-1",
        "tick",
        "--actor",
        "mallory",
    ])
    .ok();

    // CNSM_TOKEN works like --token.
    let mut as_viewer = cli.command(&["-n", "shop", "history", "c-1", "-o", "json"]);
    as_viewer.env("CNSM_TOKEN", "viewer-token");
    let history = output_of(as_viewer);
    history.ok();
    let records = history.json();
    let actors: Vec<&str> = records
        .as_array()
        .expect("history")
        .iter()
        .map(|r| r["actor"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(actors, ["ci-bot", "ci-bot"], "{records:#}");
    let mut viewer_sends = cli.command(&["-n", "shop", "send", "c-1", "tick"]);
    viewer_sends.env("CNSM_TOKEN", "viewer-token");
    let refused = output_of(viewer_sends);
    refused.code(1);
    assert!(
        refused.error_line().starts_with("error: Forbidden: "),
        "{refused:?}"
    );

    server.signal("TERM");
    let (status, stderr) = server.wait();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("plaintext"), "{stderr}");
    for token in ["ops-admin-token", "ci-bot-token", "viewer-token"] {
        assert!(!stderr.contains(token), "{stderr}");
    }
}

#[test]
fn a_bad_auth_file_is_refused_naming_the_field() {
    let cli = Cli::new();
    let file = cli.dir.path().join("tokens.yaml");
    std::fs::write(
        &file,
        "tokens:\n- name: x\n  tokenSha256: 1234\n  roles: [{namespace: shop, role: reader}]\n",
    )
    .expect("write");
    let file = file.to_string_lossy();
    let refused = cli.run(&["serve", "--listen", "127.0.0.1:0", "--auth-file", &file]);
    refused.code(1);
    assert!(
        refused.error_line().contains("tokens[0].tokenSha256"),
        "{refused:?}"
    );
    assert!(!cli.data_dir().exists(), "nothing was created");
    let missing = cli.run(&["serve", "--auth-file", "no-such-file.yaml"]);
    missing.code(1).stderr_has("no-such-file.yaml");
    std::fs::write(
        cli.dir.path().join("typo.yaml"),
        "tokens:\n- name: x\n  token: secret-typo-token\n  role: [{namespace: shop, role: reader}]\n",
    )
    .expect("write");
    let typo = cli.run(&["serve", "--auth-file", "typo.yaml"]);
    typo.code(1).stderr_has("line ");
    assert!(!typo.stderr.contains("secret-typo-token"), "{typo:?}");
}

/// A self-signed certificate for `localhost` and 127.0.0.1 in `dir`: (cert.pem, key.pem).
fn self_signed(dir: &Path, name: &str) -> (String, String) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("generate a certificate");
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
    (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    )
}

#[test]
fn serve_over_tls_and_the_cli_with_ca_cert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = self_signed(dir.path(), "server");
    let mut server = ServerChild::start_with(
        &dir.path().join("data"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    let file = cli.dir.path().join("counter.yaml");
    std::fs::write(&file, COUNTER_YAML).expect("write");
    let file = file.to_string_lossy();

    cli.run(&["--ca-cert", &cert, "-n", "shop", "apply", "-f", &file])
        .ok();
    cli.run(&[
        "--ca-cert",
        &cert,
        "-n",
        "shop",
        "create",
        "instance",
        "counter",
        "--id",
        "c-1",
    ])
    .ok()
    .stdout_has("instance/c-1 created");
    // The CA certificate from the environment.
    let mut command = cli.command(&["-n", "shop", "get", "instances"]);
    command.env("CNSM_CA_CERT", &cert);
    output_of(command).ok().stdout_has("c-1");

    // https without --ca-cert: a clear message, exit 1.
    let untrusted = cli.run(&["-n", "shop", "get", "instances"]);
    untrusted.code(1);
    assert!(
        untrusted.error_line().contains("--ca-cert"),
        "{untrusted:?}"
    );
    // A certificate the server does not have: the handshake fails (unavailable, exit 5).
    let (other, _) = self_signed(dir.path(), "other");
    cli.run(&["--ca-cert", &other, "-n", "shop", "get", "instances"])
        .code(5)
        .stderr_has("TLS handshake failed");
    // Plain HTTP to the TLS port gets no answer.
    let mut plain = Cli::new();
    plain.server = Some(server.url.replacen("https://", "http://", 1));
    plain.run(&["-n", "shop", "get", "instances"]).code(5);

    server.signal("TERM");
    let (status, stderr) = server.wait();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("on https://127.0.0.1:"), "{stderr}");
}

#[test]
fn serve_refuses_bad_tls_files_naming_them() {
    let cli = Cli::new();
    let (cert, key) = self_signed(cli.dir.path(), "a");
    let (_, other_key) = self_signed(cli.dir.path(), "b");
    let bad_key = cli.dir.path().join("bad-key.pem");
    std::fs::write(
        &bad_key,
        "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let bad_key = bad_key.to_string_lossy();
    let listen = ["serve", "--listen", "127.0.0.1:0"];
    let with = |cert: &str, key: &str| {
        let mut args = listen.to_vec();
        args.extend(["--tls-cert", cert, "--tls-key", key]);
        cli.run(&args)
    };
    let refused = with(&cert, &bad_key);
    refused.code(1);
    assert!(refused.error_line().contains("bad-key.pem"), "{refused:?}");
    let missing = with(&cert, "no-such-key.pem");
    missing.code(1);
    assert!(
        missing.error_line().contains("no-such-key.pem"),
        "{missing:?}"
    );
    let missing_cert = with("no-such-cert.pem", &key);
    missing_cert.code(1);
    assert!(
        missing_cert.error_line().contains("no-such-cert.pem"),
        "{missing_cert:?}"
    );
    let mismatch = with(&cert, &other_key);
    mismatch.code(1);
    assert!(
        mismatch.error_line().contains("does not match")
            && mismatch.error_line().contains("b-key.pem"),
        "{mismatch:?}"
    );
    assert!(!cli.data_dir().exists(), "nothing was created");
    // One without the other is a usage error.
    let mut args = listen.to_vec();
    args.extend(["--tls-cert", cert.as_str()]);
    cli.run(&args).code(2);
}
