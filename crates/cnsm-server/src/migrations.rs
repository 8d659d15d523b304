//! `POST .../namespaces/{ns}/statemachines/{name}/migrations`: run (or plan) a
//! `StateMigrationPolicy` between two revisions, and the wire form of its report.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use cnsm_runtime::{
    MigrationEntry, MigrationOutcome, MigrationPhase, MigrationReport, MigrationRequest,
};
use serde::{Deserialize, Serialize};

use crate::ServerState;
use crate::params;
use crate::problem::ApiError;

/// The request body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationBody {
    /// The `StateMigrationPolicy` as YAML (or JSON) text.
    pub policy: String,
    pub from_revision: u32,
    pub to_revision: u32,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub rollback: bool,
    /// `all` (default), `pre` or `post`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Instances per round (0: default).
    #[serde(default)]
    pub chunk: usize,
    #[serde(default)]
    pub actor: Option<String>,
}

/// One instance of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationEntryView {
    pub id: String,
    /// `would-migrate`, `migrated`, `locked` or `blocked`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationReportView {
    pub migrated: usize,
    pub blocked: usize,
    pub entries: Vec<MigrationEntryView>,
}

impl From<&MigrationEntry> for MigrationEntryView {
    fn from(entry: &MigrationEntry) -> MigrationEntryView {
        let (outcome, from, to, reason) = match &entry.outcome {
            MigrationOutcome::WouldMigrate { from, to } => {
                ("would-migrate", Some(from.clone()), Some(to.clone()), None)
            }
            MigrationOutcome::Migrated { from, to } => {
                ("migrated", Some(from.clone()), Some(to.clone()), None)
            }
            MigrationOutcome::Locked => ("locked", None, None, None),
            MigrationOutcome::Blocked(why) => ("blocked", None, None, Some(why.clone())),
        };
        MigrationEntryView {
            id: entry.id.clone(),
            outcome: outcome.into(),
            from,
            to,
            reason,
        }
    }
}

impl From<&MigrationReport> for MigrationReportView {
    fn from(report: &MigrationReport) -> MigrationReportView {
        MigrationReportView {
            migrated: report.n_migrated(),
            blocked: report.n_blocked(),
            entries: report
                .entries
                .iter()
                .map(MigrationEntryView::from)
                .collect(),
        }
    }
}

impl MigrationEntryView {
    /// Back to the runtime's form (for clients).
    pub fn to_entry(&self) -> MigrationEntry {
        let outcome = match self.outcome.as_str() {
            "would-migrate" => MigrationOutcome::WouldMigrate {
                from: self.from.clone().unwrap_or_default(),
                to: self.to.clone().unwrap_or_default(),
            },
            "migrated" => MigrationOutcome::Migrated {
                from: self.from.clone().unwrap_or_default(),
                to: self.to.clone().unwrap_or_default(),
            },
            "locked" => MigrationOutcome::Locked,
            _ => MigrationOutcome::Blocked(self.reason.clone().unwrap_or_default()),
        };
        MigrationEntry {
            id: self.id.clone(),
            outcome,
        }
    }
}

/// Parses `all|pre|post`.
pub fn parse_phase(phase: Option<&str>) -> Result<MigrationPhase, String> {
    match phase.unwrap_or("all") {
        "all" => Ok(MigrationPhase::All),
        "pre" => Ok(MigrationPhase::Pre),
        "post" => Ok(MigrationPhase::Post),
        other => Err(format!("phase must be all, pre or post, found '{other}'")),
    }
}

pub async fn run(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<MigrationReportView>, ApiError> {
    let Path((ns, name)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let body = params::body(body)?;
    let media_type = params::media_type(&headers);
    if !params::is_json_like(&media_type) {
        return Err(params::unsupported(&media_type, "application/json"));
    }
    let parsed: MigrationBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::json("the migration body", &e))?;
    let policy = cnsm_core::migration::parse_policy(&parsed.policy).map_err(|problems| {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| cnsm_core::admission::render_problem(p, Some("policy")))
            .collect();
        ApiError::invalid(format!("the policy is invalid: {}", lines.join("; ")))
    })?;
    if policy.spec.machine != name {
        return Err(ApiError::invalid(format!(
            "the policy is for machine '{}', not '{name}'",
            policy.spec.machine
        )));
    }
    let phase = parse_phase(parsed.phase.as_deref()).map_err(ApiError::invalid)?;
    let mut request = MigrationRequest::new(policy, parsed.from_revision, parsed.to_revision);
    request.namespace = ns;
    request.dry_run = parsed.dry_run;
    request.rollback = parsed.rollback;
    request.phase = phase;
    request.chunk = parsed.chunk;
    if let Some(actor) = parsed.actor {
        request.actor = actor;
    }
    let report = state
        .runtime()
        .migrate(&request, &mut |_, _| {})
        .await
        .map_err(ApiError::from_runtime)?;
    Ok(Json(MigrationReportView::from(&report)))
}

/// A machine's rollout as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutView {
    /// The newest revision (what new instances get when no rollout is set).
    pub latest: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<cnsm_core::rollout::Rollout>,
    /// Active instances per revision (keys are revision numbers).
    pub active_by_revision: std::collections::BTreeMap<String, u64>,
}

impl From<&cnsm_runtime::RolloutStatus> for RolloutView {
    fn from(status: &cnsm_runtime::RolloutStatus) -> RolloutView {
        RolloutView {
            latest: status.latest,
            rollout: status.rollout.clone(),
            active_by_revision: status
                .active_by_revision
                .iter()
                .map(|(r, n)| (r.to_string(), *n))
                .collect(),
        }
    }
}

impl RolloutView {
    /// Back to the runtime's form (for clients).
    pub fn to_status(&self) -> cnsm_runtime::RolloutStatus {
        cnsm_runtime::RolloutStatus {
            latest: self.latest,
            rollout: self.rollout.clone(),
            active_by_revision: self
                .active_by_revision
                .iter()
                .filter_map(|(r, n)| r.parse().ok().map(|r| (r, *n)))
                .collect(),
        }
    }
}

/// The body of a rollout change.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutBody {
    /// `set`, `promote` or `abort`.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// `set` by a flag instead of `revision` and `weight`: the flag's value names the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
}

impl RolloutBody {
    pub fn change(&self) -> Result<cnsm_runtime::RolloutChange, String> {
        use cnsm_runtime::RolloutChange;
        match self.action.as_str() {
            "set" => match (self.revision, self.weight, &self.flag) {
                (Some(revision), Some(weight), None) => Ok(RolloutChange::Set { revision, weight }),
                (None, None, Some(flag)) => Ok(RolloutChange::Flag { flag: flag.clone() }),
                _ => Err("action set needs either revision and weight, or flag".into()),
            },
            "promote" => Ok(RolloutChange::Promote),
            "abort" => Ok(RolloutChange::Abort),
            other => Err(format!(
                "action must be set, promote or abort, found '{other}'"
            )),
        }
    }
}

/// `GET .../statemachines/{name}/rollout`.
pub async fn rollout_status(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let Path((ns, name)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let status = state
        .runtime()
        .rollout_status(&ns, &name)
        .await
        .map_err(ApiError::from_runtime)?;
    Ok(Json(RolloutView::from(&status)))
}

/// `POST .../statemachines/{name}/rollout`: set, promote or abort.
pub async fn change_rollout(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RolloutView>, ApiError> {
    let Path((ns, name)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let body = params::body(body)?;
    let media_type = params::media_type(&headers);
    if !params::is_json_like(&media_type) {
        return Err(params::unsupported(&media_type, "application/json"));
    }
    let parsed: RolloutBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::json("the rollout body", &e))?;
    let change = parsed.change().map_err(ApiError::invalid)?;
    let status = state
        .runtime()
        .change_rollout(&ns, &name, change)
        .await
        .map_err(ApiError::from_runtime)?;
    Ok(Json(RolloutView::from(&status)))
}
