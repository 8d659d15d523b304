//! The JsonLogic evaluator of flag targeting: `datalogic-rs` with flagd's operators. Rules are
//! compiled once, when a flag file is loaded, not on every evaluation.
//!
//! - `fractional` is ours: flagd's v2 bucketing, MurmurHash3 x86-32 of the bucketing string
//!   (an explicit first argument, else `$flagd.flagKey` + `targetingKey`),
//!   `(hash * totalWeight) >> 32`, over buckets `[variant, weight]` whose variant may be any
//!   JSON value (so it also works as a condition: `[true, 10]`); a negative weight counts as 0.
//!   Null when there is no bucketing key, a bucket is malformed, or the weights sum to 0.
//! - `sem_ver` is `datalogic-rs`'s built-in flagd operator (its `flagd` feature).
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
                .add_operator(FRACTIONAL, Fractional)
                .build(),
        }
    }

    pub fn compile(&self, rule: &Json) -> Result<Rule, String> {
        // `fractional` is ours (any JSON variant value); the engine's built-in takes only
        // string variant names, so the operator is renamed before compiling.
        let rule = rename_fractional(rule);
        self.engine
            .compile(&rule)
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

/// The name `fractional` is compiled under (the engine's built-in would take precedence).
const FRACTIONAL: &str = "cnsm_fractional";

/// `{"fractional": ...}` anywhere in a rule becomes `{"cnsm_fractional": ...}`.
fn rename_fractional(rule: &Json) -> Json {
    match rule {
        Json::Object(map) => Json::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = if k == "fractional" && map.len() == 1 {
                        FRACTIONAL.to_owned()
                    } else {
                        k.clone()
                    };
                    (key, rename_fractional(v))
                })
                .collect(),
        ),
        Json::Array(items) => Json::Array(items.iter().map(rename_fractional).collect()),
        other => other.clone(),
    }
}

/// flagd's `fractional` (v2 bucketing).
struct Fractional;

impl CustomOperator for Fractional {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        context: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        let field = |object: &'a DataValue<'a>, name: &str| -> Option<&'a DataValue<'a>> {
            object
                .as_object()?
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
        };
        let (key, buckets) = match args.first() {
            Some(first) if first.as_str().is_some() => {
                (first.as_str().unwrap_or_default().to_owned(), &args[1..])
            }
            Some(first) if first.as_array().is_none() => return Ok(arena.null()),
            _ => {
                let root = context.root_input();
                let Some(targeting_key) = field(root, "targetingKey").and_then(|v| v.as_str())
                else {
                    return Ok(arena.null());
                };
                let flag_key = field(root, "$flagd")
                    .and_then(|f| field(f, "flagKey"))
                    .and_then(|v| v.as_str())
                    .unwrap_or_default();
                (format!("{flag_key}{targeting_key}"), args)
            }
        };
        let mut parsed: Vec<(&'a DataValue<'a>, u64)> = Vec::with_capacity(buckets.len());
        let mut total: u64 = 0;
        for bucket in buckets {
            let Some(items) = bucket.as_array() else {
                return Ok(arena.null());
            };
            let Some(variant) = items.first() else {
                return Ok(arena.null());
            };
            // A negative weight counts as 0 (flagd clamps it); a non-number is malformed.
            let weight = match items.get(1) {
                None => 1,
                Some(w) => match (w.as_i64(), w.as_f64()) {
                    (Some(w), _) => w.max(0) as u64,
                    (None, Some(f)) if f.is_finite() => f.max(0.0) as u64,
                    _ => return Ok(arena.null()),
                },
            };
            total = total.saturating_add(weight);
            parsed.push((variant, weight));
        }
        if total == 0 || total > u64::from(u32::MAX) {
            return Ok(arena.null());
        }
        let hash = cnsm_core::rollout::murmur3_x86_32(key.as_bytes(), 0);
        let point = (u64::from(hash) * total) >> 32;
        let mut upto = 0;
        for (variant, weight) in parsed {
            upto += weight;
            if point < upto {
                return Ok(variant);
            }
        }
        Ok(arena.null())
    }
}
