//! Runtime tests on the embedded store: group commit, the concurrency contracts, idempotency,
//! timers under a virtual clock, restart.

use std::sync::Arc;

use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeError, RuntimeOptions};
use cnsm_store::embedded::EmbeddedStore;
use cnsm_testkit::{SnapshotVerifier, TransitionRecorder, VirtualClock};
use serde_json::{Map, Value, json};

fn example(name: &str) -> String {
    let path = format!(
        "{}/../../../shared/examples/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("not an object"),
    }
}

struct Env {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    clock: VirtualClock,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        Env {
            _dir: dir,
            path,
            clock: VirtualClock::new(1_700_000_000_000),
        }
    }

    fn runtime(&self) -> Runtime {
        let store = EmbeddedStore::open(&self.path).unwrap();
        Runtime::open(
            store,
            RuntimeOptions::default().with_clock(Arc::new(self.clock.clone())),
        )
        .unwrap()
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn order_flow_with_versions_and_idempotency() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        let recorder = TransitionRecorder::attach(&rt);
        let applied = rt
            .apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        assert_eq!((applied.revision, applied.created), (1, true));
        let again = rt
            .apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        assert_eq!(
            (again.revision, again.created),
            (1, false),
            "same content is a no-op"
        );

        let created = rt
            .create_instance(
                CreateInstance::new("shop", "order-processing")
                    .id("o-1")
                    .data(obj(json!({"total": 40}))),
            )
            .await
            .unwrap();
        assert_eq!((created.state.as_ref(), created.version), ("created", 0));
        let dup = rt
            .create_instance(CreateInstance::new("shop", "order-processing").id("o-1"))
            .await
            .unwrap_err();
        assert_eq!(dup.error_type(), "Conflict");

        rt.send("shop", "o-1", EventRequest::new("complete"))
            .await
            .unwrap();
        let stale = rt
            .send("shop", "o-1", EventRequest::new("pay").expected_version(0))
            .await
            .unwrap_err();
        assert_eq!(stale.error_type(), "StaleState");

        let pay = || {
            EventRequest::new("pay")
                .payload(json!({"amount": 40}))
                .expected_version(1)
                .idempotency_key("k1")
        };
        let first = rt.send("shop", "o-1", pay()).await.unwrap();
        assert_eq!(
            (
                first.instance.state.as_ref(),
                first.record.version,
                first.replayed
            ),
            ("paid", 2, false)
        );
        // The same key replays the original result, even though the version moved on.
        let replay = rt.send("shop", "o-1", pay()).await.unwrap();
        assert!(replay.replayed);
        assert_eq!(replay.record.version, 2);
        assert_eq!(replay.hash, first.hash);
        let other = rt
            .send(
                "shop",
                "o-1",
                EventRequest::new("pay")
                    .payload(json!({"amount": 41}))
                    .idempotency_key("k1"),
            )
            .await
            .unwrap_err();
        assert_eq!(other.error_type(), "Conflict");

        let failure = rt
            .send("shop", "o-1", EventRequest::new("pay"))
            .await
            .unwrap_err();
        assert_eq!(failure.error_type(), "TransitionFailure");
        let missing = rt
            .send("shop", "o-9", EventRequest::new("pay"))
            .await
            .unwrap_err();
        assert!(matches!(missing, RuntimeError::NotFound(_)));

        recorder.assert_path("shop", "o-1", &["created", "validated", "paid"]);
        let history = rt.history("shop", "o-1", 0, 100).await.unwrap();
        assert_eq!(history.len(), 3);
        for pair in history.windows(2) {
            assert_eq!(pair[1].record.prev_hash, pair[0].hash);
        }
        SnapshotVerifier::new(rt.store().as_ref())
            .require_keys(["total", "paidAmount"])
            .verify_instance("shop", "o-1")
            .unwrap();
        rt.shutdown();
    });
}

#[test]
fn concurrent_expected_versions_one_winner_rest_race_or_stale() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        rt.apply_yaml(&example("payment-saga.yaml"), None)
            .await
            .unwrap();
        for round in 0..20 {
            let id = format!("s-{round}");
            rt.create_instance(CreateInstance::new("shop", "payment-saga").id(&id))
                .await
                .unwrap();
            let mut tasks = Vec::new();
            for _ in 0..8 {
                let rt = rt.clone();
                let id = id.clone();
                tasks.push(tokio::spawn(async move {
                    rt.send(
                        "shop",
                        &id,
                        EventRequest::new("complete").expected_version(0),
                    )
                    .await
                }));
            }
            let mut n_ok = 0;
            for t in tasks {
                match t.await.unwrap() {
                    Ok(_) => n_ok += 1,
                    Err(e) => assert!(
                        matches!(e.error_type(), "RaceCondition" | "StaleState"),
                        "{e}"
                    ),
                }
            }
            assert_eq!(n_ok, 1, "round {round}: exactly one compare-and-swap wins");
            assert_eq!(rt.instance("shop", &id).await.unwrap().version, 1);
        }
        rt.shutdown();
    });
}

#[test]
fn many_instances_in_flight_share_commits() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        let recorder = TransitionRecorder::attach(&rt);
        rt.apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..64 {
            let rt = rt.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("o-{i}");
                rt.create_instance(
                    CreateInstance::new("shop", "order-processing")
                        .id(&id)
                        .data(obj(json!({"total": 5}))),
                )
                .await
                .unwrap();
                rt.send("shop", &id, EventRequest::new("complete"))
                    .await
                    .unwrap();
                rt.send(
                    "shop",
                    &id,
                    EventRequest::new("pay").payload(json!({"amount": 5})),
                )
                .await
                .unwrap();
                rt.send("shop", &id, EventRequest::new("ship"))
                    .await
                    .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(recorder.len(), 64 * 4);
        assert_eq!(
            rt.queue_depth(),
            0,
            "every queued request was taken into a batch"
        );
        let n = SnapshotVerifier::new(rt.store().as_ref())
            .verify_all(Some("shop"))
            .unwrap();
        assert_eq!(n, 64);
        assert!(rt.store().verify().unwrap().is_ok());
        rt.shutdown();
    });
}

#[test]
fn thirty_day_timeout_runs_in_milliseconds_and_survives_restart() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        rt.apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        rt.create_instance(
            CreateInstance::new("shop", "order-processing")
                .id("o-1")
                .data(obj(json!({"total": 1}))),
        )
        .await
        .unwrap();
        rt.send("shop", "o-1", EventRequest::new("complete"))
            .await
            .unwrap();
        rt.send(
            "shop",
            "o-1",
            EventRequest::new("pay").payload(json!({"amount": 1})),
        )
        .await
        .unwrap();
        assert_eq!(rt.pending_timers().await.unwrap(), 1);
        // Not yet due: nothing fires.
        env.clock.advance_secs(3600);
        assert_eq!(rt.fire_due_timers().await.unwrap(), 0);
        rt.shutdown();
        drop(rt); // the store closes with the last handle

        // Restart: the timer index is rebuilt from the store; the week-long "paid" timeout is
        // overdue after 30 days and fires right after start.
        env.clock.advance_secs(30 * 24 * 3600);
        let rt = env.runtime();
        assert_eq!(rt.pending_timers().await.unwrap(), 1);
        assert_eq!(rt.fire_due_timers().await.unwrap(), 1);
        let order = rt.instance("shop", "o-1").await.unwrap();
        assert_eq!(
            (order.state.as_ref(), order.status.as_str()),
            ("refunded", "cancelled")
        );
        assert_eq!(rt.pending_timers().await.unwrap(), 0);
        let last = rt.history("shop", "o-1", 3, 1).await.unwrap();
        assert_eq!(&*last[0].record.actor, "system:timer");
        // Fires at most once.
        assert_eq!(rt.fire_due_timers().await.unwrap(), 0);
        rt.shutdown();
    });
}

#[test]
fn saga_retries_and_compensation_through_timers() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        let recorder = TransitionRecorder::attach(&rt);
        rt.apply_yaml(&example("payment-saga.yaml"), None)
            .await
            .unwrap();
        rt.create_instance(CreateInstance::new("shop", "payment-saga").id("p-1"))
            .await
            .unwrap();
        rt.send("shop", "p-1", EventRequest::new("complete"))
            .await
            .unwrap();
        // charge-card fails: back-off 2s, then a new attempt with its own 30s timeout.
        rt.send("shop", "p-1", EventRequest::new("fail"))
            .await
            .unwrap();
        env.clock.advance_secs(2);
        assert_eq!(rt.fire_due_timers().await.unwrap(), 1);
        let p = rt.instance("shop", "p-1").await.unwrap();
        assert_eq!(
            (p.state.as_ref(), p.attempt, p.in_backoff),
            ("charge-card", 2, false)
        );
        rt.send("shop", "p-1", EventRequest::new("complete"))
            .await
            .unwrap();
        // book-courier times out (no retry): compensations run in reverse order.
        env.clock.advance_secs(61);
        assert_eq!(rt.fire_due_timers().await.unwrap(), 1);
        rt.send("shop", "p-1", EventRequest::new("complete"))
            .await
            .unwrap();
        rt.send("shop", "p-1", EventRequest::new("complete"))
            .await
            .unwrap();
        recorder.assert_path(
            "shop",
            "p-1",
            &[
                "reserve-stock",
                "charge-card",
                "charge-card",
                "charge-card",
                "book-courier",
                "refund-card",
                "release-stock",
                "release-stock",
            ],
        );
        let p = rt.instance("shop", "p-1").await.unwrap();
        assert_eq!(p.status.as_str(), "failed");
        SnapshotVerifier::new(rt.store().as_ref())
            .verify_instance("shop", "p-1")
            .unwrap();
        rt.shutdown();
    });
}

#[test]
fn wait_state_and_choice_in_provisioning() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        rt.apply_yaml(&example("provisioning.yaml"), None)
            .await
            .unwrap();
        rt.create_instance(CreateInstance::new("default", "provisioning").id("v-1"))
            .await
            .unwrap();
        rt.send(
            "default",
            "v-1",
            EventRequest::new("submit").payload(json!({"size": 4})),
        )
        .await
        .unwrap();
        rt.send("default", "v-1", EventRequest::new("complete"))
            .await
            .unwrap();
        assert_eq!(
            &*rt.instance("default", "v-1").await.unwrap().state,
            "settling"
        );
        env.clock.advance_secs(30);
        assert_eq!(rt.fire_due_timers().await.unwrap(), 1);
        let v = rt.instance("default", "v-1").await.unwrap();
        assert_eq!(
            (v.state.as_ref(), v.status.as_str()),
            ("ready", "succeeded")
        );
        rt.shutdown();
    });
}

#[test]
fn bad_requests_change_nothing() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        let err = rt
            .apply_yaml(&example("seed-fragment.yaml"), None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RuntimeError::Admission(p) if p.iter().any(|p| p.message.contains("validated"))),
            "{err:?}"
        );
        assert!(rt.definitions(None).await.unwrap().is_empty());
        let err = rt
            .create_instance(CreateInstance::new("shop", "order-processing"))
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "NotFound");
        rt.apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        let err = rt
            .create_instance(CreateInstance::new("shop", "order-processing").id("bad id!"))
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "Invalid");
        let err = rt
            .create_instance(CreateInstance::new("Shop", "order-processing"))
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "Invalid");
        assert!(
            rt.list_instances(&Default::default())
                .await
                .unwrap()
                .is_empty()
        );
        rt.shutdown();
    });
}

#[test]
fn idempotency_keys_expire_after_their_window() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        rt.apply_yaml(&example("provisioning.yaml"), None)
            .await
            .unwrap();
        rt.create_instance(CreateInstance::new("default", "provisioning").id("v-1"))
            .await
            .unwrap();
        rt.create_instance(CreateInstance::new("default", "provisioning").id("v-2"))
            .await
            .unwrap();
        let submit = || {
            EventRequest::new("submit")
                .payload(json!({"size": 128}))
                .idempotency_key("once")
        };
        let first = rt.send("default", "v-1", submit()).await.unwrap();
        assert!(!first.replayed);
        // Within the window the key replays; keys are scoped to the instance.
        assert!(rt.send("default", "v-1", submit()).await.unwrap().replayed);
        assert!(!rt.send("default", "v-2", submit()).await.unwrap().replayed);
        // After 24 h the key is forgotten: the same request is a new event (and here a failure,
        // since the instance moved on).
        env.clock.advance_secs(24 * 3600 + 1);
        let again = rt.send("default", "v-1", submit()).await.unwrap_err();
        assert_eq!(again.error_type(), "TransitionFailure");
        rt.shutdown();
    });
}

// --- Operator controls ---------------------------------------------------------------------

use cnsm_runtime::{Control, ControlRequest};

fn kinds(history: &[cnsm_runtime::HistoryEntry]) -> Vec<&'static str> {
    history.iter().map(|h| h.record.kind.as_str()).collect()
}

#[test]
fn suspend_holds_a_due_timer_across_restart_and_resume_fires_it() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        rt.apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        rt.create_instance(CreateInstance::new("shop", "order-processing").id("o-1"))
            .await
            .unwrap();
        let suspended = rt
            .control(
                "shop",
                "o-1",
                ControlRequest::new(Control::Suspend).actor("oncall@example"),
            )
            .await
            .unwrap();
        assert!(suspended.instance.suspended);
        assert_eq!(&*suspended.record.actor, "oncall@example");
        // The 30 s timeout of `created` falls due while suspended: it is held.
        env.clock.advance_secs(60);
        assert_eq!(rt.fire_due_timers().await.unwrap(), 0);
        let err = rt
            .send("shop", "o-1", EventRequest::new("complete"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("suspended"), "{err}");
        rt.shutdown();
        drop(rt);

        // Still held after a restart (the index is rebuilt from the store).
        let rt = env.runtime();
        assert_eq!(rt.fire_due_timers().await.unwrap(), 0);
        assert_eq!(
            rt.instance("shop", "o-1").await.unwrap().state.as_ref(),
            "created"
        );
        rt.control("shop", "o-1", ControlRequest::new(Control::Resume))
            .await
            .unwrap();
        // Overdue: it fires right after resume.
        assert_eq!(rt.fire_due_timers().await.unwrap(), 1);
        let order = rt.instance("shop", "o-1").await.unwrap();
        assert_eq!(order.status.as_str(), "cancelled");
        let history = rt.history("shop", "o-1", 0, 100).await.unwrap();
        assert_eq!(kinds(&history), ["genesis", "suspend", "resume", "timer"]);
        SnapshotVerifier::new(rt.store().as_ref())
            .verify_all(Some("shop"))
            .unwrap();
        rt.shutdown();
    });
}

#[test]
fn cancel_races_events_in_flight_and_wins_exactly_once() {
    block_on(async {
        let env = Env::new();
        let rt = Arc::new(env.runtime());
        rt.apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        rt.create_instance(
            CreateInstance::new("shop", "order-processing")
                .id("o-1")
                .data(obj(json!({"total": 5}))),
        )
        .await
        .unwrap();
        let mut tasks = Vec::new();
        for (i, event) in ["complete", "pay", "ship", "deliver"].iter().enumerate() {
            let rt = Arc::clone(&rt);
            tasks.push(tokio::spawn(async move {
                let request = EventRequest::new(*event).payload(json!({"amount": 5}));
                (i, rt.send("shop", "o-1", request).await.map(|_| ()))
            }));
        }
        let cancel = {
            let rt = Arc::clone(&rt);
            tokio::spawn(async move {
                rt.control(
                    "shop",
                    "o-1",
                    ControlRequest::new(Control::Cancel).reason("customer request"),
                )
                .await
            })
        };
        let cancelled = cancel.await.unwrap();
        for task in tasks {
            let (_, result) = task.await.unwrap();
            if let Err(e) = result {
                assert!(
                    matches!(e, RuntimeError::Transition(_)),
                    "an event loses to the cancel only as a TransitionFailure: {e}"
                );
            }
        }
        let order = rt.instance("shop", "o-1").await.unwrap();
        let history = rt.history("shop", "o-1", 0, 100).await.unwrap();
        let n_cancels = history
            .iter()
            .filter(|h| h.record.kind.as_str() == "cancel")
            .count();
        match cancelled {
            Ok(outcome) => {
                assert_eq!(n_cancels, 1);
                assert_eq!(order.status.as_str(), "cancelled");
                assert_eq!(order.reason.as_deref(), Some("customer request"));
                assert_eq!(history.last().unwrap().hash, outcome.hash, "cancel is last");
            }
            // The events won the race and the order ended first: the cancel is refused.
            Err(e) => {
                assert_eq!(n_cancels, 0);
                assert!(e.to_string().contains("already ended"), "{e}");
            }
        }
        SnapshotVerifier::new(rt.store().as_ref())
            .verify_all(Some("shop"))
            .unwrap();
        rt.shutdown();
    });
}

#[test]
fn redrive_after_a_timeout_failure() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        rt.apply_yaml(&example("payment-saga.yaml"), None)
            .await
            .unwrap();
        rt.create_instance(CreateInstance::new("shop", "payment-saga").id("p-1"))
            .await
            .unwrap();
        let err = rt
            .control("shop", "p-1", ControlRequest::new(Control::Redrive))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("only a failed instance"), "{err}");
        // reserve-stock: 3 attempts, each timing out after 10 s, back-offs of 2 s and 4 s.
        for _ in 0..10 {
            env.clock.advance_secs(10);
            rt.fire_due_timers().await.unwrap();
        }
        let failed = rt.instance("shop", "p-1").await.unwrap();
        assert_eq!(failed.status.as_str(), "failed");
        assert_eq!(failed.reason.as_deref(), Some("Timeout"));
        let redriven = rt
            .control("shop", "p-1", ControlRequest::new(Control::Redrive))
            .await
            .unwrap();
        assert_eq!(redriven.instance.status.as_str(), "active");
        assert_eq!(redriven.instance.state.as_ref(), "reserve-stock");
        assert_eq!(
            rt.pending_timers().await.unwrap(),
            1,
            "the new entry is timed"
        );
        rt.send("shop", "p-1", EventRequest::new("complete"))
            .await
            .unwrap();
        assert_eq!(
            rt.instance("shop", "p-1").await.unwrap().state.as_ref(),
            "charge-card"
        );
        SnapshotVerifier::new(rt.store().as_ref())
            .verify_all(Some("shop"))
            .unwrap();
        rt.shutdown();
    });
}

/// The format-1 fixture store of cnsm-store runs on: the next event commits, chains verify.
#[test]
fn fixture_store_of_format_1_accepts_the_next_event() {
    block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let source = format!(
            "{}/../cnsm-store/tests/fixtures/store-format-1/cnsm.redb",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::copy(&source, dir.path().join("cnsm.redb")).unwrap();
        let updated_ms = {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            cnsm_store::Store::instance(&store, "shop", "o-1")
                .unwrap()
                .unwrap()
                .instance
                .updated_ms
        };
        // A minute after the fixture was written: no timer is due yet.
        let clock = VirtualClock::new(updated_ms + 60_000);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let rt = Runtime::open(
            store,
            RuntimeOptions::default().with_clock(Arc::new(clock.clone())),
        )
        .unwrap();
        let shipped = rt
            .send("shop", "o-1", EventRequest::new("ship"))
            .await
            .unwrap();
        assert_eq!(shipped.instance.state.as_ref(), "shipped");
        assert_eq!(shipped.record.format, 1);
        // p-1's retry back-off (1 s) is long over: the next attempt starts.
        assert_eq!(rt.fire_due_timers().await.unwrap(), 1);
        let saga = rt.instance("shop", "p-1").await.unwrap();
        assert_eq!((saga.attempt, saga.in_backoff), (2, false));
        SnapshotVerifier::new(rt.store().as_ref())
            .verify_all(Some("shop"))
            .unwrap();
        rt.shutdown();
    });
}

#[test]
fn retention_deletes_finished_instances_after_their_window() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        let yaml = example("order-processing.yaml").replacen(
            "spec:\n",
            "spec:\n  retention:\n    finishedAfterDays: 1\n",
            1,
        );
        rt.apply_yaml(&yaml, None).await.unwrap();
        for i in 0..5 {
            rt.create_instance(
                CreateInstance::new("shop", "order-processing").id(format!("o-{i}")),
            )
            .await
            .unwrap();
        }
        for i in 0..3 {
            rt.send("shop", &format!("o-{i}"), EventRequest::new("cancel"))
                .await
                .unwrap();
        }
        // Not yet: they ended less than a day ago.
        env.clock.advance_secs(3600);
        assert_eq!(rt.apply_retention().await.unwrap(), 0);
        env.clock.advance_secs(24 * 3600);
        // The store deletes only what its background verifier has checked; give it a moment.
        let mut deleted = 0;
        for _ in 0..100 {
            deleted += rt.apply_retention().await.unwrap();
            if deleted == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(deleted, 3);
        for i in 0..3 {
            let err = rt.instance("shop", &format!("o-{i}")).await.unwrap_err();
            assert!(matches!(err, RuntimeError::NotFound(_)), "{err}");
        }
        for i in 3..5 {
            let live = rt.instance("shop", &format!("o-{i}")).await.unwrap();
            assert_eq!(live.status.as_str(), "active", "active instances stay");
        }
        // A deleted id can be used again, with a fresh history.
        rt.create_instance(CreateInstance::new("shop", "order-processing").id("o-0"))
            .await
            .unwrap();
        assert_eq!(rt.history("shop", "o-0", 0, 10).await.unwrap().len(), 1);
        SnapshotVerifier::new(rt.store().as_ref())
            .verify_all(Some("shop"))
            .unwrap();
        assert!(rt.store().verify().unwrap().is_ok());
        rt.shutdown();
    });
}

// --- Migration -----------------------------------------------------------------------------

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../cnsm-core/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Creates `n` orders spread over every state of order-processing (revision 1).
async fn orders_in_every_state(rt: &Runtime, n: usize) {
    let paths: [&[(&str, Value)]; 7] = [
        &[],
        &[("complete", Value::Null)],
        &[("complete", Value::Null), ("pay", json!({"amount": 40}))],
        &[
            ("complete", Value::Null),
            ("pay", json!({"amount": 40})),
            ("ship", Value::Null),
        ],
        &[
            ("complete", Value::Null),
            ("pay", json!({"amount": 40})),
            ("ship", Value::Null),
            ("deliver", Value::Null),
        ],
        &[
            ("complete", Value::Null),
            ("pay", json!({"amount": 40})),
            ("refund", Value::Null),
        ],
        &[("cancel", Value::Null)],
    ];
    for i in 0..n {
        let id = format!("o-{i:05}");
        rt.create_instance(
            CreateInstance::new("shop", "order-processing")
                .id(id.clone())
                .data(obj(json!({"total": 40}))),
        )
        .await
        .unwrap();
        for (event, payload) in paths[i % paths.len()] {
            rt.send(
                "shop",
                &id,
                EventRequest::new(*event).payload(payload.clone()),
            )
            .await
            .unwrap();
        }
    }
}

fn migration_request(dry_run: bool) -> cnsm_runtime::MigrationRequest {
    let policy = cnsm_core::migration::parse_policy(&fixture("order-migration.yaml")).unwrap();
    let mut request = cnsm_runtime::MigrationRequest::new(policy, 1, 2);
    request.dry_run = dry_run;
    request.chunk = 40;
    request
}

#[test]
fn migration_dry_run_pre_post_and_an_interrupted_run_resume_exactly_once() {
    use cnsm_runtime::{MigrationOutcome, MigrationPhase};
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        rt.apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        orders_in_every_state(&rt, 350).await;
        let applied = rt
            .apply_yaml(&fixture("order-processing-v2.yaml"), None)
            .await
            .unwrap();
        assert_eq!(applied.revision, 2);

        let plan = rt
            .migrate(&migration_request(true), &mut |_, _| {})
            .await
            .unwrap();
        // 4 of 7 paths end active: created, validated, paid, shipped.
        assert_eq!(plan.entries.len(), 200);
        assert_eq!(plan.n_migrated(), 200);
        assert_eq!(
            rt.instance("shop", "o-00002").await.unwrap().revision,
            1,
            "a dry run changes nothing"
        );

        // A run interrupted between its phases: `pre` locked everything, `post` never ran.
        let mut pre = migration_request(false);
        pre.phase = MigrationPhase::Pre;
        let locked = rt.migrate(&pre, &mut |_, _| {}).await.unwrap();
        assert!(
            locked
                .entries
                .iter()
                .all(|e| e.outcome == MigrationOutcome::Locked)
        );
        assert_eq!(locked.entries.len(), 200);
        // Events during `pre` are refused with Locked, naming the migration; nothing changes.
        let before = rt.instance("shop", "o-00001").await.unwrap();
        let err = rt
            .send("shop", "o-00001", EventRequest::new("cancel"))
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), "Locked", "{err}");
        assert!(err.to_string().contains("order-v1-to-v2"), "{err}");
        assert_eq!(rt.instance("shop", "o-00001").await.unwrap(), before);
        // A due timer is held until the lock ends (here: the migration re-arms it).
        env.clock.advance_secs(61);
        rt.fire_due_timers().await.unwrap();
        assert_eq!(
            rt.instance("shop", "o-00000").await.unwrap().state.as_ref(),
            "created"
        );

        // Resume with a full run: it renews the locks it finds and migrates everything left.
        let mut half = migration_request(false);
        half.phase = MigrationPhase::Post;
        half.chunk = 40;
        let mut calls = 0;
        let first = rt
            .migrate(&half, &mut |done, total| {
                calls += 1;
                assert!(done <= total);
            })
            .await
            .unwrap();
        assert_eq!(first.n_migrated(), 200);
        assert_eq!(calls, 5, "one progress call per chunk of 40");
        let again = rt
            .migrate(&migration_request(false), &mut |_, _| {})
            .await
            .unwrap();
        assert!(again.entries.is_empty(), "nothing is left to migrate");

        for i in 0..350 {
            let id = format!("o-{i:05}");
            let instance = rt.instance("shop", &id).await.unwrap();
            let history = rt.history("shop", &id, 0, 100).await.unwrap();
            let n_migrations = history
                .iter()
                .filter(|h| h.record.kind.as_str() == "migration")
                .count();
            if instance.status.as_str() == "active" {
                assert_eq!(instance.revision, 2, "{id}");
                assert_eq!(n_migrations, 1, "{id} migrated exactly once");
                assert_eq!(instance.lock, None);
                let expected = match i % 7 {
                    0 | 1 => "created",
                    2 => "payment-received",
                    3 => "shipped",
                    _ => unreachable!(),
                };
                assert_eq!(instance.state.as_ref(), expected, "{id}");
                let timer = instance.timer.expect("a timer under revision 2");
                let timeout_s = match expected {
                    "created" => 60,
                    "payment-received" => 604_800,
                    _ => 1_209_600,
                };
                assert_eq!(timer.due_ms, instance.updated_ms + timeout_s * 1000, "{id}");
                if i % 7 < 2 {
                    assert_eq!(instance.data["currency"], json!("EUR"));
                    assert_eq!(instance.data["totalCents"], json!(4000));
                }
            } else {
                assert_eq!(instance.revision, 1, "finished instances stay");
                assert_eq!(n_migrations, 0);
            }
        }
        // Accepted after: the instances take revision 2's events.
        let moved = rt
            .send("shop", "o-00002", EventRequest::new("pack"))
            .await
            .unwrap();
        assert_eq!(moved.instance.state.as_ref(), "packed");
        SnapshotVerifier::new(rt.store().as_ref())
            .verify_all(Some("shop"))
            .unwrap();
        assert!(rt.store().verify().unwrap().is_ok());

        // Rollback: back to revision 1 where the reverse mapping exists.
        let mut rollback = migration_request(false);
        rollback.rollback = true;
        let back = rt.migrate(&rollback, &mut |_, _| {}).await.unwrap();
        let packed = back.entries.iter().find(|e| e.id == "o-00002").unwrap();
        assert!(
            matches!(&packed.outcome, MigrationOutcome::Blocked(why) if why.contains("packed")),
            "{packed:?}"
        );
        let o3 = rt.instance("shop", "o-00003").await.unwrap();
        assert_eq!((o3.revision, o3.state.as_ref()), (1, "shipped"));
        rt.shutdown();
    });
}

// --- Canary rollout ------------------------------------------------------------------------

#[test]
fn canary_rollout_routes_by_weight_sticky_per_id_then_promote_and_abort() {
    use cnsm_runtime::RolloutChange;
    block_on(async {
        let env = Env::new();
        let rt = Arc::new(env.runtime());
        for ns in ["shop", "shop2"] {
            let v1 = example("order-processing.yaml")
                .replace("namespace: shop\n", &format!("namespace: {ns}\n"));
            let v2 = fixture("order-processing-v2.yaml")
                .replace("namespace: shop\n", &format!("namespace: {ns}\n"));
            rt.apply_yaml(&v1, None).await.unwrap();
            rt.apply_yaml(&v2, None).await.unwrap();
        }
        // Without a rollout, new instances get the latest revision.
        let plain = rt
            .create_instance(CreateInstance::new("shop", "order-processing").id("before"))
            .await
            .unwrap();
        assert_eq!(plain.revision, 2);
        let status = rt
            .change_rollout(
                "shop",
                "order-processing",
                RolloutChange::Set {
                    revision: 2,
                    weight: 10,
                },
            )
            .await
            .unwrap();
        let rollout = status.rollout.expect("a rollout");
        assert_eq!((rollout.stable, rollout.canary, rollout.weight), (1, 2, 10));
        rt.change_rollout(
            "shop2",
            "order-processing",
            RolloutChange::Set {
                revision: 2,
                weight: 10,
            },
        )
        .await
        .unwrap();

        let n = 10_000;
        let mut tasks = Vec::new();
        for worker in 0..64 {
            let rt = Arc::clone(&rt);
            tasks.push(tokio::spawn(async move {
                let mut on_canary = 0;
                let mut i = worker;
                while i < n {
                    let created = rt
                        .create_instance(
                            CreateInstance::new("shop", "order-processing").id(format!("c-{i}")),
                        )
                        .await
                        .unwrap();
                    if created.revision == 2 {
                        on_canary += 1;
                    }
                    i += 64;
                }
                on_canary
            }));
        }
        let mut on_canary = 0;
        for task in tasks {
            on_canary += task.await.unwrap();
        }
        let share = on_canary as f64 / n as f64;
        assert!((share - 0.10).abs() <= 0.02, "canary share {share}");
        // Sticky: the same targeting key gets the same revision in another namespace, and the
        // decision is in the genesis record.
        for i in 0..200 {
            let id = format!("c-{i}");
            let first = rt.instance("shop", &id).await.unwrap();
            let again = rt
                .create_instance(CreateInstance::new("shop2", "order-processing").id(id.clone()))
                .await
                .unwrap();
            assert_eq!(first.revision, again.revision, "{id}");
            let genesis = &rt.history("shop", &id, 0, 1).await.unwrap()[0].record;
            assert_eq!(genesis.flags[0].key, "cnsm.rollout.order-processing");
            assert_eq!(genesis.flags[0].value, json!(first.revision));
        }
        let status = rt.rollout_status("shop", "order-processing").await.unwrap();
        assert_eq!(
            status.active_by_revision.values().sum::<u64>(),
            n as u64 + 1
        );

        // Abort: back to the stable revision for every new instance.
        rt.change_rollout("shop", "order-processing", RolloutChange::Abort)
            .await
            .unwrap();
        for i in 0..50 {
            let created = rt
                .create_instance(
                    CreateInstance::new("shop", "order-processing").id(format!("a-{i}")),
                )
                .await
                .unwrap();
            assert_eq!(created.revision, 1);
        }
        // Set again, then promote: every new instance gets the canary; the rollout is cleared
        // because the canary is the latest revision.
        rt.change_rollout(
            "shop",
            "order-processing",
            RolloutChange::Set {
                revision: 2,
                weight: 50,
            },
        )
        .await
        .unwrap();
        let promoted = rt
            .change_rollout("shop", "order-processing", RolloutChange::Promote)
            .await
            .unwrap();
        assert_eq!(promoted.rollout, None);
        for i in 0..50 {
            let created = rt
                .create_instance(
                    CreateInstance::new("shop", "order-processing").id(format!("p-{i}")),
                )
                .await
                .unwrap();
            assert_eq!(created.revision, 2);
        }
        let err = rt
            .change_rollout("shop", "order-processing", RolloutChange::Promote)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no rollout in progress"), "{err}");
        rt.shutdown();
    });
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Erasure end to end on the embedded store: personal values leave the data, the history and
/// the store file; `verify` and the test kit's verifier stay green; the instance goes on.
#[test]
fn erase_removes_personal_data_and_the_chain_still_verifies() {
    block_on(async {
        let env = Env::new();
        let rt = env.runtime();
        rt.apply_yaml(&example("order-processing.yaml"), None)
            .await
            .unwrap();
        rt.create_instance(
            CreateInstance::new("shop", "order-processing")
                .id("o-1")
                .data(obj(json!({"total": 40, "email": "ann@secret.example"}))),
        )
        .await
        .unwrap();
        rt.send("shop", "o-1", EventRequest::new("complete"))
            .await
            .unwrap();
        rt.send(
            "shop",
            "o-1",
            EventRequest::new("pay").payload(json!({"amount": 40, "card": "4111-SECRET-CARD"})),
        )
        .await
        .unwrap();
        let unknown = rt
            .erase("shop", "nobody", cnsm_runtime::EraseRequest::default())
            .await
            .unwrap_err();
        assert_eq!(unknown.error_type(), "NotFound");
        let bad = cnsm_runtime::EraseRequest {
            fields: vec!["a..b".into()],
            ..Default::default()
        };
        let bad = rt.erase("shop", "o-1", bad).await.unwrap_err();
        assert_eq!(bad.error_type(), "Invalid");

        let erased = rt
            .erase(
                "shop",
                "o-1",
                cnsm_runtime::EraseRequest {
                    reason: Some("GDPR art. 17".into()),
                    actor: "alice".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(erased.record.version, 3);
        assert_eq!(erased.record.kind, cnsm_core::record::RecordKind::Erasure);
        assert_eq!(erased.instance.state.as_ref(), "paid");
        assert_eq!(
            erased.instance.data.get("email"),
            Some(&json!(cnsm_core::record::ERASED_MARKER))
        );
        let got = rt.instance("shop", "o-1").await.unwrap();
        assert_eq!(got, erased.instance);
        let history = rt.history("shop", "o-1", 0, 100).await.unwrap();
        assert_eq!(history.len(), 4);
        for entry in &history {
            let text = serde_json::to_string(&entry.record).unwrap();
            assert!(!text.contains("ann@secret.example"), "{text}");
            assert!(!text.contains("4111-SECRET-CARD"), "{text}");
        }
        let report = rt.store().verify().unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        SnapshotVerifier::new(&**rt.store())
            .verify_all(None)
            .expect("the test kit verifies the erased chain");

        // Without its erasure record the redacted chain no longer verifies.
        let sealed = rt.store().history("shop", "o-1", 0, 0).unwrap();
        let without = cnsm_core::record::verify_chain(
            "shop",
            "o-1",
            0,
            cnsm_core::Hash32::ZERO,
            &sealed[..3],
        );
        assert_eq!(
            without,
            Err(cnsm_core::record::ChainError::HashMismatch { version: 0 })
        );

        // The instance goes on, and its chain with it.
        let shipped = rt
            .send("shop", "o-1", EventRequest::new("ship"))
            .await
            .unwrap();
        assert_eq!(shipped.record.version, 4);
        assert_eq!(shipped.record.prev_hash, erased.hash);
        assert!(rt.store().verify().unwrap().is_ok());
        rt.shutdown();
        drop(rt);

        // Reopened: the store still verifies, and no copy of the erased bytes is left in the
        // store's records.
        let rt = env.runtime();
        assert!(rt.store().verify().unwrap().is_ok());
        let mut after = 0;
        while let Ok(page) = rt.store().records_after(after, 0) {
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (_, sealed) in &page {
                assert!(!contains(&sealed.bytes, b"ann@secret.example"));
                assert!(!contains(&sealed.bytes, b"4111-SECRET-CARD"));
            }
        }
        rt.shutdown();
        drop(rt);
        let file = std::fs::read(env.path.join(cnsm_store::embedded::FILE_NAME)).unwrap();
        assert!(
            !contains(&file, b"4111-SECRET-CARD"),
            "the store file still holds an erased value"
        );
    });
}
