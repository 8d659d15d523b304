//! Feature-flag gates for cnsm (DESIGN.md §6), evaluated through the OpenFeature Rust SDK.
//!
//! - [`provider::FlagdFileProvider`]: the embedded default provider — a flagd flag file
//!   evaluated in-process: targeting compiled once by `datalogic-rs` with flagd's operators
//!   (`fractional`, `sem_ver`, `starts_with`, `ends_with`; [`jsonlogic`]), and cnsm's flag model
//!   (optional default variant, per-flag `PARSE_ERROR`, `$evaluators`, disabled flags),
//!   reloaded when the file changes.
//! - [`provider::InMemoryProvider`]: flags defined in code, for tests.
//! - [`hook::TransitionHook`]: the OpenFeature hook that annotates spans and keeps the gate
//!   status per flag.
//! - [`Flags`]: an OpenFeature client over a provider, with the hook attached; it implements
//!   the runtime's [`cnsm_runtime::FlagEvaluator`].
//!
//! `fractional` buckets with flagd's **v2** algorithm (MurmurHash3 x86-32 of the bucketing
//! string, `(hash * totalWeight) >> 32`), the one flagd's Go evaluator uses; it comes from
//! `datalogic-rs`'s `flagd` feature. See docs/flags.md.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use cnsm_flags::{Flags, provider::{InMemoryProvider, MemoryFlag}};
//! use cnsm_core::flags::{FlagQuery, FlagValueType};
//! let provider = InMemoryProvider::new();
//! provider.set_flag("new-path", MemoryFlag::boolean(true));
//! let flags = Flags::new(provider).await;
//! let query = FlagQuery {
//!     key: "new-path".into(),
//!     targeting_key: "order-1".into(),
//!     targeting_key_error: None,
//!     context: Default::default(),
//!     value_type: FlagValueType::Bool,
//! };
//! let decision = flags.evaluate_one(&query).await;
//! assert_eq!(decision.value, serde_json::json!(true));
//! assert_eq!(decision.reason, "STATIC");
//! # });
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use cnsm_core::flags::{FlagQuery, FlagValueType};
use cnsm_core::record::FlagDecision;
use cnsm_runtime::flags::{FlagEvaluator, FlagFuture};
use open_feature::provider::FeatureProvider;
use open_feature::{
    Client, EvaluationDetails, EvaluationError, EvaluationReason, OpenFeature, StructValue,
};
use serde_json::Value as Json;

pub mod hook;
pub mod jsonlogic;
pub mod model;
pub mod provider;

pub use hook::{GateInfo, GateStatus, GateStatuses, TransitionHook, gate_status};
pub use model::{FlagFileError, FlagSet, Resolution};
pub use provider::{FlagSource, FlagdFileProvider, InMemoryProvider, MemoryFlag};

/// An OpenFeature client over one provider, with the [`TransitionHook`] attached.
pub struct Flags {
    /// Kept so the provider registry lives as long as the client.
    _api: OpenFeature,
    client: Client,
    source: Option<Arc<dyn FlagSource>>,
    hook: TransitionHook,
    provider_name: String,
}

impl std::fmt::Debug for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flags")
            .field("provider", &self.provider_name)
            .finish_non_exhaustive()
    }
}

/// The client name cnsm registers its provider under (an isolated `OpenFeature` instance, not
/// the global singleton: libraries set no globals).
const CLIENT_NAME: &str = "cnsm";

impl Flags {
    /// Flags over one of cnsm's providers (which also report their health and flag types).
    pub async fn new<P>(provider: P) -> Flags
    where
        P: FeatureProvider + FlagSource + Clone,
    {
        let source: Arc<dyn FlagSource> = Arc::new(provider.clone());
        let mut flags = Flags::with_provider(provider).await;
        flags.source = Some(source);
        flags
    }

    /// Flags over any OpenFeature provider. `variant:` gates ask it for a string flag.
    pub async fn with_provider(provider: impl FeatureProvider) -> Flags {
        let provider_name = provider.metadata().name.clone();
        let mut api = OpenFeature::default();
        api.set_named_provider(CLIENT_NAME, provider).await;
        let hook = TransitionHook::new();
        let client = api.create_named_client(CLIENT_NAME).with_hook(hook.clone());
        Flags {
            _api: api,
            client,
            source: None,
            hook,
            provider_name,
        }
    }

    /// Flags over the embedded provider reading a flagd flag file.
    pub async fn from_file(path: impl AsRef<Path>) -> Result<Flags, FlagFileError> {
        Ok(Flags::new(FlagdFileProvider::open(path)?).await)
    }

    /// The OpenFeature client (with the hook attached) the gates are evaluated through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The gate status map (see [`GateStatuses::statuses`]).
    pub fn gates(&self) -> &GateStatuses {
        self.hook.statuses()
    }

    /// Evaluates one query through the OpenFeature client. `allowed` is left `false`: the
    /// engine decides it from the gate.
    pub async fn evaluate_one(&self, query: &FlagQuery) -> FlagDecision {
        if let Some(message) = &query.targeting_key_error {
            return error_decision(&query.key, "INVALID_CONTEXT", message);
        }
        let context = model::context_from_json(Some(&query.targeting_key), &query.context);
        let value_type = match query.value_type {
            FlagValueType::Any => self
                .source
                .as_ref()
                .and_then(|s| s.value_type(&query.key))
                .unwrap_or(FlagValueType::String),
            other => other,
        };
        let key = query.key.as_str();
        let c = Some(&context);
        let result: Result<EvaluationDetails<open_feature::Value>, EvaluationError> =
            match value_type {
                FlagValueType::Bool => self
                    .client
                    .get_bool_details(key, c, None)
                    .await
                    .map(EvaluationDetails::into_value),
                FlagValueType::Int => self
                    .client
                    .get_int_details(key, c, None)
                    .await
                    .map(EvaluationDetails::into_value),
                FlagValueType::Float => self
                    .client
                    .get_float_details(key, c, None)
                    .await
                    .map(EvaluationDetails::into_value),
                FlagValueType::String | FlagValueType::Any => self
                    .client
                    .get_string_details(key, c, None)
                    .await
                    .map(EvaluationDetails::into_value),
                FlagValueType::Object => self
                    .client
                    .get_struct_details::<StructValue>(key, c, None)
                    .await
                    .map(EvaluationDetails::into_value),
            };
        match result {
            Ok(details) => {
                let reason = details.reason.clone().unwrap_or_default();
                // DISABLED, or DEFAULT without a variant: the caller's default, which for a
                // gate is "no value" (it never equals what a gate expects).
                let caller_default = details.variant.is_none()
                    && matches!(
                        reason,
                        EvaluationReason::Disabled | EvaluationReason::Default
                    );
                FlagDecision {
                    key: query.key.clone(),
                    variant: details.variant,
                    value: if caller_default {
                        Json::Null
                    } else {
                        model::json_of(&details.value)
                    },
                    reason: reason.to_string(),
                    error: None,
                    allowed: false,
                }
            }
            Err(e) => error_decision(
                &query.key,
                &e.code.to_string(),
                e.message.as_deref().unwrap_or(""),
            ),
        }
    }
}

fn error_decision(key: &str, code: &str, message: &str) -> FlagDecision {
    FlagDecision {
        key: key.to_owned(),
        variant: None,
        value: Json::Null,
        reason: "ERROR".into(),
        error: Some(if message.is_empty() {
            code.to_owned()
        } else {
            format!("{code}: {message}")
        }),
        allowed: false,
    }
}

impl FlagEvaluator for Flags {
    fn evaluate<'a>(&'a self, queries: &'a [FlagQuery]) -> FlagFuture<'a> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(queries.len());
            for q in queries {
                out.push(self.evaluate_one(q).await);
            }
            out
        })
    }

    fn provider_error(&self) -> Option<String> {
        self.source.as_ref().and_then(|s| s.error())
    }

    fn provider_name(&self) -> String {
        self.provider_name.clone()
    }

    fn gate_statuses(&self) -> BTreeMap<String, String> {
        self.gates().statuses()
    }
}

/// Flag keys that `machine`'s gates use but `flags` does not define (for
/// `cnsmctl validate --flags`), with the path of the first entry using each.
pub fn undefined_flag_keys(
    machine: &cnsm_core::StateMachine,
    flags: &FlagSet,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, state) in machine.spec.states.iter().enumerate() {
        for (j, entry) in state.on_event.iter().enumerate() {
            if let Some(gate) = &entry.flag
                && !flags.contains(&gate.key)
                && !out.iter().any(|(k, _)| *k == gate.key)
            {
                out.push((
                    gate.key.clone(),
                    format!("spec.states[{i}].onEvent[{j}].flag"),
                ));
            }
        }
    }
    out
}
