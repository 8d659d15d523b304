//! The transition hook: observes every flag evaluation at the OpenFeature hook stages
//! (before/after/error/finally), puts the OpenTelemetry feature-flag attributes on the current
//! `tracing` span and on a `feature_flag.evaluation` event, and keeps a gate status per flag
//! key for diagnostics (DESIGN.md §6).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use open_feature::{
    EvaluationContext, EvaluationDetails, EvaluationError, EvaluationReason, Hook, HookContext,
    HookHints, Value,
};

/// What a flag's last evaluation means for the gates that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GateStatus {
    /// `TARGETING_MATCH` (and `SPLIT`): targeting is routing instances.
    Active,
    /// `STATIC`, `DEFAULT` (and `CACHED`): every instance gets the same answer.
    Stable,
    /// `DISABLED`: the flag is off; gates see the caller default (deny).
    Disabled,
    /// `ERROR`: the provider failed; `onFlagError` decides.
    Degraded,
    /// `UNKNOWN` or a provider-specific reason.
    Unknown,
}

impl GateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            GateStatus::Active => "ACTIVE",
            GateStatus::Stable => "STABLE",
            GateStatus::Disabled => "DISABLED",
            GateStatus::Degraded => "DEGRADED",
            GateStatus::Unknown => "UNKNOWN",
        }
    }
}

/// The reason → gate status mapping of DESIGN.md §6.
pub fn gate_status(reason: &EvaluationReason) -> GateStatus {
    match reason {
        EvaluationReason::TargetingMatch | EvaluationReason::Split => GateStatus::Active,
        EvaluationReason::Static | EvaluationReason::Default | EvaluationReason::Cached => {
            GateStatus::Stable
        }
        EvaluationReason::Disabled => GateStatus::Disabled,
        EvaluationReason::Error => GateStatus::Degraded,
        EvaluationReason::Unknown | EvaluationReason::Other(_) => GateStatus::Unknown,
    }
}

/// The OpenTelemetry form of an OpenFeature code or reason: `FLAG_NOT_FOUND` → `flag_not_found`.
pub fn otel_name(upper: &str) -> String {
    upper.to_ascii_lowercase()
}

/// The last evaluation of one flag, as diagnostics show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateInfo {
    pub status: GateStatus,
    pub reason: String,
    pub variant: Option<String>,
    pub provider: String,
    /// `error.type` of the last evaluation, when it failed.
    pub error_type: Option<String>,
    pub n_evaluations: u64,
}

/// Gate status per flag key, shared between the hook and whoever shows it.
#[derive(Debug, Clone, Default)]
pub struct GateStatuses(Arc<RwLock<BTreeMap<String, GateInfo>>>);

impl GateStatuses {
    /// A copy of every flag's last evaluation.
    pub fn snapshot(&self) -> BTreeMap<String, GateInfo> {
        self.0.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Status per flag key (`ACTIVE`, `STABLE`, `DISABLED`, `DEGRADED`, `UNKNOWN`); the
    /// public seam for a gate-status metric.
    pub fn statuses(&self) -> BTreeMap<String, String> {
        self.0
            .read()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.status.as_str().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn update(&self, key: &str, update: impl FnOnce(&mut GateInfo)) {
        if let Ok(mut m) = self.0.write() {
            let info = m.entry(key.to_owned()).or_insert_with(|| GateInfo {
                status: GateStatus::Unknown,
                reason: "UNKNOWN".into(),
                variant: None,
                provider: String::new(),
                error_type: None,
                n_evaluations: 0,
            });
            update(info);
        }
    }
}

/// The OpenFeature hook cnsm attaches to its client.
#[derive(Debug, Clone, Default)]
pub struct TransitionHook {
    statuses: GateStatuses,
}

impl TransitionHook {
    pub fn new() -> TransitionHook {
        TransitionHook::default()
    }

    pub fn statuses(&self) -> &GateStatuses {
        &self.statuses
    }
}

#[open_feature::async_trait]
impl Hook for TransitionHook {
    async fn before<'a>(
        &self,
        context: &HookContext<'a>,
        _hints: Option<&'a HookHints>,
    ) -> Result<Option<EvaluationContext>, EvaluationError> {
        let span = tracing::Span::current();
        span.record("feature_flag.key", context.flag_key);
        span.record(
            "feature_flag.provider.name",
            context.provider_metadata.name.as_str(),
        );
        Ok(None)
    }

    async fn after<'a>(
        &self,
        _context: &HookContext<'a>,
        details: &EvaluationDetails<Value>,
        _hints: Option<&'a HookHints>,
    ) -> Result<(), EvaluationError> {
        let span = tracing::Span::current();
        if let Some(variant) = &details.variant {
            span.record("feature_flag.result.variant", variant.as_str());
        }
        if let Some(reason) = &details.reason {
            span.record(
                "feature_flag.result.reason",
                otel_name(&reason.to_string()).as_str(),
            );
        }
        Ok(())
    }

    async fn error<'a>(
        &self,
        context: &HookContext<'a>,
        error: &EvaluationError,
        _hints: Option<&'a HookHints>,
    ) {
        let error_type = otel_name(&error.code.to_string());
        tracing::Span::current().record("error.type", error_type.as_str());
        self.statuses.update(context.flag_key, |info| {
            info.error_type = Some(error_type.clone());
        });
        tracing::warn!(
            feature_flag.key = context.flag_key,
            feature_flag.provider.name = context.provider_metadata.name.as_str(),
            error.type = error_type.as_str(),
            feature_flag.error.message = error.message.as_deref().unwrap_or(""),
            "feature flag evaluation failed"
        );
    }

    async fn finally<'a>(
        &self,
        context: &HookContext<'a>,
        details: &EvaluationDetails<Value>,
        _hints: Option<&'a HookHints>,
    ) {
        let reason = details.reason.clone().unwrap_or_default();
        let status = gate_status(&reason);
        let reason_text = reason.to_string();
        tracing::info!(
            feature_flag.key = context.flag_key,
            feature_flag.result.variant = details.variant.as_deref().unwrap_or(""),
            feature_flag.result.reason = otel_name(&reason_text).as_str(),
            feature_flag.provider.name = context.provider_metadata.name.as_str(),
            "feature_flag.evaluation"
        );
        let failed = reason == EvaluationReason::Error;
        self.statuses.update(context.flag_key, |info| {
            info.status = status;
            info.reason = reason_text;
            info.variant = details.variant.clone();
            info.provider = context.provider_metadata.name.clone();
            if !failed {
                info.error_type = None;
            }
            info.n_evaluations += 1;
        });
    }
}
