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
    let n_active =
        N_INSTANCES * 4 / PATHS.len() + (0..N_INSTANCES % PATHS.len()).filter(|i| *i < 4).count();

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
