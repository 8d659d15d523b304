//! Store administration over HTTP: `POST /apis/statemachine.cn/v1alpha1/backup` streams a
//! consistent point-in-time copy of the store, taken while the server keeps serving.

use std::io::Read;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use cnsm_runtime::RuntimeError;

use crate::ServerState;
use crate::problem::ApiError;

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
    let mut file = file.map_err(|e| {
        ApiError::from_runtime(RuntimeError::Unavailable(format!(
            "cannot read the backup: {e}"
        )))
    })?;
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
    let mut response = Response::new(Body::from_stream(stream));
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
