//! Push delivery over HTTP: `GET /apis/statemachine.cn/v1alpha1/deliveries` lists every
//! target's cursor and a page of dead letters; `POST .../deliveries/redrive` marks dead letters
//! for redrive (what `cnsmctl deliveries` and `cnsmctl deliveries redrive` do locally).

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use cnsm_runtime::RuntimeError;
use cnsm_runtime::delivery::RedriveRequest;

use crate::ServerState;
use crate::auth::Caller;
use crate::params::{self, QueryPairs};
use crate::problem::ApiError;
use crate::wire::{
    ANONYMOUS_ACTOR, DeliveryCursorView, DeliveryList, ListMeta, RedriveBody,
    decode_dead_letter_continue, encode_dead_letter_continue,
};

/// Most dead letters one page returns.
pub const DEAD_LETTER_PAGE_LEN_MAX: usize = 1_000;
/// Dead letters per page when `limit` is not given.
pub const DEAD_LETTER_PAGE_LEN_DEFAULT: usize = 500;

/// `GET .../deliveries?target=&limit=&continue=`.
pub async fn list(
    State(state): State<ServerState>,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let query = params::query(query)?;
    let target = params::param(&query, "target")
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    if let Some(t) = &target
        && t.len() > cnsm_store::DELIVERY_TARGET_CHARS_MAX
    {
        return Err(ApiError::invalid(format!(
            "query parameter target: at most {} bytes",
            cnsm_store::DELIVERY_TARGET_CHARS_MAX
        )));
    }
    let limit = params::number::<usize>(&query, "limit")?
        .unwrap_or(DEAD_LETTER_PAGE_LEN_DEFAULT)
        .clamp(1, DEAD_LETTER_PAGE_LEN_MAX);
    let after = match params::param(&query, "continue") {
        None | Some("") => None,
        Some(token) => Some(decode_dead_letter_continue(token).ok_or_else(|| {
            ApiError::invalid("the continue token is not valid; list again from the start")
        })?),
    };
    if let (Some(t), Some((token_target, _))) = (&target, &after)
        && t != token_target
    {
        return Err(ApiError::invalid(
            "the continue token belongs to another target; list again from the start",
        ));
    }
    let store = std::sync::Arc::clone(state.runtime().store());
    let list = tokio::task::spawn_blocking(move || -> Result<DeliveryList, RuntimeError> {
        let cursors = store
            .delivery_cursors()?
            .into_iter()
            .filter(|(name, _)| target.as_ref().is_none_or(|t| t == name))
            .map(|(name, c)| DeliveryCursorView {
                target: name,
                position: c.position,
                lease_node: c.lease_node,
                lease_until_ms: c.lease_until_ms,
            })
            .collect();
        // One more than the page tells whether another page follows.
        let mut dead_letters = store.dead_letters(
            target.as_deref(),
            after.as_ref().map(|(t, p)| (t.as_str(), *p)),
            limit + 1,
        )?;
        let more = dead_letters.len() > limit;
        dead_letters.truncate(limit);
        let continue_token = match dead_letters.last() {
            Some(last) if more => Some(encode_dead_letter_continue(&last.target, last.position)),
            _ => None,
        };
        Ok(DeliveryList {
            cursors,
            dead_letters,
            metadata: ListMeta { continue_token },
        })
    })
    .await
    .map_err(|e| ApiError::from_runtime(RuntimeError::Unavailable(e.to_string())))?
    .map_err(ApiError::from_runtime)?;
    Ok(Json(list).into_response())
}

/// `POST .../deliveries/redrive` with `{"target": "ns/machine/name", "position": 12}` or
/// `{"target": "...", "all": true}`: marks the dead letters; answers how many.
pub async fn redrive(
    State(state): State<ServerState>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = params::body(body)?;
    let media_type = params::media_type(&headers);
    if !params::is_json_like(&media_type) {
        return Err(params::unsupported(&media_type, "application/json"));
    }
    let parsed: RedriveBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::json("the redrive body", &e))?;
    match (parsed.position, parsed.all) {
        (Some(_), true) => {
            return Err(ApiError::invalid(
                "the redrive body names a position and all: give one of them",
            ));
        }
        (None, false) => {
            return Err(ApiError::invalid(
                "the redrive body needs a position, or all: true for every dead letter of the target",
            ));
        }
        _ => {}
    }
    let actor = match caller.as_ref().and_then(|Extension(c)| c.actor()) {
        Some(subject) => subject.to_owned(),
        None => parsed.actor.unwrap_or_else(|| ANONYMOUS_ACTOR.to_owned()),
    };
    let request = RedriveRequest {
        target: parsed.target,
        position: parsed.position,
        actor,
    };
    let runtime = state.runtime().clone();
    let report = tokio::task::spawn_blocking(move || runtime.redrive_dead_letters(&request))
        .await
        .map_err(|e| ApiError::from_runtime(RuntimeError::Unavailable(e.to_string())))?
        .map_err(ApiError::from_runtime)?;
    Ok(Json(report).into_response())
}
