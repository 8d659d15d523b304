//! Operator controls: `POST .../instances/{id}/cancel|suspend|resume|redrive`, and
//! `POST .../instances/{id}/erase` (erasure of personal data).
//!
//! Each is one history record with the acting subject (the token's name when authentication
//! is on), ordered with the instance's events through the runtime's queue. A control's body is
//! optional: `{"reason": "..."}` (kept on a cancel) and, without authentication,
//! `{"actor": "..."}`. An erasure needs a body: `{}` erases all data and payloads,
//! `{"fields": ["address.zip"], "reason": "..."}` only the values at those paths.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use cnsm_runtime::{Control, ControlRequest, EraseRequest};
use serde::Deserialize;

use crate::ServerState;
use crate::auth::Caller;
use crate::params;
use crate::problem::ApiError;
use crate::wire::{ANONYMOUS_ACTOR, TransitionView};

/// The optional body of a control request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ControlBody {
    reason: Option<String>,
    actor: Option<String>,
}

async fn control(
    state: ServerState,
    path: Result<Path<(String, String)>, PathRejection>,
    caller: Option<Extension<Caller>>,
    deadline: Option<Extension<crate::RequestDeadline>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    action: Control,
) -> Result<Response, ApiError> {
    let Path((ns, id)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let body = params::body(body)?;
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        ControlBody::default()
    } else {
        let media_type = params::media_type(&headers);
        if !params::is_json_like(&media_type) {
            return Err(params::unsupported(&media_type, "application/json"));
        }
        serde_json::from_slice(&body).map_err(|e| ApiError::json("the control body", &e))?
    };
    let mut request = ControlRequest::new(action);
    request.reason = parsed.reason;
    request.actor = acting_subject(caller.as_ref(), parsed.actor);
    // The runtime answers Timeout by the request's deadline (counted on the transition metrics
    // and span), ahead of the middleware's own answer.
    request.deadline = deadline.map(|Extension(d)| d.0);
    let outcome = state
        .runtime()
        .control(&ns, &id, request)
        .await
        .map_err(|e| {
            ApiError::from_runtime(e)
                .at_instance(&ns, &id)
                .with("event", action.as_str())
        })?;
    Ok(answer(outcome))
}

macro_rules! control_handler {
    ($name:ident, $action:expr) => {
        pub async fn $name(
            State(state): State<ServerState>,
            path: Result<Path<(String, String)>, PathRejection>,
            caller: Option<Extension<Caller>>,
            deadline: Option<Extension<crate::RequestDeadline>>,
            headers: HeaderMap,
            body: Result<Bytes, BytesRejection>,
        ) -> Result<Response, ApiError> {
            control(state, path, caller, deadline, headers, body, $action).await
        }
    };
}

control_handler!(cancel, Control::Cancel);
control_handler!(suspend, Control::Suspend);
control_handler!(resume, Control::Resume);
control_handler!(redrive, Control::Redrive);

/// The body of an erasure request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct EraseBody {
    /// Dotted data paths; absent or empty: all data and payloads.
    #[serde(default)]
    fields: Vec<String>,
    reason: Option<String>,
    actor: Option<String>,
}

/// `POST .../instances/{id}/erase`: one `erasure` record, the redacted records rewritten in the
/// same transaction; answers the erasure record and the instance after it.
pub async fn erase(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, id)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let body = params::body(body)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the erase body: a JSON object is required ({} erases all data and payloads)",
        ));
    }
    let media_type = params::media_type(&headers);
    if !params::is_json_like(&media_type) {
        return Err(params::unsupported(&media_type, "application/json"));
    }
    let parsed: EraseBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::json("the erase body", &e))?;
    let request = EraseRequest {
        fields: parsed.fields,
        reason: parsed.reason,
        trace: None,
        actor: acting_subject(caller.as_ref(), parsed.actor),
    };
    let outcome = state
        .runtime()
        .erase(&ns, &id, request)
        .await
        .map_err(|e| {
            ApiError::from_runtime(e)
                .at_instance(&ns, &id)
                .with("event", "erase")
        })?;
    Ok(answer(outcome))
}

/// Who acts: the authenticated subject, else the actor the body claims, else anonymous.
fn acting_subject(caller: Option<&Extension<Caller>>, claimed: Option<String>) -> String {
    match caller.and_then(|Extension(c)| c.actor()) {
        Some(subject) => subject.to_owned(),
        None => claimed.unwrap_or_else(|| ANONYMOUS_ACTOR.to_owned()),
    }
}

/// 200 with the record and the instance after it, and the instance's `ETag`.
fn answer(outcome: cnsm_runtime::TransitionOutcome) -> Response {
    let version = outcome.instance.version;
    let view = TransitionView {
        record: outcome.record,
        hash: outcome.hash,
        instance: outcome.instance,
        replayed: false,
    };
    crate::instances::with_etag(StatusCode::OK, &view, version)
}
