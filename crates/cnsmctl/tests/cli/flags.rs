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
