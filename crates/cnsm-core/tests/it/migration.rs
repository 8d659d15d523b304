//! Migration policies and the lock/migration records.

use std::collections::BTreeMap;

use cnsm_core::admission::admit_str;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use cnsm_core::migration::{CompiledMigration, parse_policy};
use cnsm_core::record::{Hash32, RecordKind, TimerKind, verify_chain};
use cnsm_core::{Instance, SealedRecord, TransitionError};
use serde_json::{Value, json};

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn machines() -> (Machine, Machine) {
    let v1 = read(&format!(
        "{}/../../../shared/examples/order-processing.yaml",
        env!("CARGO_MANIFEST_DIR")
    ));
    let v2 = read(&format!(
        "{}/tests/fixtures/order-processing-v2.yaml",
        env!("CARGO_MANIFEST_DIR")
    ));
    let compile = |yaml: &str, revision| {
        Machine::compile(admit_str(yaml, None).into_result().expect("valid"))
            .expect("compiles")
            .with_revision(revision)
    };
    (compile(&v1, 1), compile(&v2, 2))
}

fn policy() -> cnsm_core::migration::StateMigrationPolicy {
    parse_policy(&read(&format!(
        "{}/tests/fixtures/order-migration.yaml",
        env!("CARGO_MANIFEST_DIR")
    )))
    .expect("a valid policy")
}

/// An instance of `machine` driven by `events`, with its sealed history.
fn drive(machine: &Machine, events: &[(&str, Value)]) -> (Instance, Vec<SealedRecord>) {
    let mut data = serde_json::Map::new();
    data.insert("total".into(), json!(40));
    let genesis = machine
        .create(NewInstance {
            namespace: "shop",
            id: "o-1",
            data,
            labels: BTreeMap::new(),
            now_ms: 1_000,
            actor: "t",
        })
        .unwrap();
    let sealed = genesis.seal();
    let mut instance = Instance::from_genesis(&genesis, sealed.hash).unwrap();
    let mut history = vec![sealed];
    for (i, (name, payload)) in events.iter().enumerate() {
        let input = Input::new(Trigger::Event { name, payload }, 2_000 + i as u64, "t");
        let record = machine.apply(&instance, &input).unwrap();
        let sealed = record.seal();
        instance.apply_record(&record, sealed.hash).unwrap();
        history.push(sealed);
    }
    (instance, history)
}

fn commit(
    instance: &mut Instance,
    history: &mut Vec<SealedRecord>,
    record: &cnsm_core::StateChangeEvent,
) {
    let sealed = record.seal();
    instance.apply_record(record, sealed.hash).unwrap();
    history.push(sealed);
}

#[test]
fn policy_problems_are_listed_with_paths() {
    let bad = "apiVersion: statemachine.cn/v1alpha1\nkind: StateMigrationPolicy\nmetadata: {name: Bad_Name}\nspec:\n  machine: m\n  lockSeconds: 0\n  dataTransforms: {x: \"data.(\"}\n";
    let problems = parse_policy(bad).unwrap_err();
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["metadata.name", "spec.lockSeconds", "spec.dataTransforms.x"],
        "{problems:?}"
    );
    let unknown = "apiVersion: statemachine.cn/v1alpha1\nkind: StateMigrationPolicy\nmetadata: {name: p}\nspec: {machine: m, statemapping: {}}\n";
    let problems = parse_policy(unknown).unwrap_err();
    assert!(problems[0].message.contains("statemapping"), "{problems:?}");
}

#[test]
fn compile_requires_a_counterpart_for_every_state() {
    let (v1, v2) = machines();
    let mut policy = policy();
    policy.spec.state_mapping.remove("validated");
    let problems = CompiledMigration::compile(&policy, &v1, &v2).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("'validated'") && p.contains("no counterpart")),
        "{problems:?}"
    );
    policy.spec.refuse_from.push("validated".into());
    CompiledMigration::compile(&policy, &v1, &v2).expect("refusing it is enough");
    policy
        .spec
        .state_mapping
        .insert("shipped".into(), "nowhere".into());
    let problems = CompiledMigration::compile(&policy, &v1, &v2).unwrap_err();
    assert!(
        problems.iter().any(|p| p.contains("'nowhere'")),
        "{problems:?}"
    );
}

#[test]
fn lock_then_migrate_moves_the_instance_to_revision_2() {
    let (v1, v2) = machines();
    let migration = CompiledMigration::compile(&policy(), &v1, &v2).expect("compiles");
    let (mut instance, mut history) = drive(
        &v1,
        &[("complete", Value::Null), ("pay", json!({"amount": 40}))],
    );
    assert_eq!(&*instance.state, "paid");
    let plan = migration.plan(&instance).expect("migratable");
    assert_eq!(plan.target_state, "payment-received");
    assert_eq!(plan.data_set["currency"], json!("EUR"));
    assert_eq!(plan.data_set["totalCents"], json!(4000));

    let now = 10_000;
    let lock = v1
        .lock(
            &instance,
            &migration.name,
            now + migration.lock_ms,
            &Input::new(
                Trigger::Timer(instance.timer.unwrap()),
                now,
                "system:migration",
            ),
        )
        .unwrap();
    assert_eq!(lock.kind, RecordKind::Lock);
    assert_eq!(lock.format, 2);
    commit(&mut instance, &mut history, &lock);
    // During the lock: events are refused with Locked, naming the migration.
    let ship = Input::new(
        Trigger::Event {
            name: "ship",
            payload: &Value::Null,
        },
        now + 1,
        "t",
    );
    match v1.apply(&instance, &ship) {
        Err(TransitionError::Locked { migration, .. }) => assert_eq!(migration, "order-v1-to-v2"),
        other => panic!("expected Locked, got {other:?}"),
    }
    // Another migration cannot take it.
    let input = Input::new(
        Trigger::Event {
            name: "x",
            payload: &Value::Null,
        },
        now + 2,
        "system:migration",
    );
    assert!(matches!(
        v2.migrate(
            &instance,
            "other",
            "payment-received",
            Default::default(),
            &input
        ),
        Err(TransitionError::Locked { .. })
    ));

    let record = v2
        .migrate(
            &instance,
            &migration.name,
            &plan.target_state,
            plan.data_set.clone(),
            &input,
        )
        .unwrap();
    assert_eq!(record.kind, RecordKind::Migration);
    assert_eq!((record.revision, record.revision_hash), (2, v2.hash()));
    assert_eq!(record.from.as_deref(), Some("paid"));
    assert_eq!(&*record.to, "payment-received");
    commit(&mut instance, &mut history, &record);
    assert_eq!(instance.revision, 2);
    assert_eq!(instance.lock, None);
    assert_eq!(instance.data["totalCents"], json!(4000));
    let timer = instance.timer.expect("re-armed");
    assert_eq!(timer.kind, TimerKind::Timeout);
    assert_eq!(
        timer.due_ms,
        now + 2 + 604_800_000,
        "the new revision's timeout"
    );
    verify_chain("shop", "o-1", 0, Hash32::ZERO, &history).expect("the chain verifies");
    let replayed = Instance::replay(
        history
            .iter()
            .map(|s| (s.open().unwrap(), s.hash))
            .collect::<Vec<_>>()
            .iter()
            .map(|(r, h)| (r, *h)),
    )
    .unwrap()
    .unwrap();
    assert_eq!(replayed, instance);
    // Exactly once: a second migration is refused; the instance goes on under revision 2.
    assert!(
        v2.migrate(
            &instance,
            &migration.name,
            "payment-received",
            Default::default(),
            &input
        )
        .is_err()
    );
    assert!(migration.plan(&instance).is_err());
    let pack = Input::new(
        Trigger::Event {
            name: "pack",
            payload: &Value::Null,
        },
        now + 3,
        "t",
    );
    let packed = v2.apply(&instance, &pack).unwrap();
    assert_eq!(&*packed.to, "packed");
}

#[test]
fn expired_lock_no_longer_blocks_and_is_dropped() {
    let (v1, v2) = machines();
    let migration = CompiledMigration::compile(&policy(), &v1, &v2).unwrap();
    let (mut instance, mut history) = drive(&v1, &[]);
    let input = Input::new(
        Trigger::Event {
            name: "x",
            payload: &Value::Null,
        },
        5_000,
        "system:migration",
    );
    let lock = v1.lock(&instance, &migration.name, 6_000, &input).unwrap();
    commit(&mut instance, &mut history, &lock);
    let late = Input::new(
        Trigger::Event {
            name: "complete",
            payload: &Value::Null,
        },
        6_000,
        "t",
    );
    let record = v1.apply(&instance, &late).unwrap();
    assert_eq!(record.lock, None, "the expired lease is dropped");
    commit(&mut instance, &mut history, &record);
    assert_eq!(&*instance.state, "validated");
    // validated maps back to created in revision 2.
    assert_eq!(migration.plan(&instance).unwrap().target_state, "created");
}

#[test]
fn reverse_mapping_for_rollback() {
    let (v1, v2) = machines();
    let migration = CompiledMigration::compile(&policy(), &v1, &v2).unwrap();
    let back = migration.reverse(&v1, &v2);
    assert_eq!((back.from_revision, back.to_revision), (2, 1));
    let (instance, _) = drive(
        &v2,
        &[("pay", json!({"amount": 40})), ("pack", Value::Null)],
    );
    let blocked = back.plan(&instance).unwrap_err();
    assert!(blocked.contains("'packed'"), "no way back: {blocked}");
    let (created, _) = drive(&v2, &[]);
    let blocked = back.plan(&created).unwrap_err();
    assert!(
        blocked.contains("'created'"),
        "created and validated both map to it: {blocked}"
    );
    let (paid, _) = drive(&v2, &[("pay", json!({"amount": 40}))]);
    assert_eq!(back.plan(&paid).unwrap().target_state, "paid");
}

#[test]
fn diff_lists_states_and_transitions() {
    let (v1, v2) = machines();
    let d = cnsm_core::diff::diff(v1.definition(), v2.definition());
    assert_eq!(d.states_added, ["packed", "payment-received"]);
    assert_eq!(d.states_removed, ["paid", "validated"]);
    assert_eq!(d.states_changed.len(), 1, "{:?}", d.states_changed);
    assert_eq!(d.states_changed[0].name, "created");
    assert_eq!(d.states_changed[0].changes, ["timeoutSeconds: 30 -> 60"]);
    let added: Vec<String> = d
        .transitions_added
        .iter()
        .map(|e| format!("{} -{}-> {}", e.from, e.label, e.to))
        .collect();
    assert!(
        added.contains(&"created -event pay-> payment-received".to_owned()),
        "{added:?}"
    );
    assert!(
        added.contains(&"packed -event ship-> shipped".to_owned()),
        "{added:?}"
    );
    let removed: Vec<String> = d
        .transitions_removed
        .iter()
        .map(|e| format!("{} -{}-> {}", e.from, e.label, e.to))
        .collect();
    assert!(
        removed.contains(&"created -complete-> validated".to_owned()),
        "{removed:?}"
    );
    assert!(cnsm_core::diff::diff(v1.definition(), v1.definition()).is_empty());
}
