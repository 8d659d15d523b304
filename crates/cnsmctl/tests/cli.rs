//! End-to-end tests of the `cnsmctl` binary: every command run as a real process on a temporary
//! embedded store, asserting exit codes, stdout and stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

#[path = "cli/deliveries.rs"]
mod deliveries;
#[path = "cli/erase.rs"]
mod erase;
#[path = "cli/evolve.rs"]
mod evolve;
#[path = "cli/flags.rs"]
mod flags;
#[path = "cli/nodes.rs"]
mod nodes;
#[path = "cli/observability.rs"]
mod observability;
#[path = "cli/server.rs"]
mod server;
#[path = "cli/snapshot.rs"]
mod snapshot;

/// The shared example machines (CI checks `shared/` out beside the repository).
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/examples/");

fn example(name: &str) -> String {
    format!("{EXAMPLES}{name}")
}

/// What one run of the binary produced.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the exit code, showing the whole run when it differs.
    #[track_caller]
    fn code(&self, expected: i32) -> &Run {
        assert_eq!(self.code, expected, "unexpected exit code: {self:#?}");
        self
    }

    #[track_caller]
    fn ok(&self) -> &Run {
        self.code(0)
    }

    #[track_caller]
    fn stdout_has(&self, needle: &str) -> &Run {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}: {self:#?}"
        );
        self
    }

    #[track_caller]
    fn stderr_has(&self, needle: &str) -> &Run {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {self:#?}"
        );
        self
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// The one `error: ` line of stderr.
    #[track_caller]
    fn error_line(&self) -> &str {
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(lines.len(), 1, "expected one error line: {self:#?}");
        lines[0]
    }
}

/// A temporary data directory and a way to run the binary on it.
struct Cli {
    dir: tempfile::TempDir,
    /// `--server URL`: every command goes through that server.
    server: Option<String>,
}

impl Cli {
    fn new() -> Cli {
        Cli {
            dir: tempfile::tempdir().expect("tempdir"),
            server: None,
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cnsmctl"));
        command
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .env_remove("CNSM_DATA_DIR")
            .env_remove("CNSM_NAMESPACE")
            .env_remove("CNSM_ACTOR")
            .env_remove("CNSM_SERVER")
            .env_remove("CNSM_TOKEN")
            .env_remove("CNSM_AUTH_FILE")
            .env_remove("CNSM_CA_CERT")
            .env_remove("CNSM_TLS_CERT")
            .env_remove("CNSM_TLS_KEY")
            .env_remove("CNSM_FLAGS")
            .current_dir(self.dir.path());
        if let Some(url) = &self.server {
            command.arg("--server").arg(url);
        }
        command
    }

    fn run(&self, args: &[&str]) -> Run {
        self.run_with_stdin(args, None)
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let mut command = self.command(args);
        command.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn cnsmctl");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write stdin");
        }
        let output = child.wait_with_output().expect("wait for cnsmctl");
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Applies order-processing and creates `id` (namespace shop) with the given data.
    fn order(&self, id: &str, data: &str) {
        self.run(&["apply", "-f", &example("order-processing.yaml")])
            .ok();
        self.run(&[
            "-n",
            "shop",
            "create",
            "instance",
            "order-processing",
            "--id",
            id,
            "--data",
            data,
        ])
        .ok();
    }

    fn history(&self, namespace: &str, id: &str) -> Value {
        self.run(&["-n", namespace, "history", id, "-o", "json"])
            .ok()
            .json()
    }
}

/// The issue's script on order-processing.yaml, step by step.
#[test]
fn order_processing_script() {
    run_order_processing_script(&Cli::new());
}

/// The same script, every command through the HTTP API of a `cnsmctl serve` child.
#[test]
fn order_processing_script_through_a_server() {
    let server_dir = tempfile::tempdir().expect("tempdir");
    let server = server::ServerChild::start(server_dir.path());
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    run_order_processing_script(&cli);
    // Nothing went to the client's own data directory.
    assert!(!cli.data_dir().exists());
}

fn run_order_processing_script(cli: &Cli) {
    let file = example("order-processing.yaml");

    cli.run(&["validate", "-f", &file])
        .ok()
        .stdout_has(&format!("{file}: valid"));
    cli.run(&["apply", "-f", &file])
        .ok()
        .stdout_has("statemachine.statemachine.cn/order-processing created (revision 1)");
    cli.run(&["apply", "-f", &file])
        .ok()
        .stdout_has("statemachine.statemachine.cn/order-processing unchanged (revision 1)");

    cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "--id",
        "o-1",
        "--data",
        r#"{"total": 40}"#,
    ])
    .ok()
    .stdout_has("instance/o-1 created (state created, version 0)");
    cli.run(&["-n", "shop", "send", "o-1", "complete"])
        .ok()
        .stdout_has("instance/o-1: created -> validated (version 1)");

    let pay = [
        "-n",
        "shop",
        "send",
        "o-1",
        "pay",
        "--payload",
        r#"{"amount": 40}"#,
        "--expected-version",
        "1",
    ];
    let pay_k1: Vec<&str> = pay
        .iter()
        .copied()
        .chain(["--idempotency-key", "k1"])
        .collect();
    cli.run(&pay_k1)
        .ok()
        .stdout_has("instance/o-1: validated -> paid (version 2)");

    // The same key again: the original result, nothing applied twice.
    let replay = cli.run(&pay_k1);
    replay
        .ok()
        .stdout_has("instance/o-1: validated -> paid (version 2)")
        .stdout_has("replayed");
    let replay_json: Vec<&str> = pay_k1.iter().copied().chain(["-o", "json"]).collect();
    let replayed = cli.run(&replay_json).ok().json();
    assert_eq!(replayed["replayed"], true);
    assert_eq!(replayed["instance"]["version"], 2);
    assert_eq!(replayed["record"]["version"], 2);

    // The same key with another payload: a conflict, nothing changes.
    let other = [
        "-n",
        "shop",
        "send",
        "o-1",
        "pay",
        "--payload",
        r#"{"amount": 41}"#,
        "--idempotency-key",
        "k1",
    ];
    let conflict = cli.run(&other);
    conflict.code(4).stderr_has("idempotency key 'k1'");
    assert!(
        conflict.error_line().starts_with("error: Conflict: "),
        "{conflict:#?}"
    );

    let instance = cli
        .run(&["-n", "shop", "get", "instance", "o-1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(instance["namespace"], "shop");
    assert_eq!(instance["id"], "o-1");
    assert_eq!(instance["machine"], "order-processing");
    assert_eq!(instance["revision"], 1);
    assert_eq!(instance["state"], "paid");
    assert_eq!(instance["status"], "active");
    assert_eq!(instance["phase"], "running");
    assert_eq!(instance["version"], 2);
    assert_eq!(
        instance["data"],
        serde_json::json!({"total": 40, "paidAmount": 40})
    );
    assert_eq!(instance["timer"]["kind"], "timeout");
    for field in ["createdAt", "updatedAt"] {
        let time = instance[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} missing: {instance}"));
        assert!(is_rfc3339_ms(time), "{field} = {time}");
    }

    let history = cli.history("shop", "o-1");
    let records = history.as_array().expect("history is an array");
    assert_eq!(records.len(), 3, "{history:#}");
    let mut prev = "0".repeat(64);
    for (version, record) in records.iter().enumerate() {
        assert_eq!(record["version"], version as u64);
        assert_eq!(
            record["prevHash"],
            prev.as_str(),
            "record {version} does not chain"
        );
        let hash = record["hash"].as_str().expect("hash");
        assert_eq!(hash.len(), 64);
        prev = hash.to_owned();
    }
    assert_eq!(records[0]["kind"], "genesis");
    assert_eq!(records[2]["event"], "pay");
    assert_eq!(records[2]["idempotencyKey"], "k1");
    assert_eq!(records[2]["actor"], "cnsmctl");
    assert_eq!(instance["lastHash"], prev.as_str());

    cli.run(&["-n", "shop", "history", "o-1"])
        .ok()
        .stdout_has("VERSION   KIND      FROM        TO          EVENT      ACTOR     TIME")
        .stdout_has(&prev[..12]);

    cli.run(&["-n", "shop", "graph", "order-processing"])
        .ok()
        .stdout_has("stateDiagram-v2")
        .stdout_has("[*] --> s_created")
        .stdout_has("s_validated --> s_paid: pay [event.amount >= data.total]");
    cli.run(&["-n", "shop", "graph", "order-processing", "--format", "dot"])
        .ok()
        .stdout_has("digraph \"order-processing\"")
        .stdout_has("\"created\" -> \"validated\" [label=\"complete\"];");

    // A second instance with labels, to filter on.
    cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "--id",
        "o-2",
        "-l",
        "tier=gold",
        "-l",
        "region=eu",
    ])
    .ok();
    let table = cli
        .run(&["-n", "shop", "get", "instances"])
        .ok()
        .stdout
        .clone();
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["ID", "MACHINE", "REV", "STATE", "STATUS", "VERSION", "AGE"]
    );
    assert_eq!(table.lines().count(), 3, "{table}");

    let gold = cli
        .run(&[
            "-n",
            "shop",
            "get",
            "instances",
            "-l",
            "tier=gold",
            "-o",
            "wide",
        ])
        .ok()
        .stdout
        .clone();
    let gold_header: Vec<&str> = gold
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        gold_header[7..],
        ["LABELS", "TIMER-DUE", "UPDATED"],
        "{gold}"
    );
    assert!(gold.contains("o-2") && !gold.contains("o-1"), "{gold}");
    assert!(
        gold.contains("region=eu,tier=gold") && gold.contains("timeout in"),
        "{gold}"
    );

    let paid = cli
        .run(&[
            "-n",
            "shop",
            "get",
            "instances",
            "--state",
            "paid",
            "-o",
            "json",
        ])
        .ok()
        .json();
    let ids: Vec<&str> = paid["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, ["o-1"]);

    let yaml = cli
        .run(&[
            "-n",
            "shop",
            "get",
            "instances",
            "-l",
            "tier=gold,region=eu",
            "-o",
            "yaml",
        ])
        .ok()
        .stdout
        .clone();
    assert!(yaml.starts_with("items:"), "{yaml}");
    assert!(
        yaml.contains("id: o-2") && yaml.contains("state: created"),
        "{yaml}"
    );

    let machines = cli
        .run(&["-n", "shop", "get", "machines"])
        .ok()
        .stdout
        .clone();
    assert!(
        machines.starts_with("NAME               REVISION   STATES   INITIAL   AGE\n"),
        "{machines}"
    );
    assert!(
        machines.contains("order-processing   1          7        created"),
        "{machines}"
    );
}

fn is_rfc3339_ms(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && s.chars().filter(char::is_ascii_digit).count() == 17
}

#[test]
fn every_example_is_accepted_and_the_seed_fragment_is_rejected() {
    let cli = Cli::new();
    for name in [
        "order-processing.yaml",
        "payment-saga.yaml",
        "provisioning.yaml",
        "checkout-canary.yaml",
    ] {
        let file = example(name);
        cli.run(&["validate", "-f", &file])
            .ok()
            .stdout_has(&format!("{file}: valid"));
        cli.run(&["apply", "-f", &file])
            .ok()
            .stdout_has("created (revision 1)");
    }
    let all = cli.run(&["get", "sm", "-A"]).ok().stdout.clone();
    for name in [
        "checkout",
        "order-processing",
        "payment-saga",
        "provisioning",
    ] {
        assert!(all.contains(name), "{all}");
    }
    assert!(all.starts_with("NAMESPACE   NAME"), "{all}");

    let fragment = example("seed-fragment.yaml");
    let rejected = cli.run(&["validate", "-f", &fragment]);
    rejected
        .code(1)
        .stderr_has("error[undefined-target]")
        .stderr_has("`validated`");
    assert!(rejected.stdout.is_empty(), "{rejected:#?}");
    assert!(
        rejected.error_line().starts_with("error: Invalid: "),
        "{rejected:#?}"
    );

    // apply refuses it too, and the store stays as it was.
    let before = cli
        .run(&["get", "machines", "-A", "-o", "json"])
        .ok()
        .stdout
        .clone();
    cli.run(&["apply", "-f", &fragment])
        .code(1)
        .stderr_has("validated")
        .stderr_has("nothing was stored");
    assert_eq!(
        cli.run(&["get", "machines", "-A", "-o", "json"])
            .ok()
            .stdout,
        before
    );
}

#[test]
fn validate_reads_stdin_and_reports_every_file() {
    let cli = Cli::new();
    let source = std::fs::read_to_string(example("provisioning.yaml")).expect("example");
    cli.run_with_stdin(&["validate", "-f", "-"], Some(&source))
        .ok()
        .stdout_has("<stdin>: valid");

    let good = example("payment-saga.yaml");
    let bad = example("seed-fragment.yaml");
    let both = cli.run(&[
        "validate",
        "-f",
        &good,
        "-f",
        &bad,
        "-f",
        "no-such-file.yaml",
    ]);
    both.code(1)
        .stdout_has(&format!("{good}: valid"))
        .stderr_has(&format!("{bad}:12:17: error[undefined-target]"))
        .stderr_has("cannot read no-such-file.yaml");
    assert!(
        both.error_line().contains("2 of 3 file(s) invalid"),
        "{both:#?}"
    );

    // Warnings do not fail validation; they go to stderr.
    let warned = "apiVersion: statemachine.cn/v1alpha1\nkind: StateMachine\nmetadata: {name: w}\nspec:\n  initialState: a\n  states:\n  - {name: a, type: task, timeoutSeconds: 5, transition: b}\n  - {name: b, type: final}\n  - {name: c, type: final}\n";
    let run = cli.run_with_stdin(&["validate", "-f", "-"], Some(warned));
    run.ok()
        .stdout_has("<stdin>: valid (1 warning(s))")
        .stderr_has("warning[unreachable-state]");
    // validate never creates a store.
    assert!(!cli.data_dir().exists());
}

#[test]
fn apply_settles_the_namespace_like_kubectl() {
    let cli = Cli::new();
    let order = example("order-processing.yaml");
    let refused = cli.run(&["-n", "other", "apply", "-f", &order]);
    refused.code(1).stderr_has(
        "the namespace from the file (shop) does not match the namespace from -n (other)",
    );
    assert!(
        !cli.data_dir().exists(),
        "a refused apply must not create the store"
    );
    cli.run(&["apply", "-n", "shop", "-f", &order])
        .ok()
        .stdout_has("created (revision 1)");

    // A file without a namespace goes where -n says.
    cli.run(&["-n", "dev", "apply", "-f", &example("provisioning.yaml")])
        .ok();
    let dev = cli
        .run(&["-n", "dev", "get", "machine", "provisioning", "-o", "json"])
        .ok()
        .json();
    assert_eq!(dev["metadata"]["namespace"], "dev");
    assert_eq!(dev["status"]["revision"], 1);
    assert_eq!(dev["status"]["hash"].as_str().map(str::len), Some(64));
    cli.run(&["get", "machine", "provisioning"])
        .code(3)
        .stderr_has("statemachine default/provisioning not found");

    // Several files in one apply, as JSON.
    let both = cli
        .run(&[
            "apply",
            "-f",
            &order,
            "-f",
            &example("payment-saga.yaml"),
            "-o",
            "json",
        ])
        .ok()
        .json();
    let items = both["items"].as_array().expect("items");
    assert_eq!(items[0]["created"], false);
    assert_eq!(items[1]["name"], "payment-saga");
    assert_eq!(items[1]["created"], true);
}

#[test]
fn revisions_pin_instances() {
    let cli = Cli::new();
    let source = std::fs::read_to_string(example("order-processing.yaml")).expect("example");
    cli.run_with_stdin(&["apply", "-f", "-"], Some(&source))
        .ok()
        .stdout_has("created (revision 1)");
    let changed = source.replace("timeoutSeconds: 900", "timeoutSeconds: 1800");
    cli.run_with_stdin(&["apply", "-f", "-"], Some(&changed))
        .ok()
        .stdout_has("order-processing created (revision 2)");

    cli.run(&["-n", "shop", "get", "sm", "order-processing"])
        .ok()
        .stdout_has("order-processing   2 ");
    let old = cli
        .run(&[
            "-n",
            "shop",
            "get",
            "sm",
            "order-processing",
            "--revision",
            "1",
            "-o",
            "yaml",
        ])
        .ok()
        .stdout
        .clone();
    assert!(
        old.contains("timeoutSeconds: 900") && old.contains("revision: 1"),
        "{old}"
    );
    cli.run(&[
        "-n",
        "shop",
        "get",
        "sm",
        "order-processing",
        "--revision",
        "9",
    ])
    .code(3)
    .stderr_has("statemachine shop/order-processing revision 9 not found");

    let pinned = cli
        .run(&[
            "-n",
            "shop",
            "create",
            "instance",
            "order-processing",
            "--revision",
            "1",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(pinned["revision"], 1);
    let id = pinned["id"].as_str().expect("generated id");
    assert!(id.starts_with("order-processing-"), "{id}");
    assert_eq!(pinned["version"], 0);
    let latest = cli
        .run(&[
            "-n",
            "shop",
            "create",
            "instance",
            "order-processing",
            "-o",
            "yaml",
        ])
        .ok()
        .stdout
        .clone();
    assert!(latest.contains("revision: 2"), "{latest}");

    cli.run(&[
        "-n",
        "shop",
        "describe",
        "machine",
        "order-processing",
        "--revision",
        "1",
    ])
    .ok()
    .stdout_has("Revision:      1 (latest is 2)")
    .stdout_has("Instances:     2 (2 active, 0 succeeded, 0 failed, 0 cancelled)");
}

#[test]
fn send_prints_the_record_and_the_instance() {
    let cli = Cli::new();
    cli.order("o-1", r#"{"total": 40}"#);
    let sent = cli
        .run(&[
            "-n", "shop", "send", "o-1", "complete", "--actor", "alice", "-o", "json",
        ])
        .ok()
        .json();
    assert_eq!(sent["replayed"], false);
    assert_eq!(sent["record"]["from"], "created");
    assert_eq!(sent["record"]["to"], "validated");
    assert_eq!(sent["record"]["actor"], "alice");
    assert_eq!(sent["record"]["hash"], sent["instance"]["lastHash"]);
    assert_eq!(sent["instance"]["state"], "validated");
    assert_eq!(sent["instance"]["version"], 1);

    cli.run(&["-n", "shop", "send", "o-1", "cancel"])
        .ok()
        .stdout_has("instance/o-1: validated -> cancelled (version 2) [cancelled]");
    let ended = cli.run(&["-n", "shop", "send", "o-1", "complete"]);
    ended.code(4);
    assert!(
        ended.error_line().starts_with("error: TransitionFailure: "),
        "{ended:#?}"
    );
    cli.run(&["-n", "shop", "get", "instances", "--status", "cancelled"])
        .ok()
        .stdout_has("o-1");
    cli.run(&["-n", "shop", "get", "instances", "--status", "active"])
        .ok()
        .stderr_has("No resources found in shop namespace.");
}

#[test]
fn operator_controls_suspend_resume_cancel() {
    run_operator_controls(&Cli::new());
}

#[test]
fn operator_controls_through_a_server() {
    let server_dir = tempfile::tempdir().expect("tempdir");
    let server = server::ServerChild::start(server_dir.path());
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    run_operator_controls(&cli);
}

fn run_operator_controls(cli: &Cli) {
    cli.order("o-1", r#"{"total": 40}"#);
    cli.run(&["-n", "shop", "suspend", "o-1", "--actor", "oncall"])
        .ok()
        .stdout_has("instance/o-1 suspended: state created, status active, suspended (version 1)");
    let refused = cli.run(&["-n", "shop", "send", "o-1", "complete"]);
    refused.code(4);
    assert!(refused.error_line().contains("suspended"), "{refused:#?}");
    cli.run(&["-n", "shop", "resume", "o-1"])
        .ok()
        .stdout_has("instance/o-1 resumed: state created, status active (version 2)");
    let cancelled = cli
        .run(&[
            "-n",
            "shop",
            "cancel",
            "o-1",
            "--reason",
            "customer request",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(cancelled["record"]["kind"], "cancel");
    assert_eq!(cancelled["record"]["reason"], "customer request");
    assert_eq!(cancelled["instance"]["status"], "cancelled");
    let history = cli.history("shop", "o-1");
    let kinds: Vec<&str> = history
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["genesis", "suspend", "resume", "cancel"]);
    assert_eq!(history[1]["actor"], "oncall");
    let redrive = cli.run(&["-n", "shop", "redrive", "o-1"]);
    redrive.code(4);
    assert!(
        redrive.error_line().contains("only a failed instance"),
        "{redrive:#?}"
    );
}

#[test]
fn rejected_and_malformed_requests() {
    let cli = Cli::new();
    cli.order("o-1", r#"{"total": 40}"#);
    let before = cli.history("shop", "o-1");

    let missing = cli.run(&["-n", "shop", "send", "o-9", "complete"]);
    missing.code(3);
    assert_eq!(
        missing.error_line(),
        "error: NotFound: instance shop/o-9 not found"
    );
    cli.run(&["-n", "shop", "get", "instance", "o-9"])
        .code(3)
        .stderr_has("instance shop/o-9 not found");
    cli.run(&["-n", "shop", "history", "o-9"])
        .code(3)
        .stderr_has("instance shop/o-9 not found");
    cli.run(&["-n", "shop", "describe", "instance", "o-9"])
        .code(3)
        .stderr_has("instance shop/o-9 not found");

    // The wrong namespace does not find it either.
    cli.run(&["get", "instance", "o-1"])
        .code(3)
        .stderr_has("instance default/o-1 not found");
    cli.run(&["-n", "other", "send", "o-1", "complete"])
        .code(3)
        .stderr_has("instance other/o-1 not found");

    let malformed = cli.run(&[
        "-n",
        "shop",
        "send",
        "o-1",
        "complete",
        "--payload",
        r#"{"amount": 4"#,
    ]);
    malformed
        .code(1)
        .stderr_has("error: Invalid: --payload is not valid JSON")
        .stderr_has("line 1 column 12");
    assert_eq!(
        cli.history("shop", "o-1"),
        before,
        "a malformed payload must not touch the store"
    );

    let no_transition = cli.run(&[
        "-n",
        "shop",
        "send",
        "o-1",
        "pay",
        "--payload",
        r#"{"amount": 40}"#,
    ]);
    no_transition.code(4);
    assert_eq!(
        no_transition.error_line(),
        "error: TransitionFailure: no transition for event 'pay' in state 'created' (state 'created' has no transition on 'pay')"
    );
    assert_eq!(cli.history("shop", "o-1"), before);

    cli.run(&[
        "-n",
        "shop",
        "send",
        "o-1",
        "complete",
        "--expected-version",
        "0",
    ])
    .ok();
    let stale = cli.run(&[
        "-n",
        "shop",
        "send",
        "o-1",
        "cancel",
        "--expected-version",
        "0",
    ]);
    stale.code(4);
    assert_eq!(
        stale.error_line(),
        "error: StaleState: expected version 0, but the instance is at version 1"
    );

    let guard = cli.run(&[
        "-n",
        "shop",
        "send",
        "o-1",
        "pay",
        "--payload",
        r#"{"amount": 10}"#,
    ]);
    guard
        .code(4)
        .stderr_has("error: TransitionFailure: no transition for event 'pay' in state 'validated'");

    // --data: must be JSON, and an object; checked before the store is touched.
    let bad_data = cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "--id",
        "o-3",
        "--data",
        "{",
    ]);
    bad_data
        .code(1)
        .stderr_has("error: Invalid: --data is not valid JSON")
        .stderr_has("line 1 column 1");
    cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "--data",
        "[1, 2]",
    ])
    .code(1)
    .stderr_has("--data must be a JSON object, got an array");
    cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "-l",
        "tier",
    ])
    .code(1)
    .stderr_has("'tier' must be key=value");
    cli.run(&["-n", "shop", "get", "instance", "o-3"]).code(3);

    cli.run(&["-n", "shop", "create", "instance", "no-such-machine"])
        .code(3)
        .stderr_has("statemachine shop/no-such-machine");
    cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "--id",
        "o-1",
    ])
    .code(4)
    .stderr_has("error: Conflict: ");
    cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "--id",
        "bad id!",
    ])
    .code(1)
    .stderr_has("error: Invalid: instance id");

    // Usage errors are clap's: exit 2.
    cli.run(&["-n", "shop", "send", "o-1"])
        .code(2)
        .stderr_has("EVENT");
    cli.run(&["get", "instances", "--status", "sleeping"])
        .code(2)
        .stderr_has("sleeping");
    cli.run(&["frobnicate"]).code(2);
}

#[test]
fn history_pages() {
    let cli = Cli::new();
    cli.order("o-1", r#"{"total": 1}"#);
    cli.run(&["-n", "shop", "send", "o-1", "complete"]).ok();
    cli.run(&[
        "-n",
        "shop",
        "send",
        "o-1",
        "pay",
        "--payload",
        r#"{"amount": 1}"#,
    ])
    .ok();
    cli.run(&["-n", "shop", "send", "o-1", "ship"]).ok();
    let page = cli
        .run(&[
            "-n", "shop", "history", "o-1", "--from", "1", "--limit", "2", "-o", "json",
        ])
        .ok()
        .json();
    let versions: Vec<u64> = page
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["version"].as_u64())
        .collect();
    assert_eq!(versions, [1, 2]);
    let wide = cli.run(&["-n", "shop", "history", "o-1", "-o", "wide", "--limit", "2"]);
    wide.ok().stdout_has("PREV-HASH").stderr_has("--from 2");
    let yaml = cli
        .run(&["-n", "shop", "history", "o-1", "-o", "yaml"])
        .ok()
        .stdout
        .clone();
    assert!(
        yaml.contains("prevHash:") && yaml.contains("kind: genesis"),
        "{yaml}"
    );
}

#[test]
fn describe_summarizes() {
    let cli = Cli::new();
    cli.order("o-1", r#"{"total": 40, "customer": "ada"}"#);
    cli.run(&["-n", "shop", "send", "o-1", "complete"]).ok();
    cli.run(&["-n", "shop", "describe", "instance", "o-1"])
        .ok()
        .stdout_has("Name:        o-1")
        .stdout_has("Machine:     order-processing (revision 1, ")
        .stdout_has("State:       validated")
        .stdout_has("Status:      active")
        .stdout_has("Version:     1")
        .stdout_has("Timer:       timeout due ")
        .stdout_has("\"customer\": \"ada\"")
        .stdout_has("Records (2 of 2):")
        .stdout_has("complete");
    cli.run(&["-n", "shop", "describe", "machine", "order-processing"])
        .ok()
        .stdout_has("Initial state: created")
        .stdout_has("States (7):")
        .stdout_has("validated   task    15m")
        .stdout_has("guard: event.amount >= data.total; assign: paidAmount = event.amount")
        .stdout_has("(timeout 30s)")
        .stdout_has("Instances:     1 (1 active, 0 succeeded, 0 failed, 0 cancelled)");
    cli.run(&["-n", "shop", "describe", "sm", "nope"])
        .code(3)
        .stderr_has("statemachine shop/nope not found");
}

#[test]
fn delete_machine_waits_for_active_instances() {
    let cli = Cli::new();
    cli.order("o-1", r#"{"total": 40}"#);
    let refused = cli.run(&["-n", "shop", "delete", "machine", "order-processing"]);
    refused.code(4);
    assert_eq!(
        refused.error_line(),
        "error: Conflict: statemachine shop/order-processing has 1 active instance(s) (o-1); it can be deleted once they have ended"
    );
    cli.run(&["-n", "shop", "get", "machine", "order-processing"])
        .ok();

    cli.run(&["-n", "shop", "send", "o-1", "cancel"]).ok();
    cli.run(&["-n", "shop", "delete", "machine", "order-processing"])
        .ok()
        .stdout_has("statemachine.statemachine.cn/order-processing deleted");
    cli.run(&["-n", "shop", "get", "machine", "order-processing"])
        .code(3);
    cli.run(&["-n", "shop", "delete", "machine", "order-processing"])
        .code(3)
        .stderr_has("not found");
}

#[test]
fn store_verify_counts_and_passes() {
    let cli = Cli::new();
    // A read-only command on a missing store refuses instead of creating one.
    cli.run(&["store", "verify"])
        .code(5)
        .stderr_has("error: Unavailable: no store at");
    cli.run(&["get", "machines"]).code(5);
    assert!(!cli.data_dir().exists());

    cli.order("o-1", r#"{"total": 40}"#);
    cli.run(&["-n", "shop", "send", "o-1", "complete"]).ok();
    cli.run(&["store", "verify"])
        .ok()
        .stdout_has("1 definition revision(s), 1 instance(s), 2 record(s) checked")
        .stdout_has("OK");
}

#[test]
fn a_locked_store_is_unavailable() {
    let cli = Cli::new();
    cli.order("o-1", r#"{"total": 40}"#);
    let held =
        cnsm_store::embedded::EmbeddedStore::open(&cli.data_dir()).expect("open store in the test");
    let locked = cli.run(&["-n", "shop", "get", "instances"]);
    locked.code(5);
    assert!(
        locked
            .error_line()
            .starts_with("error: Unavailable: cannot open the store in "),
        "{locked:#?}"
    );
    cli.run(&["-n", "shop", "send", "o-1", "complete"]).code(5);
    drop(held);
    cli.run(&["-n", "shop", "send", "o-1", "complete"]).ok();
}

#[test]
fn demo_tours_a_temporary_store() {
    let cli = Cli::new();
    let started = std::time::Instant::now();
    // Without --data-dir on the command line the demo uses a temporary store.
    let mut command = Command::new(env!("CARGO_BIN_EXE_cnsmctl"));
    command
        .arg("demo")
        .env_remove("CNSM_DATA_DIR")
        .current_dir(cli.dir.path());
    let run = output_of(command);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "demo took {:?}",
        started.elapsed()
    );
    run.ok()
        .stdout_has("statemachine.statemachine.cn/order-processing created (revision 1)")
        .stdout_has("statemachine.statemachine.cn/checkout created (revision 1)")
        .stdout_has("instance/o-1 created (state created, version 0)")
        .stdout_has("instance/o-1: created -> validated (version 1)")
        .stdout_has("error: TransitionFailure: no transition for event 'pay' in state 'validated'")
        .stdout_has("instance/o-1: validated -> paid (version 2)")
        .stdout_has("instance/o-1: paid -> shipped (version 3)")
        .stdout_has("instance/o-1: shipped -> delivered (version 4) [succeeded]")
        .stdout_has("PREV-HASH")
        .stdout_has("stateDiagram-v2")
        .stdout_has("5 record(s): OK");
    assert!(
        !cli.dir.path().join("cnsm-data").exists(),
        "the demo must not use ./cnsm-data"
    );

    // With --data-dir the store is kept, and a second run does not collide with the first.
    let dir = cli.data_dir();
    let dir_arg = dir.to_str().expect("utf-8 path");
    cli.run(&["demo", "--data-dir", dir_arg]).ok();
    cli.run(&["demo", "--data-dir", dir_arg])
        .ok()
        .stdout_has("unchanged (revision 1)");
    let items = cli
        .run(&[
            "-n",
            "shop",
            "get",
            "instances",
            "--state",
            "delivered",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(items["items"].as_array().map(Vec::len), Some(2));
}

fn output_of(mut command: Command) -> Run {
    let output = command.stdin(Stdio::null()).output().expect("run cnsmctl");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn help_teaches() {
    let cli = Cli::new();
    cli.run(&["--help"])
        .ok()
        .stdout_has("Exit codes:")
        .stdout_has("3  not found")
        .stdout_has("5  store unavailable")
        .stdout_has("cnsmctl demo");
    let cases: [(&[&str], &str); 8] = [
        (&["validate", "--help"], "cnsmctl validate -f -"),
        (&["apply", "--help"], "unchanged (revision 1)"),
        (&["send", "--help"], "--idempotency-key k1"),
        (&["get", "instances", "--help"], "--state paid -o wide"),
        (
            &["create", "instance", "--help"],
            "--data '{\"total\": 40}'",
        ),
        (&["history", "--help"], "prevHash"),
        (&["graph", "--help"], "--format dot"),
        (&["store", "verify", "--help"], "Exit code 1"),
    ];
    for (args, needle) in cases {
        cli.run(args).ok().stdout_has(needle);
    }
    cli.run(&["--version"]).ok().stdout_has("cnsmctl 0.1.0");
}

#[test]
fn data_dir_comes_from_the_environment() {
    let cli = Cli::new();
    let dir: &Path = cli.dir.path();
    let run = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cnsmctl"));
        command
            .args(args)
            .env("CNSM_DATA_DIR", dir.join("env-data"))
            .env("CNSM_NAMESPACE", "shop")
            .current_dir(dir);
        output_of(command)
    };
    run(&["apply", "-f", &example("order-processing.yaml")]).ok();
    run(&["get", "machines"])
        .ok()
        .stdout_has("order-processing");
    assert!(dir.join("env-data").is_dir());
}

#[test]
fn embedded_examples_match_the_shared_ones() {
    let embedded = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/");
    for name in [
        "order-processing.yaml",
        "payment-saga.yaml",
        "provisioning.yaml",
        "checkout-canary.yaml",
    ] {
        let ours = std::fs::read_to_string(format!("{embedded}{name}")).expect("embedded example");
        let shared = std::fs::read_to_string(example(name)).expect("shared example");
        assert_eq!(
            ours, shared,
            "crates/cnsmctl/examples/{name} drifted from shared/examples/{name}"
        );
    }
}

/// Backup (local, then through a serving server), restore into new directories, verify.
#[test]
fn store_backup_and_restore() {
    let cli = Cli::new();
    cli.order("o-1", r#"{"total": 40}"#);
    cli.order("o-2", r#"{"total": 5}"#);
    cli.run(&["-n", "shop", "send", "o-1", "complete"]).ok();
    let backup = cli.dir.path().join("backup.cnsm");
    let backup_arg = backup.to_str().expect("utf-8 path");
    cli.run(&["store", "backup", "--out", backup_arg])
        .ok()
        .stdout_has("2 instance(s), 3 record(s)");
    // Never overwritten.
    cli.run(&["store", "backup", "--out", backup_arg]).code(4);

    let restored = cli.dir.path().join("restored");
    let restored_arg = restored.to_str().expect("utf-8 path");
    let restore = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cnsmctl"));
        command
            .args(args)
            .env_remove("CNSM_DATA_DIR")
            .env_remove("CNSM_SERVER")
            .stdin(Stdio::null());
        command.output().expect("cnsmctl runs")
    };
    let done = restore(&["--data-dir", restored_arg, "store", "restore", backup_arg]);
    assert!(done.status.success(), "{done:?}");
    let again = restore(&["--data-dir", restored_arg, "store", "restore", backup_arg]);
    assert_eq!(again.status.code(), Some(4), "{again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds a store"),
        "{again:?}"
    );
    let listed = restore(&[
        "--data-dir",
        restored_arg,
        "-n",
        "shop",
        "get",
        "instances",
        "-o",
        "json",
    ]);
    assert!(listed.status.success(), "{listed:?}");
    let items: Value = serde_json::from_slice(&listed.stdout).expect("json");
    let states: Vec<&str> = items["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["state"].as_str())
        .collect();
    assert_eq!(states, ["validated", "created"]);
    let verified = restore(&["--data-dir", restored_arg, "store", "verify"]);
    assert!(verified.status.success(), "{verified:?}");

    // Through a server that keeps serving: the copy is downloaded and checked on arrival.
    let server_dir = tempfile::tempdir().expect("tempdir");
    let server = server::ServerChild::start(server_dir.path());
    let mut remote = Cli::new();
    remote.server = Some(server.url.clone());
    remote.order("r-1", r#"{"total": 40}"#);
    let remote_backup = remote.dir.path().join("remote.cnsm");
    let remote_arg = remote_backup.to_str().expect("utf-8 path");
    remote
        .run(&["store", "backup", "--out", remote_arg])
        .ok()
        .stdout_has("1 instance(s), 1 record(s)");
    remote.run(&["-n", "shop", "send", "r-1", "complete"]).ok();
    let target = remote.dir.path().join("from-server");
    let target_arg = target.to_str().expect("utf-8 path");
    let done = restore(&["--data-dir", target_arg, "store", "restore", remote_arg]);
    assert!(done.status.success(), "{done:?}");
    let refused = remote.run(&["store", "restore", remote_arg]);
    refused.code(1);
}

fn core_fixture(name: &str) -> String {
    format!(
        "{}/../cnsm-core/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn run_migration_script(cli: &Cli) {
    cli.order("o-1", r#"{"total": 40}"#);
    cli.order("o-2", r#"{"total": 40}"#);
    cli.run(&["-n", "shop", "send", "o-2", "complete"]).ok();
    cli.run(&[
        "-n",
        "shop",
        "send",
        "o-2",
        "pay",
        "--payload",
        r#"{"amount": 40}"#,
    ])
    .ok();
    cli.order("o-3", r#"{"total": 40}"#);
    cli.run(&["-n", "shop", "send", "o-3", "cancel"]).ok();
    let v2 = core_fixture("order-processing-v2.yaml");
    cli.run(&["apply", "-f", &v2])
        .ok()
        .stdout_has("(revision 2)")
        .stderr_has("breaking-change")
        .stderr_has("state 'paid' is removed, but 1 running instance(s) are in it");
    cli.run(&["-n", "shop", "diff", "order-processing", "1", "2"])
        .ok()
        .stdout_has("+ state packed")
        .stdout_has("- state validated");
    let policy = core_fixture("order-migration.yaml");
    let base = [
        "-n",
        "shop",
        "migrate",
        "order-processing",
        "--from",
        "1",
        "--to",
        "2",
        "--policy",
        &policy,
    ];
    let mut dry = base.to_vec();
    dry.push("--dry-run");
    cli.run(&dry)
        .ok()
        .stdout_has("instance/o-2: ok (paid -> payment-received)")
        .stdout_has("2 instance(s) would migrate, 0 blocked");
    cli.run(&["-n", "shop", "get", "instance", "o-2", "-o", "json"])
        .ok()
        .stdout_has("\"revision\": 1");
    let mut pre = base.to_vec();
    pre.extend(["--phase", "pre"]);
    cli.run(&pre).ok().stdout_has("instance/o-1: locked");
    let locked = cli.run(&["-n", "shop", "send", "o-1", "complete"]);
    locked.code(4);
    assert!(
        locked.error_line().contains("Locked") && locked.error_line().contains("order-v1-to-v2"),
        "{locked:#?}"
    );
    cli.run(&base)
        .ok()
        .stdout_has("instance/o-1: migrated (created -> created)")
        .stdout_has("2 instance(s) migrated, 0 blocked");
    cli.run(&["-n", "shop", "history", "o-2", "-o", "json"])
        .ok()
        .stdout_has("\"kind\": \"migration\"");
    // Canary rollout: status, set, promote (clears: revision 2 is the latest), abort refused.
    cli.run(&["-n", "shop", "rollout", "status", "order-processing"])
        .ok()
        .stdout_has("no rollout; new instances get the latest revision 2");
    cli.run(&[
        "-n",
        "shop",
        "rollout",
        "set",
        "order-processing",
        "--revision",
        "2",
        "--weight",
        "10",
    ])
    .ok()
    .stdout_has("rollout revision 2 10% / revision 1 90%");
    let status = cli
        .run(&[
            "-n",
            "shop",
            "rollout",
            "status",
            "order-processing",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(status["rollout"]["weight"], 10, "{status}");
    cli.run(&["-n", "shop", "rollout", "promote", "order-processing"])
        .ok()
        .stdout_has("no rollout; new instances get the latest revision 2");
    cli.run(&["-n", "shop", "rollout", "abort", "order-processing"])
        .code(1)
        .stderr_has("no rollout in progress");
    let mut rollback = vec!["-n", "shop", "migrate", "rollback"];
    rollback.extend_from_slice(&base[3..]);
    let back = cli.run(&rollback);
    // created: both created and validated map to it, so there is no single way back.
    back.code(4).stdout_has("instance/o-1: blocked");
    back.stdout_has("instance/o-2: migrated (payment-received -> paid)");
    cli.run(&["-n", "shop", "send", "o-2", "ship"])
        .ok()
        .stdout_has("paid -> shipped");
}

#[test]
fn diff_and_migrate_with_dry_run_phases_and_rollback() {
    run_migration_script(&Cli::new());
}

#[test]
fn diff_and_migrate_through_a_server() {
    let server_dir = tempfile::tempdir().expect("tempdir");
    let server = server::ServerChild::start(server_dir.path());
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    run_migration_script(&cli);
}
