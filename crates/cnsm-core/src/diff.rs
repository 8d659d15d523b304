//! What changed between two revisions of a machine: states and transitions added, removed or
//! changed (`cnsmctl diff MACHINE A B`).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::resource::{StateDef, StateMachine};

/// One edge of a machine: `from --label--> to`, with what decides it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Edge {
    pub from: String,
    /// `event NAME`, `complete`, `timeout`, `wait`, `choice N`, `default`, `failure`.
    pub label: String,
    pub to: String,
    /// Guard, flag and assignments, as written (empty when none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A state whose own settings differ (type, timeout, outcome, retry, compensation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateChange {
    pub name: String,
    /// `field: old -> new` for each difference.
    pub changes: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Diff {
    pub states_added: Vec<String>,
    pub states_removed: Vec<String>,
    pub states_changed: Vec<StateChange>,
    pub transitions_added: Vec<Edge>,
    pub transitions_removed: Vec<Edge>,
    /// Same `from`, label and `to`, different guard, flag or assignments.
    pub transitions_changed: Vec<(Edge, Edge)>,
    pub initial_state: Option<(String, String)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

/// The differences from `a` to `b`.
pub fn diff(a: &StateMachine, b: &StateMachine) -> Diff {
    let states = |m: &StateMachine| -> BTreeMap<String, StateDef> {
        m.spec
            .states
            .iter()
            .map(|s| (s.name.clone(), s.clone()))
            .collect()
    };
    let (sa, sb) = (states(a), states(b));
    let mut out = Diff::default();
    if a.spec.initial_state != b.spec.initial_state {
        out.initial_state = Some((a.spec.initial_state.clone(), b.spec.initial_state.clone()));
    }
    for name in sb.keys().filter(|n| !sa.contains_key(*n)) {
        out.states_added.push(name.clone());
    }
    for name in sa.keys().filter(|n| !sb.contains_key(*n)) {
        out.states_removed.push(name.clone());
    }
    for (name, old) in &sa {
        let Some(new) = sb.get(name) else { continue };
        let mut changes = Vec::new();
        let mut field = |what: &str, x: String, y: String| {
            if x != y {
                changes.push(format!("{what}: {x} -> {y}"));
            }
        };
        field(
            "type",
            old.state_type.as_str().into(),
            new.state_type.as_str().into(),
        );
        field(
            "timeoutSeconds",
            show(&old.timeout_seconds),
            show(&new.timeout_seconds),
        );
        field(
            "outcome",
            show(&old.outcome.map(|o| o.as_str())),
            show(&new.outcome.map(|o| o.as_str())),
        );
        field(
            "retry",
            show(&old.retry.as_ref().map(|r| format!("{r:?}"))),
            show(&new.retry.as_ref().map(|r| format!("{r:?}"))),
        );
        field(
            "compensation",
            show(&old.compensation),
            show(&new.compensation),
        );
        if !changes.is_empty() {
            out.states_changed.push(StateChange {
                name: name.clone(),
                changes,
            });
        }
    }
    let (ea, eb) = (edges(a), edges(b));
    let key = |e: &Edge| (e.from.clone(), e.label.clone(), e.to.clone());
    let ka: BTreeMap<_, _> = ea.iter().map(|e| (key(e), e)).collect();
    let kb: BTreeMap<_, _> = eb.iter().map(|e| (key(e), e)).collect();
    for (k, e) in &kb {
        match ka.get(k) {
            None => out.transitions_added.push((*e).clone()),
            Some(old) if old.detail != e.detail => {
                out.transitions_changed.push(((*old).clone(), (*e).clone()))
            }
            Some(_) => {}
        }
    }
    for (k, e) in &ka {
        if !kb.contains_key(k) {
            out.transitions_removed.push((*e).clone());
        }
    }
    out
}

fn show<T: std::fmt::Display>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

/// Every edge of a machine, sorted.
fn edges(m: &StateMachine) -> Vec<Edge> {
    let mut out = Vec::new();
    for s in &m.spec.states {
        let mut push = |label: String, to: &str, detail: String| {
            out.push(Edge {
                from: s.name.clone(),
                label,
                to: to.to_owned(),
                detail,
            })
        };
        for t in &s.on_event {
            let mut detail = Vec::new();
            if let Some(g) = &t.guard {
                detail.push(format!("guard {g}"));
            }
            if let Some(f) = &t.flag {
                detail.push(format!("flag {}", f.key));
            }
            for (k, v) in &t.assign {
                detail.push(format!("{k} = {v}"));
            }
            push(format!("event {}", t.event), &t.target, detail.join("; "));
        }
        if let Some(t) = &s.transition {
            let label = if s.state_type == crate::resource::StateType::Wait {
                "wait"
            } else {
                "complete"
            };
            push(label.into(), t, String::new());
        }
        if let Some(t) = &s.on_timeout {
            push("timeout".into(), t, String::new());
        }
        for (i, c) in s.choices.iter().enumerate() {
            push(
                format!("choice {i}"),
                &c.target,
                format!("guard {}", c.guard),
            );
        }
        if let Some(t) = &s.default {
            push("default".into(), t, String::new());
        }
        if let Some(t) = &s.on_failure {
            push("failure".into(), t, String::new());
        }
    }
    out.sort();
    out
}
