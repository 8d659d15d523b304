//! Several store handles on one schema, as several cnsm nodes: racing commits, migrations at
//! once, timer leases, a newer schema, an unreachable database, calls from async code.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use cnsm_store::conformance::{Driver, T0_MS};
use cnsm_store::{CommitItem, ItemOutcome, Store, StoreError};
use cnsm_store_postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};

use crate::{drop_schema, options, test_url, unique_schema};

/// A schema dropped when the test ends.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn new() -> Option<Schema> {
        Some(Schema {
            url: test_url()?,
            name: unique_schema(),
        })
    }

    fn open(&self) -> PostgresStore {
        PostgresStore::open(&self.url, options(&self.name)).expect("the store opens")
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        drop_schema(&self.url, &self.name);
    }
}

fn commit_one(store: &dyn Store, item: &CommitItem) -> ItemOutcome {
    store
        .commit(std::slice::from_ref(item))
        .expect("the commit succeeds")[0]
}

/// Two nodes (two store handles, two connection pools) commit different transitions from the
/// same version of one instance at the same instant, 30 times: exactly one wins each round,
/// the loser learns the winner's version, and the chain has no fork and no gap.
#[test]
fn two_nodes_racing_on_one_instance_have_one_winner() {
    let Some(schema) = Schema::new() else { return };
    let node_a = schema.open();
    let node_b = schema.open();
    let driver = Driver::new("job");
    let create = driver.create("default", "hot", &[], T0_MS);
    assert!(matches!(
        commit_one(&node_a, &create),
        ItemOutcome::Committed { .. }
    ));
    let mut current = create.instance;
    let mut wins = [0u32; 2];
    for round in 0..30u64 {
        let a = driver.event(&current, "ping", &format!("a{round}"), T0_MS + round + 1);
        let b = driver.event(&current, "ping", &format!("b{round}"), T0_MS + round + 1);
        let barrier = Barrier::new(2);
        let (outcome_a, outcome_b) = std::thread::scope(|scope| {
            let ta = scope.spawn(|| {
                barrier.wait();
                commit_one(&node_a, &a)
            });
            let tb = scope.spawn(|| {
                barrier.wait();
                commit_one(&node_b, &b)
            });
            (ta.join().expect("node a"), tb.join().expect("node b"))
        });
        current = match (outcome_a, outcome_b) {
            (ItemOutcome::Committed { .. }, ItemOutcome::Conflict { actual }) => {
                assert_eq!(actual, Some(current.version + 1));
                wins[0] += 1;
                a.instance
            }
            (ItemOutcome::Conflict { actual }, ItemOutcome::Committed { .. }) => {
                assert_eq!(actual, Some(current.version + 1));
                wins[1] += 1;
                b.instance
            }
            other => panic!("round {round}: expected exactly one winner, got {other:?}"),
        };
        // Both nodes read the winner.
        for node in [&node_a, &node_b] {
            assert_eq!(
                node.instance("default", "hot").unwrap().unwrap().instance,
                current
            );
        }
    }
    let history = node_b.history("default", "hot", 0, 0).unwrap();
    assert_eq!(history.len(), 31);
    cnsm_core::record::verify_chain(
        "default",
        "hot",
        0,
        cnsm_core::record::Hash32::ZERO,
        &history,
    )
    .expect("the chain verifies");
    assert!(node_a.verify().unwrap().is_ok());
    assert_eq!(wins[0] + wins[1], 30);
}

/// Two nodes creating the same instance at once: one genesis commits.
#[test]
fn two_nodes_creating_one_instance_commit_one_genesis() {
    let Some(schema) = Schema::new() else { return };
    let nodes = [schema.open(), schema.open()];
    let driver = Driver::new("job");
    for round in 0..10 {
        let id = format!("new-{round}");
        let items = [
            driver.create("default", &id, &[("by", "a")], T0_MS),
            driver.create("default", &id, &[("by", "b")], T0_MS),
        ];
        let barrier = Barrier::new(2);
        let outcomes: Vec<ItemOutcome> = std::thread::scope(|scope| {
            let handles: Vec<_> = nodes
                .iter()
                .zip(&items)
                .map(|(node, item)| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        commit_one(node, item)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("node"))
                .collect()
        });
        let n_committed = outcomes
            .iter()
            .filter(|o| matches!(o, ItemOutcome::Committed { .. }))
            .count();
        assert_eq!(n_committed, 1, "{outcomes:?}");
        assert!(outcomes.contains(&ItemOutcome::Conflict { actual: Some(0) }));
        assert_eq!(nodes[0].history("default", &id, 0, 0).unwrap().len(), 1);
    }
}

/// An idempotency key committed by one node makes the same key from another node conflict,
/// even when that node computed its item before the first commit.
#[test]
fn idempotency_key_is_honoured_across_nodes() {
    let Some(schema) = Schema::new() else { return };
    let (node_a, node_b) = (schema.open(), schema.open());
    let driver = Driver::new("job");
    let create = driver.create("default", "j", &[], T0_MS);
    commit_one(&node_a, &create);
    let keyed = |note: &str| {
        let mut item = driver.event_with_key(&create.instance, "ping", note, T0_MS + 1, Some("k"));
        item.idempotency = Some(cnsm_store::IdempotencyEntry {
            key: "k".into(),
            request_hash: cnsm_core::record::Hash32([5; 32]),
            version: 1,
            expires_ms: T0_MS + 60_000,
        });
        item
    };
    let first = keyed("first");
    assert!(matches!(
        commit_one(&node_a, &first),
        ItemOutcome::Committed { .. }
    ));
    // Node b saw version 1 already and computed the same keyed request again on top of it.
    let mut again = driver.event_with_key(&first.instance, "ping", "again", T0_MS + 2, Some("k"));
    again.idempotency = Some(cnsm_store::IdempotencyEntry {
        version: 2,
        ..first.idempotency.clone().unwrap()
    });
    assert_eq!(
        commit_one(&node_b, &again),
        ItemOutcome::Conflict { actual: Some(1) }
    );
    assert_eq!(node_b.history("default", "j", 0, 0).unwrap().len(), 2);
}

/// Due timers are claimed by one node at a time; a claim expires with its lease (a dead node),
/// and a commit to the instance clears it.
#[test]
fn timer_claims_are_exclusive_until_the_lease_expires() {
    let Some(schema) = Schema::new() else { return };
    let (node_a, node_b) = (schema.open(), schema.open());
    let driver = Driver::new("job");
    let items: Vec<CommitItem> = (0..20)
        .map(|i| driver.create("default", &format!("t-{i:02}"), &[], T0_MS))
        .collect();
    node_a.commit(&items).unwrap();
    let due = T0_MS + 60_000;
    assert!(
        node_a
            .claim_due_timers(due - 1, 5_000, "a", 100)
            .unwrap()
            .is_empty()
    );

    // Both nodes claim at once: every timer goes to exactly one of them.
    let (claimed_a, claimed_b) = std::thread::scope(|scope| {
        let a = scope.spawn(|| node_a.claim_due_timers(due, 5_000, "a", 12).unwrap());
        let b = scope.spawn(|| node_b.claim_due_timers(due, 5_000, "b", 12).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut all: Vec<u64> = claimed_a.iter().chain(&claimed_b).map(|t| t.uid).collect();
    all.sort_unstable();
    let n_claimed = all.len();
    all.dedup();
    assert_eq!(all.len(), n_claimed, "a timer was claimed twice");
    assert_eq!(n_claimed, 20);
    assert!(
        node_b
            .claim_due_timers(due + 4_999, 5_000, "b", 100)
            .unwrap()
            .is_empty()
    );

    // Node b renews its own claims before they expire (it is alive), by claiming again once
    // they have; node a "dies": its claims expire and node b takes them over.
    let taken_over = node_b
        .claim_due_timers(due + 5_000, 5_000, "b", 100)
        .unwrap();
    assert_eq!(
        taken_over.len(),
        20,
        "every expired claim is claimable again"
    );
    let taken_over: Vec<_> = taken_over
        .into_iter()
        .filter(|t| claimed_a.iter().any(|a| a.uid == t.uid))
        .collect();
    let mut uids_a: Vec<u64> = claimed_a.iter().map(|t| t.uid).collect();
    uids_a.sort_unstable();
    let mut retaken: Vec<u64> = taken_over.iter().map(|t| t.uid).collect();
    retaken.sort_unstable();
    assert_eq!(retaken, uids_a);

    // Firing commits clear the claim; the fired instances have no due timer left.
    let fired = driver.fire(&items[0].instance, due);
    assert!(matches!(
        commit_one(&node_b, &fired),
        ItemOutcome::Committed { .. }
    ));
    let later = node_a
        .claim_due_timers(due + 60_000, 5_000, "a", 100)
        .unwrap();
    assert_eq!(
        later.len(),
        19,
        "the fired instance is final and has no timer"
    );
}

/// Several nodes starting at once on an empty schema migrate it once.
#[test]
fn concurrent_opens_migrate_once() {
    let Some(schema) = Schema::new() else { return };
    let stores: Vec<PostgresStore> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| schema.open())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let status = PostgresStore::schema_status(&schema.url, &options(&schema.name)).unwrap();
    assert_eq!(status.version, SCHEMA_VERSION);
    assert_eq!(status.applied.len(), SCHEMA_VERSION as usize);
    assert!(
        stores
            .iter()
            .all(|s| s.list_definitions(None).unwrap().is_empty())
    );
}

/// A schema written by a newer cnsm is refused with a clear error; `migrate: false` on an
/// empty schema is refused with a hint; `migrate` brings it up.
#[test]
fn newer_schema_is_refused_and_migrate_is_explicit() {
    let Some(schema) = Schema::new() else { return };
    let manual = PostgresOptions {
        migrate: false,
        ..options(&schema.name)
    };
    match PostgresStore::open(&schema.url, manual.clone()) {
        Err(StoreError::Refused(message)) => assert!(message.contains("cnsmctl store migrate")),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        PostgresStore::schema_status(&schema.url, &manual)
            .unwrap()
            .version,
        0
    );
    assert_eq!(
        PostgresStore::migrate(&schema.url, &manual).unwrap(),
        (1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    assert!(
        PostgresStore::migrate(&schema.url, &manual)
            .unwrap()
            .is_empty()
    );
    let store = PostgresStore::open(&schema.url, manual.clone()).expect("opens once migrated");
    store
        .batch_execute(&format!(
            "INSERT INTO cnsm_schema_version VALUES ({}, 'from the future', 0)",
            SCHEMA_VERSION + 1
        ))
        .unwrap();
    match PostgresStore::open(&schema.url, options(&schema.name)) {
        Err(e @ StoreError::FormatTooNew { .. }) => {
            assert!(e.to_string().contains("newer than this binary"), "{e}")
        }
        other => panic!("expected FormatTooNew, got {other:?}"),
    }
    // Back to this binary's version, so the schema can be opened (and dropped) again.
    store
        .batch_execute(&format!(
            "DELETE FROM cnsm_schema_version WHERE version > {SCHEMA_VERSION}"
        ))
        .unwrap();
}

/// A database that does not answer fails fast with an I/O error, never hangs.
#[test]
fn unreachable_database_fails_fast() {
    // A loopback port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let started = Instant::now();
    let result = PostgresStore::open(
        &format!("postgres://postgres@127.0.0.1:{port}/test"),
        PostgresOptions {
            connect_timeout_ms: 500,
            op_timeout_ms: 1_000,
            ..PostgresOptions::default()
        },
    );
    assert!(matches!(result, Err(StoreError::Io(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A server that accepts and never answers: the operation deadline ends the wait.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let result = PostgresStore::open(
        &format!("postgres://postgres@127.0.0.1:{port}/test"),
        PostgresOptions {
            connect_timeout_ms: 500,
            op_timeout_ms: 1_000,
            ..PostgresOptions::default()
        },
    );
    assert!(matches!(result, Err(StoreError::Io(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(silent);
}

/// The synchronous store works when called from inside tokio runtimes of both flavours (the
/// server calls it from async handlers), and can be dropped there.
#[test]
fn works_from_inside_tokio_runtimes() {
    let Some(schema) = Schema::new() else { return };
    let driver = Driver::new("job");
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    multi.block_on(async {
        let store = schema.open();
        let item = driver.create("default", "in-multi", &[], T0_MS);
        assert!(matches!(
            commit_one(&store, &item),
            ItemOutcome::Committed { .. }
        ));
        let task =
            tokio::spawn(async move { store.instance("default", "in-multi").unwrap().is_some() });
        assert!(task.await.unwrap());
    });
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current.block_on(async {
        let store = schema.open();
        let item = driver.create("default", "in-current", &[], T0_MS);
        assert!(matches!(
            commit_one(&store, &item),
            ItemOutcome::Committed { .. }
        ));
        assert_eq!(store.list_instances(&Default::default()).unwrap().len(), 2);
    });
}

/// A store call made from the `block_on` thread of a multi-thread runtime does not swallow a
/// wake-up meant for the future that thread is running: here a oneshot is answered while the
/// same `join!` blocks in a one-second query. Waiting on the store's runtime with a nested
/// `block_on` used that thread's tokio parker and consumed the notification, so the answered
/// future slept until something else woke it (two runtimes racing `If-Match` sends in one
/// `join!` saw answers arrive 30 s late, at their timeout).
#[test]
fn a_store_call_on_a_block_on_thread_keeps_its_wake_ups() {
    let Some(schema) = Schema::new() else { return };
    let store = schema.open();
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let (answered, woken_after) = multi.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = async {
            let answer = tokio::time::timeout(Duration::from_secs(20), rx).await;
            (answer, started.elapsed())
        };
        let blocking = async {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let _ = tx.send(());
            });
            store.batch_execute("SELECT pg_sleep(1)").unwrap();
        };
        let ((answer, woken_after), ()) = tokio::join!(waiting, blocking);
        (answer.map(|a| a.is_ok()), woken_after)
    });
    // The timeout polls its future first, so a lost wake-up still ends Ok, 20 s late.
    assert_eq!(answered, Ok(true));
    assert!(
        woken_after < Duration::from_secs(8),
        "the answer was seen only after {woken_after:?}"
    );
}

/// A batch that advances an instance twice, after another node committed its own next record:
/// both items conflict (the second names the right version but the losing record as its
/// previous one), and the rest of the batch commits.
#[test]
fn items_built_on_a_lost_item_conflict() {
    let Some(schema) = Schema::new() else { return };
    let (node_a, node_b) = (schema.open(), schema.open());
    let driver = Driver::new("job");
    let create = driver.create("default", "j", &[], T0_MS);
    let other = driver.create("default", "other", &[], T0_MS);
    node_a.commit(&[create.clone(), other.clone()]).unwrap();
    let winner = driver.event(&create.instance, "ping", "b", T0_MS + 1);
    assert!(matches!(
        commit_one(&node_b, &winner),
        ItemOutcome::Committed { .. }
    ));
    let lost = driver.event(&create.instance, "ping", "a", T0_MS + 1);
    let on_lost = driver.event(&lost.instance, "ping", "a2", T0_MS + 2);
    let independent = driver.event(&other.instance, "start", "", T0_MS + 2);
    let outcomes = node_a.commit(&[lost, on_lost, independent]).unwrap();
    assert_eq!(outcomes[0], ItemOutcome::Conflict { actual: Some(1) });
    assert_eq!(outcomes[1], ItemOutcome::Conflict { actual: Some(1) });
    assert!(matches!(outcomes[2], ItemOutcome::Committed { .. }));
    assert_eq!(
        node_a.instance("default", "j").unwrap().unwrap().instance,
        winner.instance
    );
    assert!(node_a.verify().unwrap().is_ok());
}

/// `instances` reads many instances in one call, leaving out unknown keys.
#[test]
fn instances_reads_many_at_once() {
    let Some(schema) = Schema::new() else { return };
    let store = schema.open();
    let driver = Driver::new("job");
    let items: Vec<CommitItem> = (0..5)
        .map(|i| {
            driver.create(
                if i % 2 == 0 { "a" } else { "b" },
                &format!("i-{i}"),
                &[],
                T0_MS,
            )
        })
        .collect();
    store.commit(&items).unwrap();
    let mut found = store
        .instances(&[
            ("a", "i-0"),
            ("b", "i-1"),
            ("a", "i-1"),
            ("a", "i-4"),
            ("zz", "i-0"),
        ])
        .unwrap();
    found.sort_by(|x, y| x.instance.id.cmp(&y.instance.id));
    let got: Vec<_> = found.iter().map(|s| s.instance.clone()).collect();
    assert_eq!(
        got,
        vec![
            items[0].instance.clone(),
            items[1].instance.clone(),
            items[4].instance.clone()
        ]
    );
    assert!(store.instances(&[]).unwrap().is_empty());
}
