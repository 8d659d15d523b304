//! Renders a machine as a Graphviz DOT or Mermaid state diagram.

use std::fmt::Write;

use crate::resource::{EVENT_COMPLETE, StateMachine, StateType};

/// One edge of the diagram.
struct Edge<'a> {
    from: &'a str,
    to: &'a str,
    label: String,
    dashed: bool,
}

fn edges(machine: &StateMachine) -> Vec<Edge<'_>> {
    let mut out = Vec::new();
    for state in &machine.spec.states {
        let from = state.name.as_str();
        for t in &state.on_event {
            let mut label = t.event.clone();
            if let Some(guard) = &t.guard {
                let _ = write!(label, " [{guard}]");
            }
            if let Some(flag) = &t.flag {
                let _ = write!(label, " flag:{}", flag.key);
            }
            out.push(Edge {
                from,
                to: &t.target,
                label,
                dashed: false,
            });
        }
        if let Some(next) = &state.transition {
            let label = match state.state_type {
                StateType::Wait => format!("after {}s", state.timeout_seconds.unwrap_or(0)),
                _ => EVENT_COMPLETE.to_owned(),
            };
            out.push(Edge {
                from,
                to: next,
                label,
                dashed: false,
            });
        }
        if let Some(next) = &state.on_timeout {
            let label = format!("timeout {}s", state.timeout_seconds.unwrap_or(0));
            out.push(Edge {
                from,
                to: next,
                label,
                dashed: true,
            });
        }
        for c in &state.choices {
            out.push(Edge {
                from,
                to: &c.target,
                label: format!("[{}]", c.guard),
                dashed: false,
            });
        }
        if let Some(next) = &state.default {
            out.push(Edge {
                from,
                to: next,
                label: "default".into(),
                dashed: false,
            });
        }
        if let Some(next) = &state.on_failure {
            out.push(Edge {
                from,
                to: next,
                label: "failure".into(),
                dashed: true,
            });
        }
        if let Some(next) = &state.compensation {
            out.push(Edge {
                from,
                to: next,
                label: "compensate".into(),
                dashed: true,
            });
        }
    }
    out
}

fn escape_dot(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Graphviz DOT.
pub fn to_dot(machine: &StateMachine) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape_dot(&machine.metadata.name));
    out.push_str("  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    out.push_str("  __start [shape=point];\n");
    let _ = writeln!(
        out,
        "  __start -> \"{}\";",
        escape_dot(&machine.spec.initial_state)
    );
    for state in &machine.spec.states {
        let shape = match state.state_type {
            StateType::Final => "doublecircle",
            StateType::Choice => "diamond",
            StateType::Wait => "ellipse",
            StateType::Task => "box",
        };
        let _ = writeln!(
            out,
            "  \"{}\" [shape={shape}, tooltip=\"{}\"];",
            escape_dot(&state.name),
            state.state_type.as_str()
        );
    }
    for e in edges(machine) {
        let style = if e.dashed { ", style=dashed" } else { "" };
        let _ = writeln!(
            out,
            "  \"{}\" -> \"{}\" [label=\"{}\"{style}];",
            escape_dot(e.from),
            escape_dot(e.to),
            escape_dot(&e.label)
        );
    }
    out.push_str("}\n");
    out
}

/// Mermaid `stateDiagram-v2`. State names are mapped to safe ids; the name is the label.
pub fn to_mermaid(machine: &StateMachine) -> String {
    let id = |name: &str| -> String {
        let mut s = String::from("s_");
        for c in name.chars() {
            s.push(if c.is_ascii_alphanumeric() { c } else { '_' });
        }
        s
    };
    let mut out = String::from("stateDiagram-v2\n");
    for state in &machine.spec.states {
        let _ = writeln!(
            out,
            "  state \"{}\" as {}",
            state.name.replace('"', "'"),
            id(&state.name)
        );
        if state.state_type == StateType::Choice {
            let _ = writeln!(out, "  note right of {}: choice", id(&state.name));
        }
    }
    let _ = writeln!(out, "  [*] --> {}", id(&machine.spec.initial_state));
    for e in edges(machine) {
        let label = e.label.replace([':', '\n'], " ");
        let _ = writeln!(out, "  {} --> {}: {}", id(e.from), id(e.to), label);
    }
    for state in &machine.spec.states {
        if state.state_type == StateType::Final {
            let _ = writeln!(out, "  {} --> [*]", id(&state.name));
        }
    }
    out
}
