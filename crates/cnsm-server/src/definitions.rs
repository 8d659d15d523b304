//! `statemachines`: apply (JSON or YAML), list, get a revision, delete.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use cnsm_core::admission::admit_str;
use cnsm_runtime::RuntimeError;
use serde_json::{Value, json};

use crate::ServerState;
use crate::params::{self, QueryPairs};
use crate::problem::ApiError;
use crate::wire::{AppliedView, ProblemItem, definition_view, machine_path};

fn is_yaml(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/yaml" | "application/x-yaml" | "text/yaml" | "text/x-yaml"
    )
}

/// The `metadata.namespace` a source names, if any (admission defaults a missing one, so the
/// typed machine cannot tell). Called only on admitted sources: limits are already checked.
fn namespace_in_source(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        metadata: Option<Meta>,
    }
    #[derive(serde::Deserialize)]
    struct Meta {
        namespace: Option<String>,
    }
    let doc: Doc = serde_saphyr::from_str(text).ok()?;
    doc.metadata.and_then(|m| m.namespace)
}

/// `POST .../namespaces/{ns}/statemachines`: 201 for a new revision, 200 when unchanged.
pub async fn apply(
    State(state): State<ServerState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(ns) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let body = params::body(body)?;
    let media_type = params::media_type(&headers);
    let yaml = is_yaml(&media_type);
    if !yaml && !params::is_json_like(&media_type) {
        return Err(params::unsupported(
            &media_type,
            "application/json or application/yaml",
        ));
    }
    let text = params::utf8(&body)?;
    if !yaml && let Err(e) = serde_json::from_str::<Value>(text) {
        return Err(ApiError::json("the definition", &e));
    }
    // JSON is YAML: one admission path gives every problem with its line and column.
    let admission = admit_str(text, None);
    let mut warnings: Vec<ProblemItem> = admission.warnings().map(ProblemItem::from).collect();
    let Some(mut machine) = admission.machine else {
        return Err(ApiError::from_runtime(RuntimeError::Admission(
            admission.problems,
        )));
    };
    if let Some(named) = namespace_in_source(text)
        && named != ns
    {
        return Err(ApiError::invalid(format!(
            "the namespace of the definition ({named}) does not match the namespace of the \
             request path ({ns})"
        ))
        .with("namespace", ns));
    }
    machine.metadata.namespace = ns.clone();
    let applied = state.runtime().apply(machine).await?;
    // The runtime adds what only it can see: states removed under running instances.
    warnings.extend(
        applied
            .warnings
            .iter()
            .filter(|w| w.code == cnsm_core::admission::codes::BREAKING_CHANGE)
            .map(ProblemItem::from),
    );
    let status = if applied.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let view = AppliedView {
        namespace: applied.namespace.clone(),
        name: applied.name.clone(),
        revision: applied.revision,
        hash: applied.hash,
        created: applied.created,
        warnings,
    };
    let mut response = (status, Json(view)).into_response();
    if let Ok(location) = HeaderValue::from_str(&machine_path(&ns, &applied.name)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// `GET .../namespaces/{ns}/statemachines`: the latest revision of each machine.
pub async fn list(
    State(state): State<ServerState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(ns) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    list_in(&state, Some(&ns)).await
}

/// `GET /apis/statemachine.cn/v1alpha1/statemachines`: every namespace.
pub async fn list_all(State(state): State<ServerState>) -> Result<Json<Value>, ApiError> {
    list_in(&state, None).await
}

async fn list_in(state: &ServerState, ns: Option<&str>) -> Result<Json<Value>, ApiError> {
    let rows = state.runtime().definitions(ns).await?;
    let items: Vec<Value> = rows.iter().map(definition_view).collect();
    Ok(Json(json!({ "items": items })))
}

/// `GET .../statemachines/{name}[?revision=N]`.
pub async fn get_one(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: QueryPairs,
) -> Result<Json<Value>, ApiError> {
    let Path((ns, name)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    let query = params::query(query)?;
    let revision: Option<u32> = params::number(&query, "revision")?;
    let row = match state.runtime().definition(&ns, &name, revision).await {
        Ok(row) => row,
        Err(RuntimeError::NotFound(_)) => {
            let detail = match revision {
                Some(r) => format!("statemachine {ns}/{name} revision {r} not found"),
                None => format!("statemachine {ns}/{name} not found"),
            };
            return Err(ApiError::not_found(detail).with("namespace", ns));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Json(definition_view(&row)))
}

/// `DELETE .../statemachines/{name}`: every revision; 409 while instances are active.
pub async fn delete(
    State(state): State<ServerState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path((ns, name)) = path.map_err(params::path_error)?;
    params::namespace(&ns)?;
    state
        .runtime()
        .delete_definition(&ns, &name)
        .await
        .map_err(|e| ApiError::from_runtime(e).with("namespace", ns.clone()))?;
    Ok(Json(
        json!({ "namespace": ns, "name": name, "deleted": true }),
    ))
}
