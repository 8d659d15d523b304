//! `snapshot`: the unsigned payload of a signed portable snapshot (`docs/snapshots.md`), for
//! admins. `GET` exports the selected instances of a namespace as deterministic CBOR
//! (`application/cbor`); the client signs it. `POST` imports a payload whose signature the
//! client verified: the server checks encoding, chains and definitions again (steps 4-6), that
//! everything in it belongs to the path's namespace, and imports it in one transaction.
//!
//! Neither holds a snapshot in memory: the export is written to an anonymous temporary file
//! and streamed from it; an import's body is spooled to one, checked in a streaming pass, then
//! streamed into the store's transaction.

use std::io::{Seek, SeekFrom, Write};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cnsm_snapshot::Selection;
use serde::{Deserialize, Serialize};

use crate::ServerState;
use crate::params::{self, QueryPairs};
use crate::problem::{ApiError, ProblemKind};

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
        let io = |e: std::io::Error| {
            cnsm_snapshot::ExportError::Snapshot(cnsm_core::snapshot::SnapshotError::Io(
                e.to_string(),
            ))
        };
        let mut file = tempfile::tempfile().map_err(io)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        let n_bytes = cnsm_snapshot::export_to(
            &**runtime.store(),
            &namespace,
            &selection,
            as_of_ms,
            &mut out,
            &mut |_, _| {},
        )?;
        out.flush().map_err(io)?;
        drop(out);
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        Ok((file, n_bytes))
    })
    .await
    .map_err(|_| ApiError::unavailable("the export was interrupted"))?;
    let (file, n_bytes) = result.map_err(|e| match e {
        cnsm_snapshot::ExportError::NotFound(what) => {
            ApiError::not_found(format!("instance {what} not found"))
        }
        cnsm_snapshot::ExportError::Store(e) => {
            ApiError::from_runtime(cnsm_runtime::RuntimeError::from(e))
        }
        other => ApiError::unavailable(other.to_string()),
    })?;
    let mut response = Response::new(crate::admin::file_body(file));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(SNAPSHOT_MEDIA_TYPE),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n_bytes));
    Ok(response)
}

/// `POST .../namespaces/{ns}/snapshot[?replace=true]` with an `application/cbor` payload
/// (`application/octet-stream` is accepted as well).
pub async fn import(
    State(state): State<ServerState>,
    path: Result<Path<String>, PathRejection>,
    query: QueryPairs,
    headers: HeaderMap,
    body: Body,
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
    let spooled = spool(body).await?;
    let namespace = ns.clone();
    // Steps 4-6 over the whole payload first (an encoding problem late in it wins over a
    // broken chain earlier), then the import pass, which checks each instance again.
    let opened = tokio::task::spawn_blocking(move || {
        let mut file = spooled;
        let verified = cnsm_snapshot::verify_payload_from(
            std::io::BufReader::with_capacity(1 << 20, &mut file),
            &mut |_, _| {},
        );
        verified.map_err(cnsm_snapshot::ImportFailure::Verify)?;
        file.seek(SeekFrom::Start(0)).map_err(|e| {
            cnsm_snapshot::ImportFailure::Verify(cnsm_snapshot::VerifyError::Io(e.to_string()))
        })?;
        cnsm_snapshot::ImportSource::open(
            std::io::BufReader::with_capacity(1 << 20, file),
            &namespace,
            Box::new(|_, _| {}),
        )
    })
    .await
    .map_err(|_| ApiError::unavailable("the import was interrupted"))?;
    let (source, definitions) = opened.map_err(import_failure)?;
    let failure = source.failure();
    let result = state
        .runtime()
        .import_stream(definitions, Box::new(source), replace)
        .await;
    if let Some(failure) = failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(import_failure(failure));
    }
    let report = result.map_err(ApiError::from_runtime)?;
    Ok((StatusCode::OK, Json(ImportReportView::from(report))).into_response())
}

/// Writes a request body to an anonymous temporary file as it arrives, refusing more than
/// [`SNAPSHOT_BYTES_MAX`] bytes.
async fn spool(body: Body) -> Result<std::fs::File, ApiError> {
    use futures_util::StreamExt;
    let unavailable = |e: std::io::Error| {
        ApiError::unavailable(format!(
            "cannot spool the snapshot to a temporary file: {e}"
        ))
    };
    let file = tempfile::tempfile().map_err(unavailable)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut n_bytes = 0usize;
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|_| ApiError::invalid("the request body could not be read"))?;
        n_bytes += chunk.len();
        if n_bytes > SNAPSHOT_BYTES_MAX {
            return Err(ApiError::new(
                ProblemKind::PayloadTooLarge,
                "the request body is larger than the server's limit",
            ));
        }
        out.write_all(&chunk).map_err(unavailable)?;
    }
    let mut file = out.into_inner().map_err(|e| unavailable(e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(unavailable)?;
    Ok(file)
}

fn import_failure(failure: cnsm_snapshot::ImportFailure) -> ApiError {
    match failure {
        cnsm_snapshot::ImportFailure::Verify(e) => {
            ApiError::invalid(format!("the snapshot does not verify: {e}"))
        }
        other => ApiError::invalid(other.to_string()),
    }
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
