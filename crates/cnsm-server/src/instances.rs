//! `instances`: create, get (with `ETag`), list (filters and pagination), events (with
//! `If-Match` and `Idempotency-Key`), history, and the entry points of watch streams.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use cnsm_core::{Instance, Status};
use cnsm_runtime::{CreateInstance, RuntimeError};
use cnsm_store::InstanceQuery;

use crate::ServerState;
use crate::auth::Caller;
use crate::params::{self, QueryPairs};
use crate::problem::{ApiError, ProblemKind};
use crate::watch_stream::{self, CollectionFilter};
use crate::wire::{
    ANONYMOUS_ACTOR, CreateInstanceBody, HISTORY_PAGE_LEN_DEFAULT, HISTORY_PAGE_LEN_MAX,
    HistoryItem, HistoryPage, InstanceList, LIST_PAGE_LEN_DEFAULT, LIST_PAGE_LEN_MAX, ListMeta,
    TransitionView, decode_continue, encode_continue, instance_path,
};

/// A JSON response with an `ETag` holding the instance version.
pub(crate) fn with_etag(status: StatusCode, body: impl serde::Serialize, version: u64) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&params::etag(version)) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// `POST .../namespaces/{ns}/instances`: 201 with `ETag: "0"` and `Location`.
pub async fn create(
    State(state): State<ServerState>,
    path: Result<Path<String>, PathRejection>,
    caller: Option<Extension<Caller>>,
    deadline: Option<Extension<crate::RequestDeadline>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let body = params::body(body)?;
    let media_type = params::media_type(&headers);
    if !params::is_json_like(&media_type) {
        return Err(params::unsupported(&media_type, "application/json"));
    }
    let parsed: CreateInstanceBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::json("the instance body", &e))?;
    let mut request =
        CreateInstance::new(&ns, &parsed.machine).data(parsed.data.unwrap_or_default());
    request.id = parsed.id;
    request.labels = parsed.labels;
    request.revision = parsed.revision;
    // Timeout by the request's deadline, counted on the transition metrics and span.
    request.deadline = deadline.map(|Extension(d)| d.0);
    request.actor = match caller.as_ref().and_then(|Extension(c)| c.actor()) {
        // With authentication on, the actor is the token's subject, whatever the body says.
        Some(subject) => subject.to_owned(),
        None => parsed.actor.unwrap_or_else(|| ANONYMOUS_ACTOR.to_owned()),
    };
    let requested_id = request.id.clone();
    let instance = state
        .runtime()
        .create_instance(request)
        .await
        .map_err(|e| {
            let problem = ApiError::from_runtime(e).with("namespace", ns.clone());
            match requested_id {
                Some(id) => problem.with("instanceId", id),
                None => problem,
            }
        })?;
    let mut response = with_etag(StatusCode::CREATED, &instance, instance.version);
    if let Ok(location) = HeaderValue::from_str(&instance_path(&ns, &instance.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET .../instances/{id}` (`ETag: "<version>"`), or its watch stream with `?watch=true`.
pub async fn get_one(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: QueryPairs,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((ns, id)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let query = params::query(query)?;
    if params::flag(&query, "watch")? {
        let resume = resume_point(&query, &headers)?;
        return watch_stream::watch_instance(state, ns, id, resume).await;
    }
    let instance = state
        .runtime()
        .instance(&ns, &id)
        .await
        .map_err(|e| ApiError::from_runtime(e).at_instance(&ns, &id))?;
    Ok(with_etag(StatusCode::OK, &instance, instance.version))
}

/// Where a watch of one instance resumes: `Last-Event-ID` (a version, or `...@<version>`),
/// else `?resourceVersion=`.
fn resume_point(query: &[(String, String)], headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    if let Some(text) = params::header_text(headers, "last-event-id")?
        && !text.is_empty()
    {
        let version = text.rsplit('@').next().unwrap_or(text);
        return version.parse().map(Some).map_err(|_| {
            ApiError::invalid(format!(
                "Last-Event-ID must be an instance version (or <instance>@<version>), got '{text}'"
            ))
        });
    }
    params::number(query, "resourceVersion")
}

/// The filters of a list or a collection watch.
fn filter_of(query: &[(String, String)], ns: Option<&str>) -> Result<CollectionFilter, ApiError> {
    let status = match params::param(query, "status") {
        None | Some("") => None,
        Some(text) => Some(Status::parse(text).ok_or_else(|| {
            ApiError::invalid(format!(
                "query parameter 'status' must be active, succeeded, failed or cancelled, got '{text}'"
            ))
        })?),
    };
    let mut labels = Vec::new();
    if let Some(selector) = params::param(query, "labelSelector") {
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
    }
    let text = |name: &str| {
        params::param(query, name)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    Ok(CollectionFilter {
        namespace: ns.map(str::to_owned),
        machine: text("machine"),
        state: text("state"),
        status,
        labels,
    })
}

/// `GET .../namespaces/{ns}/instances`: filters, pagination, or a watch stream.
pub async fn list(
    State(state): State<ServerState>,
    path: Result<Path<String>, PathRejection>,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    list_in(state, Some(&ns), params::query(query)?).await
}

/// `GET /apis/statemachine.cn/v1alpha1/instances`: every namespace.
pub async fn list_all(
    State(state): State<ServerState>,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    list_in(state, None, params::query(query)?).await
}

async fn list_in(
    state: ServerState,
    ns: Option<&str>,
    query: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    let filter = filter_of(&query, ns)?;
    if params::flag(&query, "watch")? {
        return watch_stream::watch_collection(state, filter).await;
    }
    let limit = params::number::<usize>(&query, "limit")?
        .unwrap_or(LIST_PAGE_LEN_DEFAULT)
        .clamp(1, LIST_PAGE_LEN_MAX);
    let after = match params::param(&query, "continue") {
        None | Some("") => None,
        Some(token) => Some(decode_continue(token).ok_or_else(|| {
            ApiError::invalid("the continue token is not valid; list again from the start")
        })?),
    };
    if let (Some(ns), Some((token_ns, _))) = (ns, &after)
        && token_ns != ns
    {
        return Err(ApiError::invalid(
            "the continue token belongs to another namespace; list again from the start",
        ));
    }
    let store_query = InstanceQuery {
        namespace: filter.namespace.clone(),
        machine: filter.machine.clone(),
        state: filter.state.clone(),
        status: filter.status,
        labels: filter.labels.clone(),
        after,
        // One more than the page tells whether another page follows.
        limit: limit + 1,
    };
    let mut items: Vec<Instance> = state.runtime().list_instances(&store_query).await?;
    let more = items.len() > limit;
    items.truncate(limit);
    let continue_token = match items.last() {
        Some(last) if more => Some(encode_continue(&last.namespace, &last.id)),
        _ => None,
    };
    Ok(Json(InstanceList {
        items,
        metadata: ListMeta { continue_token },
    })
    .into_response())
}

/// `POST .../instances/{id}/events`: plain JSON or a CloudEvent; `If-Match` makes it a
/// compare-and-swap. Answers the record, its hash, the instance after it and the new `ETag`.
pub async fn send_event(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
    caller: Option<Extension<Caller>>,
    deadline: Option<Extension<crate::RequestDeadline>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((ns, id)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let body = params::body(body)?;
    let mut event = crate::events::parse(&headers, &body).map_err(|e| e.at_instance(&ns, &id))?;
    // The runtime answers Timeout by the request's deadline (counted on the transition metrics
    // and span), ahead of the middleware's own answer.
    event.deadline = deadline.map(|Extension(d)| d.0);
    if let Some(subject) = caller.as_ref().and_then(|Extension(c)| c.actor()) {
        // With authentication on, the actor is the token's subject, whatever the body says.
        event.actor = subject.to_owned();
    }
    let event_name = event.name.clone();
    let outcome = match state.runtime().send(&ns, &id, event).await {
        Ok(outcome) => outcome,
        Err(error) => return Err(event_error(&state, &ns, &id, &event_name, error).await),
    };
    let version = outcome.instance.version;
    let view = TransitionView {
        record: outcome.record,
        hash: outcome.hash,
        instance: outcome.instance,
        replayed: outcome.replayed,
    };
    Ok(with_etag(StatusCode::OK, &view, version))
}

/// The problem of a rejected event, with the instance's current state where it helps (a stale
/// or racing caller wants to know where the instance is now).
async fn event_error(
    state: &ServerState,
    ns: &str,
    id: &str,
    event: &str,
    error: RuntimeError,
) -> ApiError {
    let mut problem = ApiError::from_runtime(error)
        .at_instance(ns, id)
        .with("event", event);
    if matches!(
        problem.kind,
        ProblemKind::StaleState | ProblemKind::RaceCondition
    ) && !problem.extensions.contains_key("state")
        && let Ok(current) = state.runtime().instance(ns, id).await
    {
        problem = problem.with("state", current.state.to_string());
    }
    problem
}

/// `GET .../instances/{id}/history?from=&limit=` (at most 1000 records a page).
pub async fn history(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: QueryPairs,
) -> Result<Json<HistoryPage>, ApiError> {
    let Path((ns, id)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let query = params::query(query)?;
    let from: u64 = params::number(&query, "from")?.unwrap_or(0);
    let limit = params::number::<usize>(&query, "limit")?
        .unwrap_or(HISTORY_PAGE_LEN_DEFAULT)
        .clamp(1, HISTORY_PAGE_LEN_MAX);
    let entries = state
        .runtime()
        .history(&ns, &id, from, limit + 1)
        .await
        .map_err(|e| ApiError::from_runtime(e).at_instance(&ns, &id))?;
    let mut items: Vec<HistoryItem> = entries
        .into_iter()
        .map(|e| HistoryItem {
            record: e.record,
            hash: e.hash,
        })
        .collect();
    let next = (items.len() > limit).then(|| {
        items.truncate(limit);
        items.last().map_or(from, |last| last.record.version + 1)
    });
    Ok(Json(HistoryPage { items, next }))
}
