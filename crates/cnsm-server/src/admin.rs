//! Store administration over HTTP: `POST /apis/statemachine.cn/v1alpha1/backup` streams a
//! consistent point-in-time copy of the store, taken while the server keeps serving;
//! `GET /apis/statemachine.cn/v1alpha1/audit` streams the committed audit lines regenerated from
//! the history (what `cnsmctl audit export` prints locally).

use std::io::Read;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use cnsm_runtime::RuntimeError;

use crate::ServerState;
use crate::params::{self, QueryPairs};
use crate::problem::ApiError;

/// The media type of the audit route: one ECS JSON object per line.
pub const NDJSON_MEDIA_TYPE: &str = "application/x-ndjson";

/// `GET /apis/statemachine.cn/v1alpha1/audit?since=TIME|SEQ`: the ECS line of every committed
/// transition in commit order (after commit position `SEQ`, or at or after the RFC 3339 time),
/// as ND-JSON, streamed a page of the commit log at a time from a blocking reader. A bad
/// `since` is a 400 before anything is read; a store error after the first line ends the
/// stream early (the client sees a truncated body and reports it).
pub async fn audit(
    State(state): State<ServerState>,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let query = params::query(query)?;
    let since = cnsm_runtime::audit::AuditSince::parse(params::param(&query, "since"))
        .map_err(|e| ApiError::invalid(format!("query parameter {e}")))?;
    let store = std::sync::Arc::clone(state.runtime().store());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let result = cnsm_runtime::audit::export_committed(store.as_ref(), since, &mut |lines| {
            let mut chunk = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
            for line in lines {
                chunk.extend_from_slice(line.as_bytes());
                chunk.push(b'\n');
            }
            chunk.is_empty() || tx.blocking_send(Ok(Bytes::from(chunk))).is_ok()
        });
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(NDJSON_MEDIA_TYPE),
    );
    Ok(response)
}

/// Bytes per streamed chunk.
const CHUNK_LEN: usize = 1 << 20;

/// `POST /apis/statemachine.cn/v1alpha1/backup`: the store writes a verified copy to a
/// temporary file (in `TMPDIR`), which is streamed as `application/octet-stream` and removed.
pub async fn backup(State(state): State<ServerState>) -> Result<Response, ApiError> {
    let store = std::sync::Arc::clone(state.runtime().store());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let path =
        std::env::temp_dir().join(format!("cnsm-backup-{}-{nanos}.cnsm", std::process::id()));
    let written = path.clone();
    let report = tokio::task::spawn_blocking(move || store.backup(&written))
        .await
        .map_err(|e| ApiError::from_runtime(RuntimeError::Unavailable(e.to_string())))?
        .map_err(|e| ApiError::from_runtime(e.into()))?;
    let file = std::fs::File::open(&path);
    // The open file stays readable; nothing is left behind whatever happens to the stream.
    let _ = std::fs::remove_file(&path);
    let file = file.map_err(|e| {
        ApiError::from_runtime(RuntimeError::Unavailable(format!(
            "cannot read the backup: {e}"
        )))
    })?;
    let mut response = Response::new(file_body(file));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(report.bytes));
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"backup.cnsm\""),
    );
    headers.insert(
        "x-cnsm-backup-records",
        HeaderValue::from(report.verified.n_records),
    );
    headers.insert(
        "x-cnsm-backup-instances",
        HeaderValue::from(report.verified.n_instances),
    );
    Ok(response)
}

/// A response body read from `file` in chunks as the client takes them (a few chunks in
/// flight, never the whole file in memory).
pub(crate) fn file_body(mut file: std::fs::File) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        loop {
            let mut chunk = vec![0u8; CHUNK_LEN];
            match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Body::from_stream(stream)
}
