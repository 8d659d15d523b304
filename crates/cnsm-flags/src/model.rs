//! The flagd flag-definition format (`https://flagd.dev/schema/v0/flags.json`) and its
//! evaluation: states, variants, an optional default variant, JsonLogic targeting with shared
//! `$evaluators` (`{"$ref": name}`), and the reasons flagd gives.
//!
//! A problem with one flag (a dangling `$ref`, a default variant that is not a variant...)
//! makes only that flag answer `PARSE_ERROR`; a file that is not a flag set at all is refused
//! whole, so a reload keeps the last good set.

use std::collections::HashMap;

use crate::jsonlogic::{Evaluator, Rule};
use open_feature::{EvaluationContext, EvaluationError, EvaluationErrorCode, EvaluationReason};
use serde_json::{Map, Value as Json};

use cnsm_core::flags::FlagValueType;

/// Largest flag file accepted, in bytes.
pub const FLAG_FILE_LEN_MAX: usize = 8 << 20;

/// One parsed flag set.
#[derive(Debug, Default)]
pub struct FlagSet {
    flags: HashMap<String, Entry>,
    evaluator: Evaluator,
}

#[derive(Debug)]
enum Entry {
    Valid(FlagDef),
    /// The flag exists but cannot be evaluated; every evaluation is `PARSE_ERROR`.
    Invalid(String),
}

#[derive(Debug)]
struct FlagDef {
    enabled: bool,
    variants: Map<String, Json>,
    default_variant: Option<String>,
    /// Targeting rule with `$ref`s resolved, compiled; `None` when absent or `{}`.
    targeting: Option<Rule>,
    metadata: Map<String, Json>,
}

/// A successful resolution. `value: None` means "the caller's default" (a disabled flag, or no
/// default variant): the reason says which, and there is no variant.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub value: Option<Json>,
    pub variant: Option<String>,
    pub reason: EvaluationReason,
    pub metadata: Map<String, Json>,
}

/// Why a flag file was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlagFileError {
    #[error("cannot read the flag file {path}: {message}")]
    Read { path: String, message: String },
    #[error("the flag file is {0} bytes, more than the limit of {FLAG_FILE_LEN_MAX}")]
    TooLarge(usize),
    #[error("the flag file is not valid JSON: {0}")]
    Json(String),
    #[error("the flag file has no `flags` object")]
    NoFlags,
}

fn error(code: EvaluationErrorCode, message: impl Into<String>) -> EvaluationError {
    EvaluationError::builder()
        .code(code)
        .message(message.into())
        .build()
}

impl FlagSet {
    /// Parses a flagd flag file.
    pub fn parse(text: &str) -> Result<FlagSet, FlagFileError> {
        if text.len() > FLAG_FILE_LEN_MAX {
            return Err(FlagFileError::TooLarge(text.len()));
        }
        let value: Json =
            serde_json::from_str(text).map_err(|e| FlagFileError::Json(e.to_string()))?;
        FlagSet::from_json(&value)
    }

    /// Builds a flag set from the JSON form of a flag file.
    pub fn from_json(value: &Json) -> Result<FlagSet, FlagFileError> {
        let flags = value
            .get("flags")
            .and_then(Json::as_object)
            .ok_or(FlagFileError::NoFlags)?;
        let empty = Map::new();
        let evaluators = value
            .get("$evaluators")
            .and_then(Json::as_object)
            .unwrap_or(&empty);
        let set_metadata = value
            .get("metadata")
            .and_then(Json::as_object)
            .unwrap_or(&empty);
        let evaluator = Evaluator::new();
        let flags = flags
            .iter()
            .map(|(key, flag)| {
                let entry = match parse_flag(&evaluator, flag, evaluators, set_metadata) {
                    Ok(def) => Entry::Valid(def),
                    Err(message) => Entry::Invalid(format!("flag '{key}': {message}")),
                };
                (key.clone(), entry)
            })
            .collect();
        Ok(FlagSet { flags, evaluator })
    }

    /// The keys of every flag defined (valid or not).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.flags.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.flags.contains_key(key)
    }

    /// The type of a flag's variants, for `variant:` gates that do not say which type they want.
    pub fn value_type(&self, key: &str) -> Option<FlagValueType> {
        let Some(Entry::Valid(def)) = self.flags.get(key) else {
            return None;
        };
        def.variants.values().next().map(type_of)
    }

    /// Evaluates a flag for a context, checking the resolved value against `value_type`.
    pub fn resolve(
        &self,
        key: &str,
        value_type: FlagValueType,
        context: &EvaluationContext,
    ) -> Result<Resolution, EvaluationError> {
        let def = match self.flags.get(key) {
            None => {
                return Err(error(
                    EvaluationErrorCode::FlagNotFound,
                    format!("flag '{key}' is not defined"),
                ));
            }
            Some(Entry::Invalid(message)) => {
                return Err(error(EvaluationErrorCode::ParseError, message.clone()));
            }
            Some(Entry::Valid(def)) => def,
        };
        let metadata = def.metadata.clone();
        if !def.enabled {
            return Ok(Resolution {
                value: None,
                variant: None,
                reason: EvaluationReason::Disabled,
                metadata,
            });
        }
        let (variant, reason) = match &def.targeting {
            None => (def.default_variant.clone(), EvaluationReason::Static),
            Some(rule) => match self.evaluator.apply(rule, key, context) {
                Ok(Some(name)) => (Some(name), EvaluationReason::TargetingMatch),
                Ok(None) => (def.default_variant.clone(), EvaluationReason::Default),
                Err(e) => {
                    return Err(error(
                        EvaluationErrorCode::General("GENERAL".into()),
                        format!("flag '{key}': targeting failed: {e}"),
                    ));
                }
            },
        };
        let Some(variant) = variant else {
            // No default variant: the caller's default, reason DEFAULT.
            return Ok(Resolution {
                value: None,
                variant: None,
                reason: EvaluationReason::Default,
                metadata,
            });
        };
        let Some(value) = def.variants.get(&variant) else {
            return Err(error(
                EvaluationErrorCode::General("GENERAL".into()),
                format!("flag '{key}': targeting chose variant '{variant}', which is not defined"),
            ));
        };
        if !type_matches(value, value_type) {
            return Err(error(
                EvaluationErrorCode::TypeMismatch,
                format!("flag '{key}' has a value of another type than {value_type:?}"),
            ));
        }
        Ok(Resolution {
            value: Some(value.clone()),
            variant: Some(variant),
            reason,
            metadata,
        })
    }
}

/// The OpenFeature type of a JSON value.
pub(crate) fn type_of(value: &Json) -> FlagValueType {
    match value {
        Json::Bool(_) => FlagValueType::Bool,
        Json::String(_) => FlagValueType::String,
        Json::Number(n) if n.is_i64() || n.is_u64() => FlagValueType::Int,
        Json::Number(_) => FlagValueType::Float,
        _ => FlagValueType::Object,
    }
}

pub(crate) fn type_matches(value: &Json, value_type: FlagValueType) -> bool {
    match value_type {
        FlagValueType::Any => true,
        FlagValueType::Bool => value.is_boolean(),
        FlagValueType::String => value.is_string(),
        FlagValueType::Int => value.is_i64() || value.is_u64(),
        FlagValueType::Float => value.is_number(),
        FlagValueType::Object => value.is_object() || value.is_array(),
    }
}

fn parse_flag(
    evaluator: &Evaluator,
    flag: &Json,
    evaluators: &Map<String, Json>,
    set_metadata: &Map<String, Json>,
) -> Result<FlagDef, String> {
    let flag = flag.as_object().ok_or("a flag must be an object")?;
    let enabled = match flag.get("state").and_then(Json::as_str) {
        Some("ENABLED") => true,
        Some("DISABLED") => false,
        Some(other) => return Err(format!("state '{other}' is neither ENABLED nor DISABLED")),
        None => return Err("`state` is missing".into()),
    };
    let variants = flag
        .get("variants")
        .and_then(Json::as_object)
        .cloned()
        .ok_or("`variants` must be an object")?;
    let default_variant = match flag.get("defaultVariant") {
        None | Some(Json::Null) => None,
        Some(Json::String(name)) => {
            if !variants.contains_key(name) {
                return Err(format!(
                    "defaultVariant '{name}' is not one of the variants"
                ));
            }
            Some(name.clone())
        }
        Some(_) => return Err("defaultVariant must be a string or null".into()),
    };
    let targeting = match flag.get("targeting") {
        None | Some(Json::Null) => None,
        Some(Json::Object(o)) if o.is_empty() => None,
        Some(rule) => {
            let mut rule = rule.clone();
            resolve_refs(&mut rule, evaluators, 0)?;
            Some(evaluator.compile(&rule)?)
        }
    };
    let mut metadata = set_metadata.clone();
    if let Some(m) = flag.get("metadata").and_then(Json::as_object) {
        for (k, v) in m {
            metadata.insert(k.clone(), v.clone());
        }
    }
    Ok(FlagDef {
        enabled,
        variants,
        default_variant,
        targeting,
        metadata,
    })
}

/// Replaces `{"$ref": name}` with the shared evaluator (which may hold refs of its own, up to
/// a small depth, so a cycle is an error rather than a hang).
fn resolve_refs(
    value: &mut Json,
    evaluators: &Map<String, Json>,
    depth: usize,
) -> Result<(), String> {
    const REF_DEPTH_MAX: usize = 16;
    match value {
        Json::Object(obj) => {
            if obj.len() == 1
                && let Some(name) = obj.get("$ref").and_then(Json::as_str)
            {
                if depth >= REF_DEPTH_MAX {
                    return Err(format!(
                        "evaluator '$ref' nesting is deeper than {REF_DEPTH_MAX} (a cycle?)"
                    ));
                }
                let mut replacement = evaluators
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("evaluator '{name}' (from $ref) is not defined"))?;
                resolve_refs(&mut replacement, evaluators, depth + 1)?;
                *value = replacement;
                return Ok(());
            }
            for child in obj.values_mut() {
                resolve_refs(child, evaluators, depth)?;
            }
            Ok(())
        }
        Json::Array(items) => {
            for item in items {
                resolve_refs(item, evaluators, depth)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Converts a JSON object into an OpenFeature evaluation context (nested objects become
/// `StructValue`s, which the JsonLogic engine reads).
pub fn context_from_json(
    targeting_key: Option<&str>,
    fields: &Map<String, Json>,
) -> EvaluationContext {
    let mut context = EvaluationContext {
        targeting_key: targeting_key.map(str::to_owned),
        ..EvaluationContext::default()
    };
    for (k, v) in fields {
        if let Some(field) = field_value(v) {
            context.custom_fields.insert(k.clone(), field);
        }
    }
    context
}

fn field_value(value: &Json) -> Option<open_feature::EvaluationContextFieldValue> {
    use open_feature::EvaluationContextFieldValue as F;
    Some(match value {
        Json::Null => return None,
        Json::Bool(b) => F::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => F::Int(i),
            None => F::Float(n.as_f64()?),
        },
        Json::String(s) => F::String(s.clone()),
        Json::Object(_) => match of_value(value)? {
            open_feature::Value::Struct(s) => F::new_struct(s),
            _ => return None,
        },
        Json::Array(_) => F::new_struct(of_value(value)?),
    })
}

/// JSON to an OpenFeature value (`null` has no OpenFeature form).
pub fn of_value(value: &Json) -> Option<open_feature::Value> {
    use open_feature::{StructValue, Value as V};
    Some(match value {
        Json::Null => return None,
        Json::Bool(b) => V::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => V::Int(i),
            None => V::Float(n.as_f64()?),
        },
        Json::String(s) => V::String(s.clone()),
        Json::Array(items) => V::Array(items.iter().filter_map(of_value).collect()),
        Json::Object(map) => V::Struct(StructValue {
            fields: map
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), of_value(v)?)))
                .collect(),
        }),
    })
}

/// An OpenFeature value back to JSON.
pub fn json_of(value: &open_feature::Value) -> Json {
    match value {
        open_feature::Value::Bool(b) => Json::Bool(*b),
        open_feature::Value::Int(i) => Json::from(*i),
        open_feature::Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number)
        }
        open_feature::Value::String(s) => Json::String(s.clone()),
        open_feature::Value::Array(a) => Json::Array(a.iter().map(json_of).collect()),
        open_feature::Value::Struct(s) => Json::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), json_of(v)))
                .collect(),
        ),
    }
}
