//! `Machine::flag_queries` (the evaluation context of flag gates) and how the engine applies
//! pre-made decisions.

use std::collections::BTreeMap;

use cnsm_core::Instance;
use cnsm_core::engine::{Input, Machine, NewInstance, Trigger};
use cnsm_core::flags::FlagValueType;
use cnsm_core::record::FlagDecision;
use serde_json::{Value, json};

const YAML: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: checkout, namespace: shop}
spec:
  initialState: cart
  states:
  - name: cart
    type: task
    timeoutSeconds: 60
    onEvent:
    - event: checkout
      target: fast
      flag: {key: fast, targetingKey: "data.customer", onFlagError: allow}
      context: [country, missing]
    - {event: checkout, target: fast, flag: {key: ui, variant: compact}}
    - {event: checkout, target: slow}
    - {event: touch, target: cart}
  - {name: fast, type: final}
  - {name: slow, type: final}
"#;

fn setup() -> (Machine, Instance) {
    let definition = cnsm_core::admission::admit_str(YAML, None)
        .into_result()
        .expect("admitted");
    let machine = Machine::compile(definition)
        .expect("compiles")
        .with_revision(3);
    let mut data = serde_json::Map::new();
    data.insert("customer".into(), json!("c-42"));
    data.insert("country".into(), json!("FR"));
    let mut labels = BTreeMap::new();
    labels.insert("tier".to_owned(), "gold".to_owned());
    labels.insert("state".to_owned(), "label-loses".to_owned());
    let record = machine
        .create(NewInstance {
            namespace: "shop",
            id: "o-1",
            data,
            labels,
            now_ms: 1,
            actor: "test",
        })
        .expect("created");
    let hash = record.seal().hash;
    (
        machine,
        Instance::from_genesis(&record, hash).expect("genesis"),
    )
}

#[test]
fn queries_carry_the_targeting_key_and_context_of_each_gate() {
    let (machine, instance) = setup();
    let queries = machine.flag_queries(&instance, "checkout", &Value::Null);
    assert_eq!(queries.len(), 2);
    let fast = &queries[0];
    assert_eq!(fast.key, "fast");
    assert_eq!(
        fast.targeting_key, "c-42",
        "from the targetingKey expression"
    );
    assert_eq!(fast.value_type, FlagValueType::Bool);
    assert_eq!(
        Value::Object(fast.context.clone()),
        json!({"tier": "gold", "state": "cart", "country": "FR", "machine": "checkout",
               "revision": 3, "event": "checkout"}),
        "labels, the listed data fields that exist, then the reserved fields (which win)"
    );
    let ui = &queries[1];
    assert_eq!(ui.targeting_key, "o-1", "the instance id by default");
    assert_eq!(ui.value_type, FlagValueType::Any);
    // No flag on the event's entries: nothing to evaluate, and nothing allocated.
    let none = machine.flag_queries(&instance, "touch", &Value::Null);
    assert!(none.is_empty() && none.capacity() == 0);
    assert!(
        machine
            .flag_queries(&instance, "nope", &Value::Null)
            .is_empty()
    );
}

fn decision(key: &str, variant: &str, value: Value, error: Option<&str>) -> FlagDecision {
    FlagDecision {
        key: key.into(),
        variant: Some(variant.into()),
        value,
        reason: if error.is_some() {
            "ERROR"
        } else {
            "TARGETING_MATCH"
        }
        .into(),
        error: error.map(str::to_owned),
        allowed: false,
    }
}

fn checkout(
    machine: &Machine,
    instance: &Instance,
    decisions: &[FlagDecision],
) -> (String, Vec<bool>) {
    let payload = Value::Null;
    let mut input = Input::new(
        Trigger::Event {
            name: "checkout",
            payload: &payload,
        },
        2,
        "test",
    );
    input.flags = decisions;
    let record = machine.apply(instance, &input).expect("applies");
    (
        record.to.to_string(),
        record.flags.iter().map(|d| d.allowed).collect(),
    )
}

#[test]
fn gates_use_the_decisions_and_fall_through_in_order() {
    let (machine, instance) = setup();
    // Boolean gate true: taken.
    let d = [decision("fast", "on", json!(true), None)];
    assert_eq!(
        checkout(&machine, &instance, &d),
        ("fast".into(), vec![true])
    );
    // Boolean false, variant gate matches: the second entry.
    let d = [
        decision("fast", "off", json!(false), None),
        decision("ui", "compact", json!("c"), None),
    ];
    assert_eq!(
        checkout(&machine, &instance, &d),
        ("fast".into(), vec![false, true])
    );
    // Both deny: the fallback entry, with both decisions recorded.
    let d = [
        decision("fast", "off", json!(false), None),
        decision("ui", "wide", json!("w"), None),
    ];
    assert_eq!(
        checkout(&machine, &instance, &d),
        ("slow".into(), vec![false, false])
    );
    // A provider error with onFlagError: allow lets the first gate through.
    let d = [decision("fast", "", Value::Null, Some("GENERAL: down"))];
    assert_eq!(
        checkout(&machine, &instance, &d),
        ("fast".into(), vec![true])
    );
    // No decisions at all (no evaluator): `fast` allows on error, so it is taken too.
    assert_eq!(
        checkout(&machine, &instance, &[]),
        ("fast".into(), vec![true])
    );
}
