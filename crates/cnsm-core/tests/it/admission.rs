//! Admission suite: every case goes through one `check(yaml, expected)` helper that compares the
//! complete list of problems (errors and warnings) with the expected one.
//!
//! Expected problems are written one per line:
//! `<error|warning> <code> <path> [@line[:column]] [~ message fragment]`, where the path `$`
//! stands for the document root. Order does not matter; every problem must be expected.

use cnsm_core::admission::{
    self, Admission, EXPRESSION_BYTES_MAX, NESTING_DEPTH_MAX, Problem, SOURCE_BYTES_MAX,
    STATES_MAX, Severity, admit, admit_str, render_problem,
};
use proptest::prelude::*;

/// A small valid machine; the cases below edit it. Its states start on line 7.
const VALID: &str = "\
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: m}
spec:
  initialState: a
  states:
  - {name: a, type: task, timeoutSeconds: 5, transition: done}
  - {name: done, type: final}
";

/// The header of [`VALID`] (lines 1–6); the states follow.
const HEAD: &str = "\
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: m}
spec:
  initialState: a
  states:
";

/// [`VALID`] with one piece of text replaced (which must be there).
fn edit(from: &str, to: &str) -> String {
    assert!(VALID.contains(from), "VALID does not contain {from:?}");
    VALID.replacen(from, to, 1)
}

/// [`HEAD`] followed by the given states, one YAML line each.
fn states(lines: &[&str]) -> String {
    let mut doc = HEAD.to_owned();
    for line in lines {
        doc.push_str("  - ");
        doc.push_str(line);
        doc.push('\n');
    }
    doc
}

fn example(name: &str) -> String {
    let path = format!(
        "{}/../../../shared/examples/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|error| {
        panic!("cannot read {path} ({error}); CI copies shared/ beside the repository")
    })
}

struct Expected {
    severity: Severity,
    code: String,
    path: String,
    line: Option<u32>,
    column: Option<u32>,
    fragment: Option<String>,
}

fn parse_expected(line: &str) -> Expected {
    let (head, fragment) = match line.split_once('~') {
        Some((head, fragment)) => (head, Some(fragment.trim().to_owned())),
        None => (line, None),
    };
    let mut words = head.split_whitespace();
    let severity = match words.next() {
        Some("error") => Severity::Error,
        Some("warning") => Severity::Warning,
        other => panic!("bad expectation {line:?}: severity {other:?}"),
    };
    let code = words.next().expect("a code").to_owned();
    let path = match words.next().expect("a path") {
        "$" => String::new(),
        path => path.to_owned(),
    };
    let (mut line_no, mut column) = (None, None);
    if let Some(position) = words.next() {
        let position = position
            .strip_prefix('@')
            .expect("a position starts with @");
        let mut parts = position.split(':');
        line_no = parts.next().map(|l| l.parse().expect("a line number"));
        column = parts.next().map(|c| c.parse().expect("a column number"));
    }
    Expected {
        severity,
        code,
        path,
        line: line_no,
        column,
        fragment,
    }
}

fn matches(expected: &Expected, problem: &Problem) -> bool {
    expected.severity == problem.severity
        && expected.code == problem.code
        && expected.path == problem.path
        && expected.line.is_none_or(|l| problem.line == Some(l))
        && expected.column.is_none_or(|c| problem.column == Some(c))
        && expected
            .fragment
            .as_ref()
            .is_none_or(|f| problem.message.contains(f.as_str()))
}

fn render_all(admission: &Admission) -> String {
    admission
        .problems
        .iter()
        .map(|p| {
            format!(
                "  {} (path {:?})",
                render_problem(p, Some("input.yaml")),
                p.path
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Compares the problems of `yaml` with `expected`; `None` when they agree.
fn diff(yaml: &str, expected: &str) -> Option<String> {
    let admission = admit_str(yaml, Some("input.yaml"));
    let has_errors = admission.errors().next().is_some();
    let mut unmatched: Vec<&Problem> = admission.problems.iter().collect();
    let mut missing = Vec::new();
    for line in expected.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let wanted = parse_expected(line);
        match unmatched.iter().position(|p| matches(&wanted, p)) {
            Some(at) => {
                unmatched.remove(at);
            }
            None => missing.push(line.to_owned()),
        }
    }
    let mut report = String::new();
    if admission.machine.is_some() == has_errors {
        report.push_str("machine must be present exactly when there is no error\n");
    }
    if !missing.is_empty() {
        report.push_str(&format!("missing:\n  {}\n", missing.join("\n  ")));
    }
    if !unmatched.is_empty() {
        let extra: Vec<String> = unmatched
            .iter()
            .map(|p| render_problem(p, Some("input.yaml")))
            .collect();
        report.push_str(&format!("unexpected:\n  {}\n", extra.join("\n  ")));
    }
    (!report.is_empty()).then(|| format!("{report}all problems:\n{}", render_all(&admission)))
}

/// Asserts that admitting `yaml` yields exactly the `expected` problems.
#[track_caller]
fn check(yaml: &str, expected: &str) {
    if let Some(report) = diff(yaml, expected) {
        panic!("{report}\n--- input ---\n{}", shorten(yaml));
    }
}

fn shorten(text: &str) -> String {
    if text.len() <= 4000 {
        text.to_owned()
    } else {
        format!(
            "{}… ({} bytes)",
            &text[..text.floor_char_boundary(4000)],
            text.len()
        )
    }
}

#[test]
fn the_examples_are_accepted_without_problems() {
    for name in [
        "order-processing.yaml",
        "payment-saga.yaml",
        "provisioning.yaml",
        "checkout-canary.yaml",
    ] {
        let yaml = example(name);
        if let Some(report) = diff(&yaml, "") {
            panic!("{name}:\n{report}");
        }
    }
}

#[test]
fn the_seed_fragment_is_rejected_naming_validated() {
    check(
        &example("seed-fragment.yaml"),
        "error undefined-target spec.states[0].transition @12:17 ~`validated`
         warning no-final-reachable spec.states[0]",
    );
}

#[test]
fn a_machine_using_every_field_is_accepted() {
    let yaml = include_str!("../admission/everything-valid.yaml");
    check(yaml, "");
    let machine = admit_str(yaml, None).into_result().expect("accepted");
    assert_eq!(machine.metadata.namespace, "team-a");
    assert_eq!(machine.spec.states.len(), 8);
    assert_eq!(
        machine.spec.retention.map(|r| r.finished_after_days),
        Some(30)
    );
    let first = &machine.spec.states[0].on_event[0];
    let flag = first.flag.as_ref().expect("a flag");
    assert_eq!(flag.variant.as_deref(), Some("on"));
    assert_eq!(
        flag.on_flag_error,
        cnsm_core::resource::FlagErrorPolicy::Allow
    );
    assert_eq!(first.assign.get("count").map(String::as_str), Some("1"));
    let second = machine.spec.states[0].on_event[1]
        .flag
        .as_ref()
        .expect("a flag");
    assert_eq!(
        second.value,
        Some(serde_json::json!({"enabled": true, "weight": 2}))
    );
    assert_eq!(
        machine.spec.states[0]
            .retry
            .as_ref()
            .map(|r| r.backoff_rate),
        Some(1.5)
    );
}

#[test]
fn namespace_defaults_and_short_flags_are_normalized() {
    let machine = admit_str(&example("checkout-canary.yaml"), None)
        .into_result()
        .expect("accepted");
    let flag = machine.spec.states[0].on_event[0]
        .flag
        .as_ref()
        .expect("a flag");
    assert_eq!(flag.key, "one-click-checkout");
    assert_eq!(flag.variant, None);
    let machine = admit_str(VALID, None).into_result().expect("accepted");
    assert_eq!(machine.metadata.namespace, "default");
}

/// At least 40 invalid definitions, each with its code and path.
#[test]
fn invalid_definitions_are_rejected_with_code_and_path() {
    let cases: Vec<(&str, String, &str)> = vec![
        // ---- resource header and metadata
        (
            "wrong apiVersion",
            edit("statemachine.cn/v1alpha1", "statemachine.cn/v1"),
            "error invalid-api-version apiVersion @1:13 ~statemachine.cn/v1alpha1",
        ),
        (
            "wrong kind",
            edit("kind: StateMachine", "kind: Statemachine"),
            "error invalid-kind kind @2:7",
        ),
        (
            "missing apiVersion",
            edit("apiVersion: statemachine.cn/v1alpha1\n", ""),
            "error missing-field apiVersion @1:1",
        ),
        (
            "missing spec",
            "apiVersion: statemachine.cn/v1alpha1\nkind: StateMachine\nmetadata: {name: m}\n"
                .to_owned(),
            "error missing-field spec @1:1",
        ),
        (
            "retention of zero days",
            edit(
                "  initialState: a\n",
                "  initialState: a\n  retention: {finishedAfterDays: 0}\n",
            ),
            "error invalid-retention spec.retention.finishedAfterDays @6:34 ~between 1 and 36500",
        ),
        (
            "retention with an unknown field",
            edit(
                "  initialState: a\n",
                "  initialState: a\n  retention: {days: 3}\n",
            ),
            "error unknown-field spec.retention.days @6:15\nerror missing-field spec.retention.finishedAfterDays @6:14",
        ),
        (
            "metadata not a mapping",
            edit("metadata: {name: m}", "metadata: m"),
            "error invalid-type metadata @3:11 ~mapping",
        ),
        (
            "name not an RFC 1123 label",
            edit("{name: m}", "{name: Order_Processing}"),
            "error invalid-name metadata.name @3:18 ~RFC 1123",
        ),
        (
            "name too long",
            edit("{name: m}", &format!("{{name: {}}}", "a".repeat(64))),
            "error invalid-name metadata.name",
        ),
        (
            "missing name",
            edit("{name: m}", "{labels: {}}"),
            "error missing-field metadata.name @3:11",
        ),
        (
            "namespace not a label",
            edit("{name: m}", "{name: m, namespace: -shop}"),
            "error invalid-namespace metadata.namespace",
        ),
        (
            "label value not a string",
            edit("{name: m}", "{name: m, labels: {tier: 1}}"),
            "error invalid-type metadata.labels.tier ~quote it",
        ),
        (
            "labels as a list",
            edit("{name: m}", "{name: m, labels: [a]}"),
            "error invalid-type metadata.labels",
        ),
        (
            "annotation with an odd key and a list value",
            edit("{name: m}", "{name: m, annotations: {example.com/x: [1]}}"),
            "error invalid-type metadata.annotations[\"example.com/x\"]",
        ),
        (
            "unknown top-level field",
            format!("{VALID}status: {{}}\n"),
            "error unknown-field status @9:1",
        ),
        (
            "unknown spec field (typo) with the real one missing",
            edit("initialState: a", "initalState: a"),
            "error unknown-field spec.initalState @5:3 ~did you mean `initialState`
             error missing-field spec.initialState @5:3",
        ),
        // ---- states
        (
            "states empty",
            format!("{HEAD}    []\n").replace("states:\n    []", "states: []"),
            "error no-states spec.states
             error undefined-initial-state spec.initialState",
        ),
        (
            "states not a list",
            HEAD.replace("states:\n", "states: none\n"),
            "error invalid-type spec.states @6:11 ~a list",
        ),
        (
            "state not a mapping",
            format!("{VALID}  - 42\n"),
            "error invalid-type spec.states[2] @9:5",
        ),
        (
            "duplicate state",
            format!("{VALID}  - {{name: done, type: final}}\n"),
            "error duplicate-state spec.states[2].name @9:12 ~spec.states[1]",
        ),
        (
            "state name with a space",
            states(&[
                "{name: a, type: task, timeoutSeconds: 5, transition: the end}",
                "{name: the end, type: final}",
            ]),
            "error invalid-state-name spec.states[1].name ~white space",
        ),
        (
            "state name is a number",
            format!("{VALID}  - {{name: 7, type: final}}\n"),
            "error invalid-type spec.states[2].name ~quote it",
        ),
        (
            "unknown state type",
            edit("type: task", "type: tsak"),
            "error invalid-value spec.states[0].type @7:21 ~did you mean `task`",
        ),
        (
            "typo in a final state's type (no warning flood)",
            edit("type: final", "type: fnal"),
            "error invalid-value spec.states[1].type ~did you mean `final`",
        ),
        (
            "missing state type",
            edit("type: task, ", ""),
            "error missing-field spec.states[0].type @7:5",
        ),
        (
            "unknown state field near timeoutSeconds",
            edit("timeoutSeconds: 5", "timeout: 5"),
            "error unknown-field spec.states[0].timeout @7:27 ~did you mean `timeoutSeconds`
             error missing-timeout spec.states[0].timeoutSeconds @7:5",
        ),
        (
            "bare `on` key (kubectl would read it as true)",
            include_str!("../admission/kubectl-on.yaml").to_owned(),
            "error unknown-field spec.states[0].on @12:5 ~kubectl
             warning unreachable-state spec.states[1]
             warning no-final-reachable spec.states[0]",
        ),
        (
            "undefined initial state",
            edit("initialState: a", "initialState: start"),
            "error undefined-initial-state spec.initialState @5:17 ~`start`",
        ),
        // ---- targets
        (
            "undefined transition target, with a suggestion",
            edit("transition: done", "transition: dome"),
            "error undefined-target spec.states[0].transition ~did you mean `done`
             warning unreachable-state spec.states[1]
             warning no-final-reachable spec.states[0]",
        ),
        (
            "undefined onEvent target",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: nowhere}]}",
            ),
            "error undefined-target spec.states[0].onEvent[0].target ~`nowhere`",
        ),
        (
            "undefined onTimeout target",
            edit("transition: done}", "transition: done, onTimeout: gone}"),
            "error undefined-target spec.states[0].onTimeout ~`gone`",
        ),
        (
            "undefined onFailure target",
            edit("transition: done}", "transition: done, onFailure: oops}"),
            "error undefined-target spec.states[0].onFailure ~`oops`",
        ),
        (
            "undefined compensation target",
            edit("transition: done}", "transition: done, compensation: undo}"),
            "error undefined-target spec.states[0].compensation ~`undo`",
        ),
        (
            "undefined choice target and default",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5, choices: [{guard: data.x, target: b}], default: c}",
                "{name: done, type: final}",
            ]),
            "error undefined-target spec.states[0].choices[0].target ~`b`
             error undefined-target spec.states[0].default ~`c`
             warning unreachable-state spec.states[1]
             warning no-final-reachable spec.states[0]",
        ),
        // ---- timeouts
        (
            "missing timeout",
            edit("timeoutSeconds: 5, ", ""),
            "error missing-timeout spec.states[0].timeoutSeconds @7:5",
        ),
        (
            "zero timeout",
            edit("timeoutSeconds: 5", "timeoutSeconds: 0"),
            "error timeout-not-positive spec.states[0].timeoutSeconds @7:43",
        ),
        (
            "negative timeout",
            edit("timeoutSeconds: 5", "timeoutSeconds: -5"),
            "error timeout-not-positive spec.states[0].timeoutSeconds",
        ),
        (
            "quoted timeout",
            edit("timeoutSeconds: 5", "timeoutSeconds: \"5\""),
            "error invalid-type spec.states[0].timeoutSeconds ~an integer",
        ),
        (
            "fractional timeout",
            edit("timeoutSeconds: 5", "timeoutSeconds: 1.5"),
            "error invalid-type spec.states[0].timeoutSeconds ~an integer",
        ),
        (
            "timeout above ten years",
            edit("timeoutSeconds: 5", "timeoutSeconds: 999999999999"),
            "error timeout-too-large spec.states[0].timeoutSeconds",
        ),
        (
            "timeout beyond 64 bits",
            edit(
                "timeoutSeconds: 5",
                "timeoutSeconds: 99999999999999999999999",
            ),
            "error timeout-too-large spec.states[0].timeoutSeconds",
        ),
        (
            "onTimeout on a wait state",
            edit("type: task", "type: wait").replace("done}", "done, onTimeout: done}"),
            "error on-timeout-not-allowed spec.states[0].onTimeout",
        ),
        (
            "onTimeout on a choice state",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5, default: done, onTimeout: done}",
                "{name: done, type: final}",
            ]),
            "error on-timeout-not-allowed spec.states[0].onTimeout",
        ),
        // ---- type-specific fields
        (
            "transition out of a final state",
            edit(
                "{name: done, type: final}",
                "{name: done, type: final, transition: a}",
            ),
            "error final-state-transition spec.states[1].transition @8:43",
        ),
        (
            "onEvent on a final state",
            edit(
                "{name: done, type: final}",
                "{name: done, type: final, onEvent: [{event: again, target: a}]}",
            ),
            "error final-state-transition spec.states[1].onEvent",
        ),
        (
            "retry on a final state",
            edit(
                "{name: done, type: final}",
                "{name: done, type: final, retry: {maxAttempts: 2}}",
            ),
            "error field-not-allowed spec.states[1].retry",
        ),
        (
            "outcome on a task state",
            edit("transition: done}", "transition: done, outcome: failed}"),
            "error field-not-allowed spec.states[0].outcome ~only final states",
        ),
        (
            "unknown outcome",
            edit(
                "{name: done, type: final}",
                "{name: done, type: final, outcome: ok}",
            ),
            "error invalid-value spec.states[1].outcome ~succeeded",
        ),
        (
            "choices on a task state",
            edit(
                "transition: done}",
                "transition: done, choices: [{guard: data.x, target: done}]}",
            ),
            "error field-not-allowed spec.states[0].choices",
        ),
        (
            "wait state without transition",
            states(&[
                "{name: a, type: wait, timeoutSeconds: 5}",
                "{name: done, type: final}",
            ]),
            "error missing-transition spec.states[0].transition @7:5
             warning unreachable-state spec.states[1]
             warning no-final-reachable spec.states[0]",
        ),
        (
            "onEvent on a wait state",
            states(&[
                "{name: a, type: wait, timeoutSeconds: 5, transition: done, onEvent: [{event: go, target: done}]}",
                "{name: done, type: final}",
            ]),
            "error field-not-allowed spec.states[0].onEvent",
        ),
        (
            "compensation on a wait state",
            states(&[
                "{name: a, type: wait, timeoutSeconds: 5, transition: done, compensation: done}",
                "{name: done, type: final}",
            ]),
            "error field-not-allowed spec.states[0].compensation
             error invalid-compensation spec.states[0].compensation ~final",
        ),
        (
            "choice state without a way out",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5}",
                "{name: done, type: final}",
            ]),
            "error choice-without-way-out spec.states[0] @7:5
             warning unreachable-state spec.states[1]
             warning no-final-reachable spec.states[0]",
        ),
        (
            "transition on a choice state",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5, default: done, transition: done}",
                "{name: done, type: final}",
            ]),
            "error field-not-allowed spec.states[0].transition",
        ),
        (
            "retry on a choice state",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5, default: done, retry: {maxAttempts: 2}}",
                "{name: done, type: final}",
            ]),
            "error field-not-allowed spec.states[0].retry",
        ),
        (
            "choice missing its guard",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5, choices: [{target: done}]}",
                "{name: done, type: final}",
            ]),
            "error missing-field spec.states[0].choices[0].guard",
        ),
        (
            "cycle among choice states",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5, default: b}",
                "{name: b, type: choice, timeoutSeconds: 5, choices: [{guard: data.x, target: done}], default: a}",
                "{name: done, type: final}",
            ]),
            "error choice-cycle spec.states[0] ~a -> b -> a",
        ),
        (
            "choice state defaulting to itself",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5, choices: [{guard: data.x, target: done}], default: a}",
                "{name: done, type: final}",
            ]),
            "error choice-cycle spec.states[0] ~a -> a",
        ),
        // ---- retry
        (
            "retry with zero attempts",
            edit(
                "transition: done}",
                "transition: done, retry: {maxAttempts: 0}}",
            ),
            "error invalid-retry spec.states[0].retry.maxAttempts ~at least 1",
        ),
        (
            "retry with a back-off rate below 1",
            edit(
                "transition: done}",
                "transition: done, retry: {maxAttempts: 3, backoffRate: 0.5}}",
            ),
            "error invalid-retry spec.states[0].retry.backoffRate",
        ),
        (
            "retry with a negative back-off",
            edit(
                "transition: done}",
                "transition: done, retry: {maxAttempts: 3, backoffSeconds: -1}}",
            ),
            "error invalid-retry spec.states[0].retry.backoffSeconds",
        ),
        (
            "retry without maxAttempts",
            edit(
                "transition: done}",
                "transition: done, retry: {backoffSeconds: 1}}",
            ),
            "error missing-field spec.states[0].retry.maxAttempts",
        ),
        (
            "retry with a string maxAttempts",
            edit(
                "transition: done}",
                "transition: done, retry: {maxAttempts: many}}",
            ),
            "error invalid-type spec.states[0].retry.maxAttempts",
        ),
        // ---- compensations
        (
            "compensation state with a transition of its own",
            states(&[
                "{name: a, type: task, timeoutSeconds: 5, transition: done, compensation: undo}",
                "{name: undo, type: task, timeoutSeconds: 5, transition: done}",
                "{name: done, type: final}",
            ]),
            "error invalid-compensation spec.states[0].compensation ~declares `transition`",
        ),
        (
            "compensation naming a final state",
            edit("transition: done}", "transition: done, compensation: done}"),
            "error invalid-compensation spec.states[0].compensation ~is a final state",
        ),
        // ---- onEvent entries and flags
        (
            "onEvent as a string",
            edit("transition: done}", "transition: done, onEvent: go}"),
            "error invalid-type spec.states[0].onEvent ~a list",
        ),
        (
            "onEvent entry without event",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{target: done}]}",
            ),
            "error missing-field spec.states[0].onEvent[0].event",
        ),
        (
            "onEvent entry with an empty event name",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: '', target: done}]}",
            ),
            "error invalid-event-name spec.states[0].onEvent[0].event",
        ),
        (
            "flag with both variant and value",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, flag: {key: k, variant: x, value: true}}]}",
            ),
            "error flag-variant-and-value spec.states[0].onEvent[0].flag.value",
        ),
        (
            "flag with an empty key",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, flag: ''}]}",
            ),
            "error flag-key-empty spec.states[0].onEvent[0].flag.key",
        ),
        (
            "flag with an unknown field",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, flag: {key: k, defaultValue: x}}]}",
            ),
            "error unknown-field spec.states[0].onEvent[0].flag.defaultValue",
        ),
        (
            "flag with a bad targetingKey",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, flag: {key: k, targetingKey: 'data.'}}]}",
            ),
            "error expression-syntax spec.states[0].onEvent[0].flag.targetingKey ~does not compile",
        ),
        (
            "flag with an unknown onFlagError policy",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, flag: {key: k, onFlagError: maybe}}]}",
            ),
            "error invalid-value spec.states[0].onEvent[0].flag.onFlagError ~deny",
        ),
        (
            "flag as a list",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, flag: [k]}]}",
            ),
            "error invalid-type spec.states[0].onEvent[0].flag",
        ),
        (
            "assign key that is not an identifier",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, assign: {paid-amount: event.amount}}]}",
            ),
            "error invalid-assign-key spec.states[0].onEvent[0].assign.paid-amount",
        ),
        (
            "assign value that does not compile",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, assign: {paid: 'event.amount +'}}]}",
            ),
            "error expression-syntax spec.states[0].onEvent[0].assign.paid",
        ),
        (
            "assign value with an unknown variable",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, assign: {at: 'now + 1'}}]}",
            ),
            "error unknown-variable spec.states[0].onEvent[0].assign.at ~`now`",
        ),
        (
            "context as a string",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, flag: k, context: region}]}",
            ),
            "error invalid-type spec.states[0].onEvent[0].context",
        ),
        // ---- guards
        (
            "guard that does not compile",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: 'data.total >'}]}",
            ),
            "error expression-syntax spec.states[0].onEvent[0].guard ~does not compile",
        ),
        (
            "guard that is the constant true",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: true}]}",
            ),
            "error guard-constant spec.states[0].onEvent[0].guard",
        ),
        (
            "guard with a constant comparison",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: '1 + 2 > 2'}]}",
            ),
            "error guard-constant spec.states[0].onEvent[0].guard ~always `true`",
        ),
        (
            "guard that always fails",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: '1 / 0 == 1'}]}",
            ),
            "error guard-constant spec.states[0].onEvent[0].guard ~always fails",
        ),
        (
            "guard over a constant list",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: '[1, 2].exists(x, x > 1)'}]}",
            ),
            "error guard-constant spec.states[0].onEvent[0].guard",
        ),
        (
            "guard that is arithmetic",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: 'data.x + 1'}]}",
            ),
            "error guard-not-bool spec.states[0].onEvent[0].guard ~arithmetic",
        ),
        (
            "guard that is a string literal",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: \"'yes'\"}]}",
            ),
            "error guard-not-bool spec.states[0].onEvent[0].guard ~string literal",
        ),
        (
            "guard that is a constant int",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: \"size('abc')\"}]}",
            ),
            "error guard-not-bool spec.states[0].onEvent[0].guard ~int",
        ),
        (
            "guard with a non-bool branch",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: 'data.x ? 1 : 2'}]}",
            ),
            "error guard-not-bool spec.states[0].onEvent[0].guard ~branch",
        ),
        (
            "guard with an unknown variable",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: 'order.total > 1'}]}",
            ),
            "error unknown-variable spec.states[0].onEvent[0].guard ~`order`",
        ),
        (
            "guard as a list",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: [data.x]}]}",
            ),
            "error invalid-type spec.states[0].onEvent[0].guard",
        ),
        (
            "choice guard that does not compile",
            states(&[
                "{name: a, type: choice, timeoutSeconds: 5, choices: [{guard: 'data.x >', target: done}], default: done}",
                "{name: done, type: final}",
            ]),
            "error expression-syntax spec.states[0].choices[0].guard",
        ),
        // ---- YAML
        (
            "duplicate key",
            edit("{name: a, type: task,", "{name: a, name: b, type: task,"),
            "error duplicate-key spec.states[0].name @7:15 ~line 7, column 6",
        ),
        (
            "YAML tag",
            edit("kind: StateMachine", "kind: !!str StateMachine"),
            "error yaml-tag kind @2:7",
        ),
        (
            "two documents",
            format!("{VALID}---\n{VALID}"),
            "error yaml-multiple-documents $ @9:1",
        ),
        ("empty document", String::new(), "error yaml-empty $"),
        (
            "only a comment",
            "# nothing here\n".to_owned(),
            "error yaml-empty $",
        ),
        (
            "YAML syntax error",
            "apiVersion: [statemachine.cn/v1alpha1\n".to_owned(),
            "error yaml-syntax apiVersion[1] @2:1 ~expected ',' or ']'",
        ),
        (
            "document that is a list",
            "- a\n- b\n".to_owned(),
            "error invalid-type $ @1:1 ~a mapping",
        ),
        (
            "key that is a list",
            format!("{VALID}[x]: y\n"),
            "error invalid-key $ @9:1",
        ),
    ];
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(name, yaml, expected)| {
            diff(yaml, expected)
                .map(|report| format!("### {name}\n{report}\n--- input ---\n{yaml}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn three_distinct_errors_are_reported_together() {
    check(
        include_str!("../admission/three-errors.yaml"),
        "error unknown-field spec.states[0].timeout @14:5 ~timeoutSeconds
         error missing-timeout spec.states[1].timeoutSeconds @15:5
         error undefined-target spec.states[1].transition @17:17 ~`shipped`
         warning unreachable-state spec.states[2] @18:5
         warning no-final-reachable spec.states[0]
         warning no-final-reachable spec.states[1]",
    );
}

#[test]
fn problems_of_a_file_are_in_source_order() {
    let admission = admit_str(include_str!("../admission/three-errors.yaml"), None);
    let lines: Vec<u32> = admission.problems.iter().filter_map(|p| p.line).collect();
    let mut sorted = lines.clone();
    sorted.sort_unstable();
    assert_eq!(lines, sorted);
    assert_eq!(lines.len(), admission.problems.len());
}

#[test]
fn warnings_do_not_reject() {
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unreachable state",
            format!("{VALID}  - {{name: orphan, type: final}}\n"),
            "warning unreachable-state spec.states[2] @9:5 ~`orphan`",
        ),
        (
            "no final state reachable",
            states(&[
                "{name: a, type: task, timeoutSeconds: 5, transition: b}",
                "{name: b, type: task, timeoutSeconds: 5, transition: a}",
                "{name: done, type: final}",
            ]),
            "warning no-final-reachable spec.states[0]
             warning no-final-reachable spec.states[1]
             warning unreachable-state spec.states[2]",
        ),
        (
            "entry after an unconditional one for the same event",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done}, {event: go, target: a, guard: data.x}]}",
            ),
            "warning shadowed-transition spec.states[0].onEvent[1] ~onEvent[0]",
        ),
        (
            "guarded entries do not shadow",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: data.x}, {event: go, target: a, flag: f}, {event: go, target: done}]}",
            ),
            "",
        ),
        (
            "explicit complete makes transition dead",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: complete, target: done}]}",
            ),
            "warning shadowed-transition spec.states[0].transition ~`complete`",
        ),
        (
            "timeout on a final state",
            edit(
                "{name: done, type: final}",
                "{name: done, type: final, timeoutSeconds: 5}",
            ),
            "warning timeout-ignored spec.states[1].timeoutSeconds",
        ),
        (
            "context without flag",
            edit(
                "transition: done}",
                "transition: done, onEvent: [{event: go, target: done, guard: data.x, context: [region]}]}",
            ),
            "warning context-without-flag spec.states[0].onEvent[0].context",
        ),
        (
            "compensation states are reachable and exempt from the final rule",
            states(&[
                "{name: a, type: task, timeoutSeconds: 5, transition: done, compensation: undo}",
                "{name: undo, type: task, timeoutSeconds: 5}",
                "{name: done, type: final}",
            ]),
            "",
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(name, yaml, expected)| {
            diff(yaml, expected)
                .map(|report| format!("### {name}\n{report}\n--- input ---\n{yaml}"))
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    for (name, yaml, _) in &cases {
        assert!(
            admit_str(yaml, None).machine.is_some(),
            "{name} was rejected"
        );
    }
}

// ---- limits

#[test]
fn a_document_over_one_mebibyte_is_refused_before_parsing() {
    let mut yaml = VALID.to_owned();
    // Unclosed flow collections would be expensive to parse: the size check must come first.
    yaml.push_str("x: [");
    yaml.push_str(&"[".repeat(SOURCE_BYTES_MAX + SOURCE_BYTES_MAX / 10));
    check(&yaml, "error yaml-too-large $ ~1048576");
    let mut comment = VALID.to_owned();
    comment.push_str(&format!("# {}\n", "x".repeat(SOURCE_BYTES_MAX / 10 * 11)));
    check(&comment, "error yaml-too-large $");
}

#[test]
fn nesting_deeper_than_64_is_refused() {
    let deep = |depth: usize| format!("{}{}\n", "[".repeat(depth), "]".repeat(depth));
    check(
        &deep(NESTING_DEPTH_MAX + 1),
        &format!(
            "error yaml-too-deep {} @1:65",
            "[0]".repeat(NESTING_DEPTH_MAX)
        ),
    );
    // At the limit the document is read (and rejected for being a list, not for its depth).
    check(&deep(NESTING_DEPTH_MAX), "error invalid-type $ ~a mapping");
    // Deep nesting where a value is expected, inside a valid machine.
    let yaml = edit(
        "{name: m}",
        &format!("{{name: m, labels: {{a: {}}}}}", deep(70).trim()),
    );
    check(
        &yaml,
        &format!(
            "error yaml-too-deep metadata.labels.a{}",
            "[0]".repeat(NESTING_DEPTH_MAX - 3)
        ),
    );
}

#[test]
fn more_than_1000_states_are_refused() {
    let build = |n_states: usize| {
        let mut lines: Vec<String> = (0..n_states - 1)
            .map(|i| {
                let name = if i == 0 {
                    "a".to_owned()
                } else {
                    format!("s{i}")
                };
                format!(
                    "{{name: {name}, type: task, timeoutSeconds: 5, transition: s{}}}",
                    i + 1
                )
            })
            .collect();
        lines.push(format!("{{name: s{}, type: final}}", n_states - 1));
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        states(&refs)
    };
    check(
        &build(STATES_MAX + 1),
        "error too-many-states spec.states @7:5 ~1001",
    );
    check(&build(STATES_MAX), "");
}

#[test]
fn expressions_over_4_kib_are_refused() {
    let guard = |length: usize| {
        let prefix = "data.x == '";
        format!("{prefix}{}'", "a".repeat(length - prefix.len() - 1))
    };
    let with_guard = |guard: &str| {
        edit(
            "transition: done}",
            &format!(
                "transition: done, onEvent: [{{event: go, target: done, guard: \"{guard}\"}}]}}"
            ),
        )
    };
    check(
        &with_guard(&guard(5 * 1024)),
        "error expression-too-long spec.states[0].onEvent[0].guard ~5120 bytes",
    );
    check(&with_guard(&guard(EXPRESSION_BYTES_MAX)), "");
    check(
        &with_guard(&guard(EXPRESSION_BYTES_MAX + 1)),
        "error expression-too-long spec.states[0].onEvent[0].guard",
    );
}

#[test]
fn deeply_nested_expressions_are_refused() {
    let guard = format!("data.x{} > 0", " + 1".repeat(80));
    check(
        &edit(
            "transition: done}",
            &format!(
                "transition: done, onEvent: [{{event: go, target: done, guard: '{guard}'}}]}}"
            ),
        ),
        "error expression-too-deep spec.states[0].onEvent[0].guard",
    );
}

/// Expressions just under 4 KiB built to exhaust the stack of a recursive parser or
/// interpreter; admission runs on the test thread's small stack and must answer each.
#[test]
fn adversarial_expressions_are_answered_without_overflowing_the_stack() {
    let cases = [
        ("!".repeat(4090) + "true", "guard-constant"),
        ("-".repeat(4090) + "1 > 0", "guard-constant"),
        (
            "data".to_owned() + &".b".repeat(2040),
            "expression-too-deep",
        ),
        (
            "data".to_owned() + &"[0]".repeat(1360),
            "expression-too-deep",
        ),
        (
            "data.x".to_owned() + &"+1".repeat(2040),
            "expression-too-deep",
        ),
        (
            "data.s".to_owned() + &".size()".repeat(580),
            "expression-too-deep",
        ),
        (
            "(".repeat(2000) + "data.x" + &")".repeat(2000),
            "expression-too-deep",
        ),
        ("[".repeat(2000) + &"]".repeat(2000), "expression-too-deep"),
        ("{".repeat(1000) + &"}".repeat(1000), "expression-too-deep"),
        ("f(".repeat(1000) + &")".repeat(1000), "expression-too-deep"),
        (
            "data.l.all(x, ".repeat(200) + "true" + &")".repeat(200),
            "expression-too-deep",
        ),
    ];
    for (guard, code) in cases {
        assert!(guard.len() <= EXPRESSION_BYTES_MAX);
        let yaml = edit(
            "transition: done}",
            &format!(
                "transition: done, onEvent: [{{event: go, target: done, guard: '{guard}'}}]}}"
            ),
        );
        check(
            &yaml,
            &format!("error {code} spec.states[0].onEvent[0].guard"),
        );
    }
}

#[test]
fn anchors_and_aliases_are_refused() {
    check(
        &edit("metadata: {name: m}", "metadata: &meta {name: m}"),
        "error yaml-anchor metadata @3:11 ~anchors and aliases",
    );
    check(
        &format!("{VALID}x: &a [1]\ny: *a\n"),
        "error yaml-anchor x @9:4",
    );
    // An alias of an anchor the parser never saw is a syntax error; still no panic.
    check(
        &format!("{VALID}y: *a\n"),
        "error yaml-syntax y @9:4 ~unknown anchor",
    );
}

// ---- typed machines and rendering

#[test]
fn typed_machines_are_checked_without_positions() {
    let machine = admit_str(&example("order-processing.yaml"), None)
        .into_result()
        .expect("accepted");
    let admission = admit(machine.clone());
    assert!(admission.problems.is_empty(), "{:?}", admission.problems);
    assert_eq!(admission.machine.as_ref(), Some(&machine));

    let mut broken = machine;
    broken.spec.states[0].transition = Some("validatd".to_owned());
    broken.spec.states[1].timeout_seconds = None;
    let admission = admit(broken);
    assert!(admission.machine.is_none());
    let found: Vec<(&str, &str, Option<u32>)> = admission
        .errors()
        .map(|p| (p.code, p.path.as_str(), p.line))
        .collect();
    assert_eq!(
        found,
        [
            (
                admission::codes::UNDEFINED_TARGET,
                "spec.states[0].transition",
                None
            ),
            (
                admission::codes::MISSING_TIMEOUT,
                "spec.states[1].timeoutSeconds",
                None
            ),
        ]
    );
    assert!(
        admission.problems[0]
            .message
            .contains("did you mean `validated`")
    );
}

#[test]
fn problems_render_as_compiler_lines() {
    let admission = admit_str(&example("seed-fragment.yaml"), None);
    let error = admission.errors().next().expect("an error");
    assert_eq!(
        render_problem(error, Some("seed-fragment.yaml")),
        "seed-fragment.yaml:12:17: error[undefined-target]: target `validated` is not a defined \
         state (at spec.states[0].transition)"
    );
    assert_eq!(
        render_problem(error, None),
        "12:17: error[undefined-target]: target `validated` is not a defined state (at \
         spec.states[0].transition)"
    );
    let json = serde_json::to_value(error).expect("serializable");
    assert_eq!(json["severity"], "error");
    assert_eq!(json["line"], 12);
}

// ---- no input makes admission panic

/// Invariants that hold for any input.
fn assert_consistent(admission: &Admission) {
    let has_errors = admission.errors().next().is_some();
    assert_eq!(admission.machine.is_some(), !has_errors);
    for problem in &admission.problems {
        assert!(!problem.code.is_empty());
        assert!(problem.line.is_none_or(|l| l >= 1));
        assert!(problem.column.is_none_or(|c| c >= 1));
    }
    // What the text admission accepts, the typed admission accepts too.
    if let Some(machine) = &admission.machine {
        assert!(admit(machine.clone()).errors().next().is_none());
    }
}

fn mutate(text: &str, mutations: &[(prop::sample::Index, u8, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for (index, operation, c) in mutations {
        if chars.is_empty() {
            chars.push(*c);
            continue;
        }
        let at = index.index(chars.len());
        match operation % 5 {
            0 => {
                chars.remove(at);
            }
            1 => chars.insert(at, *c),
            2 => chars[at] = *c,
            3 => {
                let end = (at + 24).min(chars.len());
                let copy: Vec<char> = chars[at..end].to_vec();
                let to = index.index(chars.len() + 7) % chars.len();
                chars.splice(to..to, copy);
            }
            _ => {
                let end = (at + 16).min(chars.len());
                chars.drain(at..end);
            }
        }
    }
    chars.into_iter().collect()
}

fn yaml_char() -> impl Strategy<Value = char> {
    prop_oneof![
        prop::sample::select(vec![
            ':', '-', ' ', '\n', '{', '}', '[', ']', '&', '*', '!', '"', '\'', '#', '?', '|', '>',
            ',', 'a', '1', '.', '(', ')', '%', '@', '\t', '\u{feff}',
        ]),
        any::<char>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn admit_str_never_panics_on_arbitrary_strings(text in any::<String>()) {
        assert_consistent(&admit_str(&text, None));
    }

    #[test]
    fn admit_str_never_panics_on_yaml_like_strings(text in "[a-z:{}\\[\\], \n\"'&*!#?|>.()0-9-]{0,400}") {
        assert_consistent(&admit_str(&text, None));
    }

    #[test]
    fn admit_str_never_panics_on_mutated_examples(
        which in 0usize..5,
        mutations in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), yaml_char()), 1..10),
    ) {
        let source = match which {
            0 => example("order-processing.yaml"),
            1 => example("payment-saga.yaml"),
            2 => example("provisioning.yaml"),
            3 => example("checkout-canary.yaml"),
            _ => include_str!("../admission/everything-valid.yaml").to_owned(),
        };
        assert_consistent(&admit_str(&mutate(&source, &mutations), None));
    }
}

/// [`VALID`] with `notify:` targets (one YAML flow mapping per line, from line 7).
fn with_notify(targets: &[&str]) -> String {
    let mut block = String::from("  initialState: a\n  notify:\n");
    for target in targets {
        block.push_str("  - ");
        block.push_str(target);
        block.push('\n');
    }
    edit("  initialState: a\n", &block)
}

#[test]
fn notify_targets_are_checked() {
    let good = with_notify(&[
        "{name: worker, url: 'https://hooks.example.com:8443/cnsm?x=1', secretEnv: CNSM_HOOK_SECRET, states: [done], events: [complete], timeoutSeconds: 5, maxAttempts: 3}",
        "{name: audit-copy, url: 'http://[::1]:9000/'}",
    ])
    .replace(
        "transition: done}",
        "transition: done, notify: [{name: on-a, url: 'http://127.0.0.1:9/a', events: [fail]}]}",
    );
    check(&good, "");
    let machine = admit_str(&good, None).into_result().expect("accepted");
    assert_eq!(machine.spec.notify.len(), 2);
    assert_eq!(machine.spec.notify[0].max_attempts, Some(3));
    assert_eq!(machine.spec.states[0].notify[0].name, "on-a");
    assert_eq!(machine.notify_targets().count(), 3);

    let many: Vec<String> = (0..17)
        .map(|i| format!("{{name: t{i}, url: 'http://h/{i}'}}"))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "not http",
            with_notify(&["{name: w, url: 'ftp://h/x'}"]),
            "error invalid-notify-url spec.notify[0].url @7 ~absolute http:// or https://",
        ),
        (
            "relative",
            with_notify(&["{name: w, url: '/hook'}"]),
            "error invalid-notify-url spec.notify[0].url @7 ~absolute",
        ),
        (
            "credentials in the URL",
            with_notify(&["{name: w, url: 'http://user:pw@h/x'}"]),
            "error invalid-notify-url spec.notify[0].url @7 ~credentials",
        ),
        (
            "no host",
            with_notify(&["{name: w, url: 'http:///x'}"]),
            "error invalid-notify-url spec.notify[0].url @7 ~no host",
        ),
        (
            "bad port",
            with_notify(&["{name: w, url: 'http://h:99999/x'}"]),
            "error invalid-notify-url spec.notify[0].url @7 ~port",
        ),
        (
            "duplicate names",
            with_notify(&[
                "{name: w, url: 'http://h/1'}",
                "{name: w, url: 'http://h/2'}",
            ]),
            "error duplicate-notify-target spec.notify[1].name @8 ~spec.notify[0]",
        ),
        (
            "duplicate across machine and state",
            with_notify(&["{name: w, url: 'http://h/1'}"]).replace(
                "transition: done}",
                "transition: done, notify: [{name: w, url: 'http://h/2'}]}",
            ),
            "error duplicate-notify-target spec.states[0].notify[0].name @9",
        ),
        (
            "name not a label",
            with_notify(&["{name: Worker_1, url: 'http://h/1'}"]),
            "error invalid-notify-target spec.notify[0].name @7 ~RFC 1123",
        ),
        (
            "unknown state in the filter",
            with_notify(&["{name: w, url: 'http://h/1', states: [dne]}"]),
            "error unknown-notify-filter spec.notify[0].states[0] @7 ~did you mean `done`",
        ),
        (
            "unknown event in the filter",
            with_notify(&["{name: w, url: 'http://h/1', events: [shipped]}"]),
            "error unknown-notify-filter spec.notify[0].events[0] @7 ~not an event",
        ),
        (
            "a secret written inline",
            with_notify(&["{name: w, url: 'http://h/1', secretEnv: 'hunter2 is my secret'}"]),
            "error invalid-notify-target spec.notify[0].secretEnv @7 ~never the secret itself",
        ),
        (
            "timeout of zero",
            with_notify(&["{name: w, url: 'http://h/1', timeoutSeconds: 0}"]),
            "error invalid-notify-target spec.notify[0].timeoutSeconds @7 ~between 1 and 300",
        ),
        (
            "too many attempts",
            with_notify(&["{name: w, url: 'http://h/1', maxAttempts: 1000}"]),
            "error invalid-notify-target spec.notify[0].maxAttempts @7 ~between 1 and 100",
        ),
        (
            "a states filter on a per-state target",
            VALID.replace(
                "transition: done}",
                "transition: done, notify: [{name: w, url: 'http://h/1', states: [done]}]}",
            ),
            "error invalid-notify-target spec.states[0].notify[0].states @7 ~per-state",
        ),
        (
            "an unknown field",
            with_notify(&["{name: w, url: 'http://h/1', secret: abc}"]),
            "error unknown-field spec.notify[0].secret @7",
        ),
        (
            "url missing",
            with_notify(&["{name: w}"]),
            "error missing-field spec.notify[0].url @7",
        ),
        (
            "more than 16 targets",
            with_notify(&many),
            "error too-many-notify-targets spec.notify @7 ~at most 16",
        ),
    ];
    for (name, yaml, expected) in cases {
        if let Some(report) = diff(&yaml, expected) {
            panic!("case {name:?}:\n{report}");
        }
    }
}

#[test]
fn typed_notify_targets_are_checked_too() {
    let mut machine = admit_str(VALID, None).into_result().expect("accepted");
    machine.spec.notify.push(cnsm_core::resource::NotifyTarget {
        name: "w".into(),
        url: "http://h/1".into(),
        secret_env: None,
        states: vec!["nowhere".into()],
        events: Vec::new(),
        timeout_seconds: Some(301),
        max_attempts: Some(0),
    });
    let admission = admit(machine);
    let found: Vec<(&str, &str)> = admission
        .errors()
        .map(|p| (p.code, p.path.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("invalid-notify-target", "spec.notify[0].timeoutSeconds"),
            ("invalid-notify-target", "spec.notify[0].maxAttempts"),
            ("unknown-notify-filter", "spec.notify[0].states[0]"),
        ]
    );
}
