//! What a flag gate needs evaluated before an event is applied (DESIGN.md §6): the query the
//! runtime hands to an OpenFeature provider. Building it is pure; evaluating it is not, so it
//! happens outside the core, before the event is queued.

use serde_json::{Map, Value};

/// The type a gate asks the provider for, taken from how the gate is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagValueType {
    /// `flag: KEY`, or `value:` a boolean.
    Bool,
    String,
    Int,
    Float,
    /// `value:` an object or array.
    Object,
    /// `variant:` gates: whatever type the flag has (the provider decides).
    Any,
}

impl FlagValueType {
    /// The type a gate's expected `value` implies (`Bool` for a bare key).
    pub fn of_expected(value: Option<&Value>) -> FlagValueType {
        match value {
            None | Some(Value::Bool(_)) => FlagValueType::Bool,
            Some(Value::String(_)) => FlagValueType::String,
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => FlagValueType::Int,
            Some(Value::Number(_)) => FlagValueType::Float,
            Some(Value::Null) => FlagValueType::Any,
            Some(Value::Object(_) | Value::Array(_)) => FlagValueType::Object,
        }
    }
}

/// One flag evaluation an event needs: the flag key, the targeting key, and the evaluation
/// context (instance labels as top-level fields, the data fields the entry lists in `context:`,
/// then `machine`, `revision`, `state`, `event`, which win over a label or field of that name).
#[derive(Debug, Clone, PartialEq)]
pub struct FlagQuery {
    pub key: String,
    pub targeting_key: String,
    /// Set when the entry's `targetingKey` expression failed; the evaluator must answer with an
    /// error decision (the gate's `onFlagError` then decides).
    pub targeting_key_error: Option<String>,
    pub context: Map<String, Value>,
    pub value_type: FlagValueType,
}
