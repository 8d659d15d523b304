//! Issue 8's migration test: 10,000 orders spread over every state of order-processing,
//! migrated to revision 2 by the `cnsmctl` binary, which is SIGKILLed midway and run again.
//! Every active instance ends migrated exactly once, chains verify, timers follow revision 2's
//! timeouts, and an event is refused with `Locked` during `pre` and accepted after `post`.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;

use cnsm_core::record::RecordKind;
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeOptions, VirtualClock};
use cnsm_store::embedded::EmbeddedStore;
use cnsm_store::{InstanceQuery, Store};

use super::{Cli, core_fixture, example};

const N_INSTANCES: usize = 10_000;

/// The event paths that leave an order in each of the seven states of revision 1.
const PATHS: [(&str, &[(&str, &str)]); 7] = [
    ("created", &[]),
    ("validated", &[("complete", "null")]),
    (
        "paid",
        &[("complete", "null"), ("pay", r#"{"amount": 40}"#)],
    ),
    (
        "shipped",
        &[
            ("complete", "null"),
            ("pay", r#"{"amount": 40}"#),
            ("ship", "null"),
        ],
    ),
    (
        "delivered",
        &[
            ("complete", "null"),
            ("pay", r#"{"amount": 40}"#),
            ("ship", "null"),
            ("deliver", "null"),
        ],
    ),
    (
        "refunded",
        &[
            ("complete", "null"),
            ("pay", r#"{"amount": 40}"#),
            ("refund", "null"),
        ],
    ),
    ("cancelled", &[("cancel", "null")]),
];

/// Revision 2's timeout (seconds) of each state an active order is in after the migration.
fn v2_timeout_s(state: &str) -> u64 {
    match state {
        "created" => 60,
        "payment-received" => 604_800,
        "packed" => 86_400,
        "shipped" => 1_209_600,
        other => panic!("no active order should be in {other}"),
    }
}

/// Creates the orders through the runtime library, on a clock an hour ahead, so the
/// 30-second timeout of `created` cannot fire while the binary runs the migration (the
/// binary's commands run timers on the real clock).
fn populate(cli: &Cli) {
    let store = EmbeddedStore::open(&cli.data_dir()).expect("open the store");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let options =
        RuntimeOptions::default().with_clock(Arc::new(VirtualClock::new(now_ms + 3_600_000)));
    let runtime = Arc::new(Runtime::open(store, options).expect("runtime"));
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let workers = 256;
    tokio.block_on(async {
        let mut tasks = Vec::new();
        for worker in 0..workers {
            let runtime = Arc::clone(&runtime);
            tasks.push(tokio::spawn(async move {
                let mut i = worker;
                while i < N_INSTANCES {
                    let id = format!("o-{i:05}");
                    runtime
                        .create_instance(
                            CreateInstance::new("shop", "order-processing")
                                .id(id.clone())
                                .data(serde_json::from_str(r#"{"total": 40}"#).expect("json")),
                        )
                        .await
                        .expect("create");
                    for (event, payload) in PATHS[i % PATHS.len()].1 {
                        let payload = serde_json::from_str(payload).expect("json");
                        runtime
                            .send("shop", &id, EventRequest::new(*event).payload(payload))
                            .await
                            .expect("event");
                    }
                    i += workers;
                }
            }));
        }
        for task in tasks {
            task.await.expect("worker");
        }
    });
    drop(tokio);
    Arc::try_unwrap(runtime)
        .expect("the only handle")
        .shutdown();
}

#[test]
fn ten_thousand_orders_migrate_exactly_once_across_a_sigkill() {
    let started = Instant::now();
    let cli = Cli::new();
    cli.run(&["apply", "-f", &example("order-processing.yaml")])
        .ok();
    populate(&cli);
    let populated = started.elapsed();
    cli.run(&["apply", "-f", &core_fixture("order-processing-v2.yaml")])
        .ok()
        .stdout_has("(revision 2)")
        .stderr_has("breaking-change");
    let policy = core_fixture("order-migration.yaml");
    let migrate = |extra: &[&str]| {
        let mut args = vec![
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
            "--chunk",
            "500",
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    // Orders i with i % 7 < 4 end in created, validated, paid or shipped: still active.
    let n_active = N_INSTANCES / PATHS.len() * 4 + (N_INSTANCES % PATHS.len()).min(4);

    // Run the migration and SIGKILL it once progress shows some, but not all, instances done.
    let args = migrate(&["--progress", "lines"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = cli
        .command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cnsmctl migrate");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut killed_at = None;
    for line in stderr.lines() {
        let line = line.expect("stderr line");
        let Some(progress) = line.strip_prefix("migrating: ") else {
            continue;
        };
        let (done, total) = progress
            .trim_end_matches(" instances")
            .split_once('/')
            .expect("done/total");
        let (done, total): (usize, usize) = (done.parse().unwrap(), total.parse().unwrap());
        assert_eq!(total, n_active, "{line}");
        if done > 0 && done < total {
            child.kill().expect("SIGKILL");
            killed_at = Some(done);
            break;
        }
    }
    child.wait().expect("reap");
    let killed_at = killed_at.expect("the migration was killed midway");

    // What the kill left: some instances migrated, none half-migrated; maybe a chunk locked.
    let (migrated, locked) = {
        let store = EmbeddedStore::open(&cli.data_dir()).expect("open");
        let mut migrated = 0;
        let mut locked = Vec::new();
        for i in instances(&store, Some(cnsm_core::Status::Active)) {
            if i.revision == 2 {
                migrated += 1;
                assert!(i.lock.is_none(), "{} is migrated and still locked", i.id);
            } else if i.lock.is_some() && ["created", "validated"].contains(&&*i.state) {
                locked.push(i.id.to_string());
            }
        }
        store.close().expect("close");
        (migrated, locked)
    };
    assert!(
        migrated >= killed_at && migrated < n_active,
        "killed after {killed_at}: {migrated} of {n_active} migrated"
    );

    // Resume in two steps: `pre` locks the rest; events to a locked instance are refused.
    let args = migrate(&["--phase", "pre"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cli.run(&args).ok().stdout_has(": locked");
    let probe = locked.first().cloned().unwrap_or_else(|| {
        let store = EmbeddedStore::open(&cli.data_dir()).expect("open");
        let id = instances(&store, Some(cnsm_core::Status::Active))
            .into_iter()
            .find(|i| i.revision == 1 && i.state.as_ref() == "created")
            .expect("a created order still at revision 1")
            .id
            .to_string();
        store.close().expect("close");
        id
    });
    let refused = cli.run(&["-n", "shop", "send", &probe, "cancel"]);
    refused.code(4);
    assert!(
        refused.error_line().contains("Locked") && refused.error_line().contains("order-v1-to-v2"),
        "{refused:#?}"
    );

    // Run to completion.
    let args = migrate(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let done = cli.run(&args);
    done.ok().stdout_has(&format!(
        "{} instance(s) migrated, 0 blocked",
        n_active - migrated
    ));

    // Every active order: revision 2, unlocked, exactly one migration record (after exactly one
    // lock record per run that locked it), its timer armed by the migration under revision 2.
    {
        let store = EmbeddedStore::open(&cli.data_dir()).expect("open");
        let active = instances(&store, Some(cnsm_core::Status::Active));
        assert_eq!(active.len(), n_active);
        for instance in &active {
            assert_eq!(instance.revision, 2, "{}", instance.id);
            assert!(instance.lock.is_none(), "{} still locked", instance.id);
            let history = store.history("shop", &instance.id, 0, 64).expect("history");
            let records: Vec<_> = history
                .iter()
                .map(|s| s.open().expect("record decodes"))
                .collect();
            let migrations: Vec<_> = records
                .iter()
                .filter(|r| r.kind == RecordKind::Migration)
                .collect();
            assert_eq!(migrations.len(), 1, "{}: {records:#?}", instance.id);
            let migration = migrations[0];
            assert_eq!(migration.revision, 2);
            assert_eq!(&*migration.to, &*instance.state);
            let timer = instance.timer.as_ref().expect("an armed timer");
            assert_eq!(
                timer.due_ms,
                migration.time_ms + v2_timeout_s(&instance.state) * 1000,
                "{}",
                instance.id
            );
            assert_eq!(instance.data["currency"], "EUR");
            assert_eq!(instance.data["totalCents"], 4000);
        }
        // Finished orders stay where they were.
        let finished = instances(&store, None)
            .into_iter()
            .filter(|i| i.status.is_final())
            .collect::<Vec<_>>();
        assert_eq!(finished.len(), N_INSTANCES - n_active);
        assert!(finished.iter().all(|i| i.revision == 1));
        store.close().expect("close");
    }
    cli.run(&["store", "verify"]).ok();

    // After `post` the probe takes events again (revision 2's `created` takes the payment).
    cli.run(&[
        "-n",
        "shop",
        "send",
        &probe,
        "pay",
        "--payload",
        r#"{"amount": 40}"#,
    ])
    .ok()
    .stdout_has("created -> payment-received");
    eprintln!(
        "populated {N_INSTANCES} in {:.1} s, whole test {:.1} s",
        populated.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// The instances of namespace shop (with this status), a page at a time.
fn instances(store: &EmbeddedStore, status: Option<cnsm_core::Status>) -> Vec<cnsm_core::Instance> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_instances(&InstanceQuery {
                namespace: Some("shop".into()),
                status,
                after: after.take(),
                limit: cnsm_store::PAGE_LEN_MAX,
                ..InstanceQuery::default()
            })
            .expect("list");
        let full = page.len() == cnsm_store::PAGE_LEN_MAX;
        if let Some(last) = page.last() {
            after = Some((
                last.instance.namespace.to_string(),
                last.instance.id.to_string(),
            ));
        }
        out.extend(page.into_iter().map(|s| s.instance));
        if !full {
            return out;
        }
    }
}

/// The flag file of the routing tests: label tier=gold gets revision 2, tier=odd a variant
/// naming revision 9 (which does not exist), everyone else `rest`. The variants' values are
/// integers, or strings of digits with `quoted`.
fn routing_flags(rest: &str, quoted: bool) -> String {
    let q = if quoted { "\"" } else { "" };
    format!(
        r#"{{"flags": {{"order-revision": {{
            "state": "ENABLED",
            "variants": {{"one": {q}1{q}, "two": {q}2{q}, "nine": {q}9{q}}},
            "defaultVariant": "one",
            "targeting": {{"if": [
                {{"==": [{{"var": "tier"}}, "gold"]}}, "two",
                {{"==": [{{"var": "tier"}}, "odd"]}}, "nine",
                "{rest}"
            ]}}
        }}}}}}"#
    )
}

/// Creates `id` (with `label`, if any) and answers its revision and its genesis routing decision.
fn create_routed(cli: &Cli, flags: &[&str], id: &str, label: Option<&str>) -> (u64, Value) {
    let mut args: Vec<&str> = flags.to_vec();
    args.extend([
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "--id",
        id,
    ]);
    args.extend(["--data", r#"{"total": 40}"#]);
    if let Some(label) = label {
        args.extend(["--label", label]);
    }
    cli.run(&args).ok();
    let instance = cli
        .run(&["-n", "shop", "get", "instance", id, "-o", "json"])
        .ok()
        .json();
    let history = cli.history("shop", id);
    let decision = history[0]["flags"][0].clone();
    (instance["revision"].as_u64().expect("revision"), decision)
}

/// `rollout set --flag`: new instances are routed by the flag's value, evaluated with the
/// instance's labels; the decision is in the genesis record; a value naming no revision falls
/// back to the stable revision with reason ERROR; a changed flag file routes new instances anew.
fn run_flag_routing(cli: &Cli, flags_file: &std::path::Path, flags: &[&str], quoted: bool) {
    cli.run(&["apply", "-f", &example("order-processing.yaml")])
        .ok();
    cli.run(&["apply", "-f", &core_fixture("order-processing-v2.yaml")])
        .ok();
    cli.run(&[
        "-n",
        "shop",
        "rollout",
        "set",
        "order-processing",
        "--flag",
        "order-revision",
    ])
    .ok()
    .stdout_has("new instances routed by flag order-revision (fallback revision 2; latest is 2)");
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
    assert_eq!(status["rollout"]["flag"], "order-revision", "{status}");
    assert_eq!(status["rollout"]["stable"], 2, "{status}");

    let (revision, decision) = create_routed(cli, flags, "gold-1", Some("tier=gold"));
    assert_eq!(revision, 2, "{decision}");
    assert_eq!(decision["key"], "order-revision");
    assert_eq!(decision["variant"], "two");
    assert_eq!(decision["value"], 2);
    assert_eq!(decision["reason"], "TARGETING_MATCH");
    let (revision, decision) = create_routed(cli, flags, "plain-1", None);
    assert_eq!(revision, 1, "{decision}");
    assert_eq!(decision["variant"], "one");
    assert_eq!(decision["value"], 1);
    let (revision, decision) = create_routed(cli, flags, "odd-1", Some("tier=odd"));
    assert_eq!(revision, 2, "the stable revision: {decision}");
    assert_eq!(decision["reason"], "ERROR");
    assert_eq!(decision["variant"], "nine");
    assert!(
        decision["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("REVISION_NOT_FOUND")),
        "{decision}"
    );
    // Asking for a revision is never routed.
    cli.run(&[
        "-n",
        "shop",
        "create",
        "instance",
        "order-processing",
        "--id",
        "pinned-1",
        "--revision",
        "1",
        "--label",
        "tier=gold",
    ])
    .ok();
    assert_eq!(cli.history("shop", "pinned-1")[0]["flags"], Value::Null);

    // The flag file changes: everyone else now gets revision 2 as well.
    std::fs::write(flags_file, routing_flags("two", quoted)).expect("rewrite the flag file");
    let deadline = Instant::now() + std::time::Duration::from_secs(15);
    let mut n = 0;
    loop {
        n += 1;
        let (revision, decision) = create_routed(cli, flags, &format!("plain-{n}x"), None);
        if revision == 2 {
            assert_eq!(decision["variant"], "two");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the changed flag file was not picked up"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    cli.run(&["-n", "shop", "rollout", "status", "order-processing"])
        .ok()
        .stdout_has("routed by flag order-revision");
    // promote ends the flag routing (pinned to the stable revision, the latest: cleared).
    cli.run(&["-n", "shop", "rollout", "promote", "order-processing"])
        .ok()
        .stdout_has("no rollout; new instances get the latest revision 2");
    cli.run(&[
        "-n",
        "shop",
        "rollout",
        "set",
        "order-processing",
        "--weight",
        "5",
    ])
    .code(2);
}

use serde_json::Value;

#[test]
fn rollout_by_a_named_flag_locally() {
    let cli = Cli::new();
    let flags_file = cli.dir.path().join("routing.json");
    std::fs::write(&flags_file, routing_flags("one", false)).expect("write flags");
    let file = flags_file.to_string_lossy().into_owned();
    run_flag_routing(&cli, &flags_file, &["--flags", &file], false);
}

#[test]
fn rollout_by_a_named_flag_through_a_server() {
    let server_dir = tempfile::tempdir().expect("tempdir");
    let flags_file = server_dir.path().join("routing.json");
    std::fs::write(&flags_file, routing_flags("one", true)).expect("write flags");
    let file = flags_file.to_string_lossy().into_owned();
    let server = super::server::ServerChild::start_with(
        &server_dir.path().join("data"),
        &["--listen", "127.0.0.1:0", "--flags", &file],
    );
    let mut cli = Cli::new();
    cli.server = Some(server.url.clone());
    run_flag_routing(&cli, &flags_file, &[], true);
    // The API answers the same view, and refuses a set that mixes flag and weight.
    let client = cnsm_server::client::Client::new(&server.url).expect("client");
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    tokio.block_on(async {
        let path =
            "/apis/statemachine.cn/v1alpha1/namespaces/shop/statemachines/order-processing/rollout";
        let r = client
            .post_json(
                path,
                &serde_json::json!({"action": "set", "flag": "order-revision"}),
                &[],
            )
            .await
            .expect("POST rollout");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["rollout"]["flag"], "order-revision");
        let r = client
            .post_json(
                path,
                &serde_json::json!({"action": "set", "flag": "x", "weight": 5, "revision": 1}),
                &[],
            )
            .await
            .expect("POST rollout");
        assert_eq!(r.status, 400, "{}", r.text());
        let r = client.get(path).await.expect("GET rollout");
        assert_eq!(
            r.json()["rollout"]["flag"],
            "order-revision",
            "{}",
            r.text()
        );
    });
}
