//! `cnsmctl deliveries` and `deliveries redrive`, locally and through a server (`--server`):
//! the same listing either way, redrive marks kept with who asked, refusals with exit codes.

use cnsm_store::embedded::EmbeddedStore;
use cnsm_store::{DeadLetter, Store};

use super::{Cli, server::ServerChild};

const TARGET: &str = "shop/order-processing/fulfilment";

fn letter(position: u64) -> DeadLetter {
    DeadLetter {
        target: TARGET.into(),
        position,
        namespace: "shop".into(),
        instance: format!("o-{position}"),
        version: 2,
        event_id: format!("shop/o-{position}/2/0011223344556677"),
        attempts: 8,
        last_error: "HTTP 503".into(),
        failed_ms: 1_764_237_600_000,
        redrive: None,
    }
}

#[test]
fn deliveries_list_and_redrive_locally_and_through_a_server() {
    let cli = Cli::new();
    {
        let store = EmbeddedStore::open(&cli.data_dir()).expect("store");
        for position in [5, 9, 12] {
            store.put_dead_letter(&letter(position)).expect("letter");
        }
        store.close().expect("close");
    }
    let listed = cli.run(&["deliveries", "-o", "json"]).ok().json();
    assert_eq!(listed["deadLetters"].as_array().map(Vec::len), Some(3));

    cli.run(&[
        "deliveries",
        "redrive",
        "--target",
        TARGET,
        "--position",
        "9",
        "--actor",
        "oncall",
    ])
    .ok()
    .stdout_has(&format!(
        "dead letter {TARGET} at position 9 marked for redrive"
    ));
    let missing = cli.run(&[
        "deliveries",
        "redrive",
        "--target",
        TARGET,
        "--position",
        "6",
    ]);
    missing.code(3);
    assert!(
        missing.error_line().contains("at commit position 6"),
        "{missing:#?}"
    );
    cli.run(&["deliveries", "redrive", "--target", "shop/order-processing"])
        .code(2);
    cli.run(&[
        "deliveries",
        "redrive",
        "--target",
        TARGET,
        "--position",
        "5",
        "--all",
    ])
    .code(2);
    cli.run(&["deliveries", "redrive", "--target", "shop/x", "--all"])
        .code(1);
    let local = cli.run(&["deliveries", "-o", "json"]).ok().json();
    let marks: Vec<&serde_json::Value> = local["deadLetters"]
        .as_array()
        .expect("letters")
        .iter()
        .map(|d| &d["redrive"]["actor"])
        .collect();
    assert_eq!(
        marks,
        [
            &serde_json::Value::Null,
            &"oncall".into(),
            &serde_json::Value::Null
        ]
    );
    cli.run(&["deliveries"])
        .ok()
        .stdout_has("Dead letters: 3")
        .stdout_has("pending (oncall)");

    // Through a server on the same store: the same listing, and a redrive of them all.
    let server = ServerChild::start(&cli.data_dir());
    let mut remote = Cli::new();
    remote.server = Some(server.url.clone());
    let served = remote.run(&["deliveries", "-o", "json"]).ok().json();
    assert_eq!(served, local);
    remote
        .run(&["deliveries", "redrive", "--target", TARGET, "--all"])
        .ok()
        .stdout_has(&format!("3 dead letter(s) of {TARGET} marked for redrive"));
    remote
        .run(&[
            "deliveries",
            "redrive",
            "--target",
            TARGET,
            "--position",
            "6",
        ])
        .code(3);
    remote
        .run(&["deliveries", "--target", TARGET])
        .ok()
        .stdout_has("pending (cnsmctl)");
    assert!(!remote.data_dir().exists());
}
