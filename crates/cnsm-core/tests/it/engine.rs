//! Engine tests: the examples driven step by step, and property tests against a reference model.

use std::collections::BTreeMap;

use cnsm_core::admission::admit_str;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use cnsm_core::record::{Hash32, RecordKind, TimerKind, verify_chain};
use cnsm_core::resource::{EventTransition, Outcome, Spec, StateDef, StateMachine, StateType};
use cnsm_core::{Instance, Status, TransitionError};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn example(name: &str) -> String {
    let path = format!(
        "{}/../../../shared/examples/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A driven instance with its sealed history.
struct Run {
    machine: Machine,
    instance: Instance,
    sealed: Vec<cnsm_core::SealedRecord>,
    now_ms: u64,
}

impl Run {
    fn new(yaml: &str, data: Value) -> Run {
        let definition = admit_str(yaml, None).into_result().expect("valid machine");
        Run::from_definition(definition, data)
    }

    fn from_definition(definition: StateMachine, data: Value) -> Run {
        let machine = Machine::compile(definition)
            .expect("compiles")
            .with_revision(1);
        let Value::Object(data) = data else {
            panic!("data must be an object")
        };
        let genesis = machine
            .create(NewInstance {
                namespace: "test",
                id: "i-1",
                data,
                labels: BTreeMap::new(),
                now_ms: 1_000,
                actor: "tester",
            })
            .expect("create");
        let sealed = genesis.seal();
        let instance = Instance::from_genesis(&genesis, sealed.hash).expect("genesis");
        Run {
            machine,
            instance,
            sealed: vec![sealed],
            now_ms: 1_000,
        }
    }

    fn commit(&mut self, record: cnsm_core::StateChangeEvent) {
        let sealed = record.seal();
        self.instance
            .apply_record(&record, sealed.hash)
            .expect("record applies");
        self.sealed.push(sealed);
    }

    fn send(&mut self, event: &str, payload: Value) -> Result<(), TransitionError> {
        self.now_ms += 10;
        let input = Input::new(
            Trigger::Event {
                name: event,
                payload: &payload,
            },
            self.now_ms,
            "tester",
        );
        let record = self.machine.apply(&self.instance, &input)?;
        self.commit(record);
        Ok(())
    }

    /// Jumps to the instance's timer and fires it; false when it has none.
    fn fire_timer(&mut self) -> bool {
        let Some(timer) = self.instance.timer else {
            return false;
        };
        self.now_ms = self.now_ms.max(timer.due_ms);
        let input = Input::new(Trigger::Timer(timer), self.now_ms, "system:timer");
        match self
            .machine
            .fire(&self.instance, &input)
            .expect("timer applies")
        {
            Some(record) => {
                self.commit(record);
                true
            }
            None => false,
        }
    }

    fn state(&self) -> &str {
        &self.instance.state
    }

    fn check_chain(&self) {
        verify_chain("test", "i-1", 0, Hash32::ZERO, &self.sealed).expect("chain verifies");
        let decoded: Vec<_> = self
            .sealed
            .iter()
            .map(|s| (s.open().unwrap(), s.hash))
            .collect();
        let replayed = Instance::replay(decoded.iter().map(|(r, h)| (r, *h)))
            .unwrap()
            .unwrap();
        assert_eq!(replayed, self.instance, "replay equals the live instance");
    }
}

#[test]
fn order_processing_happy_path() {
    let mut run = Run::new(&example("order-processing.yaml"), json!({"total": 40}));
    assert_eq!(run.state(), "created");
    assert_eq!(run.instance.timer.map(|t| t.kind), Some(TimerKind::Timeout));
    run.send("complete", Value::Null).unwrap();
    assert_eq!(run.state(), "validated");
    let err = run.send("pay", json!({"amount": 10})).unwrap_err();
    assert_eq!(err.error_type(), "TransitionFailure");
    assert!(
        err.to_string().contains("pay") && err.to_string().contains("validated"),
        "{err}"
    );
    run.send("pay", json!({"amount": 40})).unwrap();
    assert_eq!(run.state(), "paid");
    assert_eq!(run.instance.data["paidAmount"], json!(40));
    run.send("ship", Value::Null).unwrap();
    run.send("deliver", Value::Null).unwrap();
    assert_eq!(run.instance.status, Status::Succeeded);
    assert_eq!(run.instance.version, 4);
    assert_eq!(run.instance.timer, None);
    let err = run.send("refund", Value::Null).unwrap_err();
    assert!(err.to_string().contains("ended"), "{err}");
    run.check_chain();
}

#[test]
fn order_processing_timeout_cancels() {
    let mut run = Run::new(&example("order-processing.yaml"), json!({"total": 40}));
    assert!(run.fire_timer());
    assert_eq!(run.state(), "cancelled");
    assert_eq!(run.instance.status, Status::Cancelled);
    let last = run.sealed.last().unwrap().open().unwrap();
    assert_eq!(last.kind, RecordKind::Timer);
    assert_eq!(&*last.actor, "system:timer");
    run.check_chain();
}

#[test]
fn stale_timer_is_dropped() {
    let mut run = Run::new(&example("order-processing.yaml"), json!({"total": 40}));
    let old = run.instance.timer.unwrap();
    run.send("complete", Value::Null).unwrap();
    let input = Input::new(Trigger::Timer(old), old.due_ms, "system:timer");
    assert_eq!(run.machine.fire(&run.instance, &input).unwrap(), None);
}

#[test]
fn saga_compensates_in_reverse_order() {
    let mut run = Run::new(&example("payment-saga.yaml"), json!({}));
    run.send("complete", Value::Null).unwrap(); // reserve-stock done: push release-stock
    run.send("complete", Value::Null).unwrap(); // charge-card done: push refund-card
    assert_eq!(run.state(), "book-courier");
    assert_eq!(
        run.instance.compensations,
        vec!["release-stock", "refund-card"]
    );
    // book-courier has no retry and no onFailure: a timeout is a hard failure.
    assert!(run.fire_timer());
    assert_eq!(run.state(), "refund-card");
    assert_eq!(run.instance.phase, cnsm_core::instance::Phase::Compensating);
    run.send("complete", Value::Null).unwrap();
    assert_eq!(run.state(), "release-stock");
    run.send("complete", Value::Null).unwrap();
    assert_eq!(run.instance.status, Status::Failed);
    assert_eq!(run.instance.reason.as_deref(), Some("Timeout"));
    run.check_chain();
}

#[test]
fn retries_with_backoff_then_fail() {
    let mut run = Run::new(&example("payment-saga.yaml"), json!({}));
    // reserve-stock: maxAttempts 3, backoff 1s x2.
    run.send("fail", Value::Null).unwrap();
    assert!(run.instance.in_backoff);
    let timer = run.instance.timer.unwrap();
    assert_eq!(timer.kind, TimerKind::Backoff);
    assert_eq!(timer.due_ms, run.now_ms + 1_000);
    let err = run.send("complete", Value::Null).unwrap_err();
    assert!(err.to_string().contains("back-off"), "{err}");
    assert!(run.fire_timer());
    assert_eq!(run.instance.attempt, 2);
    assert_eq!(run.instance.timer.unwrap().kind, TimerKind::Timeout);
    run.send("fail", Value::Null).unwrap();
    assert_eq!(run.instance.timer.unwrap().due_ms, run.now_ms + 2_000);
    assert!(run.fire_timer());
    assert_eq!(run.instance.attempt, 3);
    run.send("fail", Value::Null).unwrap();
    assert_eq!(run.instance.status, Status::Failed);
    assert_eq!(run.instance.reason.as_deref(), Some("Failed"));
    run.check_chain();
}

#[test]
fn fail_is_refused_without_retry_or_on_failure() {
    let mut run = Run::new(&example("order-processing.yaml"), json!({"total": 1}));
    let err = run.send("fail", Value::Null).unwrap_err();
    assert!(matches!(
        err,
        TransitionError::TransitionFailure {
            reason: cnsm_core::error::FailureReason::ReservedEventNotHonoured,
            ..
        }
    ));
}

#[test]
fn provisioning_choice_and_wait() {
    let mut small = Run::new(&example("provisioning.yaml"), json!({}));
    small.send("submit", json!({"size": 8})).unwrap();
    assert_eq!(small.state(), "creating");
    let record = small.sealed.last().unwrap().open().unwrap();
    assert_eq!(
        record.via.iter().map(|s| &**s).collect::<Vec<_>>(),
        vec!["route"]
    );
    assert_eq!(record.version, 1, "a choice resolves in the same record");
    small.send("complete", Value::Null).unwrap();
    assert_eq!(small.state(), "settling");
    assert_eq!(small.instance.timer.unwrap().kind, TimerKind::Wait);
    assert!(small.fire_timer());
    assert_eq!(small.instance.status, Status::Succeeded);
    small.check_chain();

    let mut big = Run::new(&example("provisioning.yaml"), json!({}));
    big.send("submit", json!({"size": 128})).unwrap();
    assert_eq!(big.state(), "manual-approval");
    big.send("reject", Value::Null).unwrap();
    assert_eq!(big.instance.status, Status::Failed);
    big.check_chain();
}

#[test]
fn flag_gate_without_decision_denies_and_falls_through() {
    let mut run = Run::new(&example("checkout-canary.yaml"), json!({}));
    run.send("checkout", Value::Null).unwrap();
    assert_eq!(run.state(), "address");
    let record = run.sealed.last().unwrap().open().unwrap();
    assert_eq!(record.flags.len(), 1);
    assert!(!record.flags[0].allowed);
}

#[test]
fn flag_gate_with_decision_allows() {
    let yaml = example("checkout-canary.yaml");
    let mut run = Run::new(&yaml, json!({}));
    let decision = cnsm_core::record::FlagDecision {
        key: "one-click-checkout".into(),
        variant: Some("on".into()),
        value: Value::Bool(true),
        reason: "TARGETING_MATCH".into(),
        error: None,
        allowed: false,
    };
    let decisions = [decision];
    let payload = Value::Null;
    let mut input = Input::new(
        Trigger::Event {
            name: "checkout",
            payload: &payload,
        },
        2_000,
        "t",
    );
    input.flags = &decisions;
    let record = run.machine.apply(&run.instance, &input).unwrap();
    assert_eq!(&*record.to, "one-click-review");
    assert!(record.flags[0].allowed);
    run.commit(record);
    run.check_chain();
}

#[test]
fn guard_error_is_a_transition_failure() {
    let yaml = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: g}
spec:
  initialState: a
  states:
  - name: a
    type: task
    timeoutSeconds: 5
    onEvent: [{event: go, target: b, guard: "event.missing.field > 1"}]
  - {name: b, type: final}
"#;
    let mut run = Run::new(yaml, json!({}));
    let err = run.send("go", json!({})).unwrap_err();
    match err {
        TransitionError::TransitionFailure { reason, .. } => {
            assert_eq!(reason.as_str(), "GuardError")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(run.instance.version, 0, "nothing changed");
}

// ---------------------------------------------------------------------------------------------
// Property tests against a reference model.

/// A random machine: task states 0..n with events over {a, b, complete}, some final states.
#[derive(Debug, Clone)]
struct Spec0 {
    n_tasks: usize,
    n_finals: usize,
    /// (from task, event index, target, guard threshold, assign counter)
    edges: Vec<(usize, usize, usize, Option<i64>, bool)>,
    /// onTimeout target per task (None: a timeout is a hard failure).
    on_timeout: Vec<Option<usize>>,
}

const EVENTS: [&str; 3] = ["a", "b", "complete"];

fn spec_strategy() -> impl Strategy<Value = Spec0> {
    (2usize..6, 1usize..3).prop_flat_map(|(n_tasks, n_finals)| {
        let n = n_tasks + n_finals;
        (
            prop::collection::vec(
                (
                    0..n_tasks,
                    0usize..3,
                    0..n,
                    prop::option::of(-2i64..3),
                    any::<bool>(),
                ),
                1..12,
            ),
            prop::collection::vec(prop::option::of(0..n), n_tasks),
        )
            .prop_map(move |(edges, on_timeout)| Spec0 {
                n_tasks,
                n_finals,
                edges,
                on_timeout,
            })
    })
}

fn name(i: usize, n_tasks: usize) -> String {
    if i < n_tasks {
        format!("t{i}")
    } else {
        format!("f{}", i - n_tasks)
    }
}

fn to_definition(spec: &Spec0) -> StateMachine {
    let mut states = Vec::new();
    for i in 0..spec.n_tasks {
        let mut s = StateDef::new(name(i, spec.n_tasks), StateType::Task);
        s.timeout_seconds = Some(10 + i as u64);
        s.on_timeout = spec.on_timeout[i].map(|t| name(t, spec.n_tasks));
        for &(from, ev, to, guard, assign) in &spec.edges {
            if from != i {
                continue;
            }
            let mut t = EventTransition {
                event: EVENTS[ev].into(),
                target: name(to, spec.n_tasks),
                guard: guard.map(|k| format!("event.v > {k}")),
                flag: None,
                assign: BTreeMap::new(),
                context: Vec::new(),
            };
            if assign {
                t.assign.insert("n".into(), "data.n + 1".into());
            }
            s.on_event.push(t);
        }
        states.push(s);
    }
    for f in 0..spec.n_finals {
        let mut s = StateDef::new(name(spec.n_tasks + f, spec.n_tasks), StateType::Final);
        s.outcome = Some(if f == 0 {
            Outcome::Succeeded
        } else {
            Outcome::Cancelled
        });
        states.push(s);
    }
    StateMachine {
        api_version: "statemachine.cn/v1alpha1".into(),
        kind: "StateMachine".into(),
        metadata: cnsm_core::resource::Metadata {
            name: "random".into(),
            namespace: "test".into(),
            ..Default::default()
        },
        spec: Spec {
            initial_state: "t0".into(),
            states,
            retention: None,
            notify: Vec::new(),
        },
    }
}

/// The reference model: the definition read directly, no compilation.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    state: usize,
    status: Status,
    version: u64,
    n: i64,
}

impl Model {
    fn step(&mut self, spec: &Spec0, action: &Action) -> bool {
        if self.status != Status::Active {
            return false;
        }
        match action {
            Action::Event(ev, v) => {
                for &(from, e, to, guard, assign) in &spec.edges {
                    if from != self.state || e != *ev {
                        continue;
                    }
                    if let Some(k) = guard
                        && *v <= k
                    {
                        continue;
                    }
                    if assign {
                        self.n += 1;
                    }
                    self.enter(spec, to);
                    return true;
                }
                false
            }
            Action::Timeout => {
                match spec.on_timeout[self.state] {
                    Some(to) => self.enter(spec, to),
                    None => {
                        self.status = Status::Failed;
                        self.version += 1;
                    }
                }
                true
            }
        }
    }

    fn enter(&mut self, spec: &Spec0, to: usize) {
        self.state = to;
        self.version += 1;
        if to >= spec.n_tasks {
            self.status = if to == spec.n_tasks {
                Status::Succeeded
            } else {
                Status::Cancelled
            };
        }
    }
}

#[derive(Debug, Clone)]
enum Action {
    Event(usize, i64),
    Timeout,
}

fn action_strategy() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0usize..3, -3i64..4).prop_map(|(e, v)| Action::Event(e, v)),
        1 => Just(Action::Timeout),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn engine_agrees_with_reference_model(
        spec in spec_strategy(),
        actions in prop::collection::vec(action_strategy(), 0..40),
    ) {
        let mut run = Run::from_definition(to_definition(&spec), json!({"n": 0}));
        let mut model = Model { state: 0, status: Status::Active, version: 0, n: 0 };
        for action in &actions {
            let accepted_by_model = model.step(&spec, action);
            let accepted_by_engine = match action {
                Action::Event(e, v) => run.send(EVENTS[*e], json!({"v": v})).is_ok(),
                Action::Timeout => run.instance.status == Status::Active && run.fire_timer(),
            };
            prop_assert_eq!(accepted_by_engine, accepted_by_model, "action {:?}", action);
            prop_assert_eq!(run.instance.state.to_string(), name(model.state, spec.n_tasks));
            prop_assert_eq!(run.instance.status, model.status);
            prop_assert_eq!(run.instance.version, model.version);
            prop_assert_eq!(run.instance.data.get("n").cloned(), Some(json!(model.n)));
            // Invariants: an active instance has exactly one timer; a final one none.
            prop_assert_eq!(run.instance.timer.is_some(), run.instance.status == Status::Active);
        }
        run.check_chain();
    }

    #[test]
    fn records_round_trip_through_cbor(data in prop::collection::btree_map("[a-z]{1,6}", any::<i32>(), 0..6)) {
        let data: Map<String, Value> = data.into_iter().map(|(k, v)| (k, json!(v))).collect();
        let run = Run::new(&example("order-processing.yaml"), Value::Object(data));
        let sealed = &run.sealed[0];
        let reencoded = sealed.open().unwrap().seal();
        prop_assert_eq!(&reencoded.bytes, &sealed.bytes);
        prop_assert_eq!(reencoded.hash, sealed.hash);
    }
}

// --- Operator controls ---------------------------------------------------------------------

impl Run {
    fn control(
        &mut self,
        action: cnsm_core::engine::Control,
        reason: Option<&str>,
    ) -> Result<(), TransitionError> {
        self.now_ms += 10;
        let input = Input::new(
            Trigger::Control { action, reason },
            self.now_ms,
            "ops@example",
        );
        let record = self.machine.apply(&self.instance, &input)?;
        self.commit(record);
        Ok(())
    }
}

#[test]
fn suspend_refuses_events_and_holds_the_timer_until_resume() {
    use cnsm_core::engine::Control;
    let mut run = Run::new(&example("order-processing.yaml"), json!({"total": 40}));
    let timer = run.instance.timer.unwrap();
    run.control(Control::Suspend, None).unwrap();
    assert!(run.instance.suspended);
    assert_eq!(
        run.instance.timer,
        Some(timer),
        "the timer is held, not dropped"
    );
    let last = run.sealed.last().unwrap().open().unwrap();
    assert_eq!(last.kind, RecordKind::Suspend);
    assert_eq!(&*last.actor, "ops@example");
    assert_eq!(
        last.format, 2,
        "an older binary must refuse, not misread, a suspension"
    );
    let genesis = run.sealed[0].open().unwrap();
    assert_eq!(genesis.format, 1, "records without controls keep format 1");
    let err = run.send("complete", Value::Null).unwrap_err();
    assert_eq!(err.error_type(), "TransitionFailure");
    assert!(err.to_string().contains("suspended"), "{err}");
    // The timer falls due while suspended: it does not fire.
    let input = Input::new(Trigger::Timer(timer), timer.due_ms + 5, "system:timer");
    assert_eq!(run.machine.fire(&run.instance, &input).unwrap(), None);
    let err = run.control(Control::Suspend, None).unwrap_err();
    assert!(err.to_string().contains("already suspended"), "{err}");
    run.control(Control::Resume, None).unwrap();
    assert!(!run.instance.suspended);
    assert_eq!(
        run.instance.timer,
        Some(timer),
        "resume re-arms the same timer"
    );
    // Overdue: it fires right after resume.
    assert!(run.fire_timer());
    assert_eq!(run.state(), "cancelled");
    let err = run.control(Control::Resume, None).unwrap_err();
    assert!(err.to_string().contains("not suspended"), "{err}");
    run.check_chain();
}

#[test]
fn cancel_ends_the_instance_and_keeps_the_reason() {
    use cnsm_core::engine::Control;
    let mut run = Run::new(&example("order-processing.yaml"), json!({"total": 40}));
    run.send("complete", Value::Null).unwrap();
    run.control(Control::Cancel, Some("customer request"))
        .unwrap();
    assert_eq!(run.instance.status, Status::Cancelled);
    assert_eq!(run.instance.reason.as_deref(), Some("customer request"));
    assert_eq!(run.instance.timer, None);
    assert_eq!(run.state(), "validated", "cancel does not move the state");
    let err = run.control(Control::Cancel, None).unwrap_err();
    assert!(err.to_string().contains("already ended"), "{err}");
    run.check_chain();
}

#[test]
fn cancel_runs_compensations_first() {
    use cnsm_core::engine::Control;
    let mut run = Run::new(&example("payment-saga.yaml"), json!({}));
    run.send("complete", Value::Null).unwrap();
    run.send("complete", Value::Null).unwrap();
    run.control(Control::Suspend, None).unwrap();
    run.control(Control::Cancel, None).unwrap();
    assert!(!run.instance.suspended, "cancel lifts a suspension");
    assert_eq!(run.instance.phase, cnsm_core::instance::Phase::Compensating);
    assert_eq!(run.state(), "refund-card");
    run.send("complete", Value::Null).unwrap();
    assert_eq!(run.state(), "release-stock");
    run.send("complete", Value::Null).unwrap();
    assert_eq!(run.instance.status, Status::Cancelled);
    run.check_chain();
}

#[test]
fn redrive_reenters_the_failed_state() {
    use cnsm_core::engine::Control;
    let mut run = Run::new(&example("payment-saga.yaml"), json!({}));
    let err = run.control(Control::Redrive, None).unwrap_err();
    assert!(err.to_string().contains("only a failed instance"), "{err}");
    // reserve-stock: three attempts, then a hard failure with nothing to compensate.
    run.send("fail", Value::Null).unwrap();
    assert!(run.fire_timer());
    run.send("fail", Value::Null).unwrap();
    assert!(run.fire_timer());
    run.send("fail", Value::Null).unwrap();
    assert_eq!(run.instance.status, Status::Failed);
    let failed_in = run.state().to_owned();
    let entry_seq = run.instance.entry_seq;
    run.control(Control::Redrive, None).unwrap();
    assert_eq!(run.instance.status, Status::Active);
    assert_eq!(run.state(), failed_in);
    assert_eq!(run.instance.attempt, 1);
    assert_eq!(run.instance.reason, None);
    assert_eq!(run.instance.entry_seq, entry_seq + 1);
    assert_eq!(run.instance.timer.map(|t| t.kind), Some(TimerKind::Timeout));
    run.send("complete", Value::Null).unwrap();
    assert_eq!(run.state(), "charge-card");
    run.check_chain();
}
