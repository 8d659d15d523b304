//! The JsonLogic evaluator of flag targeting: `datalogic-rs` with flagd's operators. Rules are
//! compiled once, when a flag file is loaded, not on every evaluation.
//!
//! - `fractional` and `sem_ver` are `datalogic-rs`'s built-in flagd operators (its `flagd`
//!   feature): flagd's v2 bucketing, MurmurHash3 x86-32 of the bucketing string,
//!   `(hash * totalWeight) >> 32`.
//! - `starts_with` / `ends_with` are ours: two strings give a boolean; anything else (a
//!   non-string, a wrong argument count) gives null, as flagd specifies, so targeting falls back
//!   to the default variant.
//!
//! The context the rules see is flagd's: `targetingKey`, the custom fields, and
//! `$flagd.flagKey` / `$flagd.timestamp` (Unix seconds).

use std::sync::Arc;

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::operator::EvalContext;
use datalogic_rs::{ArenaExt, CustomOperator, DataValue, Engine, Logic};
use open_feature::{EvaluationContext, EvaluationContextFieldValue};
use serde_json::{Map, Value as Json};

/// A JsonLogic engine with flagd's operators.
pub struct Evaluator {
    engine: Engine,
}

impl std::fmt::Debug for Evaluator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator").finish_non_exhaustive()
    }
}

impl Default for Evaluator {
    fn default() -> Evaluator {
        Evaluator::new()
    }
}

/// A targeting rule compiled by an [`Evaluator`].
pub type Rule = Arc<Logic>;

impl Evaluator {
    pub fn new() -> Evaluator {
        Evaluator {
            engine: Engine::builder()
                .add_operator(
                    "starts_with",
                    StringOp(|text, pattern| text.starts_with(pattern)),
                )
                .add_operator(
                    "ends_with",
                    StringOp(|text, pattern| text.ends_with(pattern)),
                )
                .build(),
        }
    }

    pub fn compile(&self, rule: &Json) -> Result<Rule, String> {
        self.engine
            .compile(rule)
            .map(Arc::new)
            .map_err(|e| format!("targeting does not compile: {e:?}"))
    }

    /// Runs a rule; `Ok(None)` when it yields null (use the default variant). Non-string
    /// results name variants by their JSON text (`true`, `3`), as flagd does.
    pub fn apply(
        &self,
        rule: &Logic,
        flag_key: &str,
        context: &EvaluationContext,
    ) -> Result<Option<String>, String> {
        let data = flagd_context(flag_key, context);
        let mut session = self.engine.session();
        let out = session
            .eval_str(rule, &data)
            .map_err(|e| format!("targeting failed: {e:?}"))?;
        match serde_json::from_str::<Json>(&out) {
            Ok(Json::Null) => Ok(None),
            Ok(Json::String(s)) => Ok(Some(s)),
            Ok(other) => Ok(Some(other.to_string())),
            Err(e) => Err(format!("targeting result is not JSON: {e}")),
        }
    }
}

/// The JSON object flagd rules read.
fn flagd_context(flag_key: &str, context: &EvaluationContext) -> Json {
    let mut root = Map::new();
    for (k, v) in &context.custom_fields {
        root.insert(k.clone(), field_json(v));
    }
    if let Some(key) = &context.targeting_key {
        root.insert("targetingKey".into(), Json::String(key.clone()));
    }
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut flagd = Map::new();
    flagd.insert("flagKey".into(), Json::String(flag_key.to_owned()));
    flagd.insert("timestamp".into(), Json::from(timestamp));
    root.insert("$flagd".into(), Json::Object(flagd));
    Json::Object(root)
}

fn field_json(value: &EvaluationContextFieldValue) -> Json {
    match value {
        EvaluationContextFieldValue::Bool(b) => Json::Bool(*b),
        EvaluationContextFieldValue::Int(i) => Json::from(*i),
        EvaluationContextFieldValue::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number)
        }
        EvaluationContextFieldValue::String(s) => Json::String(s.clone()),
        EvaluationContextFieldValue::DateTime(t) => Json::String(t.to_string()),
        EvaluationContextFieldValue::Struct(any) => {
            if let Some(s) = any.downcast_ref::<open_feature::StructValue>() {
                crate::model::json_of(&open_feature::Value::Struct(s.clone()))
            } else if let Some(v) = any.downcast_ref::<open_feature::Value>() {
                crate::model::json_of(v)
            } else {
                Json::Null
            }
        }
    }
}

/// `starts_with` / `ends_with`: exactly two strings, else null.
struct StringOp(fn(&str, &str) -> bool);

impl CustomOperator for StringOp {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        _context: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        match args {
            [text, pattern] => match (text.as_str(), pattern.as_str()) {
                (Some(text), Some(pattern)) => Ok(arena.bool((self.0)(text, pattern))),
                _ => Ok(arena.null()),
            },
            _ => Ok(arena.null()),
        }
    }
}
