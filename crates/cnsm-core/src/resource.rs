//! The `StateMachine` resource (`statemachine.cn/v1alpha1`) as typed Rust values.
//!
//! These types are what admission produces from YAML and what the store keeps. Field names are
//! part of the public contract (DESIGN.md §2): add fields, never rename these.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The API group and version every resource carries.
pub const API_VERSION: &str = "statemachine.cn/v1alpha1";
/// The kind of a state machine definition.
pub const KIND_STATE_MACHINE: &str = "StateMachine";
/// The namespace used when `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The reserved event that takes a task state's `transition` and advances compensations.
pub const EVENT_COMPLETE: &str = "complete";
/// The reserved event that reports a failed attempt of a task state.
pub const EVENT_FAIL: &str = "fail";

/// A complete, admitted `StateMachine` definition.
///
/// ```
/// let yaml = std::fs::read_to_string(concat!(
///     env!("CARGO_MANIFEST_DIR"),
///     "/../../../shared/examples/order-processing.yaml"
/// ));
/// # let Ok(yaml) = yaml else { return };
/// let machine = cnsm_core::admission::admit_str(&yaml, None).into_result().unwrap();
/// assert_eq!(machine.metadata.name, "order-processing");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateMachine {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: Spec,
}

/// `metadata` of a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for Metadata {
    fn default() -> Metadata {
        Metadata {
            name: String::new(),
            namespace: default_namespace(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

/// `spec` of a `StateMachine`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Spec {
    pub initial_state: String,
    pub states: Vec<StateDef>,
    /// How long finished instances are kept (absent: forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    /// Push delivery: HTTP endpoints that receive a CloudEvent per matching committed record
    /// (docs/spec.md, "notify").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NotifyTarget>,
}

/// One push-delivery target (`spec.notify[]`, or `spec.states[].notify[]` for records that
/// enter that state). The runtime POSTs a CloudEvent per matching committed record to `url`,
/// at least once, in order per instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotifyTarget {
    /// Unique per machine (machine-level and per-state targets share one name space); names
    /// the delivery cursor and the dead letters.
    pub name: String,
    /// An absolute `http://` or `https://` URL without credentials.
    pub url: String,
    /// The environment variable of the server that holds the HMAC-SHA256 signing secret (the
    /// secret itself is never part of the definition). Absent: deliveries are not signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// Only records that enter one of these states (machine-level targets only; absent: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub states: Vec<String>,
    /// Only records of these events (absent: every record, genesis, timers, controls and
    /// migrations included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// One attempt's deadline (default [`NOTIFY_TIMEOUT_SECONDS_DEFAULT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Attempts before a record goes to the dead letters (default
    /// [`NOTIFY_MAX_ATTEMPTS_DEFAULT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

/// Most notify targets one machine declares (machine-level and per-state together).
pub const NOTIFY_TARGETS_MAX: usize = 16;
/// Default deadline of one delivery attempt.
pub const NOTIFY_TIMEOUT_SECONDS_DEFAULT: u64 = 10;
/// Longest `timeoutSeconds` of a notify target.
pub const NOTIFY_TIMEOUT_SECONDS_MAX: u64 = 300;
/// Default attempts before a dead letter.
pub const NOTIFY_MAX_ATTEMPTS_DEFAULT: u32 = 12;
/// Most attempts a target may ask for.
pub const NOTIFY_MAX_ATTEMPTS_MAX: u32 = 100;
/// Longest notify URL.
pub const NOTIFY_URL_CHARS_MAX: usize = 2048;
/// Most entries of a target's `states` or `events` filter.
pub const NOTIFY_FILTER_LEN_MAX: usize = 256;

impl NotifyTarget {
    /// One attempt's deadline in milliseconds.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_seconds
            .unwrap_or(NOTIFY_TIMEOUT_SECONDS_DEFAULT)
            .saturating_mul(1000)
    }

    /// Attempts before a dead letter.
    pub fn attempts_max(&self) -> u32 {
        self.max_attempts.unwrap_or(NOTIFY_MAX_ATTEMPTS_DEFAULT)
    }
}

/// `spec.retention`: finished instances (succeeded, failed, cancelled) are deleted with their
/// whole history this many days after they ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    pub finished_after_days: u32,
}

/// The longest `retention.finishedAfterDays` (100 years).
pub const RETENTION_DAYS_MAX: u32 = 36_500;

/// The kind of a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StateType {
    /// Work happens elsewhere; the state is left on an event.
    Task,
    /// The state is left when its `timeoutSeconds` elapse.
    Wait,
    /// The state is left at once by the first true guard, else `default`.
    Choice,
    /// Terminal.
    Final,
}

impl StateType {
    pub fn as_str(self) -> &'static str {
        match self {
            StateType::Task => "task",
            StateType::Wait => "wait",
            StateType::Choice => "choice",
            StateType::Final => "final",
        }
    }
}

/// How an instance that reaches a final state ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    #[default]
    Succeeded,
    Failed,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One entry of `spec.states`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateDef {
    pub name: String,
    #[serde(rename = "type")]
    pub state_type: StateType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transition: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_event: Vec<EventTransition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<Choice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<String>,
    /// Push-delivery targets for records that enter this state (no `states` filter here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<NotifyTarget>,
}

impl StateDef {
    /// A state of the given name and type with every optional field empty.
    pub fn new(name: impl Into<String>, state_type: StateType) -> StateDef {
        StateDef {
            name: name.into(),
            state_type,
            timeout_seconds: None,
            on_timeout: None,
            transition: None,
            on_event: Vec::new(),
            choices: Vec::new(),
            default: None,
            outcome: None,
            retry: None,
            on_failure: None,
            compensation: None,
            notify: Vec::new(),
        }
    }
}

/// One entry of a state's `onEvent` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventTransition {
    pub event: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<FlagGate>,
    /// Data field name to CEL expression, evaluated against the pre-transition values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub assign: BTreeMap<String, String>,
    /// Data fields passed to the flag evaluation context.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<String>,
}

/// An OpenFeature gate on a transition (DESIGN.md §6). Written as a bare key (`flag: KEY`, the
/// boolean flag must be true) or as a mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, from = "FlagGateForm")]
pub struct FlagGate {
    pub key: String,
    /// The transition is allowed when the evaluation yields this variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The transition is allowed when the evaluation yields this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
    /// A CEL expression for the targeting key; the instance id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targeting_key: Option<String>,
    #[serde(default)]
    pub on_flag_error: FlagErrorPolicy,
}

/// The two written forms of a [`FlagGate`].
#[derive(Deserialize)]
#[serde(untagged)]
enum FlagGateForm {
    Key(String),
    Full(FlagGateFull),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FlagGateFull {
    key: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    value: Option<serde_json::Value>,
    #[serde(default)]
    targeting_key: Option<String>,
    #[serde(default)]
    on_flag_error: FlagErrorPolicy,
}

impl From<FlagGateForm> for FlagGate {
    fn from(form: FlagGateForm) -> FlagGate {
        match form {
            FlagGateForm::Key(key) => FlagGate {
                key,
                variant: None,
                value: None,
                targeting_key: None,
                on_flag_error: FlagErrorPolicy::Deny,
            },
            FlagGateForm::Full(f) => FlagGate {
                key: f.key,
                variant: f.variant,
                value: f.value,
                targeting_key: f.targeting_key,
                on_flag_error: f.on_flag_error,
            },
        }
    }
}

/// What a provider error means for a flag-gated transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FlagErrorPolicy {
    #[default]
    Deny,
    Allow,
}

/// One entry of a choice state's `choices` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Choice {
    pub guard: String,
    pub target: String,
}

/// `retry` of a task state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Every try counts, the first included.
    pub max_attempts: u32,
    #[serde(default = "default_backoff_seconds")]
    pub backoff_seconds: f64,
    #[serde(default = "default_backoff_rate")]
    pub backoff_rate: f64,
}

fn default_backoff_seconds() -> f64 {
    1.0
}

fn default_backoff_rate() -> f64 {
    2.0
}

impl Retry {
    /// The back-off before attempt `next_attempt` (2 is the first retry), in milliseconds.
    pub fn backoff_ms(&self, next_attempt: u32) -> u64 {
        let exponent = next_attempt.saturating_sub(2) as i32;
        let seconds = self.backoff_seconds * self.backoff_rate.powi(exponent);
        // A year bounds the wait so the timer arithmetic never overflows.
        (seconds.clamp(0.0, 31_536_000.0) * 1000.0).round() as u64
    }
}

impl StateMachine {
    /// The state named `name`, if defined.
    pub fn state(&self, name: &str) -> Option<&StateDef> {
        self.spec.states.iter().find(|s| s.name == name)
    }

    /// Every notify target with the state it belongs to (`None`: machine-level), in
    /// declaration order: machine-level first, then per state.
    pub fn notify_targets(&self) -> impl Iterator<Item = (Option<&StateDef>, &NotifyTarget)> {
        let machine_level = self.spec.notify.iter().map(|t| (None, t));
        let per_state = self
            .spec
            .states
            .iter()
            .flat_map(|s| s.notify.iter().map(move |t| (Some(s), t)));
        machine_level.chain(per_state)
    }
}
