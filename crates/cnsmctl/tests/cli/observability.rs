//! `cnsmctl serve` telemetry end to end, as a real child process: an OTLP/HTTP receiver on
//! loopback (decoding with the opentelemetry-proto types) gets the spans and metrics the binary
//! exports, `/metrics` parses as Prometheus text, the audit log validates as ECS, and after a
//! SIGKILL mid-load and a restart every committed transition has exactly one audit line.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cnsm_server::client::Client;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::{Value, json};

use super::server::ServerChild;

const PREFIX: &str = "/apis/statemachine.cn/v1alpha1/namespaces";
const SHARED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/");
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

const ORDER_YAML: &str = "apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata:
  name: order
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

/// (path, body) of every request the receiver got.
type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal OTLP/HTTP receiver: records (path, body) of every POST and answers 200.
struct Receiver {
    url: String,
    requests: Requests,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests: Requests = Arc::default();
        let seen = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let seen = Arc::clone(&seen);
                std::thread::spawn(move || serve_connection(stream, seen));
            }
        });
        Receiver { url, requests }
    }

    fn bodies(&self, path: &str) -> Vec<Vec<u8>> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

fn serve_connection(stream: std::net::TcpStream, seen: Requests) {
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        seen.lock().unwrap().push((path, body));
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// `cnsmctl --data-dir DIR serve --listen 127.0.0.1:0 ARGS` with `env`.
fn serve(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> ServerChild {
    let data_dir = data_dir.to_str().expect("a UTF-8 data directory");
    let mut serve_args = vec!["--listen", "127.0.0.1:0"];
    serve_args.extend_from_slice(args);
    ServerChild::spawn(&["--data-dir", data_dir], &serve_args, env, Stdio::piped())
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio")
}

async fn apply_and_create(client: &Client, ids: &[String]) {
    let r = client
        .request(
            "POST",
            &format!("{PREFIX}/shop/statemachines"),
            &[("content-type", "application/yaml")],
            ORDER_YAML.as_bytes().to_vec(),
        )
        .await
        .expect("apply");
    assert_eq!(r.status, 201, "{}", r.text());
    for id in ids {
        let r = client
            .post_json(
                &format!("{PREFIX}/shop/instances"),
                &json!({"id": id, "machine": "order"}),
                &[],
            )
            .await
            .expect("create");
        assert_eq!(r.status, 201, "{}", r.text());
    }
}

/// Checks the Prometheus text exposition format line by line; returns sample name -> lines.
fn parse_prometheus(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut samples: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            if words.first() == Some(&"TYPE") {
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"]
                        .contains(&words.get(2).copied().unwrap_or_default()),
                    "bad TYPE line {line}"
                );
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value in {line}"));
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        let rest = &line[name_end..];
        let value_part = if rest.starts_with('{') {
            let close = rest
                .rfind('}')
                .unwrap_or_else(|| panic!("unclosed labels: {line}"));
            let labels = &rest[1..close];
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label {pair} in {line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name {k}"
                );
                assert!(v.starts_with('"'), "unquoted label value in {line}");
            }
            &rest[close + 1..]
        } else {
            rest
        };
        let value = value_part.split_whitespace().next().unwrap_or_default();
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {line}"
        );
        samples
            .entry(name.to_owned())
            .or_default()
            .push(line.to_owned());
    }
    samples
}

/// Runs the shared ECS checker over an audit file.
fn validate_ecs(audit: &Path) {
    let output = Command::new("python3")
        .arg(format!("{SHARED}tools/validate_ecs.py"))
        .arg(format!("{SHARED}conformance/ecs/ecs_flat.yml"))
        .arg(audit)
        .arg("state_change")
        .output()
        .expect("python3 runs (with PyYAML) to validate ECS lines");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ECS validation failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.lines().all(|l| l.ends_with(": OK")), "{stdout}");
}

#[test]
fn serve_exports_spans_and_metrics_over_otlp_serves_metrics_and_writes_ecs_audit_lines() {
    let data = tempfile::tempdir().unwrap();
    let audit = data.path().join("audit").join("audit.jsonl");
    let receiver = Receiver::start();
    let mut server = serve(
        &data.path().join("store"),
        &[
            "--audit-log",
            audit.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url.as_str()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "cnsm-test"),
            ("RUST_LOG", "info,cnsm_runtime=debug"),
        ],
    );
    let client = Client::new(&server.url).unwrap();
    let ids: Vec<String> = (0..3).map(|i| format!("o-{i}")).collect();
    let rt = tokio_runtime();
    let answer = rt.block_on(async {
        apply_and_create(&client, &ids).await;
        for id in &ids {
            let r = client
                .post_json(
                    &format!("{PREFIX}/shop/instances/{id}/events"),
                    &json!({"event": "tick"}),
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
        // One with a W3C parent, one CloudEvent with the distributed-tracing extension.
        let traced = client
            .post_json(
                &format!("{PREFIX}/shop/instances/o-0/events"),
                &json!({"event": "close"}),
                &[("traceparent", &format!("00-{TRACE_ID}-{PARENT_SPAN}-01"))],
            )
            .await
            .unwrap();
        assert_eq!(traced.status, 200, "{}", traced.text());
        let ce = client
            .request(
                "POST",
                &format!("{PREFIX}/shop/instances/o-1/events"),
                &[("content-type", "application/cloudevents+json")],
                serde_json::to_vec(&json!({
                    "specversion": "1.0", "id": "e-1", "source": "test", "type": "tick",
                    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    "tracestate": "rojo=00f067aa0ba902b7",
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(ce.status, 200, "{}", ce.text());
        assert_eq!(
            ce.json()["record"]["trace"]["traceId"],
            "0af7651916cd43dd8448eb211c80319c"
        );
        // Rejected: o-0 is closed now.
        let rejected = client
            .post_json(
                &format!("{PREFIX}/shop/instances/o-0/events"),
                &json!({"event": "tick"}),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rejected.status, 422);
        let metrics = client.get("/metrics").await.unwrap();
        assert_eq!(metrics.status, 200);
        assert!(
            metrics
                .header("content-type")
                .unwrap_or_default()
                .starts_with("text/plain; version=0.0.4")
        );
        (traced.json(), metrics.text())
    });
    let (traced, metrics_text) = answer;
    // The answer carries the transition span's ids: same trace, a new span.
    let trace = &traced["record"]["trace"];
    assert_eq!(trace["traceId"], TRACE_ID);
    let span_id = trace["spanId"].as_str().unwrap().to_owned();
    assert_eq!(span_id.len(), 16);
    assert_ne!(span_id, PARENT_SPAN);

    let samples = parse_prometheus(&metrics_text);
    for name in [
        "cnsm_transitions_total",
        "cnsm_transition_duration_seconds_bucket",
        "cnsm_transition_duration_seconds_count",
        "cnsm_transition_errors_total",
        "cnsm_instances_active",
        "cnsm_timers_pending",
        "cnsm_store_commit_duration_seconds_bucket",
        "cnsm_store_commit_batch_size_bucket",
    ] {
        assert!(
            samples.contains_key(name),
            "{name} missing:\n{metrics_text}"
        );
    }
    assert!(
        samples["cnsm_transition_errors_total"]
            .iter()
            .any(|l| l.contains("error_type=\"TransitionFailure\"")),
        "{metrics_text}"
    );
    assert!(
        samples["cnsm_transition_duration_seconds_bucket"]
            .iter()
            .any(|l| l.contains("le=\"1e-5\"") || l.contains("le=\"0.00001\"")),
        "the 10 µs bucket:\n{metrics_text}"
    );
    // o-0 closed: 2 instances open.
    let open: f64 = samples["cnsm_instances_active"]
        .iter()
        .filter(|l| l.contains("cnsm_state=\"open\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(open, 2.0, "{metrics_text}");

    // OpenMetrics on request: the duration buckets carry exemplars whose trace ids are those
    // of committed transitions (each record keeps its span's trace id).
    let history_traces: std::collections::BTreeSet<String> = rt.block_on(async {
        let mut traces = std::collections::BTreeSet::new();
        for id in &ids {
            let page = client
                .get(&format!("{PREFIX}/shop/instances/{id}/history"))
                .await
                .unwrap()
                .json();
            for record in page["items"].as_array().expect("history items") {
                if let Some(t) = record["record"]["trace"]["traceId"]
                    .as_str()
                    .or(record["trace"]["traceId"].as_str())
                {
                    traces.insert(t.to_owned());
                }
            }
        }
        traces
    });
    assert!(history_traces.contains(TRACE_ID), "{history_traces:?}");
    let openmetrics = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = client
                .request(
                    "GET",
                    "/metrics",
                    &[("accept", "application/openmetrics-text; version=1.0.0")],
                    Vec::new(),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            assert!(
                r.header("content-type")
                    .unwrap_or_default()
                    .starts_with("application/openmetrics-text; version=1.0.0"),
                "{:?}",
                r.header("content-type")
            );
            let text = r.text();
            let n_exemplars = text
                .lines()
                .filter(|l| {
                    l.starts_with("cnsm_transition_duration_seconds_bucket") && l.contains(" # {")
                })
                .count();
            if n_exemplars > 0 || Instant::now() > deadline {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    assert!(
        openmetrics.contains("# TYPE cnsm_transitions counter")
            && openmetrics.contains("cnsm_transitions_total{"),
        "{openmetrics}"
    );
    let mut n_exemplars = 0;
    for line in openmetrics.lines() {
        let Some((sample, exemplar)) = line.split_once(" # ") else {
            continue;
        };
        assert!(
            sample.starts_with("cnsm_transition_duration_seconds_bucket{")
                && sample.contains("cnsm_machine_name=\"order\""),
            "{line}"
        );
        // `{trace_id="<32 hex>"} VALUE TIMESTAMP`
        let rest = exemplar.strip_prefix("{trace_id=\"").expect(line);
        let (trace_id, rest) = rest.split_once("\"} ").expect(line);
        let mut numbers = rest.split(' ').map(|n| n.parse::<f64>().expect(line));
        let (value, timestamp) = (numbers.next().unwrap(), numbers.next().unwrap());
        assert!(
            history_traces.contains(trace_id),
            "{trace_id} is no transition's: {line}"
        );
        let le = sample
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect(line);
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().expect(line)
        };
        assert!(value <= le && value >= 0.0, "{line}");
        assert!(timestamp > 1.7e9, "{line}");
        n_exemplars += 1;
    }
    assert!(n_exemplars > 0, "no exemplar:\n{openmetrics}");

    // audit export through the server: the committed lines, as the store regenerates them
    // locally once the server has stopped (compared below).
    let served_audit = |since: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cnsmctl"));
        command
            .args(["--server", &server.url, "audit", "export"])
            .env_remove("CNSM_DATA_DIR")
            .env_remove("CNSM_TOKEN");
        if let Some(since) = since {
            command.args(["--since", since]);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let served_all = served_audit(None);
    let served_after_3 = served_audit(Some("3"));
    assert_eq!(served_all.lines().count(), 8, "{served_all}");
    assert_eq!(served_after_3.lines().count(), 5, "{served_after_3}");

    // SIGTERM: drain, flush the exporters and the audit log.
    server.signal("TERM");
    let (_, stderr) = server.wait();
    let local_audit = |since: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cnsmctl"));
        command
            .arg("--data-dir")
            .arg(data.path().join("store"))
            .args(["audit", "export"])
            .env_remove("CNSM_SERVER");
        if let Some(since) = since {
            command.args(["--since", since]);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(served_all, local_audit(None));
    assert_eq!(served_after_3, local_audit(Some("3")));
    // JSON logs with trace ids on the committed transition lines.
    let log_line = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["trace_id"] == TRACE_ID)
        .unwrap_or_else(|| panic!("no JSON log line with the trace id:\n{stderr}"));
    assert_eq!(log_line["span_id"], span_id.as_str());

    // Spans over OTLP/HTTP.
    let mut spans = Vec::new();
    for body in receiver.bodies("/v1/traces") {
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP traces");
        for rs in request.resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
    }
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let close = spans
        .iter()
        .find(|s| s.name == "cnsm.transition" && hex(&s.span_id) == span_id)
        .unwrap_or_else(|| panic!("the traced span was not exported: {} spans", spans.len()));
    assert_eq!(hex(&close.trace_id), TRACE_ID);
    assert_eq!(hex(&close.parent_span_id), PARENT_SPAN);
    let attribute = |name: &str| {
        close
            .attributes
            .iter()
            .find(|kv| kv.key == name)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
            .map(|v| format!("{v:?}"))
    };
    assert!(attribute("cnsm.state.to").unwrap().contains("closed"));
    assert!(attribute("cnsm.machine.name").unwrap().contains("order"));
    assert!(
        spans
            .iter()
            .any(|s| s.status.as_ref().is_some_and(|st| st.code == 2)
                && s.attributes.iter().any(|kv| kv.key == "error.type")),
        "an error span"
    );
    // Metrics over OTLP/HTTP.
    let mut names = std::collections::BTreeSet::new();
    for body in receiver.bodies("/v1/metrics") {
        let request = ExportMetricsServiceRequest::decode(body.as_slice()).expect("OTLP metrics");
        for rm in request.resource_metrics {
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    names.insert(m.name);
                }
            }
        }
    }
    for name in [
        "cnsm.transitions",
        "cnsm.transition.duration",
        "cnsm.transition.errors",
        "cnsm.store.commit.duration",
    ] {
        assert!(names.contains(name), "{name} not exported: {names:?}");
    }

    // Audit: every committed transition once (apply makes none; 3 creates, 5 events), the
    // rejected one live, every line ECS.
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ok = lines
        .iter()
        .filter(|l| l["event"]["outcome"] == "success")
        .count();
    let failed = lines
        .iter()
        .filter(|l| l["event"]["outcome"] == "failure")
        .count();
    assert_eq!((ok, failed), (8, 1), "{text}");
    let close_line = lines
        .iter()
        .find(|l| l["state_change"]["to"] == "closed")
        .unwrap();
    assert_eq!(close_line["trace"]["id"], TRACE_ID);
    assert_eq!(close_line["span"]["id"], span_id.as_str());
    validate_ecs(&audit);

    // `audit export` regenerates the committed lines byte for byte.
    let export = Command::new(env!("CARGO_BIN_EXE_cnsmctl"))
        .arg("--data-dir")
        .arg(data.path().join("store"))
        .args(["audit", "export"])
        .env_remove("CNSM_SERVER")
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let committed: String = text
        .lines()
        .filter(|l| l.contains("\"outcome\":\"success\""))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&export.stdout), committed);
    let since = Command::new(env!("CARGO_BIN_EXE_cnsmctl"))
        .arg("--data-dir")
        .arg(data.path().join("store"))
        .args(["audit", "export", "--since", "5"])
        .env_remove("CNSM_SERVER")
        .output()
        .unwrap();
    assert!(since.status.success());
    assert!(String::from_utf8_lossy(&since.stdout).lines().all(|l| {
        serde_json::from_str::<Value>(l).unwrap()["event"]["sequence"]
            .as_u64()
            .unwrap()
            > 5
    }));
}

#[test]
fn audit_lines_survive_sigkill_exactly_once() {
    let data = tempfile::tempdir().unwrap();
    let store_dir = data.path().join("store");
    let audit = data.path().join("audit.jsonl");
    let audit_arg = audit.to_str().unwrap().to_owned();
    let ids: Vec<String> = (0..8).map(|i| format!("k-{i}")).collect();
    let rt = tokio_runtime();
    for round in 0..2 {
        let server = serve(&store_dir, &["--audit-log", &audit_arg], &[]);
        let client = Client::new(&server.url).unwrap();
        rt.block_on(async {
            if round == 0 {
                apply_and_create(&client, &ids).await;
            }
            let mut tasks = Vec::new();
            for id in ids.clone() {
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..2_000 {
                        let sent = client
                            .post_json(
                                &format!("{PREFIX}/shop/instances/{id}/events"),
                                &json!({"event": "tick"}),
                                &[],
                            )
                            .await;
                        match sent {
                            Ok(r) if r.status == 200 => {}
                            _ => break,
                        }
                    }
                }));
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
            // SIGKILL mid-load: no drain, no flush.
            server.signal("KILL");
            for t in tasks {
                let _ = t.await;
            }
        });
        drop(server);
    }
    // A last clean start catches the audit log up with the store, then stops.
    let mut server = serve(&store_dir, &["--audit-log", &audit_arg], &[]);
    server.signal("TERM");
    server.wait();
    let store = cnsm_store::embedded::EmbeddedStore::open(&store_dir).unwrap();
    use cnsm_store::Store;
    let mut expected = Vec::new();
    let mut cursor = 0;
    loop {
        let page = store.records_after(cursor, 0).unwrap();
        let Some((last, _)) = page.last() else { break };
        cursor = *last;
        expected.extend(page.iter().map(|(seq, s)| (*seq, s.hash.to_hex())));
    }
    assert!(expected.len() > 20, "load ran: {} records", expected.len());
    let text = std::fs::read_to_string(&audit).unwrap();
    let got: Vec<(u64, String)> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("every line complete JSON"))
        .filter(|l| l["event"]["outcome"] == "success")
        .map(|l| {
            (
                l["event"]["sequence"].as_u64().unwrap(),
                l["state_change"]["record_hash"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(got.len(), expected.len(), "no line lost or duplicated");
    assert_eq!(got, expected);
}
