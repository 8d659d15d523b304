//! `snapshot`: the unsigned payload of a signed portable snapshot (`docs/snapshots.md`), for
//! admins. `GET` exports the selected instances of a namespace as deterministic CBOR
//! (`application/cbor`); the client signs it. `POST` imports a payload whose signature the
//! client verified: the server checks encoding, chains and definitions again (steps 4-6), that
//! everything in it belongs to the path's namespace, and imports it in one transaction.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cnsm_snapshot::Selection;
use serde::{Deserialize, Serialize};

use crate::ServerState;
use crate::params::{self, QueryPairs};
use crate::problem::ApiError;

/// The media type of a snapshot payload.
pub const SNAPSHOT_MEDIA_TYPE: &str = "application/cbor";

/// Largest payload `POST .../snapshot` accepts.
pub const SNAPSHOT_BYTES_MAX: usize = 1 << 30;

/// The answer of an import.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportReportView {
    pub n_instances: u64,
    pub n_records: u64,
    pub n_replaced: u64,
    pub n_definitions_created: u64,
    pub n_timers: u64,
}

impl From<cnsm_store::ImportReport> for ImportReportView {
    fn from(r: cnsm_store::ImportReport) -> ImportReportView {
        ImportReportView {
            n_instances: r.n_instances,
            n_records: r.n_records,
            n_replaced: r.n_replaced,
            n_definitions_created: r.n_definitions_created,
            n_timers: r.n_timers,
        }
    }
}

impl From<ImportReportView> for cnsm_store::ImportReport {
    fn from(r: ImportReportView) -> cnsm_store::ImportReport {
        cnsm_store::ImportReport {
            n_instances: r.n_instances,
            n_records: r.n_records,
            n_replaced: r.n_replaced,
            n_definitions_created: r.n_definitions_created,
            n_timers: r.n_timers,
        }
    }
}

/// `GET .../namespaces/{ns}/snapshot[?instance=ID | ?labelSelector=k=v,...]`.
pub async fn export(
    State(state): State<ServerState>,
    path: Result<Path<String>, PathRejection>,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let query = params::query(query)?;
    let instance = params::param(&query, "instance").filter(|v| !v.is_empty());
    let selector = params::param(&query, "labelSelector").filter(|v| !v.is_empty());
    let selection = match (instance, selector) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give either instance or labelSelector, not both",
            ));
        }
        (Some(id), None) => Selection::Instance(id.to_owned()),
        (None, Some(selector)) => Selection::Labels(parse_selector(selector)?),
        (None, None) => Selection::All,
    };
    let runtime = state.runtime().clone();
    let as_of_ms = runtime.clock().now_ms();
    let namespace = ns.clone();
    let result = tokio::task::spawn_blocking(move || {
        cnsm_snapshot::export(
            &**runtime.store(),
            &namespace,
            &selection,
            as_of_ms,
            &mut |_, _| {},
        )
    })
    .await
    .map_err(|_| ApiError::unavailable("the export was interrupted"))?;
    let payload = result.map_err(|e| match e {
        cnsm_snapshot::ExportError::NotFound(what) => {
            ApiError::not_found(format!("instance {what} not found"))
        }
        cnsm_snapshot::ExportError::Store(e) => {
            ApiError::from_runtime(cnsm_runtime::RuntimeError::from(e))
        }
        other => ApiError::unavailable(other.to_string()),
    })?;
    let mut response = (StatusCode::OK, payload).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(SNAPSHOT_MEDIA_TYPE),
    );
    Ok(response)
}

/// `POST .../namespaces/{ns}/snapshot[?replace=true]` with an `application/cbor` payload
/// (`application/octet-stream` is accepted as well).
pub async fn import(
    State(state): State<ServerState>,
    path: Result<Path<String>, PathRejection>,
    query: QueryPairs,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let query = params::query(query)?;
    let replace = params::flag(&query, "replace")?;
    let media_type = params::media_type(&headers);
    if media_type != SNAPSHOT_MEDIA_TYPE && media_type != "application/octet-stream" {
        return Err(params::unsupported(
            &media_type,
            "application/cbor (or application/octet-stream)",
        ));
    }
    let body = params::body(body)?;
    let plan =
        tokio::task::spawn_blocking(move || cnsm_snapshot::plan_import(&body, &mut |_, _| {}))
            .await
            .map_err(|_| ApiError::unavailable("the import was interrupted"))?
            .map_err(|e| ApiError::invalid(format!("the snapshot does not verify: {e}")))?;
    plan.check_namespace(&ns).map_err(ApiError::invalid)?;
    let report = state
        .runtime()
        .import_instances(plan.definitions, plan.items, replace)
        .await
        .map_err(ApiError::from_runtime)?;
    Ok((StatusCode::OK, Json(ImportReportView::from(report))).into_response())
}

fn parse_selector(selector: &str) -> Result<Vec<(String, String)>, ApiError> {
    let mut labels = Vec::new();
    for pair in selector.split(',').filter(|p| !p.trim().is_empty()) {
        match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                let value = value.strip_prefix('=').unwrap_or(value);
                labels.push((key.trim().to_owned(), value.trim().to_owned()));
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "labelSelector '{pair}' must be key=value (several comma-separated)"
                )));
            }
        }
    }
    Ok(labels)
}
