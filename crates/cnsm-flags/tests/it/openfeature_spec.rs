//! The OpenFeature spec gherkin suites that concern providers and hooks
//! (`../shared/conformance/openfeature-spec/`: `evaluation.feature`, `hooks.feature`,
//! `evaluation_v2.feature`, `metadata.feature`; `contextMerging.feature` is about API,
//! client and transaction contexts, which cnsm does not use), run
//! through the SDK client against cnsm's in-memory provider loaded from `test-flags.json`.
//!
//! Where the SDK cannot express a step it is named here, not skipped silently: the Rust SDK's
//! `get_*_details` takes no default value, so on an error the details carry no caller default
//! (the runner supplies it, as an application calling `get_*_value` gets it), and the `finally`
//! hook sees `T::default()` as the value of a failed evaluation.

use std::sync::{Arc, Mutex};

use cnsm_flags::{Flags, InMemoryProvider, MemoryFlag};
use open_feature::{
    EvaluationContext, EvaluationContextFieldValue, EvaluationDetails, EvaluationError,
    EvaluationOptions, EvaluationReason, Hook, HookContext, HookHints, StructValue, Value,
};
use serde_json::{Map, Value as Json, json};

use crate::gherkin_support::{Case, cases, quoted, shared_dir};

/// A CEL `contextEvaluator` over the context's fields (top-level variables).
fn cel_evaluator(source: &str) -> cnsm_flags::provider::ContextEvaluator {
    let program = Arc::new(cel::Program::compile(source).expect("contextEvaluator compiles"));
    Arc::new(move |context: &EvaluationContext| {
        let mut scope = cel::Context::default();
        for (k, v) in &context.custom_fields {
            let json = match v {
                EvaluationContextFieldValue::Bool(b) => json!(b),
                EvaluationContextFieldValue::Int(i) => json!(i),
                EvaluationContextFieldValue::Float(f) => json!(f),
                EvaluationContextFieldValue::String(s) => json!(s),
                _ => continue,
            };
            scope.add_variable_from_value(k.clone(), cnsm_core::expr::json_to_cel(&json));
        }
        match program.execute(&scope) {
            Ok(cel::Value::String(s)) => Some(s.to_string()),
            _ => None,
        }
    })
}

/// The in-memory provider with every flag of the spec's `test-flags.json`.
fn provider() -> InMemoryProvider {
    let path = shared_dir().join("conformance/openfeature-spec/test-flags.json");
    let text = std::fs::read_to_string(&path).expect("test-flags.json exists");
    let flags: Map<String, Json> = serde_json::from_str(&text).expect("test-flags.json parses");
    let provider = InMemoryProvider::new();
    for (key, flag) in flags {
        provider.set_flag(
            key,
            MemoryFlag {
                variants: flag["variants"].as_object().cloned().unwrap_or_default(),
                default_variant: flag["defaultVariant"].as_str().map(str::to_owned),
                disabled: flag["disabled"].as_bool().unwrap_or(false),
                context_evaluator: flag["contextEvaluator"].as_str().map(cel_evaluator),
                metadata: flag["flagMetadata"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            },
        );
    }
    // `evaluation.feature` uses a `context-aware` flag that `test-flags.json` does not define;
    // it is the one other SDKs' in-memory test providers define.
    let mut variants = Map::new();
    variants.insert("internal".into(), json!("INTERNAL"));
    variants.insert("external".into(), json!("EXTERNAL"));
    provider.set_flag(
        "context-aware",
        MemoryFlag {
            variants,
            default_variant: Some("external".into()),
            context_evaluator: Some(cel_evaluator(
                "fn == 'Sulisław' && ln == 'Świętopełk' && age == 29 && customer == false ? 'internal' : 'external'",
            )),
            ..MemoryFlag::default()
        },
    );
    provider
}

/// A hook stage and the details it saw (`after` and `finally` only).
type StageLog = Vec<(String, Option<EvaluationDetails<Value>>)>;

/// Records the hook stages and the details `after`/`finally` saw.
#[derive(Default, Clone)]
struct RecordingHook {
    log: Arc<Mutex<StageLog>>,
}

#[open_feature::async_trait]
impl Hook for RecordingHook {
    async fn before<'a>(
        &self,
        _: &HookContext<'a>,
        _: Option<&'a HookHints>,
    ) -> Result<Option<EvaluationContext>, EvaluationError> {
        self.log.lock().expect("log").push(("before".into(), None));
        Ok(None)
    }
    async fn after<'a>(
        &self,
        _: &HookContext<'a>,
        d: &EvaluationDetails<Value>,
        _: Option<&'a HookHints>,
    ) -> Result<(), EvaluationError> {
        self.log
            .lock()
            .expect("log")
            .push(("after".into(), Some(d.clone())));
        Ok(())
    }
    async fn error<'a>(&self, _: &HookContext<'a>, _: &EvaluationError, _: Option<&'a HookHints>) {
        self.log.lock().expect("log").push(("error".into(), None));
    }
    async fn finally<'a>(
        &self,
        _: &HookContext<'a>,
        d: &EvaluationDetails<Value>,
        _: Option<&'a HookHints>,
    ) {
        self.log
            .lock()
            .expect("log")
            .push(("finally".into(), Some(d.clone())));
    }
}

#[derive(Default)]
struct World {
    context: EvaluationContext,
    hook: Option<RecordingHook>,
    flag_type: String,
    key: String,
    fallback: Json,
    value: Json,
    variant: Option<String>,
    reason: String,
    error_code: Option<String>,
    metadata: Vec<(String, Json)>,
}

fn kind_of(text: &str) -> &'static str {
    let text = text.to_ascii_lowercase();
    for (word, kind) in [
        ("as an integer", "integer"),
        ("boolean", "boolean"),
        ("integer", "integer"),
        ("float", "float"),
        ("object", "object"),
    ] {
        if text.contains(word) {
            return kind;
        }
    }
    "string"
}

fn typed(kind: &str, text: &str) -> Json {
    match kind {
        "boolean" => json!(text == "true"),
        "integer" => json!(text.parse::<i64>().unwrap_or_default()),
        "float" => json!(text.parse::<f64>().unwrap_or_default()),
        "object" => serde_json::from_str(text).unwrap_or(Json::Null),
        _ => json!(text),
    }
}

/// The default a step gives: the last quoted value, else the trailing bare word.
fn default_of(kind: &str, text: &str) -> Json {
    if text.ends_with("null default value") {
        return Json::Null;
    }
    if text.ends_with('"') {
        let q = quoted(text);
        return typed(kind, q.last().map(String::as_str).unwrap_or_default());
    }
    typed(kind, text.rsplit(' ').next().unwrap_or_default())
}

async fn evaluate(flags: &Flags, w: &mut World) {
    let client = flags.client();
    let options = w
        .hook
        .clone()
        .map(|h| EvaluationOptions::default().with_hook(h));
    let (c, o, key) = (Some(&w.context), options.as_ref(), w.key.as_str());
    let result = match w.flag_type.as_str() {
        "boolean" => client
            .get_bool_details(key, c, o)
            .await
            .map(|d| d.into_value()),
        "integer" => client
            .get_int_details(key, c, o)
            .await
            .map(|d| d.into_value()),
        "float" => client
            .get_float_details(key, c, o)
            .await
            .map(|d| d.into_value()),
        "object" => client
            .get_struct_details::<StructValue>(key, c, o)
            .await
            .map(|d| d.into_value()),
        _ => client
            .get_string_details(key, c, o)
            .await
            .map(|d| d.into_value()),
    };
    match result {
        Ok(d) => {
            let reason = d.reason.clone().unwrap_or_default();
            let caller_default = d.variant.is_none()
                && matches!(
                    reason,
                    EvaluationReason::Disabled | EvaluationReason::Default
                );
            w.value = if caller_default {
                w.fallback.clone()
            } else {
                cnsm_flags::model::json_of(&d.value)
            };
            w.variant = d.variant;
            w.reason = reason.to_string();
            w.error_code = None;
            w.metadata = d
                .flag_metadata
                .values
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        open_feature::FlagMetadataValue::Bool(b) => json!(b),
                        open_feature::FlagMetadataValue::Int(i) => json!(i),
                        open_feature::FlagMetadataValue::Float(f) => json!(f),
                        open_feature::FlagMetadataValue::String(s) => json!(s),
                    };
                    (k.clone(), v)
                })
                .collect();
        }
        Err(e) => {
            w.value = w.fallback.clone();
            w.variant = None;
            w.reason = "ERROR".into();
            w.error_code = Some(e.code.to_string());
            w.metadata.clear();
        }
    }
}

fn same(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

async fn run(flags: &Flags, case: &Case) -> Result<(), String> {
    let mut w = World::default();
    for step in &case.steps {
        let text = step.text.as_str();
        let q = quoted(text);
        if text == "a stable provider" {
            w = World::default();
        } else if text == "a client with added hook" {
            w.hook = Some(RecordingHook::default());
        } else if text.starts_with("context contains keys") {
            let (keys, values) = text.split_once("with values").unwrap_or_default();
            for (key, raw) in quoted(keys).iter().zip(values.split(',')) {
                let raw = raw.trim();
                let value = if let Some(s) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"'))
                {
                    match s {
                        "true" | "false" => EvaluationContextFieldValue::Bool(s == "true"),
                        _ => EvaluationContextFieldValue::String(s.to_owned()),
                    }
                } else {
                    EvaluationContextFieldValue::Int(raw.parse().unwrap_or_default())
                };
                w.context.custom_fields.insert(key.clone(), value);
            }
        } else if text.contains("-flag with key") {
            let head = text.split('-').next().unwrap_or_default();
            w.flag_type = kind_of(head.rsplit(' ').next().unwrap_or_default()).to_owned();
            w.key = q[0].clone();
            // The fallback is everything between its quotes (object fallbacks hold quotes).
            let fallback = text
                .split_once("fallback value \"")
                .map(|(_, rest)| rest.strip_suffix('"').unwrap_or(rest).replace("\\\"", "\""))
                .unwrap_or_default();
            w.fallback = typed(&w.flag_type, &fallback);
        } else if text.contains("is evaluated") {
            w.flag_type = kind_of(text.split("with key").next().unwrap_or_default()).to_owned();
            if text.contains("as an integer") {
                w.flag_type = "integer".into();
            }
            w.key = q[0].clone();
            w.fallback = default_of(&w.flag_type, text);
            evaluate(flags, &mut w).await;
        } else if text == "the flag was evaluated with details" {
            evaluate(flags, &mut w).await;
        } else if text.starts_with("the resolved") && text.contains("the variant should be") {
            // `the resolved K details value should be V, the variant should be X, and the reason should be Y`
            let head = text.split(", the variant").next().unwrap_or_default();
            let want = default_of(&w.flag_type, head);
            if !same(&want, &w.value)
                || w.variant.as_deref() != q.get(q.len() - 2).map(String::as_str)
                || q.last() != Some(&w.reason)
            {
                return Err(format!(
                    "{text}: got {} / {:?} / {}",
                    w.value, w.variant, w.reason
                ));
            }
        } else if text.starts_with("the resolved object") && text.contains("contain fields") {
            let (fields, values) = text.split_once("with values").unwrap_or_default();
            let wanted: Vec<Json> = values
                .trim_end_matches(", respectively")
                .replace(" and ", ", ")
                .split(", ")
                .map(|v| {
                    let v = v.trim();
                    match v.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
                        Some("true") => json!(true),
                        Some(s) => json!(s),
                        None => json!(v.parse::<i64>().unwrap_or_default()),
                    }
                })
                .collect();
            for (field, want) in quoted(fields).iter().zip(&wanted) {
                if !same(&w.value[field.as_str()], want) {
                    return Err(format!(
                        "{text}: field {field} is {}",
                        w.value[field.as_str()]
                    ));
                }
            }
        } else if text.starts_with("a context containing a key")
            && text.ends_with("with null value")
        {
            // The SDK's context has no null field: leaving the key out is the same to targeting.
        } else if text.starts_with("a context containing a key") {
            let value = match q[1].as_str() {
                "Integer" => EvaluationContextFieldValue::Int(q[2].parse().unwrap_or_default()),
                "Float" => EvaluationContextFieldValue::Float(q[2].parse().unwrap_or_default()),
                "Boolean" => EvaluationContextFieldValue::Bool(q[2] == "true"),
                _ => EvaluationContextFieldValue::String(q[2].clone()),
            };
            w.context.custom_fields.insert(q[0].clone(), value);
        } else if text.starts_with("the resolved details value should be") {
            let (first, last) = (text.find('"').unwrap_or(0), text.rfind('"').unwrap_or(0));
            let raw = text
                .get(first + 1..last)
                .unwrap_or_default()
                .replace("\\\"", "\"");
            let want = typed(&w.flag_type, &raw);
            if !same(&want, &w.value) {
                return Err(format!("{text}: got {} ({})", w.value, w.reason));
            }
        } else if text.starts_with("the reason should be") {
            if w.reason != q[0] {
                return Err(format!("{text}: got {}", w.reason));
            }
        } else if text.starts_with("the error-code should be") {
            if w.error_code.as_deref() != Some(q[0].as_str()) {
                return Err(format!("{text}: got {:?}", w.error_code));
            }
        } else if text.starts_with("the flag key should be") {
            if w.key != q[0] {
                return Err(format!("{text}: got {}", w.key));
            }
        } else if text.starts_with("the variant should be") && q.len() == 1 {
            if w.variant.as_deref() != Some(q[0].as_str()) {
                return Err(format!("{text}: got {:?}", w.variant));
            }
        } else if text == "the resolved metadata should contain" {
            for row in step.table.iter().skip(1) {
                let want = typed(&row[1].to_ascii_lowercase(), &row[2]);
                let got = w
                    .metadata
                    .iter()
                    .find(|(k, _)| *k == row[0])
                    .map(|(_, v)| v);
                if !got.is_some_and(|g| same(g, &want)) {
                    return Err(format!("metadata {}: want {want}, got {got:?}", row[0]));
                }
            }
        } else if text == "the resolved metadata is empty" {
            if !w.metadata.is_empty() {
                return Err(format!("metadata not empty: {:?}", w.metadata));
            }
        } else if text.starts_with("the variant should be") {
            if w.variant.as_deref() != q.first().map(String::as_str) || q.get(1) != Some(&w.reason)
            {
                return Err(format!("{text}: got {:?} / {}", w.variant, w.reason));
            }
        } else if text.starts_with("the resolved") && text.contains("should be") {
            let want = default_of(&w.flag_type, text);
            if !same(&want, &w.value) {
                return Err(format!("{text}: got {}", w.value));
            }
        } else if text.starts_with("the resolved flag value is")
            && text.ends_with("when the context is empty")
        {
            w.context = EvaluationContext::default();
            evaluate(flags, &mut w).await;
            if w.value != json!(q[0]) {
                return Err(format!("{text}: got {}", w.value));
            }
        } else if text.starts_with("the default") && text.ends_with("value should be returned") {
            if w.value != w.fallback {
                return Err(format!("{text}: got {}", w.value));
            }
        } else if text.starts_with("the reason should indicate an error") {
            if w.reason != "ERROR" || w.error_code.as_deref() != q.first().map(String::as_str) {
                return Err(format!("{text}: got {} / {:?}", w.reason, w.error_code));
            }
        } else if text.ends_with("hook should have been executed") {
            let log = w
                .hook
                .as_ref()
                .map(|h| h.log.lock().expect("log").clone())
                .unwrap_or_default();
            if !log.iter().any(|(stage, _)| *stage == q[0]) {
                return Err(format!(
                    "{text}: stages were {:?}",
                    log.iter().map(|l| &l.0).collect::<Vec<_>>()
                ));
            }
        } else if text.ends_with("hooks should be called with evaluation details") {
            let log = w
                .hook
                .as_ref()
                .map(|h| h.log.lock().expect("log").clone())
                .unwrap_or_default();
            let stages: Vec<String> = log.iter().map(|l| l.0.clone()).collect();
            let want_order: Vec<&str> = if w.error_code.is_some() {
                vec!["before", "error", "finally"]
            } else {
                vec!["before", "after", "finally"]
            };
            if stages != want_order {
                return Err(format!("stage order {stages:?}, want {want_order:?}"));
            }
            for stage in q[0].split(", ") {
                let Some(details) = log.iter().find(|l| l.0 == stage).and_then(|l| l.1.clone())
                else {
                    return Err(format!("{stage} saw no details"));
                };
                for row in step.table.iter().skip(1) {
                    let (kind, field, want) = (row[0].as_str(), row[1].as_str(), row[2].as_str());
                    let ok = match field {
                        "flag_key" => details.flag_key == want,
                        "variant" => details.variant.as_deref() == (want != "null").then_some(want),
                        "reason" => {
                            details.reason.as_ref().map(ToString::to_string).as_deref()
                                == Some(want)
                        }
                        "error_code" => w.error_code.as_deref() == (want != "null").then_some(want),
                        // The SDK hands `finally` T::default() on errors (see the module doc).
                        "value" if w.error_code.is_some() => true,
                        "value" => same(
                            &cnsm_flags::model::json_of(&details.value),
                            &typed(
                                if kind == "boolean" {
                                    "boolean"
                                } else {
                                    "string"
                                },
                                want,
                            ),
                        ),
                        _ => return Err(format!("unknown detail field {field}")),
                    };
                    if !ok {
                        return Err(format!("{stage}: {field} is not {want}: {details:?}"));
                    }
                }
            }
        } else {
            return Err(format!("no step matches `{text}`"));
        }
    }
    Ok(())
}

/// Scenarios not run, each for a stated reason (they are printed, and counted):
/// - `provider-status`: the Rust SDK 0.3 has no provider events or `FATAL`/`NOT_READY`
///   short-circuit in the client (spec 1.7, "❌ Eventing" in its README);
/// - `reason-codes-cached`: needs a caching provider; cnsm's providers evaluate in-process and
///   never cache;
/// - `evaluation-options`, `immutability`, `async`: steps that assert properties the SDK's
///   Rust types give by construction (options hooks are covered by `hooks.feature` here,
///   contexts are passed by shared reference, every evaluation is a future) and have no step
///   form that could fail.
const UNSUPPORTED_TAGS: &[&str] = &[
    "provider-status",
    "reason-codes-cached",
    "evaluation-options",
    "immutability",
    "async",
];

#[tokio::test]
async fn openfeature_spec_evaluation_and_hooks_suites() {
    let flags = Flags::new(provider()).await;
    let dir = shared_dir().join("conformance/openfeature-spec");
    let (mut n_passed, mut n_unsupported) = (0, 0);
    let mut failures = Vec::new();
    for file in [
        "evaluation.feature",
        "hooks.feature",
        "evaluation_v2.feature",
        "metadata.feature",
    ] {
        for case in cases(&dir.join(file)) {
            if let Some(tag) = case
                .tags
                .iter()
                .find(|t| UNSUPPORTED_TAGS.contains(&t.as_str()))
            {
                n_unsupported += 1;
                println!("not run ({tag}): {file} / {}", case.name);
                continue;
            }
            match run(&flags, &case).await {
                Ok(()) => n_passed += 1,
                Err(e) => failures.push(format!("{file} / {}: {e}", case.name)),
            }
        }
    }
    println!(
        "openfeature spec (evaluation, hooks, evaluation_v2, metadata): {n_passed} passed, {} \
         failed, {n_unsupported} not run (UNSUPPORTED_TAGS)",
        failures.len()
    );
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
    assert!(n_passed >= 79, "only {n_passed} cases passed");
    // The transition hook saw every evaluation and mapped the reasons.
    let statuses = flags.gates().statuses();
    assert_eq!(
        statuses.get("boolean-flag").map(String::as_str),
        Some("STABLE")
    );
    assert_eq!(
        statuses.get("missing-flag").map(String::as_str),
        Some("DEGRADED")
    );
    // Its last evaluation had an empty context, so the default variant: STABLE.
    assert_eq!(
        statuses.get("context-aware").map(String::as_str),
        Some("STABLE")
    );
}
