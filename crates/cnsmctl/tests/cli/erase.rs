//! `cnsmctl erase`: personal data leaves an instance's data and history, locally and through a
//! server; `store verify` stays green; an erased instance survives a signed snapshot round trip;
//! tampering with a redacted record is reported with the instance and version.

use serde_json::Value;

use super::{Cli, server};

const EMAIL: &str = "ann@example.com";
const NAME: &str = "Ann Berg";
const CARD: &str = "4111-1111";

/// Every string anywhere in `value`.
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

#[track_caller]
fn assert_lacks(value: &Value, needles: &[&str]) {
    let mut all = Vec::new();
    strings(value, &mut all);
    for needle in needles {
        assert!(
            !all.iter().any(|s| s.contains(needle)),
            "{needle:?} is still there: {value}"
        );
    }
}

#[track_caller]
fn assert_has(value: &Value, needle: &str) {
    let mut all = Vec::new();
    strings(value, &mut all);
    assert!(
        all.iter().any(|s| s.contains(needle)),
        "{needle:?} is missing: {value}"
    );
}

fn kinds(history: &Value) -> Vec<String> {
    history
        .as_array()
        .expect("history is an array")
        .iter()
        .filter_map(|r| r["kind"].as_str().map(str::to_owned))
        .collect()
}

/// o-1 in shop: personal data in its data (genesis) and in the `pay` event's payload.
fn personal_order(cli: &Cli) {
    cli.order(
        "o-1",
        &format!(r#"{{"total": 40, "customer": {{"email": "{EMAIL}", "name": "{NAME}"}}}}"#),
    );
    cli.run(&["-n", "shop", "send", "o-1", "complete"]).ok();
    cli.run(&[
        "-n",
        "shop",
        "send",
        "o-1",
        "pay",
        "--payload",
        &format!(r#"{{"amount": 40, "card": "{CARD}"}}"#),
    ])
    .ok();
}

/// Field erasure, then full erasure, then the refusals; `verify` (`store verify`) green after
/// each.
fn run_erase(cli: &Cli, verify: &mut dyn FnMut()) {
    personal_order(cli);
    let instance = cli
        .run(&["-n", "shop", "get", "instances", "o-1", "-o", "json"])
        .ok()
        .json();
    assert_has(&instance, EMAIL);

    // One path: only the e-mail goes, from the genesis data.
    cli.run(&[
        "-n",
        "shop",
        "erase",
        "o-1",
        "--field",
        "customer.email",
        "--reason",
        "request 4711",
    ])
    .ok()
    .stdout_has(
        "instance/o-1 erased (customer.email): 1 record(s) redacted, erasure record at version 3",
    );
    let instance = cli
        .run(&["-n", "shop", "get", "instances", "o-1", "-o", "json"])
        .ok()
        .json();
    assert_lacks(&instance, &[EMAIL]);
    assert_eq!(instance["data"]["customer"]["email"], "[erased]");
    assert_eq!(instance["data"]["customer"]["name"], NAME);
    let history = cli.history("shop", "o-1");
    assert_lacks(&history, &[EMAIL]);
    assert_has(&history, CARD);
    assert_eq!(history[3]["kind"], "erasure");
    assert_eq!(history[3]["erasure"]["reason"], "request 4711");
    assert_eq!(history[3]["erasure"]["fields"][0], "customer.email");
    assert_eq!(history[3]["erasure"]["records"][0]["version"], 0);
    verify();

    // Everything: data and payloads, JSON output.
    let erased = cli
        .run(&["-n", "shop", "erase", "o-1", "--actor", "dpo", "-o", "json"])
        .ok()
        .json();
    assert_eq!(erased["record"]["kind"], "erasure");
    assert_eq!(erased["record"]["actor"], "dpo");
    assert_eq!(erased["instance"]["version"], 4);
    assert_eq!(erased["instance"]["state"], "paid");
    let instance = cli
        .run(&["-n", "shop", "get", "instances", "o-1", "-o", "json"])
        .ok()
        .json();
    assert_lacks(&instance, &[EMAIL, NAME, CARD]);
    let history = cli.history("shop", "o-1");
    assert_lacks(&history, &[EMAIL, NAME, CARD]);
    assert_eq!(
        kinds(&history),
        ["genesis", "event", "event", "erasure", "erasure"]
    );
    assert_eq!(history[2]["payload"]["card"], "[erased]");
    // States, events and hashes stay.
    assert_eq!(history[2]["event"], "pay");
    assert_eq!(history[2]["to"], "paid");
    verify();

    // Refusals name the problem and change nothing.
    let bad = cli.run(&["-n", "shop", "erase", "o-1", "--field", "customer..email"]);
    bad.code(1);
    assert!(bad.error_line().contains("fields[0]"), "{bad:#?}");
    let missing = cli.run(&["-n", "shop", "erase", "nope"]);
    missing.code(3);
    assert_eq!(
        cli.history("shop", "o-1"),
        history,
        "refusals change nothing"
    );
    // The instance goes on (its data now holds the markers).
    cli.run(&["-n", "shop", "send", "o-1", "ship"]).ok();
}

#[test]
fn erase_locally() {
    let cli = Cli::new();
    run_erase(&cli, &mut || {
        cli.run(&["store", "verify"]).ok().stdout_has("OK");
    });
}

/// The same through `cnsmctl serve`; `store verify` reads the store file, so it runs on the
/// server's data directory after the server has drained and stopped.
#[test]
fn erase_through_a_server() {
    let host = Cli::new();
    let mut server = server::ServerChild::start(&host.data_dir());
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    run_erase(&cli, &mut || {});
    assert!(!cli.data_dir().exists());
    server.signal("TERM");
    let (status, stderr) = server.wait();
    assert!(status.success(), "{stderr}");
    host.run(&["store", "verify"]).ok().stdout_has("OK");
    let history = host.history("shop", "o-1");
    assert_lacks(&history, &[EMAIL, NAME, CARD]);
}

/// An erased instance: exported, verified, imported elsewhere; the markers and the verification
/// survive.
#[test]
fn an_erased_instance_round_trips_through_a_snapshot() {
    let source = Cli::new();
    let target = Cli::new();
    personal_order(&source);
    source.run(&["-n", "shop", "erase", "o-1"]).ok();
    let dir = source.dir.path();
    let key = dir.join("key.pem");
    let public = dir.join("key.pub.pem");
    let snapshot = dir.join("shop.snapshot");
    let (key, public, snapshot) = (
        key.to_str().unwrap(),
        public.to_str().unwrap(),
        snapshot.to_str().unwrap(),
    );
    source.run(&["keys", "generate", "--out", key]).ok();
    source
        .run(&[
            "-n", "shop", "snapshot", "export", "--all", "--key", key, "-o", snapshot,
        ])
        .ok()
        .stdout_has("1 instance(s), 4 record(s)");
    let bytes = std::fs::read(snapshot).expect("read the snapshot");
    for needle in [EMAIL, NAME, CARD] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the snapshot holds {needle:?}"
        );
    }
    target
        .run(&["snapshot", "verify", snapshot, "--public-key", public])
        .ok()
        .stdout_has("VERIFIED");
    target
        .run(&[
            "-n",
            "shop",
            "snapshot",
            "import",
            snapshot,
            "--public-key",
            public,
        ])
        .ok()
        .stdout_has("1 instance(s) (0 replaced), 4 record(s)");
    target.run(&["store", "verify"]).ok().stdout_has("OK");
    let history = target.history("shop", "o-1");
    assert_eq!(kinds(&history), ["genesis", "event", "event", "erasure"]);
    assert_eq!(history[0]["data"]["customer"], "[erased]");
    assert_eq!(history[2]["payload"]["card"], "[erased]");
    assert_lacks(&history, &[EMAIL, NAME, CARD]);
    assert_eq!(
        history,
        source.history("shop", "o-1"),
        "the same records on both sides"
    );
}

/// A byte of a redacted record changed again (below the store's checks): `store verify` names
/// the instance and the version and exits 1.
#[test]
fn a_tampered_redacted_record_fails_store_verify() {
    let cli = Cli::new();
    personal_order(&cli);
    cli.run(&["-n", "shop", "erase", "o-1"]).ok();
    cli.run(&["store", "verify"]).ok();
    cnsm_store::embedded::testing::flip_record_byte(&cli.data_dir(), "shop", "o-1", 2, 40)
        .expect("flip a byte of record 2");
    let verify = cli.run(&["store", "verify"]);
    verify.code(1).stdout_has("problem: ");
    let problems: Vec<&str> = verify
        .stdout
        .lines()
        .filter(|l| l.starts_with("problem: "))
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("shop/o-1") && p.contains("record 2")),
        "{verify:#?}"
    );
}
