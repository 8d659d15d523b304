//! Admission: parsing a `StateMachine` from YAML and checking it, returning every problem at once.
//!
//! [`admit_str`] reads YAML into a positioned tree (the private `yaml` module), converts it into
//! [`StateMachine`] by hand (not through serde, so that every type error is collected instead of
//! the first one), then runs the semantic checks of DESIGN.md §2. [`admit`] runs only the
//! semantic checks, for machines that arrive already typed (JSON, the API, tests).
//!
//! Every [`Problem`] carries a stable [`code`](codes), the path of the offending node
//! (`spec.states[2].onEvent[0].target`) and, for files, its 1-based line and column. For a
//! missing field the path names the field and the position is that of the enclosing mapping.
//!
//! Hostile input is refused before anything expensive happens: see the `*_MAX` constants.
//!
//! ```
//! use cnsm_core::admission::{admit_str, render_problem};
//! let admission = admit_str("apiVersion: statemachine.cn/v1alpha1\nkind: Machine\n", None);
//! let lines: Vec<String> = admission.errors().map(|p| render_problem(p, Some("m.yaml"))).collect();
//! assert!(lines.contains(&"m.yaml:2:7: error[invalid-kind]: kind must be `StateMachine`, found `Machine` (at kind)".to_owned()));
//! assert!(admission.machine.is_none());
//! ```

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use cel::common::ast::{EntryExpr, Expr, IdedExpr, LiteralValue, operators};

use crate::resource::{
    API_VERSION, Choice, DEFAULT_NAMESPACE, EVENT_COMPLETE, EventTransition, FlagErrorPolicy,
    FlagGate, KIND_STATE_MACHINE, Metadata, NOTIFY_FILTER_LEN_MAX, NOTIFY_MAX_ATTEMPTS_MAX,
    NOTIFY_TARGETS_MAX, NOTIFY_TIMEOUT_SECONDS_MAX, NOTIFY_URL_CHARS_MAX, NotifyTarget, Outcome,
    RETENTION_DAYS_MAX, Retention, Retry, Spec, StateDef, StateMachine, StateType,
};
use crate::yaml::{self, Entry, Node, NodeKind, Pos, Scalar, path_index, path_key};

/// Documents larger than this many bytes (1 MiB) are refused before parsing.
pub const SOURCE_BYTES_MAX: usize = yaml::SOURCE_BYTES_MAX;
/// YAML mappings and lists may nest this deep, no deeper.
pub const NESTING_DEPTH_MAX: usize = yaml::NESTING_DEPTH_MAX;
/// A machine may define at most this many states.
pub const STATES_MAX: usize = 1_000;
/// A CEL expression (guard, assignment, targeting key) may be this many bytes long (4 KiB).
pub const EXPRESSION_BYTES_MAX: usize = 4 * 1024;
/// A compiled CEL expression tree may be this deep. Deeper trees would risk the stack of the
/// threads that evaluate them (the CEL interpreter recurses).
pub const EXPRESSION_DEPTH_MAX: usize = 64;
/// `timeoutSeconds` may not exceed ten years: deadlines stay far from integer overflow.
pub const TIMEOUT_SECONDS_MAX: u64 = 10 * 365 * 24 * 60 * 60;
/// RFC 1123 labels (`metadata.name`, `metadata.namespace`) are at most 63 characters.
pub const LABEL_CHARS_MAX: usize = 63;
/// State and event names are at most this many characters.
pub const NAME_CHARS_MAX: usize = 253;

/// The variables a CEL expression may use (DESIGN.md §2).
pub const EXPRESSION_VARIABLES: [&str; 3] = ["data", "event", "instance"];

/// Stable, machine-readable problem codes. Tools may match on them; they never change meaning.
pub mod codes {
    use crate::yaml::codes as yaml;

    /// The document is larger than [`SOURCE_BYTES_MAX`](super::SOURCE_BYTES_MAX).
    pub const YAML_TOO_LARGE: &str = yaml::TOO_LARGE;
    /// Mappings and lists nest deeper than [`NESTING_DEPTH_MAX`](super::NESTING_DEPTH_MAX).
    pub const YAML_TOO_DEEP: &str = yaml::TOO_DEEP;
    /// A YAML anchor (`&x`) or alias (`*x`).
    pub const YAML_ANCHOR: &str = yaml::ANCHOR;
    /// A YAML tag (`!x`, `!!str`).
    pub const YAML_TAG: &str = yaml::TAG;
    /// More than one YAML document.
    pub const YAML_MULTIPLE_DOCUMENTS: &str = yaml::MULTIPLE_DOCUMENTS;
    /// No document at all.
    pub const YAML_EMPTY: &str = yaml::EMPTY;
    /// The text is not YAML.
    pub const YAML_SYNTAX: &str = yaml::SYNTAX;
    /// A key appears twice in one mapping.
    pub const DUPLICATE_KEY: &str = yaml::DUPLICATE_KEY;
    /// A mapping key that is a mapping or a list.
    pub const INVALID_KEY: &str = yaml::INVALID_KEY;

    /// `apiVersion` is not `statemachine.cn/v1alpha1`.
    pub const INVALID_API_VERSION: &str = "invalid-api-version";
    /// `kind` is not `StateMachine`.
    pub const INVALID_KIND: &str = "invalid-kind";
    /// A field the resource does not define (the message suggests the right one).
    pub const UNKNOWN_FIELD: &str = "unknown-field";
    /// A required field is absent.
    pub const MISSING_FIELD: &str = "missing-field";
    /// A value of the wrong type (a string where a list is expected...).
    pub const INVALID_TYPE: &str = "invalid-type";
    /// A value outside its set (`type: tsak`, `outcome: done`...).
    pub const INVALID_VALUE: &str = "invalid-value";
    /// `metadata.name` is not an RFC 1123 label.
    pub const INVALID_NAME: &str = "invalid-name";
    /// `metadata.namespace` is not an RFC 1123 label.
    pub const INVALID_NAMESPACE: &str = "invalid-namespace";

    /// `spec.states` is empty.
    pub const NO_STATES: &str = "no-states";
    /// More than [`STATES_MAX`](super::STATES_MAX) states.
    pub const TOO_MANY_STATES: &str = "too-many-states";
    /// A state name is empty, too long, or holds white space or control characters.
    pub const INVALID_STATE_NAME: &str = "invalid-state-name";
    /// Two states share a name.
    pub const DUPLICATE_STATE: &str = "duplicate-state";
    /// `initialState` names no state.
    pub const UNDEFINED_INITIAL_STATE: &str = "undefined-initial-state";
    /// A target names no state.
    pub const UNDEFINED_TARGET: &str = "undefined-target";
    /// A non-final state without `timeoutSeconds`.
    pub const MISSING_TIMEOUT: &str = "missing-timeout";
    /// `timeoutSeconds` is zero or negative.
    pub const TIMEOUT_NOT_POSITIVE: &str = "timeout-not-positive";
    /// `timeoutSeconds` is above [`TIMEOUT_SECONDS_MAX`](super::TIMEOUT_SECONDS_MAX).
    pub const TIMEOUT_TOO_LARGE: &str = "timeout-too-large";
    /// `onTimeout` on a wait or choice state.
    pub const ON_TIMEOUT_NOT_ALLOWED: &str = "on-timeout-not-allowed";
    /// A final state declares a way out (`transition`, `onEvent`, `onTimeout`, `choices`...).
    pub const FINAL_STATE_TRANSITION: &str = "final-state-transition";
    /// A field that the state's type does not allow (`outcome` on a task, `retry` on a wait...).
    pub const FIELD_NOT_ALLOWED: &str = "field-not-allowed";
    /// A wait state without `transition`.
    pub const MISSING_TRANSITION: &str = "missing-transition";
    /// A choice state with neither `choices` nor `default`.
    pub const CHOICE_WITHOUT_WAY_OUT: &str = "choice-without-way-out";
    /// Choice states that lead to one another in a cycle.
    pub const CHOICE_CYCLE: &str = "choice-cycle";
    /// `retry.maxAttempts < 1`, `backoffSeconds < 0` or `backoffRate < 1`.
    pub const INVALID_RETRY: &str = "invalid-retry";
    /// `retention.finishedAfterDays` outside 1..=36500.
    pub const INVALID_RETENTION: &str = "invalid-retention";
    /// A notify URL that is not an absolute `http`/`https` URL, or that carries credentials.
    pub const INVALID_NOTIFY_URL: &str = "invalid-notify-url";
    /// Two notify targets of one machine share a name.
    pub const DUPLICATE_NOTIFY_TARGET: &str = "duplicate-notify-target";
    /// More than [`NOTIFY_TARGETS_MAX`](crate::resource::NOTIFY_TARGETS_MAX) notify targets.
    pub const TOO_MANY_NOTIFY_TARGETS: &str = "too-many-notify-targets";
    /// A notify target field out of its range (name, `secretEnv`, `timeoutSeconds`,
    /// `maxAttempts`, a `states` filter on a per-state target, an over-long filter).
    pub const INVALID_NOTIFY_TARGET: &str = "invalid-notify-target";
    /// A notify filter names a state or an event the machine does not have.
    pub const UNKNOWN_NOTIFY_FILTER: &str = "unknown-notify-filter";
    /// Warning (on apply): a new revision removes a state that running instances are in.
    pub const BREAKING_CHANGE: &str = "breaking-change";
    /// A compensation names a state that is not a task without transitions of its own.
    pub const INVALID_COMPENSATION: &str = "invalid-compensation";
    /// An empty, too long or blank event name.
    pub const INVALID_EVENT_NAME: &str = "invalid-event-name";
    /// An empty flag key.
    pub const FLAG_KEY_EMPTY: &str = "flag-key-empty";
    /// A flag gate with both `variant` and `value`.
    pub const FLAG_VARIANT_AND_VALUE: &str = "flag-variant-and-value";
    /// An `assign` key that is not an identifier.
    pub const INVALID_ASSIGN_KEY: &str = "invalid-assign-key";
    /// An empty `context` entry.
    pub const INVALID_CONTEXT_FIELD: &str = "invalid-context-field";
    /// A CEL expression longer than [`EXPRESSION_BYTES_MAX`](super::EXPRESSION_BYTES_MAX).
    pub const EXPRESSION_TOO_LONG: &str = "expression-too-long";
    /// A CEL expression nested deeper than [`EXPRESSION_DEPTH_MAX`](super::EXPRESSION_DEPTH_MAX).
    pub const EXPRESSION_TOO_DEEP: &str = "expression-too-deep";
    /// A CEL expression that does not compile.
    pub const EXPRESSION_SYNTAX: &str = "expression-syntax";
    /// A CEL expression that uses a variable other than `data`, `event`, `instance`.
    pub const UNKNOWN_VARIABLE: &str = "unknown-variable";
    /// A guard whose result never changes (it uses no variable).
    pub const GUARD_CONSTANT: &str = "guard-constant";
    /// A guard that cannot yield a bool (a literal, arithmetic, a list...).
    pub const GUARD_NOT_BOOL: &str = "guard-not-bool";

    /// Warning: no path from `initialState` leads to the state.
    pub const UNREACHABLE_STATE: &str = "unreachable-state";
    /// Warning: no final state can be reached from the state.
    pub const NO_FINAL_REACHABLE: &str = "no-final-reachable";
    /// Warning: an `onEvent` entry (or `transition`) that can never fire.
    pub const SHADOWED_TRANSITION: &str = "shadowed-transition";
    /// Warning: `timeoutSeconds` on a final state, which is never armed.
    pub const TIMEOUT_IGNORED: &str = "timeout-ignored";
    /// Warning: `context` on an entry without `flag`, which nothing reads.
    pub const CONTEXT_WITHOUT_FLAG: &str = "context-without-flag";
}

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Severity {
    /// The definition is accepted, but probably not what was meant.
    Warning,
    /// The definition is rejected.
    Error,
}

impl Severity {
    /// `"warning"` or `"error"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One problem found by admission.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// Whether the problem rejects the definition.
    pub severity: Severity,
    /// A stable machine-readable kind, e.g. `undefined-target` (see [`codes`]).
    pub code: &'static str,
    /// Where in the resource, e.g. `spec.states[2].onEvent[0].target`.
    pub path: String,
    /// 1-based line and column in the source, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// 1-based column (in characters) in the source, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// What is wrong, for people.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(
        severity: Severity,
        code: &'static str,
        path: String,
        message: String,
    ) -> Problem {
        Problem {
            severity,
            code,
            path,
            line: None,
            column: None,
            message,
        }
    }

    /// A warning found outside admission proper (e.g. by the runtime against running
    /// instances).
    pub fn warning(
        code: &'static str,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Problem {
        Problem::new(Severity::Warning, code, path.into(), message.into())
    }

    pub(crate) fn at(mut self, pos: Option<Pos>) -> Problem {
        if let Some(pos) = pos {
            self.line = Some(pos.line);
            self.column = Some(pos.column);
        }
        self
    }
}

/// The result of admitting one document.
#[derive(Debug, Clone)]
pub struct Admission {
    /// Present when there are no errors (warnings allowed).
    pub machine: Option<StateMachine>,
    /// Every error and warning; for files, in source order.
    pub problems: Vec<Problem>,
}

impl Admission {
    /// The problems that reject the definition.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }
    /// The problems that do not reject the definition.
    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }
    /// The machine, or every problem when there is at least one error.
    pub fn into_result(self) -> Result<StateMachine, Vec<Problem>> {
        match self.machine {
            Some(machine) => Ok(machine),
            None => Err(self.problems),
        }
    }
}

/// Renders one problem as a compiler-style line, e.g.
/// `order.yaml:12:17: error[undefined-target]: target `validated` is not a defined state (at spec.states[0].transition)`.
///
/// The position is left out when unknown; `file` defaults to nothing.
///
/// ```
/// use cnsm_core::admission::{admit_str, render_problem};
/// let yaml = "apiVersion: statemachine.cn/v1alpha1\nkind: StateMachine\nmetadata: {name: m}\nspec:\n  initialState: a\n  states:\n  - {name: a, type: task, timeoutSeconds: 5, transition: b}\n";
/// let admission = admit_str(yaml, None);
/// let first = admission.errors().next().unwrap();
/// assert_eq!(
///     render_problem(first, Some("m.yaml")),
///     "m.yaml:7:58: error[undefined-target]: target `b` is not a defined state (at spec.states[0].transition)"
/// );
/// ```
pub fn render_problem(problem: &Problem, file: Option<&str>) -> String {
    let mut line = String::new();
    match (file, problem.line, problem.column) {
        (Some(file), Some(l), Some(c)) => line.push_str(&format!("{file}:{l}:{c}: ")),
        (Some(file), Some(l), None) => line.push_str(&format!("{file}:{l}: ")),
        (Some(file), None, _) => line.push_str(&format!("{file}: ")),
        (None, Some(l), Some(c)) => line.push_str(&format!("{l}:{c}: ")),
        (None, Some(l), None) => line.push_str(&format!("{l}: ")),
        (None, None, _) => {}
    }
    line.push_str(&format!(
        "{}[{}]: {}",
        problem.severity.as_str(),
        problem.code,
        problem.message
    ));
    if !problem.path.is_empty() {
        line.push_str(&format!(" (at {})", problem.path));
    }
    line
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&render_problem(self, None))
    }
}

/// Parses and checks one `StateMachine` document.
///
/// `file` names the source for messages only; no message repeats it today, since
/// [`render_problem`] writes it before each position. Every problem is reported at once;
/// `machine` is present only when none of them is an error.
pub fn admit_str(source: &str, file: Option<&str>) -> Admission {
    // Messages never repeat the file name: `render_problem` puts it in front of the position.
    let _ = file;
    let parsed = yaml::parse(source);
    let mut problems: Vec<Problem> = parsed
        .problems
        .into_iter()
        .map(|p| Problem::new(Severity::Error, p.code, p.path, p.message).at(p.pos))
        .collect();
    let Some(root) = parsed.root else {
        return Admission {
            machine: None,
            problems,
        };
    };

    let mut reader = Reader::default();
    let machine = reader.machine(&root);
    problems.append(&mut reader.problems);
    if !reader.skip_semantics {
        let known_types = reader.known_types;
        let mut checker = Checker::new(&machine, &known_types);
        checker.check();
        for problem in checker.problems {
            if !is_under_failed(&reader.failed, &problem.path) {
                let pos = locate(&reader.positions, &problem.path);
                problems.push(problem.at(pos));
            }
        }
    }
    problems.sort_by_key(|p| (p.line.unwrap_or(0), p.column.unwrap_or(0)));
    finish(machine, problems)
}

/// Checks an already-typed machine (from JSON, the API, or a test).
///
/// The problems have paths but no positions.
pub fn admit(machine: StateMachine) -> Admission {
    let known_types = vec![true; machine.spec.states.len()];
    let mut checker = Checker::new(&machine, &known_types);
    checker.check();
    let problems = checker.problems;
    finish(machine, problems)
}

fn finish(machine: StateMachine, problems: Vec<Problem>) -> Admission {
    let has_errors = problems.iter().any(|p| p.severity == Severity::Error);
    Admission {
        machine: (!has_errors).then_some(machine),
        problems,
    }
}

/// The parent of a path: `a.b[2]` → `a.b`, `a.b` → `a`, `a["x.y"]` → `a`, `a` → ``.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    if path.ends_with("\"]")
        && let Some(at) = path.rfind("[\"")
    {
        return Some(&path[..at]);
    }
    match path.rfind(['.', '[']) {
        Some(at) => Some(&path[..at]),
        None => Some(""),
    }
}

/// The position of the node at `path`, or of its nearest recorded ancestor.
fn locate(positions: &HashMap<String, Pos>, path: &str) -> Option<Pos> {
    let mut current = Some(path);
    while let Some(path) = current {
        if let Some(pos) = positions.get(path) {
            return Some(*pos);
        }
        current = parent_path(path);
    }
    None
}

/// Whether `path` is at or under a path where reading already failed: a semantic finding there
/// would only repeat (or be an artefact of) that failure.
fn is_under_failed(failed: &HashSet<String>, path: &str) -> bool {
    let mut current = Some(path);
    while let Some(path) = current {
        if failed.contains(path) {
            return true;
        }
        current = parent_path(path);
    }
    false
}

// ------------------------------------------------------------------------------------------------
// Reading the tree into typed values.
// ------------------------------------------------------------------------------------------------

const ROOT_FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
const METADATA_FIELDS: &[&str] = &["name", "namespace", "labels", "annotations"];
const SPEC_FIELDS: &[&str] = &["initialState", "states", "retention", "notify"];
const NOTIFY_FIELDS: &[&str] = &[
    "name",
    "url",
    "secretEnv",
    "states",
    "events",
    "timeoutSeconds",
    "maxAttempts",
];
const RETENTION_FIELDS: &[&str] = &["finishedAfterDays"];
const STATE_FIELDS: &[&str] = &[
    "name",
    "type",
    "timeoutSeconds",
    "onTimeout",
    "transition",
    "onEvent",
    "choices",
    "default",
    "outcome",
    "retry",
    "onFailure",
    "compensation",
    "notify",
];
const EVENT_FIELDS: &[&str] = &["event", "target", "guard", "flag", "assign", "context"];
const CHOICE_FIELDS: &[&str] = &["guard", "target"];
const RETRY_FIELDS: &[&str] = &["maxAttempts", "backoffSeconds", "backoffRate"];
const FLAG_FIELDS: &[&str] = &["key", "variant", "value", "targetingKey", "onFlagError"];

/// Field names people write for the real ones; used only when the real one is allowed there.
const FIELD_ALIASES: &[(&str, &str)] = &[
    ("timeout", "timeoutSeconds"),
    ("timeoutSecs", "timeoutSeconds"),
    ("events", "onEvent"),
    ("transitions", "onEvent"),
    ("initial", "initialState"),
    ("start", "initialState"),
    ("startAt", "initialState"),
    ("next", "transition"),
    ("retries", "retry"),
    ("catch", "onFailure"),
    ("compensate", "compensation"),
    ("when", "guard"),
    ("condition", "guard"),
    ("to", "target"),
    ("maxRetries", "maxAttempts"),
    ("attempts", "maxAttempts"),
];

/// A mapping being read: its entries, path and position.
struct Fields<'n> {
    entries: &'n [Entry],
    path: String,
    pos: Pos,
}

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|entry| entry.key == name)
            .map(|entry| &entry.value)
    }

    fn path(&self, name: &str) -> String {
        path_key(&self.path, name)
    }
}

/// Converts the YAML tree into a [`StateMachine`], collecting every structural problem.
#[derive(Default)]
struct Reader {
    problems: Vec<Problem>,
    /// Where each node was read, by path.
    positions: HashMap<String, Pos>,
    /// Paths where reading failed.
    failed: HashSet<String>,
    /// Per state: whether its `type` was read. Type-specific checks skip the others.
    known_types: Vec<bool>,
    /// Set when the semantic checks must not run (too many states).
    skip_semantics: bool,
}

impl Reader {
    fn error(&mut self, code: &'static str, path: String, pos: Pos, message: String) {
        self.failed.insert(path.clone());
        self.problems
            .push(Problem::new(Severity::Error, code, path, message).at(Some(pos)));
    }

    fn visit(&mut self, path: &str, node: &Node) {
        self.positions.insert(path.to_owned(), node.pos);
    }

    fn wrong_type(&mut self, node: &Node, path: String, expected: &str) {
        let found = node.describe();
        let hint = match &node.kind {
            NodeKind::Scalar { text, .. } if expected == "a string" && found != "null" => {
                format!(" (quote it: \"{}\")", shorten(text))
            }
            _ => String::new(),
        };
        self.error(
            codes::INVALID_TYPE,
            path,
            node.pos,
            format!("expected {expected}, found {found}{hint}"),
        );
    }

    /// Reads a mapping and reports the fields it may not have.
    fn mapping<'n>(&mut self, node: &'n Node, path: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        self.visit(path, node);
        let NodeKind::Mapping(entries) = &node.kind else {
            self.wrong_type(node, path.to_owned(), "a mapping");
            return None;
        };
        for entry in entries {
            if !allowed.contains(&entry.key.as_str()) {
                let message = unknown_field_message(&entry.key, allowed);
                self.error(
                    codes::UNKNOWN_FIELD,
                    path_key(path, &entry.key),
                    entry.key_pos,
                    message,
                );
            }
        }
        Some(Fields {
            entries,
            path: path.to_owned(),
            pos: node.pos,
        })
    }

    fn missing(&mut self, fields: &Fields<'_>, name: &str) {
        self.error(
            codes::MISSING_FIELD,
            fields.path(name),
            fields.pos,
            format!("missing required field `{name}`"),
        );
    }

    fn string(&mut self, node: &Node, path: String) -> Option<String> {
        self.visit(&path, node);
        match &node.kind {
            NodeKind::Scalar { text, style } if Scalar::classify(text, *style) == Scalar::Str => {
                Some(text.clone())
            }
            _ => {
                self.wrong_type(node, path, "a string");
                None
            }
        }
    }

    fn required_string(&mut self, fields: &Fields<'_>, name: &str) -> String {
        match fields.get(name) {
            Some(node) => self.string(node, fields.path(name)).unwrap_or_default(),
            None => {
                self.missing(fields, name);
                String::new()
            }
        }
    }

    /// An optional string; an explicit `null` counts as absent.
    fn optional_string(&mut self, fields: &Fields<'_>, name: &str) -> Option<String> {
        let node = fields.get(name)?;
        if is_null(node) {
            self.visit(&fields.path(name), node);
            return None;
        }
        self.string(node, fields.path(name))
    }

    /// CEL source: any scalar but null, taken as written (`guard: true` is the CEL `true`).
    fn expression(&mut self, node: &Node, path: String) -> Option<String> {
        self.visit(&path, node);
        match &node.kind {
            NodeKind::Scalar { text, .. } if !is_null(node) => Some(text.clone()),
            _ => {
                self.wrong_type(node, path, "a CEL expression (a string)");
                None
            }
        }
    }

    fn integer(&mut self, node: &Node, path: String) -> Option<i128> {
        self.visit(&path, node);
        match &node.kind {
            NodeKind::Scalar { text, style } => match Scalar::classify(text, *style) {
                Scalar::Int(value) => return Some(value),
                Scalar::Float(value) if value.fract() == 0.0 && value.is_finite() => {
                    self.wrong_type(node, path, "an integer (write it without a decimal point)");
                    return None;
                }
                _ => {}
            },
            NodeKind::Mapping(_) | NodeKind::Sequence(_) => {}
        }
        self.wrong_type(node, path, "an integer");
        None
    }

    fn number(&mut self, node: &Node, path: String) -> Option<f64> {
        self.visit(&path, node);
        if let NodeKind::Scalar { text, style } = &node.kind {
            match Scalar::classify(text, *style) {
                // i128 to f64 cannot fail; precision loss only beyond 2^53, irrelevant here
                Scalar::Int(value) => return Some(value as f64),
                Scalar::Float(value) => return Some(value),
                _ => {}
            }
        }
        self.wrong_type(node, path, "a number");
        None
    }

    /// A list; an explicit `null` counts as empty.
    fn sequence<'n>(&mut self, node: &'n Node, path: &str) -> &'n [Node] {
        self.visit(path, node);
        match &node.kind {
            NodeKind::Sequence(items) => items,
            _ if is_null(node) => &[],
            _ => {
                self.wrong_type(node, path.to_owned(), "a list");
                &[]
            }
        }
    }

    /// A string-to-string mapping (labels, annotations).
    fn string_map(&mut self, node: &Node, path: &str) -> BTreeMap<String, String> {
        self.visit(path, node);
        let mut map = BTreeMap::new();
        match &node.kind {
            NodeKind::Mapping(entries) => {
                for entry in entries {
                    let entry_path = path_key(path, &entry.key);
                    if let Some(value) = self.string(&entry.value, entry_path) {
                        map.insert(entry.key.clone(), value);
                    }
                }
            }
            _ if is_null(node) => {}
            _ => self.wrong_type(node, path.to_owned(), "a mapping of strings to strings"),
        }
        map
    }

    /// One of a fixed set of words.
    fn one_of<T: Copy>(
        &mut self,
        node: &Node,
        path: String,
        what: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let text = self.string(node, path.clone())?;
        if let Some((_, value)) = options.iter().find(|(word, _)| *word == text) {
            return Some(*value);
        }
        let words: Vec<&str> = options.iter().map(|(word, _)| *word).collect();
        let suggestion = suggest(&text, &words)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        self.error(
            codes::INVALID_VALUE,
            path,
            node.pos,
            format!(
                "unknown {what} `{}`: expected one of {}{suggestion}",
                shorten(&text),
                words.join(", ")
            ),
        );
        None
    }

    fn machine(&mut self, root: &Node) -> StateMachine {
        let mut machine = StateMachine {
            api_version: String::new(),
            kind: String::new(),
            metadata: Metadata {
                namespace: DEFAULT_NAMESPACE.to_owned(),
                ..Metadata::default()
            },
            spec: Spec {
                initial_state: String::new(),
                states: Vec::new(),
                retention: None,
                notify: Vec::new(),
            },
        };
        let Some(fields) = self.mapping(root, "", ROOT_FIELDS) else {
            return machine;
        };
        machine.api_version = self.required_string(&fields, "apiVersion");
        machine.kind = self.required_string(&fields, "kind");
        match fields.get("metadata") {
            Some(node) => machine.metadata = self.metadata(node),
            None => self.missing(&fields, "metadata"),
        }
        match fields.get("spec") {
            Some(node) => {
                if let Some(spec) = self.spec(node) {
                    machine.spec = spec;
                }
            }
            None => self.missing(&fields, "spec"),
        }
        machine
    }

    fn metadata(&mut self, node: &Node) -> Metadata {
        let mut metadata = Metadata {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            ..Metadata::default()
        };
        let Some(fields) = self.mapping(node, "metadata", METADATA_FIELDS) else {
            return metadata;
        };
        metadata.name = self.required_string(&fields, "name");
        if let Some(namespace) = self.optional_string(&fields, "namespace") {
            metadata.namespace = namespace;
        }
        if let Some(labels) = fields.get("labels") {
            metadata.labels = self.string_map(labels, &fields.path("labels"));
        }
        if let Some(annotations) = fields.get("annotations") {
            metadata.annotations = self.string_map(annotations, &fields.path("annotations"));
        }
        metadata
    }

    fn spec(&mut self, node: &Node) -> Option<Spec> {
        let fields = self.mapping(node, "spec", SPEC_FIELDS)?;
        let initial_state = self.required_string(&fields, "initialState");
        let mut states = Vec::new();
        match fields.get("states") {
            None => self.missing(&fields, "states"),
            Some(node) => {
                let path = fields.path("states");
                let items = self.sequence(node, &path);
                if items.len() > STATES_MAX {
                    self.error(
                        codes::TOO_MANY_STATES,
                        path,
                        node.pos,
                        format!(
                            "{} states are defined; a machine may define at most {STATES_MAX}",
                            items.len()
                        ),
                    );
                    self.skip_semantics = true;
                } else {
                    for (index, item) in items.iter().enumerate() {
                        let (state, known_type) = self.state(item, &path_index(&path, index));
                        states.push(state);
                        self.known_types.push(known_type);
                    }
                }
            }
        }
        if self.failed.contains("spec.states") {
            // Without the states, "initialState names no state" would only be noise.
            self.failed.insert("spec.initialState".to_owned());
        }
        let retention = fields
            .get("retention")
            .and_then(|node| self.retention(node, &fields.path("retention")));
        let notify = match fields.get("notify") {
            Some(node) => self.notify_list(node, &fields.path("notify")),
            None => Vec::new(),
        };
        Some(Spec {
            initial_state,
            states,
            retention,
            notify,
        })
    }

    /// A `notify` list (machine-level or per state).
    fn notify_list(&mut self, node: &Node, path: &str) -> Vec<NotifyTarget> {
        let mut targets = Vec::new();
        for (index, item) in self.sequence(node, path).iter().enumerate() {
            if let Some(target) = self.notify_target(item, &path_index(path, index)) {
                targets.push(target);
            }
        }
        targets
    }

    fn notify_target(&mut self, node: &Node, path: &str) -> Option<NotifyTarget> {
        let fields = self.mapping(node, path, NOTIFY_FIELDS)?;
        let name = self.required_string(&fields, "name");
        let url = self.required_string(&fields, "url");
        let secret_env = self.optional_string(&fields, "secretEnv");
        let mut filters = [Vec::new(), Vec::new()];
        for (slot, field) in filters.iter_mut().zip(["states", "events"]) {
            if let Some(node) = fields.get(field) {
                let list_path = fields.path(field);
                for (index, item) in self.sequence(node, &list_path).iter().enumerate() {
                    if let Some(name) = self.string(item, path_index(&list_path, index)) {
                        slot.push(name);
                    }
                }
            }
        }
        let [states, events] = filters;
        let mut bounded = |field: &str, max: u64| -> Option<u64> {
            let node = fields.get(field).filter(|node| !is_null(node))?;
            let field_path = fields.path(field);
            let value = self.integer(node, field_path.clone())?;
            match u64::try_from(value) {
                Ok(value) if (1..=max).contains(&value) => Some(value),
                _ => {
                    self.error(
                        codes::INVALID_NOTIFY_TARGET,
                        field_path,
                        node.pos,
                        format!("{field} must be between 1 and {max}, found {value}"),
                    );
                    None
                }
            }
        };
        let timeout_seconds = bounded("timeoutSeconds", NOTIFY_TIMEOUT_SECONDS_MAX);
        let max_attempts =
            bounded("maxAttempts", u64::from(NOTIFY_MAX_ATTEMPTS_MAX)).map(|v| v as u32);
        Some(NotifyTarget {
            name,
            url,
            secret_env,
            states,
            events,
            timeout_seconds,
            max_attempts,
        })
    }

    /// One state, and whether its type is known.
    fn state(&mut self, node: &Node, path: &str) -> (StateDef, bool) {
        let mut state = StateDef::new("", StateType::Task);
        let Some(fields) = self.mapping(node, path, STATE_FIELDS) else {
            return (state, false);
        };
        state.name = self.required_string(&fields, "name");
        let state_type = match fields.get("type") {
            Some(node) => self.one_of(
                node,
                fields.path("type"),
                "state type",
                &[
                    ("task", StateType::Task),
                    ("wait", StateType::Wait),
                    ("choice", StateType::Choice),
                    ("final", StateType::Final),
                ],
            ),
            None => {
                self.missing(&fields, "type");
                None
            }
        };
        if let Some(state_type) = state_type {
            state.state_type = state_type;
        }
        if let Some(node) = fields.get("timeoutSeconds") {
            state.timeout_seconds = self.timeout(node, fields.path("timeoutSeconds"));
        }
        state.on_timeout = self.optional_string(&fields, "onTimeout");
        state.transition = self.optional_string(&fields, "transition");
        state.default = self.optional_string(&fields, "default");
        state.on_failure = self.optional_string(&fields, "onFailure");
        state.compensation = self.optional_string(&fields, "compensation");
        if let Some(node) = fields.get("onEvent") {
            let list_path = fields.path("onEvent");
            for (index, item) in self.sequence(node, &list_path).iter().enumerate() {
                if let Some(entry) = self.event_transition(item, &path_index(&list_path, index)) {
                    state.on_event.push(entry);
                }
            }
        }
        if let Some(node) = fields.get("choices") {
            let list_path = fields.path("choices");
            for (index, item) in self.sequence(node, &list_path).iter().enumerate() {
                if let Some(choice) = self.choice(item, &path_index(&list_path, index)) {
                    state.choices.push(choice);
                }
            }
        }
        if let Some(node) = fields.get("outcome") {
            state.outcome = if is_null(node) {
                None
            } else {
                self.one_of(
                    node,
                    fields.path("outcome"),
                    "outcome",
                    &[
                        ("succeeded", Outcome::Succeeded),
                        ("failed", Outcome::Failed),
                        ("cancelled", Outcome::Cancelled),
                    ],
                )
            };
        }
        if let Some(node) = fields.get("retry") {
            state.retry = self.retry(node, &fields.path("retry"));
        }
        if let Some(node) = fields.get("notify") {
            state.notify = self.notify_list(node, &fields.path("notify"));
        }
        (state, state_type.is_some())
    }

    fn timeout(&mut self, node: &Node, path: String) -> Option<u64> {
        let value = self.integer(node, path.clone())?;
        if value < 0 {
            self.error(
                codes::TIMEOUT_NOT_POSITIVE,
                path,
                node.pos,
                format!("timeoutSeconds must be greater than 0, found {value}"),
            );
            return None;
        }
        match u64::try_from(value) {
            Ok(value) => Some(value),
            Err(_) => {
                self.error(
                    codes::TIMEOUT_TOO_LARGE,
                    path,
                    node.pos,
                    format!("timeoutSeconds may be at most {TIMEOUT_SECONDS_MAX} (ten years)"),
                );
                None
            }
        }
    }

    fn event_transition(&mut self, node: &Node, path: &str) -> Option<EventTransition> {
        let fields = self.mapping(node, path, EVENT_FIELDS)?;
        let event = self.required_string(&fields, "event");
        let target = self.required_string(&fields, "target");
        let guard = match fields.get("guard") {
            Some(node) if !is_null(node) => self.expression(node, fields.path("guard")),
            _ => None,
        };
        let flag = match fields.get("flag") {
            Some(node) if !is_null(node) => self.flag(node, &fields.path("flag")),
            _ => None,
        };
        let mut assign = BTreeMap::new();
        if let Some(node) = fields.get("assign") {
            let assign_path = fields.path("assign");
            self.visit(&assign_path, node);
            match &node.kind {
                NodeKind::Mapping(entries) => {
                    for entry in entries {
                        let entry_path = path_key(&assign_path, &entry.key);
                        if let Some(source) = self.expression(&entry.value, entry_path) {
                            assign.insert(entry.key.clone(), source);
                        }
                    }
                }
                _ if is_null(node) => {}
                _ => self.wrong_type(
                    node,
                    assign_path,
                    "a mapping of data fields to CEL expressions",
                ),
            }
        }
        let mut context = Vec::new();
        if let Some(node) = fields.get("context") {
            let context_path = fields.path("context");
            for (index, item) in self.sequence(node, &context_path).iter().enumerate() {
                if let Some(field) = self.string(item, path_index(&context_path, index)) {
                    context.push(field);
                }
            }
        }
        Some(EventTransition {
            event,
            target,
            guard,
            flag,
            assign,
            context,
        })
    }

    fn choice(&mut self, node: &Node, path: &str) -> Option<Choice> {
        let fields = self.mapping(node, path, CHOICE_FIELDS)?;
        let guard = match fields.get("guard") {
            Some(node) => self
                .expression(node, fields.path("guard"))
                .unwrap_or_default(),
            None => {
                self.missing(&fields, "guard");
                String::new()
            }
        };
        let target = self.required_string(&fields, "target");
        Some(Choice { guard, target })
    }

    fn retention(&mut self, node: &Node, path: &str) -> Option<Retention> {
        if is_null(node) {
            self.visit(path, node);
            return None;
        }
        let fields = self.mapping(node, path, RETENTION_FIELDS)?;
        let Some(node) = fields.get("finishedAfterDays") else {
            self.missing(&fields, "finishedAfterDays");
            return None;
        };
        let field_path = fields.path("finishedAfterDays");
        let value = self.integer(node, field_path.clone())?;
        match u32::try_from(value) {
            Ok(days) if (1..=RETENTION_DAYS_MAX).contains(&days) => Some(Retention {
                finished_after_days: days,
            }),
            _ => {
                self.error(
                    codes::INVALID_RETENTION,
                    field_path,
                    node.pos,
                    format!(
                        "retention.finishedAfterDays must be between 1 and {RETENTION_DAYS_MAX}, found {value}"
                    ),
                );
                None
            }
        }
    }

    fn retry(&mut self, node: &Node, path: &str) -> Option<Retry> {
        if is_null(node) {
            self.visit(path, node);
            return None;
        }
        let fields = self.mapping(node, path, RETRY_FIELDS)?;
        let mut retry = Retry {
            max_attempts: 0,
            backoff_seconds: 1.0,
            backoff_rate: 2.0,
        };
        match fields.get("maxAttempts") {
            Some(node) => {
                let field_path = fields.path("maxAttempts");
                if let Some(value) = self.integer(node, field_path.clone()) {
                    match u32::try_from(value) {
                        Ok(value) => retry.max_attempts = value,
                        Err(_) => self.error(
                            codes::INVALID_RETRY,
                            field_path,
                            node.pos,
                            format!(
                                "retry.maxAttempts must be between 1 and {}, found {value}",
                                u32::MAX
                            ),
                        ),
                    }
                }
            }
            None => self.missing(&fields, "maxAttempts"),
        }
        if let Some(node) = fields.get("backoffSeconds")
            && let Some(value) = self.number(node, fields.path("backoffSeconds"))
        {
            retry.backoff_seconds = value;
        }
        if let Some(node) = fields.get("backoffRate")
            && let Some(value) = self.number(node, fields.path("backoffRate"))
        {
            retry.backoff_rate = value;
        }
        Some(retry)
    }

    /// `flag: key` or `flag: {key, variant?, value?, targetingKey?, onFlagError?}`.
    fn flag(&mut self, node: &Node, path: &str) -> Option<FlagGate> {
        if let NodeKind::Scalar { .. } = node.kind {
            let key = self.string(node, path.to_owned())?;
            return Some(FlagGate {
                key,
                variant: None,
                value: None,
                targeting_key: None,
                on_flag_error: FlagErrorPolicy::Deny,
            });
        }
        let NodeKind::Mapping(_) = node.kind else {
            self.visit(path, node);
            self.wrong_type(node, path.to_owned(), "a flag key or a mapping with `key`");
            return None;
        };
        let fields = self.mapping(node, path, FLAG_FIELDS)?;
        let key = self.required_string(&fields, "key");
        let variant = self.optional_string(&fields, "variant");
        let value = match fields.get("value") {
            Some(node) if !is_null(node) => self.json(node, &fields.path("value")),
            _ => None,
        };
        let targeting_key = match fields.get("targetingKey") {
            Some(node) if !is_null(node) => self.expression(node, fields.path("targetingKey")),
            _ => None,
        };
        let on_flag_error = match fields.get("onFlagError") {
            Some(node) if !is_null(node) => self
                .one_of(
                    node,
                    fields.path("onFlagError"),
                    "onFlagError policy",
                    &[
                        ("deny", FlagErrorPolicy::Deny),
                        ("allow", FlagErrorPolicy::Allow),
                    ],
                )
                .unwrap_or_default(),
            _ => FlagErrorPolicy::Deny,
        };
        Some(FlagGate {
            key,
            variant,
            value,
            targeting_key,
            on_flag_error,
        })
    }

    /// Any YAML value as JSON (a flag's expected `value`). Depth is bounded by the YAML limit.
    fn json(&mut self, node: &Node, path: &str) -> Option<serde_json::Value> {
        use serde_json::Value;
        self.visit(path, node);
        match &node.kind {
            NodeKind::Scalar { text, style } => match Scalar::classify(text, *style) {
                Scalar::Null => Some(Value::Null),
                Scalar::Bool(b) => Some(Value::Bool(b)),
                Scalar::Str => Some(Value::String(text.clone())),
                Scalar::Int(i) => {
                    let number = i64::try_from(i)
                        .map(serde_json::Number::from)
                        .or_else(|_| u64::try_from(i).map(serde_json::Number::from))
                        .ok();
                    if number.is_none() {
                        self.error(
                            codes::INVALID_VALUE,
                            path.to_owned(),
                            node.pos,
                            "integer out of the 64-bit range".to_owned(),
                        );
                    }
                    number.map(Value::Number)
                }
                Scalar::Float(f) => {
                    let number = serde_json::Number::from_f64(f);
                    if number.is_none() {
                        self.error(
                            codes::INVALID_VALUE,
                            path.to_owned(),
                            node.pos,
                            "infinite and NaN numbers have no JSON form".to_owned(),
                        );
                    }
                    number.map(Value::Number)
                }
            },
            NodeKind::Sequence(items) => {
                let mut array = Vec::with_capacity(items.len());
                for (index, item) in items.iter().enumerate() {
                    array.push(self.json(item, &path_index(path, index))?);
                }
                Some(Value::Array(array))
            }
            NodeKind::Mapping(entries) => {
                let mut object = serde_json::Map::new();
                for entry in entries {
                    let value = self.json(&entry.value, &path_key(path, &entry.key))?;
                    object.insert(entry.key.clone(), value);
                }
                Some(Value::Object(object))
            }
        }
    }
}

/// What is wrong with a notify URL: it must be an absolute `http://` or `https://` URL with a
/// host, no credentials, no fragment, no white space, at most
/// [`NOTIFY_URL_CHARS_MAX`] characters.
pub fn notify_url_defect(url: &str) -> Option<&'static str> {
    if url.chars().count() > NOTIFY_URL_CHARS_MAX {
        return Some("is too long (at most 2048 characters)");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("holds white space or control characters");
    }
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let Some(rest) = rest else {
        return Some("is not an absolute http:// or https:// URL");
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    if authority.contains('@') {
        return Some("carries credentials; put the secret in secretEnv instead");
    }
    if url.contains('#') {
        return Some("has a fragment, which HTTP never sends");
    }
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((host, port)) if port.is_empty() || port.starts_with(':') => {
                if !port.is_empty() && !is_port(&port[1..]) {
                    return Some("has an invalid port");
                }
                host
            }
            _ => return Some("has an invalid IPv6 host"),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => {
                if !is_port(port) {
                    return Some("has an invalid port");
                }
                host
            }
            None => authority,
        }
    };
    if host.is_empty() {
        return Some("has no host");
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
    {
        return Some("has a host with characters a host name cannot hold");
    }
    None
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.parse::<u16>().is_ok_and(|p| p > 0)
}

/// An environment variable name: ASCII letters, digits and `_`, not starting with a digit.
fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_null(node: &Node) -> bool {
    match &node.kind {
        NodeKind::Scalar { text, style } => Scalar::classify(text, *style) == Scalar::Null,
        NodeKind::Mapping(_) | NodeKind::Sequence(_) => false,
    }
}

/// Text for a message, cut to a readable length.
fn shorten(text: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 80;
    if text.chars().count() <= SHOWN_CHARS_MAX {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(SHOWN_CHARS_MAX).collect();
    short.push('…');
    short
}

fn unknown_field_message(field: &str, allowed: &[&str]) -> String {
    if (field == "on" || field == "true") && allowed.contains(&"onEvent") {
        return format!(
            "unknown field `{field}`: use `onEvent`. YAML 1.1 parsers, kubectl's among them, \
             read a bare `on` key as the boolean `true`, so a manifest applied with kubectl would \
             lose its transitions"
        );
    }
    match suggest(field, allowed) {
        Some(suggestion) => {
            format!(
                "unknown field `{}`; did you mean `{suggestion}`?",
                shorten(field)
            )
        }
        None => format!(
            "unknown field `{}`; expected one of {}",
            shorten(field),
            allowed.join(", ")
        ),
    }
}

/// The allowed word closest to `word`, if one is close enough to be a likely typo.
fn suggest<'a>(word: &str, allowed: &[&'a str]) -> Option<&'a str> {
    const WORD_CHARS_COMPARED_MAX: usize = 64;
    if word.chars().count() > WORD_CHARS_COMPARED_MAX {
        return None;
    }
    if let Some((_, real)) = FIELD_ALIASES
        .iter()
        .find(|(alias, real)| *alias == word && allowed.contains(real))
    {
        return allowed.iter().copied().find(|a| a == real);
    }
    let normalize = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let wanted = normalize(word);
    if let Some(found) = allowed.iter().copied().find(|a| normalize(a) == wanted) {
        return Some(found);
    }
    if wanted.chars().count() >= 4
        && let Some(found) = allowed
            .iter()
            .copied()
            .find(|a| normalize(a).starts_with(&wanted))
    {
        return Some(found);
    }
    let threshold = match wanted.chars().count() {
        0..=2 => 0,
        3 => 1,
        4..=7 => 2,
        _ => 3,
    };
    allowed
        .iter()
        .copied()
        .map(|a| (edit_distance(&normalize(a), &wanted), a))
        .filter(|(distance, _)| *distance <= threshold)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, a)| a)
}

/// Levenshtein distance; callers keep the words short.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

// ------------------------------------------------------------------------------------------------
// Semantic checks.
// ------------------------------------------------------------------------------------------------

/// An RFC 1123 label: lowercase letters, digits and `-`, at most 63, alphanumeric at both ends.
pub fn is_rfc1123_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    !name.is_empty()
        && name.len() <= LABEL_CHARS_MAX
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
}

/// `[A-Za-z_][A-Za-z0-9_]*`
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why a state or event name is unusable, if it is.
fn name_defect(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.chars().count() > NAME_CHARS_MAX {
        Some("is longer than 253 characters")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains white space or control characters")
    } else {
        None
    }
}

/// What a CEL expression is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExpressionRole {
    Guard,
    Assignment,
    TargetingKey,
}

impl ExpressionRole {
    fn noun(self) -> &'static str {
        match self {
            ExpressionRole::Guard => "guard",
            ExpressionRole::Assignment => "assignment",
            ExpressionRole::TargetingKey => "targetingKey expression",
        }
    }
}

/// What the walk over a compiled expression found.
struct ExpressionShape<'e> {
    too_deep: bool,
    /// Top-level variables used, in first-use order, without comprehension variables.
    free_variables: Vec<&'e str>,
    has_comprehension: bool,
}

/// Names that resolve to CEL types rather than variables.
const CEL_TYPE_NAMES: &[&str] = &[
    "bool",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

/// Walks the expression tree without recursion (its depth is not trusted yet).
fn expression_shape(root: &IdedExpr) -> ExpressionShape<'_> {
    // scopes[i] = (parent scope, variables bound by a comprehension)
    let mut scopes: Vec<(Option<usize>, Vec<&str>)> = vec![(None, Vec::new())];
    let mut stack: Vec<(&IdedExpr, usize, usize)> = vec![(root, 1, 0)];
    let mut shape = ExpressionShape {
        too_deep: false,
        free_variables: Vec::new(),
        has_comprehension: false,
    };
    while let Some((node, depth, scope)) = stack.pop() {
        if depth > EXPRESSION_DEPTH_MAX {
            shape.too_deep = true;
            return shape;
        }
        let child = depth + 1;
        match &node.expr {
            Expr::Unspecified | Expr::Literal(_) => {}
            Expr::Call(call) => {
                if let Some(target) = &call.target {
                    stack.push((target, child, scope));
                }
                stack.extend(call.args.iter().map(|arg| (arg, child, scope)));
            }
            Expr::Comprehension(comprehension) => {
                shape.has_comprehension = true;
                stack.push((&comprehension.iter_range, child, scope));
                stack.push((&comprehension.accu_init, child, scope));
                let mut bound = vec![
                    comprehension.iter_var.as_str(),
                    comprehension.accu_var.as_str(),
                ];
                if let Some(second) = &comprehension.iter_var2 {
                    bound.push(second.as_str());
                }
                scopes.push((Some(scope), bound));
                let inner = scopes.len() - 1;
                stack.push((&comprehension.loop_cond, child, inner));
                stack.push((&comprehension.loop_step, child, inner));
                stack.push((&comprehension.result, child, inner));
            }
            Expr::Ident(name) => {
                let mut current = Some(scope);
                let mut is_bound = false;
                while let Some(index) = current {
                    let Some((parent, names)) = scopes.get(index) else {
                        break;
                    };
                    if names.contains(&name.as_str()) {
                        is_bound = true;
                        break;
                    }
                    current = *parent;
                }
                if !is_bound
                    && !name.starts_with('@')
                    && !CEL_TYPE_NAMES.contains(&name.as_str())
                    && !shape.free_variables.contains(&name.as_str())
                {
                    shape.free_variables.push(name);
                }
            }
            Expr::List(list) => stack.extend(list.elements.iter().map(|e| (e, child, scope))),
            Expr::Map(map) => push_entries(&mut stack, &map.entries, child, scope),
            Expr::Struct(structure) => push_entries(&mut stack, &structure.entries, child, scope),
            Expr::Select(select) => stack.push((&select.operand, child, scope)),
        }
    }
    shape
}

fn push_entries<'e>(
    stack: &mut Vec<(&'e IdedExpr, usize, usize)>,
    entries: &'e [cel::common::ast::IdedEntryExpr],
    depth: usize,
    scope: usize,
) {
    for entry in entries {
        match &entry.expr {
            EntryExpr::StructField(field) => stack.push((&field.value, depth, scope)),
            EntryExpr::MapEntry(map_entry) => {
                stack.push((&map_entry.key, depth, scope));
                stack.push((&map_entry.value, depth, scope));
            }
        }
    }
}

/// Why the top of a guard cannot be a bool, if that is known from its shape alone.
/// Only called on trees whose depth was checked.
fn non_bool_shape(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Literal(LiteralValue::Boolean(_)) => None,
        Expr::Literal(literal) => Some(format!(
            "is a {} literal",
            match literal {
                LiteralValue::Bytes(_) => "bytes",
                LiteralValue::Double(_) => "double",
                LiteralValue::Int(_) => "int",
                LiteralValue::Null => "null",
                LiteralValue::String(_) => "string",
                LiteralValue::UInt(_) => "uint",
                LiteralValue::Boolean(_) => "bool",
            }
        )),
        Expr::List(_) => Some("is a list literal".to_owned()),
        Expr::Map(_) => Some("is a map literal".to_owned()),
        Expr::Struct(_) => Some("is a message literal".to_owned()),
        Expr::Call(call) => {
            let arithmetic = [
                (operators::ADD, "+"),
                (operators::SUBSTRACT, "-"),
                (operators::MULTIPLY, "*"),
                (operators::DIVIDE, "/"),
                (operators::MODULO, "%"),
                (operators::NEGATE, "unary -"),
            ];
            if let Some((_, symbol)) = arithmetic
                .iter()
                .find(|(name, _)| *name == call.func_name.as_str())
            {
                return Some(format!(
                    "is arithmetic (`{symbol}`), which does not yield a bool"
                ));
            }
            if call.func_name == operators::CONDITIONAL {
                return call
                    .args
                    .iter()
                    .skip(1)
                    .find_map(|branch| non_bool_shape(&branch.expr))
                    .map(|why| format!("has a branch that {why}"));
            }
            None
        }
        Expr::Unspecified | Expr::Comprehension(_) | Expr::Ident(_) | Expr::Select(_) => None,
    }
}

struct Checker<'m> {
    machine: &'m StateMachine,
    known_types: &'m [bool],
    problems: Vec<Problem>,
    /// State name → index of its first definition.
    index: HashMap<&'m str, usize>,
    /// The empty context constant guards are evaluated in, built once.
    cel_context: Option<cel::Context<'static, 'static>>,
}

fn state_path(index: usize) -> String {
    format!("spec.states[{index}]")
}

impl<'m> Checker<'m> {
    fn new(machine: &'m StateMachine, known_types: &'m [bool]) -> Checker<'m> {
        Checker {
            machine,
            known_types,
            problems: Vec::new(),
            index: HashMap::new(),
            cel_context: None,
        }
    }

    fn error(&mut self, code: &'static str, path: String, message: String) {
        self.problems
            .push(Problem::new(Severity::Error, code, path, message));
    }

    fn warning(&mut self, code: &'static str, path: String, message: String) {
        self.problems
            .push(Problem::new(Severity::Warning, code, path, message));
    }

    fn type_known(&self, index: usize) -> Option<StateType> {
        let known = self.known_types.get(index).copied().unwrap_or(false);
        let state = self.machine.spec.states.get(index)?;
        known.then_some(state.state_type)
    }

    fn check(&mut self) {
        self.check_header();
        let states = &self.machine.spec.states;
        if states.len() > STATES_MAX {
            self.error(
                codes::TOO_MANY_STATES,
                "spec.states".to_owned(),
                format!(
                    "{} states are defined; a machine may define at most {STATES_MAX}",
                    states.len()
                ),
            );
            return;
        }
        if states.is_empty() {
            self.error(
                codes::NO_STATES,
                "spec.states".to_owned(),
                "spec.states must define at least one state".to_owned(),
            );
        }
        self.check_names();
        let initial = &self.machine.spec.initial_state;
        if !self.index.contains_key(initial.as_str()) {
            let message = self.undefined_message("initialState", initial);
            self.error(
                codes::UNDEFINED_INITIAL_STATE,
                "spec.initialState".to_owned(),
                message,
            );
        }
        for index in 0..states.len() {
            self.check_state(index);
        }
        self.check_compensations();
        self.check_choice_cycles();
        self.check_graph();
        self.check_notify();
    }

    /// `notify` targets: count, unique names, URLs, secrets, limits, and filters that name
    /// only states and events of this machine.
    fn check_notify(&mut self) {
        let machine = self.machine;
        let targets: Vec<(String, Option<usize>, &NotifyTarget)> = machine
            .spec
            .notify
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("spec.notify[{i}]"), None, t))
            .chain(
                machine
                    .spec
                    .states
                    .iter()
                    .enumerate()
                    .flat_map(|(s, state)| {
                        state.notify.iter().enumerate().map(move |(i, t)| {
                            (format!("{}.notify[{i}]", state_path(s)), Some(s), t)
                        })
                    }),
            )
            .collect();
        if targets.len() > NOTIFY_TARGETS_MAX {
            self.error(
                codes::TOO_MANY_NOTIFY_TARGETS,
                "spec.notify".to_owned(),
                format!(
                    "{} notify targets are declared; a machine may declare at most {NOTIFY_TARGETS_MAX}",
                    targets.len()
                ),
            );
        }
        let mut events: HashSet<&str> = [EVENT_COMPLETE, crate::resource::EVENT_FAIL]
            .into_iter()
            .collect();
        for state in &machine.spec.states {
            events.extend(state.on_event.iter().map(|e| e.event.as_str()));
        }
        let mut names: HashMap<&str, &str> = HashMap::new();
        for (path, state, target) in &targets {
            let field = |name: &str| format!("{path}.{name}");
            if !is_rfc1123_label(&target.name) {
                self.error(
                    codes::INVALID_NOTIFY_TARGET,
                    field("name"),
                    format!(
                        "the notify target name `{}` is not an RFC 1123 label: use at most 63 \
                         lowercase letters, digits and '-', starting and ending with a letter or digit",
                        shorten(&target.name)
                    ),
                );
            } else if let Some(first) = names.get(target.name.as_str()) {
                self.error(
                    codes::DUPLICATE_NOTIFY_TARGET,
                    field("name"),
                    format!(
                        "notify target `{}` is already declared at {first}",
                        target.name
                    ),
                );
            } else {
                names.insert(&target.name, path);
            }
            if let Some(defect) = notify_url_defect(&target.url) {
                self.error(
                    codes::INVALID_NOTIFY_URL,
                    field("url"),
                    format!("notify url `{}` {defect}", shorten(&target.url)),
                );
            }
            if let Some(env) = &target.secret_env
                && !is_env_name(env)
            {
                self.error(
                    codes::INVALID_NOTIFY_TARGET,
                    field("secretEnv"),
                    format!(
                        "secretEnv `{}` is not an environment variable name (letters, digits and \
                         '_', not starting with a digit, at most 128); it names the variable that \
                         holds the secret, never the secret itself",
                        shorten(env)
                    ),
                );
            }
            if let Some(seconds) = target.timeout_seconds
                && !(1..=NOTIFY_TIMEOUT_SECONDS_MAX).contains(&seconds)
            {
                self.error(
                    codes::INVALID_NOTIFY_TARGET,
                    field("timeoutSeconds"),
                    format!(
                        "timeoutSeconds must be between 1 and {NOTIFY_TIMEOUT_SECONDS_MAX}, found {seconds}"
                    ),
                );
            }
            if let Some(attempts) = target.max_attempts
                && !(1..=NOTIFY_MAX_ATTEMPTS_MAX).contains(&attempts)
            {
                self.error(
                    codes::INVALID_NOTIFY_TARGET,
                    field("maxAttempts"),
                    format!(
                        "maxAttempts must be between 1 and {NOTIFY_MAX_ATTEMPTS_MAX}, found {attempts}"
                    ),
                );
            }
            if state.is_some() && !target.states.is_empty() {
                self.error(
                    codes::INVALID_NOTIFY_TARGET,
                    field("states"),
                    "a per-state notify target takes no `states` filter: it receives the records \
                     that enter its state"
                        .to_owned(),
                );
            }
            for (list, what) in [(&target.states, "states"), (&target.events, "events")] {
                if list.len() > NOTIFY_FILTER_LEN_MAX {
                    self.error(
                        codes::INVALID_NOTIFY_TARGET,
                        field(what),
                        format!(
                            "{} entries; a filter holds at most {NOTIFY_FILTER_LEN_MAX}",
                            list.len()
                        ),
                    );
                }
            }
            if state.is_none() {
                for (index, name) in target.states.iter().enumerate() {
                    if !self.index.contains_key(name.as_str()) {
                        let message = self.undefined_message("notify state filter", name);
                        self.error(
                            codes::UNKNOWN_NOTIFY_FILTER,
                            format!("{path}.states[{index}]"),
                            message,
                        );
                    }
                }
            }
            for (index, name) in target.events.iter().enumerate() {
                if !events.contains(name.as_str()) {
                    let mut known: Vec<&str> = events.iter().copied().collect();
                    known.sort_unstable();
                    let suggestion = suggest(name, &known)
                        .map(|s| format!("; did you mean `{s}`?"))
                        .unwrap_or_default();
                    self.error(
                        codes::UNKNOWN_NOTIFY_FILTER,
                        format!("{path}.events[{index}]"),
                        format!(
                            "notify event filter `{}` is not an event of this machine{suggestion}",
                            shorten(name)
                        ),
                    );
                }
            }
        }
    }

    fn check_header(&mut self) {
        let machine = self.machine;
        if machine.api_version != API_VERSION {
            self.error(
                codes::INVALID_API_VERSION,
                "apiVersion".to_owned(),
                format!(
                    "apiVersion must be `{API_VERSION}`, found `{}`",
                    shorten(&machine.api_version)
                ),
            );
        }
        if machine.kind != KIND_STATE_MACHINE {
            self.error(
                codes::INVALID_KIND,
                "kind".to_owned(),
                format!(
                    "kind must be `{KIND_STATE_MACHINE}`, found `{}`",
                    shorten(&machine.kind)
                ),
            );
        }
        if !is_rfc1123_label(&machine.metadata.name) {
            self.error(
                codes::INVALID_NAME,
                "metadata.name".to_owned(),
                format!(
                    "metadata.name `{}` is not an RFC 1123 label: use at most 63 lowercase \
                     letters, digits and '-', starting and ending with a letter or digit",
                    shorten(&machine.metadata.name)
                ),
            );
        }
        if !is_rfc1123_label(&machine.metadata.namespace) {
            self.error(
                codes::INVALID_NAMESPACE,
                "metadata.namespace".to_owned(),
                format!(
                    "metadata.namespace `{}` is not an RFC 1123 label: use at most 63 lowercase \
                     letters, digits and '-', starting and ending with a letter or digit",
                    shorten(&machine.metadata.namespace)
                ),
            );
        }
    }

    fn check_names(&mut self) {
        let states = &self.machine.spec.states;
        for (index, state) in states.iter().enumerate() {
            if let Some(defect) = name_defect(&state.name) {
                self.error(
                    codes::INVALID_STATE_NAME,
                    format!("{}.name", state_path(index)),
                    format!("the state name `{}` {defect}", shorten(&state.name)),
                );
                if state.name.is_empty() {
                    continue;
                }
            }
            match self.index.get(state.name.as_str()) {
                Some(first) => {
                    let message = format!(
                        "state `{}` is already defined at {}",
                        shorten(&state.name),
                        state_path(*first)
                    );
                    self.error(
                        codes::DUPLICATE_STATE,
                        format!("{}.name", state_path(index)),
                        message,
                    );
                }
                None => {
                    self.index.insert(state.name.as_str(), index);
                }
            }
        }
    }

    fn undefined_message(&self, what: &str, name: &str) -> String {
        if name.is_empty() {
            return format!("{what} is empty; it must name a state");
        }
        let names: Vec<&str> = self
            .machine
            .spec
            .states
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        let suggestion = suggest(name, &names)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        format!(
            "{what} `{}` is not a defined state{suggestion}",
            shorten(name)
        )
    }

    fn check_target(&mut self, path: String, target: &str) {
        if !self.index.contains_key(target) {
            let message = self.undefined_message("target", target);
            self.error(codes::UNDEFINED_TARGET, path, message);
        }
    }

    fn check_state(&mut self, index: usize) {
        let machine = self.machine;
        let Some(state) = machine.spec.states.get(index) else {
            return;
        };
        let path = state_path(index);
        let field = |name: &str| format!("{path}.{name}");

        // Every target, whatever the type: an undefined one is wrong everywhere.
        let single_targets = [
            ("transition", &state.transition),
            ("onTimeout", &state.on_timeout),
            ("default", &state.default),
            ("onFailure", &state.on_failure),
            ("compensation", &state.compensation),
        ];
        for (name, target) in single_targets {
            if let Some(target) = target {
                self.check_target(field(name), target);
            }
        }
        for (n, entry) in state.on_event.iter().enumerate() {
            self.check_event_transition(&format!("{path}.onEvent[{n}]"), entry);
        }
        for (n, choice) in state.choices.iter().enumerate() {
            let choice_path = format!("{path}.choices[{n}]");
            self.check_target(format!("{choice_path}.target"), &choice.target);
            self.check_expression(
                &choice.guard,
                format!("{choice_path}.guard"),
                ExpressionRole::Guard,
            );
        }
        if let Some(retry) = &state.retry {
            self.check_retry(&field("retry"), retry);
        }
        self.check_shadowing(index);

        let Some(state_type) = self.type_known(index) else {
            return;
        };
        self.check_timeout(index, state_type);
        let type_name = state_type.as_str();
        let not_allowed = |checker: &mut Checker<'_>, name: &str, present: bool, why: &str| {
            if present {
                checker.error(
                    codes::FIELD_NOT_ALLOWED,
                    field(name),
                    format!("`{name}` is not allowed on a {type_name} state: {why}"),
                );
            }
        };
        let has_choices = !state.choices.is_empty();
        let has_on_event = !state.on_event.is_empty();
        if state_type != StateType::Final {
            not_allowed(
                self,
                "outcome",
                state.outcome.is_some(),
                "only final states have an outcome",
            );
        }
        match state_type {
            StateType::Task => {
                let why = "only choice states have choices and a default";
                not_allowed(self, "choices", has_choices, why);
                not_allowed(self, "default", state.default.is_some(), why);
            }
            StateType::Wait => {
                if state.transition.is_none() {
                    self.error(
                        codes::MISSING_TRANSITION,
                        field("transition"),
                        "a wait state needs `transition`, the state it leads to when the wait ends"
                            .to_owned(),
                    );
                }
                self.on_timeout_not_allowed(
                    &field("onTimeout"),
                    state,
                    "a wait state leaves by `transition` when its time elapses",
                );
                let why = "a wait state leaves only by `transition` when its time elapses";
                not_allowed(self, "onEvent", has_on_event, why);
                not_allowed(self, "choices", has_choices, why);
                not_allowed(self, "default", state.default.is_some(), why);
                let why = "only task states have attempts, failures and compensations";
                not_allowed(self, "retry", state.retry.is_some(), why);
                not_allowed(self, "onFailure", state.on_failure.is_some(), why);
                not_allowed(self, "compensation", state.compensation.is_some(), why);
            }
            StateType::Choice => {
                if !has_choices && state.default.is_none() {
                    self.error(
                        codes::CHOICE_WITHOUT_WAY_OUT,
                        path.clone(),
                        format!(
                            "choice state `{}` has no way out: give it `choices` or a `default`",
                            shorten(&state.name)
                        ),
                    );
                }
                self.on_timeout_not_allowed(
                    &field("onTimeout"),
                    state,
                    "a choice state resolves at once and its timeout is never armed",
                );
                let why = "a choice state leaves at once by `choices` or `default`";
                not_allowed(self, "onEvent", has_on_event, why);
                not_allowed(self, "transition", state.transition.is_some(), why);
                let why = "only task states have attempts, failures and compensations";
                not_allowed(self, "retry", state.retry.is_some(), why);
                not_allowed(self, "onFailure", state.on_failure.is_some(), why);
                not_allowed(self, "compensation", state.compensation.is_some(), why);
            }
            StateType::Final => {
                let leaving = [
                    ("transition", state.transition.is_some()),
                    ("onEvent", has_on_event),
                    ("onTimeout", state.on_timeout.is_some()),
                    ("choices", has_choices),
                    ("default", state.default.is_some()),
                    ("onFailure", state.on_failure.is_some()),
                    ("compensation", state.compensation.is_some()),
                ];
                for (name, present) in leaving {
                    if present {
                        self.error(
                            codes::FINAL_STATE_TRANSITION,
                            field(name),
                            format!(
                                "final state `{}` may not declare `{name}`: nothing leaves a \
                                 final state",
                                shorten(&state.name)
                            ),
                        );
                    }
                }
                not_allowed(
                    self,
                    "retry",
                    state.retry.is_some(),
                    "a final state has no attempts",
                );
            }
        }
    }

    fn on_timeout_not_allowed(&mut self, path: &str, state: &StateDef, why: &str) {
        if state.on_timeout.is_some() {
            self.error(
                codes::ON_TIMEOUT_NOT_ALLOWED,
                path.to_owned(),
                format!(
                    "`onTimeout` is not allowed on {} state `{}`: {why}",
                    state.state_type.as_str(),
                    shorten(&state.name)
                ),
            );
        }
    }

    fn check_timeout(&mut self, index: usize, state_type: StateType) {
        let Some(state) = self.machine.spec.states.get(index) else {
            return;
        };
        let path = format!("{}.timeoutSeconds", state_path(index));
        match (state_type, state.timeout_seconds) {
            (StateType::Final, Some(_)) => self.warning(
                codes::TIMEOUT_IGNORED,
                path,
                "timeoutSeconds on a final state is never armed".to_owned(),
            ),
            (StateType::Final, None) => {}
            (_, None) => self.error(
                codes::MISSING_TIMEOUT,
                path,
                format!(
                    "{} state `{}` needs `timeoutSeconds` (an integer greater than 0)",
                    state_type.as_str(),
                    shorten(&state.name)
                ),
            ),
            (_, Some(0)) => self.error(
                codes::TIMEOUT_NOT_POSITIVE,
                path,
                "timeoutSeconds must be greater than 0".to_owned(),
            ),
            (_, Some(seconds)) if seconds > TIMEOUT_SECONDS_MAX => self.error(
                codes::TIMEOUT_TOO_LARGE,
                path,
                format!(
                    "timeoutSeconds is {seconds}; the limit is {TIMEOUT_SECONDS_MAX} (ten years)"
                ),
            ),
            (_, Some(_)) => {}
        }
    }

    fn check_retry(&mut self, path: &str, retry: &Retry) {
        if retry.max_attempts < 1 {
            self.error(
                codes::INVALID_RETRY,
                format!("{path}.maxAttempts"),
                format!(
                    "retry.maxAttempts counts every try including the first: it must be at \
                     least 1, found {}",
                    retry.max_attempts
                ),
            );
        }
        if !(retry.backoff_seconds.is_finite() && retry.backoff_seconds >= 0.0) {
            self.error(
                codes::INVALID_RETRY,
                format!("{path}.backoffSeconds"),
                format!(
                    "retry.backoffSeconds must be a finite number of at least 0, found {}",
                    retry.backoff_seconds
                ),
            );
        }
        if !(retry.backoff_rate.is_finite() && retry.backoff_rate >= 1.0) {
            self.error(
                codes::INVALID_RETRY,
                format!("{path}.backoffRate"),
                format!(
                    "retry.backoffRate must be a finite number of at least 1, found {}",
                    retry.backoff_rate
                ),
            );
        }
    }

    fn check_event_transition(&mut self, path: &str, entry: &EventTransition) {
        if let Some(defect) = name_defect(&entry.event) {
            self.error(
                codes::INVALID_EVENT_NAME,
                format!("{path}.event"),
                format!("the event name `{}` {defect}", shorten(&entry.event)),
            );
        }
        self.check_target(format!("{path}.target"), &entry.target);
        if let Some(guard) = &entry.guard {
            self.check_expression(guard, format!("{path}.guard"), ExpressionRole::Guard);
        }
        if let Some(flag) = &entry.flag {
            let flag_path = format!("{path}.flag");
            if flag.key.trim().is_empty() {
                self.error(
                    codes::FLAG_KEY_EMPTY,
                    format!("{flag_path}.key"),
                    "the flag key is empty".to_owned(),
                );
            }
            if flag.variant.is_some() && flag.value.is_some() {
                self.error(
                    codes::FLAG_VARIANT_AND_VALUE,
                    format!("{flag_path}.value"),
                    "a flag gate allows by `variant` or by `value`, not both".to_owned(),
                );
            }
            if let Some(targeting_key) = &flag.targeting_key {
                self.check_expression(
                    targeting_key,
                    format!("{flag_path}.targetingKey"),
                    ExpressionRole::TargetingKey,
                );
            }
        }
        for (key, source) in &entry.assign {
            let assign_path = path_key(&format!("{path}.assign"), key);
            if !is_identifier(key) {
                self.error(
                    codes::INVALID_ASSIGN_KEY,
                    assign_path.clone(),
                    format!(
                        "`{}` is not an identifier: assign keys are data field names \
                         (letters, digits and '_', not starting with a digit)",
                        shorten(key)
                    ),
                );
            }
            self.check_expression(source, assign_path, ExpressionRole::Assignment);
        }
        for (n, field) in entry.context.iter().enumerate() {
            if field.trim().is_empty() {
                self.error(
                    codes::INVALID_CONTEXT_FIELD,
                    format!("{path}.context[{n}]"),
                    "context entries name data fields; this one is empty".to_owned(),
                );
            }
        }
        if !entry.context.is_empty() && entry.flag.is_none() {
            self.warning(
                codes::CONTEXT_WITHOUT_FLAG,
                format!("{path}.context"),
                "`context` is passed to flag evaluations, but this entry has no `flag`".to_owned(),
            );
        }
    }

    /// Warns on entries that can never fire.
    fn check_shadowing(&mut self, index: usize) {
        let machine = self.machine;
        let Some(state) = machine.spec.states.get(index) else {
            return;
        };
        let path = state_path(index);
        let mut unconditional: HashMap<&str, usize> = HashMap::new();
        for (n, entry) in state.on_event.iter().enumerate() {
            if let Some(first) = unconditional.get(entry.event.as_str()) {
                self.warning(
                    codes::SHADOWED_TRANSITION,
                    format!("{path}.onEvent[{n}]"),
                    format!(
                        "this entry for event `{}` can never fire: onEvent[{first}] for the same \
                         event has neither guard nor flag",
                        shorten(&entry.event)
                    ),
                );
            } else if entry.guard.is_none() && entry.flag.is_none() {
                unconditional.insert(entry.event.as_str(), n);
            }
        }
        let is_task = self.type_known(index) == Some(StateType::Task);
        if is_task
            && state.transition.is_some()
            && let Some(first) = unconditional.get(EVENT_COMPLETE)
        {
            self.warning(
                codes::SHADOWED_TRANSITION,
                format!("{path}.transition"),
                format!(
                    "`transition` can never fire: it is the last entry for event \
                         `{EVENT_COMPLETE}`, and onEvent[{first}] for `{EVENT_COMPLETE}` has \
                         neither guard nor flag"
                ),
            );
        }
    }

    /// Compensation states may not declare transitions of their own.
    fn check_compensations(&mut self) {
        let machine = self.machine;
        for (index, state) in machine.spec.states.iter().enumerate() {
            let Some(name) = &state.compensation else {
                continue;
            };
            let Some(&target_index) = self.index.get(name.as_str()) else {
                continue;
            };
            let Some(target) = machine.spec.states.get(target_index) else {
                continue;
            };
            let mut defects = Vec::new();
            if let Some(state_type) = self.type_known(target_index)
                && state_type != StateType::Task
            {
                defects.push(format!("is a {} state", state_type.as_str()));
            }
            let declared = [
                ("onEvent", !target.on_event.is_empty()),
                ("transition", target.transition.is_some()),
                ("onTimeout", target.on_timeout.is_some()),
                ("onFailure", target.on_failure.is_some()),
                ("choices", !target.choices.is_empty()),
            ];
            for (field, present) in declared {
                if present {
                    defects.push(format!("declares `{field}`"));
                }
            }
            if !defects.is_empty() {
                self.error(
                    codes::INVALID_COMPENSATION,
                    format!("{}.compensation", state_path(index)),
                    format!(
                        "compensation state `{}` {}: a compensation must be a task state without \
                         transitions of its own (it advances on `complete`)",
                        shorten(name),
                        defects.join(" and ")
                    ),
                );
            }
        }
    }

    /// Every cycle in the graph of choice → choice edges is an error (Tarjan, without recursion).
    fn check_choice_cycles(&mut self) {
        let machine = self.machine;
        let states = &machine.spec.states;
        let is_choice = |i: usize| self.type_known(i) == Some(StateType::Choice);
        let edges: Vec<Vec<usize>> = (0..states.len())
            .map(|i| {
                if !is_choice(i) {
                    return Vec::new();
                }
                let state = &states[i];
                let mut out: Vec<usize> = state
                    .choices
                    .iter()
                    .map(|c| c.target.as_str())
                    .chain(state.default.as_deref())
                    .filter_map(|name| self.index.get(name).copied())
                    .filter(|j| is_choice(*j))
                    .collect();
                out.sort_unstable();
                out.dedup();
                out
            })
            .collect();
        for component in strongly_connected_components(&edges) {
            let is_cycle = component.len() > 1
                || component
                    .first()
                    .is_some_and(|i| edges.get(*i).is_some_and(|out| out.contains(i)));
            if !is_cycle {
                continue;
            }
            let mut members = component.clone();
            members.sort_unstable();
            let Some(&first) = members.first() else {
                continue;
            };
            let cycle = describe_cycle(first, &members, &edges, states);
            self.error(
                codes::CHOICE_CYCLE,
                state_path(first),
                format!(
                    "choice states form a cycle with no task, wait or final state in \
                     between: {cycle}"
                ),
            );
        }
    }

    /// Reachability warnings.
    fn check_graph(&mut self) {
        let machine = self.machine;
        let states = &machine.spec.states;
        let Some(&initial) = self.index.get(machine.spec.initial_state.as_str()) else {
            return;
        };
        let successors = |state: &'m StateDef, with_compensation: bool| -> Vec<usize> {
            let mut names: Vec<&str> = Vec::new();
            names.extend(state.transition.as_deref());
            names.extend(state.on_timeout.as_deref());
            names.extend(state.default.as_deref());
            names.extend(state.on_failure.as_deref());
            if with_compensation {
                names.extend(state.compensation.as_deref());
            }
            names.extend(state.on_event.iter().map(|e| e.target.as_str()));
            names.extend(state.choices.iter().map(|c| c.target.as_str()));
            names
                .into_iter()
                .filter_map(|name| self.index.get(name).copied())
                .collect()
        };

        let mut reachable = vec![false; states.len()];
        let mut queue = VecDeque::from([initial]);
        if let Some(flag) = reachable.get_mut(initial) {
            *flag = true;
        }
        while let Some(i) = queue.pop_front() {
            for j in successors(&states[i], true) {
                if !reachable[j] {
                    reachable[j] = true;
                    queue.push_back(j);
                }
            }
        }

        // Backwards from the final states, without compensation edges: a compensation does not
        // lead anywhere by itself.
        let mut predecessors: Vec<Vec<usize>> = vec![Vec::new(); states.len()];
        for (i, state) in states.iter().enumerate() {
            for j in successors(state, false) {
                predecessors[j].push(i);
            }
        }
        let mut reaches_final = vec![false; states.len()];
        // A state whose type could not be read may be final: count it as one, so that a typo
        // in `type: final` does not also produce a warning for every other state.
        let mut queue: VecDeque<usize> = (0..states.len())
            .filter(|i| matches!(self.type_known(*i), Some(StateType::Final) | None))
            .collect();
        for i in &queue {
            reaches_final[*i] = true;
        }
        while let Some(j) = queue.pop_front() {
            for &i in &predecessors[j] {
                if !reaches_final[i] {
                    reaches_final[i] = true;
                    queue.push_back(i);
                }
            }
        }
        let compensation_states: HashSet<usize> = states
            .iter()
            .filter_map(|s| s.compensation.as_deref())
            .filter_map(|name| self.index.get(name).copied())
            .collect();

        for (i, state) in states.iter().enumerate() {
            // A nameless or duplicate state was reported already; its graph says nothing more.
            if state.name.is_empty() || self.index.get(state.name.as_str()) != Some(&i) {
                continue;
            }
            if !reachable[i] {
                self.warning(
                    codes::UNREACHABLE_STATE,
                    state_path(i),
                    format!(
                        "state `{}` is unreachable from the initial state `{}`",
                        shorten(&state.name),
                        shorten(&machine.spec.initial_state)
                    ),
                );
            } else if !reaches_final[i]
                && !compensation_states.contains(&i)
                && self.type_known(i).is_some()
            {
                self.warning(
                    codes::NO_FINAL_REACHABLE,
                    state_path(i),
                    format!(
                        "no final state can be reached from state `{}`",
                        shorten(&state.name)
                    ),
                );
            }
        }
    }

    /// Checks one CEL expression: size, syntax, depth, variables and, for guards, that the result
    /// can vary and can be a bool.
    fn check_expression(&mut self, source: &str, path: String, role: ExpressionRole) {
        let noun = role.noun();
        if source.len() > EXPRESSION_BYTES_MAX {
            self.error(
                codes::EXPRESSION_TOO_LONG,
                path,
                format!(
                    "the {noun} is {} bytes long; the limit is {EXPRESSION_BYTES_MAX} bytes",
                    source.len()
                ),
            );
            return;
        }
        let program = match cel::Program::compile(source) {
            Ok(program) => program,
            Err(errors) => {
                if errors
                    .errors
                    .iter()
                    .any(|e| e.msg.contains("Recursion limit"))
                {
                    self.error(
                        codes::EXPRESSION_TOO_DEEP,
                        path,
                        format!(
                            "the {noun} nests brackets or calls deeper than the CEL parser allows"
                        ),
                    );
                    return;
                }
                let details: Vec<String> = errors
                    .errors
                    .iter()
                    .take(3)
                    .map(|e| format!("{} (line {}, column {})", e.msg, e.pos.0, e.pos.1 + 1))
                    .collect();
                let details = if details.is_empty() {
                    errors.to_string()
                } else {
                    details.join("; ")
                };
                self.error(
                    codes::EXPRESSION_SYNTAX,
                    path,
                    format!("the {noun} does not compile: {details}"),
                );
                return;
            }
        };
        let root = program.expression();
        let shape = expression_shape(root);
        if shape.too_deep {
            self.error(
                codes::EXPRESSION_TOO_DEEP,
                path,
                format!("the {noun} is nested deeper than {EXPRESSION_DEPTH_MAX} levels"),
            );
            return;
        }
        let unknown: Vec<&str> = shape
            .free_variables
            .iter()
            .copied()
            .filter(|name| !EXPRESSION_VARIABLES.contains(name))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<String> = unknown
                .iter()
                .map(|n| format!("`{}`", shorten(n)))
                .collect();
            self.error(
                codes::UNKNOWN_VARIABLE,
                path,
                format!(
                    "the {noun} uses unknown variable{} {}: only `data`, `event` and `instance` \
                     are defined",
                    if unknown.len() == 1 { "" } else { "s" },
                    names.join(", ")
                ),
            );
            return;
        }
        if role != ExpressionRole::Guard {
            return;
        }
        if let Expr::Literal(LiteralValue::Boolean(value)) = &root.expr {
            self.error(
                codes::GUARD_CONSTANT,
                path,
                format!("the guard is the constant `{}`", value.inner()),
            );
            return;
        }
        if let Some(why) = non_bool_shape(&root.expr) {
            self.error(
                codes::GUARD_NOT_BOOL,
                path,
                format!("a guard must yield a bool, but this one {why}"),
            );
            return;
        }
        if !shape.free_variables.is_empty() {
            return;
        }
        // No variable: the result never changes. Evaluate it (cheap: the depth is bounded and
        // without comprehensions there are no loops) to say what it is.
        if shape.has_comprehension {
            self.error(
                codes::GUARD_CONSTANT,
                path,
                "the guard uses no variable (`data`, `event`, `instance`), so its result \
                 never changes"
                    .to_owned(),
            );
            return;
        }
        let context = self.cel_context.get_or_insert_with(cel::Context::default);
        match program.execute(context) {
            Ok(cel::Value::Bool(value)) => self.error(
                codes::GUARD_CONSTANT,
                path,
                format!(
                    "the guard uses no variable and is always `{value}`; use `data`, `event` \
                     or `instance`"
                ),
            ),
            Ok(value) => self.error(
                codes::GUARD_NOT_BOOL,
                path,
                format!(
                    "a guard must yield a bool, but this one always yields a {}",
                    value.type_of()
                ),
            ),
            Err(error) => self.error(
                codes::GUARD_CONSTANT,
                path,
                format!(
                    "the guard uses no variable and always fails: {}",
                    shorten(&error.to_string())
                ),
            ),
        }
    }
}

/// Strongly connected components of a small graph (Tarjan's algorithm with an explicit stack).
fn strongly_connected_components(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let n = edges.len();
    let mut index_of: Vec<Option<usize>> = vec![None; n];
    let mut low = vec![0; n];
    let mut on_stack = vec![false; n];
    let mut stack: Vec<usize> = Vec::new();
    let mut components = Vec::new();
    let mut next_index = 0;
    for start in 0..n {
        if index_of[start].is_some() {
            continue;
        }
        // (node, position of the next edge to follow)
        let mut work: Vec<(usize, usize)> = vec![(start, 0)];
        index_of[start] = Some(next_index);
        low[start] = next_index;
        next_index += 1;
        stack.push(start);
        on_stack[start] = true;
        while let Some(&mut (node, ref mut edge)) = work.last_mut() {
            if let Some(&next) = edges[node].get(*edge) {
                *edge += 1;
                match index_of[next] {
                    None => {
                        index_of[next] = Some(next_index);
                        low[next] = next_index;
                        next_index += 1;
                        stack.push(next);
                        on_stack[next] = true;
                        work.push((next, 0));
                    }
                    Some(next_index_value) if on_stack[next] => {
                        low[node] = low[node].min(next_index_value);
                    }
                    Some(_) => {}
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[node]);
            }
            if Some(low[node]) == index_of[node] {
                let mut component = Vec::new();
                while let Some(member) = stack.pop() {
                    on_stack[member] = false;
                    component.push(member);
                    if member == node {
                        break;
                    }
                }
                components.push(component);
            }
        }
    }
    components
}

/// `a -> b -> a`: a walk around the cycle through `first`, within the component.
fn describe_cycle(
    first: usize,
    members: &[usize],
    edges: &[Vec<usize>],
    states: &[StateDef],
) -> String {
    let name = |i: usize| states.get(i).map(|s| shorten(&s.name)).unwrap_or_default();
    // Breadth-first search inside the component for the shortest way back to `first`.
    let mut previous: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([first]);
    let mut closing = None;
    while let Some(i) = queue.pop_front() {
        for &j in edges.get(i).map(Vec::as_slice).unwrap_or_default() {
            if j == first {
                closing = Some(i);
                break;
            }
            if members.contains(&j) && !previous.contains_key(&j) {
                previous.insert(j, i);
                queue.push_back(j);
            }
        }
        if closing.is_some() {
            break;
        }
    }
    let mut walk = vec![first];
    let mut current = closing;
    while let Some(i) = current {
        if i == first {
            break;
        }
        walk.push(i);
        current = previous.get(&i).copied();
    }
    walk[1..].reverse();
    walk.push(first);
    walk.into_iter().map(name).collect::<Vec<_>>().join(" -> ")
}
