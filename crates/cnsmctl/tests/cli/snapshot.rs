//! `keys generate` and `snapshot export|verify|import`, locally and through a server: exit
//! codes, the files written, refusals that change nothing.

use super::{Cli, server};

/// Exports shop from `source`, verifies, imports into `target`; checks every refusal.
fn round_trip(source: &Cli, target: &Cli) {
    source.order("o-1", r#"{"total": 40}"#);
    source.order("o-2", r#"{"total": 10}"#);
    source.run(&["-n", "shop", "send", "o-1", "complete"]).ok();
    // Keys and files live in the source's directory.
    let dir = source.dir.path();
    let key = dir.join("signing-key.pem");
    let public = dir.join("signing-key.pub.pem");
    let snapshot = dir.join("shop.snapshot");
    let (key, public, snapshot) = (
        key.to_str().unwrap(),
        public.to_str().unwrap(),
        snapshot.to_str().unwrap(),
    );
    source
        .run(&["keys", "generate", "--out", key])
        .ok()
        .stdout_has("signing-key.pub.pem");
    source
        .run(&["keys", "generate", "--out", key])
        .code(4)
        .stderr_has("--force");
    source
        .run(&[
            "-n", "shop", "snapshot", "export", "--key", key, "-o", snapshot,
        ])
        .code(2);
    source
        .run(&[
            "-n", "shop", "snapshot", "export", "--all", "--key", key, "-o", snapshot,
        ])
        .ok()
        .stdout_has("2 instance(s), 3 record(s), 1 definition revision(s)");
    target
        .run(&["snapshot", "verify", snapshot, "--public-key", public])
        .ok()
        .stdout_has("VERIFIED");

    // A flipped byte: exit 1 naming the step; the import changes nothing.
    let mut bytes = std::fs::read(snapshot).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 1;
    let bad = dir.join("bad.snapshot");
    std::fs::write(&bad, &bytes).unwrap();
    let bad = bad.to_str().unwrap();
    target
        .run(&["snapshot", "verify", bad, "--public-key", public])
        .code(1)
        .stderr_has("step 2 (digest)");
    target
        .run(&[
            "-n",
            "shop",
            "snapshot",
            "import",
            bad,
            "--public-key",
            public,
        ])
        .code(1);
    // Nothing there: no store at all locally (verification runs before the store opens), an
    // empty namespace on a server.
    let listed = target.run(&["-n", "shop", "get", "instances"]);
    assert!(!listed.stdout.contains("o-1"), "{listed:#?}");

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
        .stdout_has("2 instance(s) (0 replaced), 3 record(s)");
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
        .code(4)
        .stderr_has("already exist");
    target.run(&["-n", "shop", "send", "o-1", "cancel"]).ok();
    target
        .run(&[
            "-n",
            "shop",
            "snapshot",
            "import",
            snapshot,
            "--public-key",
            public,
            "--replace",
        ])
        .ok()
        .stdout_has("(2 replaced)");
    let o1 = target
        .run(&["-n", "shop", "get", "instances", "o-1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(o1["state"], "validated", "{o1}");
}

#[test]
fn snapshots_round_trip_between_stores() {
    let source = Cli::new();
    let target = Cli::new();
    round_trip(&source, &target);
    target.run(&["store", "verify"]).ok();
}

#[test]
fn snapshots_round_trip_between_servers() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let server_a = server::ServerChild::start(a.path());
    let server_b = server::ServerChild::start(b.path());
    let mut source = Cli::new();
    source.server = Some(server_a.url.clone());
    let mut target = Cli::new();
    target.server = Some(server_b.url.clone());
    round_trip(&source, &target);
}
