//! `--flags FILE`: local commands evaluate `flag:` gates with the flagd file; `validate` warns on
//! gate keys the file does not define; a bad file is refused up front.

use super::{Cli, example};

const FLAGS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../../shared/examples/flags.json"
);

#[test]
fn validate_warns_on_flag_keys_the_file_lacks() {
    let cli = Cli::new();
    let machine = example("checkout-canary.yaml");
    cli.run(&["validate", "-f", &machine, "--flags", FLAGS])
        .ok()
        .stdout_has(&format!("{machine}: valid"));
    let empty = cli.dir.path().join("empty.json");
    std::fs::write(&empty, r#"{"flags": {}}"#).expect("write");
    let empty = empty.to_string_lossy().into_owned();
    cli.run(&["validate", "-f", &machine, "--flags", &empty])
        .ok()
        .stdout_has(&format!("{machine}: valid (1 warning(s))"))
        .stderr_has("warning[flag-undefined]: flag 'one-click-checkout' is not defined");
    let broken = cli.dir.path().join("broken.json");
    std::fs::write(&broken, "{ nope").expect("write");
    let broken = broken.to_string_lossy().into_owned();
    cli.run(&["validate", "-f", &machine, "--flags", &broken])
        .code(2)
        .stderr_has("not valid JSON");
}

#[test]
fn local_commands_evaluate_gates_with_the_flag_file() {
    let cli = Cli::new();
    let flags = ["--flags", FLAGS];
    cli.run(&["apply", "-f", &example("checkout-canary.yaml")])
        .ok();
    for (id, tier) in [("gold-1", "tier=gold"), ("plain-1", "tier=bronze")] {
        cli.run(&[
            "-n", "shop", "create", "instance", "checkout", "--id", id, "--label", tier,
        ])
        .ok();
    }
    cli.run(&[&flags[..], &["-n", "shop", "send", "gold-1", "checkout"]].concat())
        .ok()
        .stdout_has("cart -> one-click-review");
    // Without --flags no provider evaluates the gate: it denies, the fallback is taken.
    cli.run(&["-n", "shop", "send", "plain-1", "checkout"])
        .ok()
        .stdout_has("cart -> address");
    let history = cli.history("shop", "plain-1");
    let decision = &history[1]["flags"][0];
    assert_eq!(decision["reason"], "ERROR", "{history}");
    assert_eq!(decision["allowed"], false);
}

/// `serve --flags`: gates evaluate on the server, and each gate's status is a metric.
#[test]
fn served_gates_and_their_status_metric() {
    let server_dir = tempfile::tempdir().expect("tempdir");
    let server = super::server::ServerChild::start_with(
        server_dir.path(),
        &["--listen", "127.0.0.1:0", "--flags", FLAGS],
    );
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    cli.run(&["apply", "-f", &example("checkout-canary.yaml")])
        .ok();
    cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "checkout",
        "--id",
        "gold-1",
        "--label",
        "tier=gold",
    ])
    .ok();
    cli.run(&["-n", "shop", "send", "gold-1", "checkout"])
        .ok()
        .stdout_has("cart -> one-click-review");
    let address = server.url.trim_start_matches("http://").to_owned();
    let mut stream = std::net::TcpStream::connect(&address).expect("connect");
    use std::io::{Read, Write};
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let line = response
        .lines()
        .find(|l| l.starts_with("cnsm_flag_gate_status") && l.contains("one-click-checkout"))
        .unwrap_or_else(|| panic!("no gate status metric in:\n{response}"));
    assert!(line.contains("ACTIVE"), "{line}");
    assert!(line.trim_end().ends_with(" 1"), "{line}");
}
