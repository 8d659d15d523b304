//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the route table
//! ([`crate::routes::ROUTES`]) the router is built from, so every route, parameter, body and
//! error status in it is one the server has.
//!
//! ```
//! let document = cnsm_server::openapi::document();
//! assert_eq!(document["openapi"], "3.1.0");
//! assert!(document["paths"]["/health/livez"]["get"].is_object());
//! ```

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::ServerState;
use crate::auth::Access;
use crate::problem::ProblemKind;
use crate::routes::{ROUTES, Route};
use crate::wire::{
    CONTENT_TYPE_CLOUDEVENTS, CONTENT_TYPE_EVENT_STREAM, CONTENT_TYPE_PROBLEM,
    HISTORY_PAGE_LEN_MAX, LIST_PAGE_LEN_MAX, PROBLEM_TYPE_BASE,
};

/// `GET /openapi.json`.
pub async fn serve_document(State(state): State<ServerState>) -> Response {
    static WITH_AUTH: OnceLock<Vec<u8>> = OnceLock::new();
    static WITHOUT_AUTH: OnceLock<Vec<u8>> = OnceLock::new();
    let auth = state.options().auth.is_some();
    let cell = if auth { &WITH_AUTH } else { &WITHOUT_AUTH };
    let bytes =
        cell.get_or_init(|| serde_json::to_vec_pretty(&document_for(auth)).unwrap_or_default());
    let mut response = bytes.clone().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A query parameter's schema and description.
fn query_parameter(name: &str) -> Value {
    let (schema, description) = match name {
        "watch" => (
            json!({"type": "boolean"}),
            "Stream changes as Server-Sent Events (text/event-stream) instead of answering once",
        ),
        "machine" => (json!({"type": "string"}), "Only instances of this machine"),
        "state" => (json!({"type": "string"}), "Only instances in this state"),
        "status" => (
            json!({"type": "string", "enum": ["active", "succeeded", "failed", "cancelled"]}),
            "Only instances with this status",
        ),
        "labelSelector" => (
            json!({"type": "string"}),
            "key=value pairs, comma-separated; every pair must match",
        ),
        "limit" => (
            json!({"type": "integer", "minimum": 0,
                   "x-cnsm-clamped-to": LIST_PAGE_LEN_MAX.max(HISTORY_PAGE_LEN_MAX)}),
            "Items per page; larger values are clamped to the route's maximum (x-cnsm-clamped-to)",
        ),
        "continue" => (
            json!({"type": "string"}),
            "The metadata.continue of the previous page",
        ),
        "revision" => (
            json!({"type": "integer", "minimum": 1}),
            "A revision instead of the latest",
        ),
        "resourceVersion" => (
            json!({"type": "integer", "minimum": 0}),
            "With watch=true: replay the history after this version first",
        ),
        "from" => (
            json!({"type": "integer", "minimum": 0}),
            "The first version of the page",
        ),
        "instance" => (
            id_schema(),
            "Only this instance (instead of every instance of the namespace)",
        ),
        "replace" => (
            json!({"type": "boolean"}),
            "Replace instances that already exist instead of refusing the whole import",
        ),
        "since" => (
            json!({"type": "string", "examples": ["2026-11-27T10:00:00Z", "1200"]}),
            "Only records at or after this RFC 3339 UTC time (or date), or, given a number, after \
             that commit position (event.sequence)",
        ),
        "target" => (
            json!({"type": "string", "maxLength": 512, "examples": ["shop/order-processing/fulfilment"]}),
            "Only this notify target (namespace/machine/name)",
        ),
        "format" => (
            json!({"type": "string", "enum": ["json", "text"]}),
            "text: human-readable instead of JSON",
        ),
        _ => (json!({"type": "string"}), ""),
    };
    json!({"name": name, "in": "query", "required": false, "schema": schema, "description": description})
}

/// A request header's schema and description.
fn header_parameter(name: &str) -> Value {
    let (schema, description) = match name {
        "If-Match" => (
            json!({"type": "string", "examples": ["\"3\""]}),
            "The expected instance version (an ETag); the event is a compare-and-swap: 412 when \
             already behind on arrival, 409 when a concurrent commit won",
        ),
        "Idempotency-Key" => (
            json!({"type": "string", "maxLength": 512}),
            "Replays the original answer for a repeated key; 409 when reused with another request",
        ),
        "Last-Event-ID" => (
            json!({"type": "string"}),
            "With watch=true: resume after this version (or <instance>@<version>)",
        ),
        "traceparent" => (
            json!({"type": "string"}),
            "W3C trace context: the parent of the transition span; the record keeps the span's ids",
        ),
        "tracestate" => (
            json!({"type": "string"}),
            "W3C trace state, carried into the transition span",
        ),
        "ce-tracestate" => (
            json!({"type": "string"}),
            "Binary-mode CloudEvent: distributed-tracing extension (trace state)",
        ),
        "ce-specversion" => (
            json!({"type": "string", "const": "1.0"}),
            "Binary-mode CloudEvent: spec version",
        ),
        "ce-id" => (
            json!({"type": "string", "minLength": 1}),
            "Binary-mode CloudEvent: id (with source, the idempotency key)",
        ),
        "ce-source" => (
            json!({"type": "string", "minLength": 1}),
            "Binary-mode CloudEvent: source",
        ),
        "ce-type" => (
            json!({"type": "string", "minLength": 1}),
            "Binary-mode CloudEvent: type (the event name)",
        ),
        "ce-traceparent" => (
            json!({"type": "string"}),
            "Binary-mode CloudEvent: distributed-tracing extension",
        ),
        _ => (json!({"type": "string"}), ""),
    };
    json!({"name": name, "in": "header", "required": false, "schema": schema, "description": description})
}

/// Namespaces and machine names: lowercase RFC 1123 labels (`cnsm_runtime::validate_name`).
fn name_schema() -> Value {
    json!({"type": "string", "pattern": NAME_PATTERN, "minLength": 1, "maxLength": 63})
}

/// Instance ids: 1 to 253 of `[A-Za-z0-9._:-]` (`cnsm_runtime::validate_id`).
fn id_schema() -> Value {
    json!({"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": 253})
}

const NAME_PATTERN: &str = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$";
const ID_PATTERN: &str = "^[A-Za-z0-9._:-]+$";

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn header_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/headers/{name}")})
}

fn request_body(name: &str) -> Value {
    let content = match name {
        "StateMachine" => json!({
            "application/json": {"schema": schema_ref("StateMachine")},
            "application/yaml": {"schema": {"type": "string"}},
        }),
        "Event" => json!({
            "application/json": {"schema": schema_ref("Event")},
            CONTENT_TYPE_CLOUDEVENTS: {"schema": schema_ref("CloudEvent")},
        }),
        // application/octet-stream is accepted too (generic HTTP tools and fuzzers send it).
        "SnapshotPayload" => json!({
            crate::snapshots::SNAPSHOT_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }),
        other => json!({"application/json": {"schema": schema_ref(other)}}),
    };
    // A control's body is optional (an empty body is an empty request).
    json!({"required": name != "Control", "content": content})
}

fn success_response(route: &Route, status: u16, body: &str) -> Value {
    let mut content = Map::new();
    if body == "Text" {
        content.insert("text/plain".into(), json!({"schema": {"type": "string"}}));
    } else if body == "Metrics" {
        content.insert("text/plain".into(), json!({"schema": {"type": "string"}}));
        content.insert(
            "application/openmetrics-text".into(),
            json!({"schema": {"type": "string"}, "description": "OpenMetrics 1.0 with exemplars (trace ids) on cnsm_transition_duration_seconds buckets"}),
        );
    } else if body == "AuditLines" {
        content.insert(
            crate::admin::NDJSON_MEDIA_TYPE.into(),
            json!({"schema": {"type": "string"}, "description": "One ECS 9.x JSON object per line"}),
        );
    } else if body == "Backup" {
        content.insert(
            "application/octet-stream".into(),
            json!({"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}),
        );
    } else if body == "SnapshotPayload" {
        content.insert(
            crate::snapshots::SNAPSHOT_MEDIA_TYPE.into(),
            json!({"schema": {"type": "string", "format": "binary"}}),
        );
    } else {
        content.insert(
            "application/json".into(),
            json!({"schema": schema_ref(body)}),
        );
    }
    if route.query.contains(&"format") {
        content.insert("text/plain".into(), json!({"schema": {"type": "string"}}));
    }
    if route.query.contains(&"watch") {
        content.insert(
            CONTENT_TYPE_EVENT_STREAM.into(),
            json!({"schema": {"type": "string", "description": "Server-Sent Events (watch=true)"}}),
        );
    }
    let mut headers = Map::new();
    if matches!(body, "Instance" | "Transition") {
        headers.insert("ETag".into(), header_ref("ETag"));
    }
    if status == 201 {
        headers.insert("Location".into(), header_ref("Location"));
    }
    let description = match status {
        201 => "Created",
        _ => "OK",
    };
    let mut response = json!({"description": description, "content": content});
    if !headers.is_empty() {
        response["headers"] = Value::Object(headers);
    }
    response
}

/// Every problem a route can answer with, 401 and 403 included when it needs a token.
pub fn error_kinds(route: &Route) -> Vec<ProblemKind> {
    let mut kinds = route.errors.to_vec();
    // The request timeout applies to every route that can be unavailable.
    if kinds.contains(&ProblemKind::Unavailable) {
        kinds.push(ProblemKind::Timeout);
    }
    if route.access != Access::Open {
        kinds.push(ProblemKind::Unauthorized);
        kinds.push(ProblemKind::Forbidden);
    }
    kinds
}

/// Every status a route is documented to answer with.
pub fn statuses(route: &Route) -> Vec<u16> {
    let mut statuses: Vec<u16> = route.ok.iter().map(|(status, _)| *status).collect();
    statuses.extend(error_kinds(route).iter().map(|k| k.status().as_u16()));
    statuses.sort_unstable();
    statuses.dedup();
    statuses
}

fn operation(route: &Route) -> Value {
    let mut parameters: Vec<Value> = Vec::new();
    for segment in route.path.split('/') {
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let (description, schema) = match name {
                "ns" => ("Namespace (an RFC 1123 label)", name_schema()),
                "name" => ("Machine name (an RFC 1123 label)", name_schema()),
                _ => ("Instance id", id_schema()),
            };
            parameters.push(json!({
                "name": name, "in": "path", "required": true,
                "schema": schema, "description": description,
            }));
        }
    }
    parameters.extend(route.query.iter().map(|q| query_parameter(q)));
    parameters.extend(route.headers.iter().map(|h| header_parameter(h)));

    let mut responses = Map::new();
    for (status, body) in route.ok {
        responses.insert(status.to_string(), success_response(route, *status, body));
    }
    let mut by_status: BTreeMap<u16, Vec<ProblemKind>> = BTreeMap::new();
    for kind in error_kinds(route) {
        by_status
            .entry(kind.status().as_u16())
            .or_default()
            .push(kind);
    }
    for (status, kinds) in by_status {
        let names: Vec<&str> = kinds.iter().map(|k| k.error_type()).collect();
        let types: Vec<String> = kinds.iter().map(|k| k.type_uri()).collect();
        let mut response = json!({
            "description": format!("{} ({})", kinds[0].title(), names.join(", ")),
            "content": {CONTENT_TYPE_PROBLEM: {"schema": {
                "allOf": [schema_ref("Problem")],
                "properties": {"type": {"enum": types}},
            }}},
        });
        if status == 503 {
            response["headers"] = json!({"Retry-After": header_ref("Retry-After")});
        }
        if status == 401 {
            response["headers"] = json!({"WWW-Authenticate": header_ref("WWW-Authenticate")});
        }
        responses.insert(status.to_string(), response);
    }

    let mut operation = json!({
        "operationId": route.operation_id,
        "summary": route.summary,
        "parameters": parameters,
        "responses": responses,
        "tags": [tag(route)],
    });
    operation["security"] = match route.access {
        Access::Open => json!([]),
        _ => json!([{"bearer": []}]),
    };
    if let Some(role) = access_role(route.access) {
        operation["x-cnsm-role"] = json!(role);
    }
    if let Some(body) = route.body {
        operation["requestBody"] = request_body(body);
    }
    operation
}

fn access_role(access: Access) -> Option<String> {
    match access {
        Access::Open => None,
        Access::Namespace(role) => Some(format!("{} in the namespace", role.as_str())),
        Access::AllNamespaces(role) => Some(format!("{} on \"*\"", role.as_str())),
    }
}

fn tag(route: &Route) -> &'static str {
    if route.path.contains("statemachines") {
        "statemachines"
    } else if route.path.contains("instances") {
        "instances"
    } else {
        "operations"
    }
}

fn schemas() -> Value {
    let problem_types: Vec<String> = ProblemKind::ALL.iter().map(|k| k.type_uri()).collect();
    let error_types: Vec<&str> = {
        let mut names: Vec<&str> = ProblemKind::ALL.iter().map(|k| k.error_type()).collect();
        names.sort_unstable();
        names.dedup();
        names
    };
    let mut schemas = json!({
        "Problem": {
            "type": "object",
            "description": format!("RFC 9457 problem details; `type` is {PROBLEM_TYPE_BASE}<kind>"),
            "required": ["type", "title", "status", "detail", "instance", "errorType"],
            "properties": {
                "type": {"type": "string", "enum": problem_types},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "instance": {"type": "string", "description": "The request path"},
                "errorType": {"type": "string", "enum": error_types},
                "namespace": {"type": "string"},
                "instanceId": {"type": "string"},
                "state": {"type": "string"},
                "event": {"type": "string"},
                "reason": {"type": "string"},
                "expectedVersion": {"type": "integer"},
                "actualVersion": {"type": "integer"},
                "requiredRole": {"type": "string", "enum": ["reader", "writer", "admin"]},
                "problems": {"type": "array", "items": schema_ref("AdmissionProblem")},
            },
        },
        "AdmissionProblem": {
            "type": "object",
            "properties": {
                "severity": {"type": "string"},
                "path": {"type": "string"},
                "line": {"type": "integer"},
                "column": {"type": "integer"},
                "message": {"type": "string"},
            },
        },
        "StateMachine": {
            "type": "object",
            "description": "A statemachine.cn/v1alpha1 StateMachine resource (docs/resource.md)",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": "statemachine.cn/v1alpha1"},
                "kind": {"const": "StateMachine"},
                "metadata": {"type": "object", "required": ["name"], "properties": {
                    "name": name_schema(),
                    "namespace": name_schema(),
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                }},
                "spec": {"type": "object", "required": ["initialState", "states"], "properties": {
                    "initialState": {"type": "string", "minLength": 1},
                    "states": {"type": "array", "minItems": 1, "items": {"type": "object"}},
                    "retention": {"type": "object", "properties": {
                        "finishedAfterDays": {"type": "integer", "minimum": 1, "maximum": 36500},
                    }},
                }},
            },
        },
        "Definition": {
            "allOf": [schema_ref("StateMachine")],
            "properties": {"status": {"type": "object", "properties": {
                "revision": {"type": "integer"},
                "hash": {"type": "string"},
                "createdMs": {"type": "integer"},
            }}},
        },
        "DefinitionList": {
            "type": "object", "required": ["items"],
            "properties": {"items": {"type": "array", "items": schema_ref("Definition")}},
        },
        "Applied": {
            "type": "object",
            "required": ["namespace", "name", "revision", "hash", "created"],
            "properties": {
                "namespace": {"type": "string"},
                "name": {"type": "string"},
                "revision": {"type": "integer"},
                "hash": {"type": "string"},
                "created": {"type": "boolean"},
                "warnings": {"type": "array", "items": schema_ref("AdmissionProblem")},
            },
        },
        "ImportReport": {
            "type": "object",
            "required": ["nInstances", "nRecords", "nReplaced", "nDefinitionsCreated", "nTimers"],
            "properties": {
                "nInstances": {"type": "integer"},
                "nRecords": {"type": "integer"},
                "nReplaced": {"type": "integer"},
                "nDefinitionsCreated": {"type": "integer"},
                "nTimers": {"type": "integer"},
            },
        },
        "Deleted": {
            "type": "object",
            "properties": {
                "namespace": {"type": "string"},
                "name": {"type": "string"},
                "deleted": {"type": "boolean"},
            },
        },
        "CreateInstance": {
            "type": "object", "required": ["machine"], "additionalProperties": false,
            "properties": {
                "id": id_schema(),
                "machine": name_schema(),
                "data": {"type": "object"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "revision": {"type": "integer", "minimum": 1},
                "actor": {"type": "string", "description": "Ignored when the server has --auth-file (the token's name is recorded)"},
            },
        },
        "Event": {
            "type": "object", "required": ["event"], "additionalProperties": false,
            "properties": {
                "event": {"type": "string", "minLength": 1, "maxLength": 253},
                "payload": {},
                "actor": {"type": "string", "description": "Ignored when the server has --auth-file (the token's name is recorded)"},
            },
        },
        "Rollout": {
            "type": "object", "required": ["latest", "activeByRevision"],
            "properties": {
                "latest": {"type": "integer"},
                "rollout": {"type": "object", "required": ["stable", "canary", "weight"], "properties": {
                    "stable": {"type": "integer"},
                    "canary": {"type": "integer"},
                    "weight": {"type": "integer", "minimum": 0, "maximum": 100},
                    "flag": {"type": "string", "description": "Routing by this flag: its value names the revision"},
                }},
                "activeByRevision": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
        "RolloutChange": {
            "type": "object", "additionalProperties": false, "required": ["action"],
            "properties": {
                "action": {"enum": ["set", "promote", "abort"]},
                "revision": {"type": "integer", "minimum": 1},
                "weight": {"type": "integer", "minimum": 0, "maximum": 100},
                "flag": {"type": "string", "minLength": 1, "maxLength": 256, "description": "set: route by this flag instead of revision and weight"},
            },
        },
        "Migration": {
            "type": "object", "additionalProperties": false,
            "required": ["policy", "fromRevision", "toRevision"],
            "properties": {
                "policy": {"type": "string", "description": "The StateMigrationPolicy as YAML"},
                "fromRevision": {"type": "integer", "minimum": 1},
                "toRevision": {"type": "integer", "minimum": 1},
                "dryRun": {"type": "boolean"},
                "rollback": {"type": "boolean"},
                "phase": {"enum": ["all", "pre", "post"]},
                "chunk": {"type": "integer", "minimum": 0},
                "actor": {"type": "string"},
            },
        },
        "MigrationReport": {
            "type": "object", "required": ["migrated", "blocked", "entries"],
            "properties": {
                "migrated": {"type": "integer"},
                "blocked": {"type": "integer"},
                "entries": {"type": "array", "items": {
                    "type": "object", "required": ["id", "outcome"],
                    "properties": {
                        "id": {"type": "string"},
                        "outcome": {"enum": ["would-migrate", "migrated", "locked", "blocked"]},
                        "from": {"type": "string"},
                        "to": {"type": "string"},
                        "reason": {"type": "string"},
                    },
                }},
            },
        },
        "Control": {
            "type": "object", "additionalProperties": false,
            "properties": {
                "reason": {"type": "string", "maxLength": 1024, "description": "Why; kept on the record of a cancel"},
                "actor": {"type": "string", "description": "Ignored when the server has --auth-file (the token's name is recorded)"},
            },
        },
        "CloudEvent": {
            "type": "object", "required": ["specversion", "id", "source", "type"],
            "properties": {
                "specversion": {"const": "1.0"},
                "id": {"type": "string", "minLength": 1},
                "source": {"type": "string", "minLength": 1},
                "type": {"type": "string", "minLength": 1},
                "datacontenttype": {
                    "type": "string",
                    "pattern": "^\\s*([Aa][Pp][Pp][Ll][Ii][Cc][Aa][Tt][Ii][Oo][Nn]/([Jj][Ss][Oo][Nn]|[^;]*\\+[Jj][Ss][Oo][Nn])|[Tt][Ee][Xx][Tt]/[Jj][Ss][Oo][Nn])\\s*(;.*)?$",
                    "description": "A JSON media type: application/json, text/json or any +json",
                },
                "data": {},
                "traceparent": {"type": "string"},
            },
        },
        "Instance": {
            "type": "object",
            "required": ["namespace", "id", "machine", "revision", "state", "status", "data", "version"],
            "properties": {
                "namespace": {"type": "string"},
                "id": {"type": "string"},
                "machine": {"type": "string"},
                "revision": {"type": "integer"},
                "revisionHash": {"type": "string"},
                "state": {"type": "string"},
                "status": {"type": "string", "enum": ["active", "succeeded", "failed", "cancelled"]},
                "phase": {"type": "string"},
                "data": {"type": "object"},
                "version": {"type": "integer"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "createdMs": {"type": "integer"},
                "updatedMs": {"type": "integer"},
                "lastHash": {"type": "string"},
            },
        },
        "InstanceList": {
            "type": "object", "required": ["items"],
            "properties": {
                "items": {"type": "array", "items": schema_ref("Instance")},
                "metadata": {"type": "object", "properties": {"continue": {"type": "string"}}},
            },
        },
        "HistoryRecord": {
            "type": "object",
            "required": ["namespace", "instance", "version", "kind", "to", "status", "actor", "timeMs", "prevHash"],
            "properties": {
                "namespace": {"type": "string"},
                "instance": {"type": "string"},
                "machine": {"type": "string"},
                "version": {"type": "integer"},
                "kind": {"type": "string"},
                "from": {"type": "string"},
                "to": {"type": "string"},
                "event": {"type": "string"},
                "payload": {},
                "status": {"type": "string"},
                "actor": {"type": "string"},
                "idempotencyKey": {"type": "string"},
                "timeMs": {"type": "integer"},
                "prevHash": {"type": "string"},
                "erasure": schema_ref("ErasureList"),
            },
        },
        "Transition": {
            "type": "object", "required": ["record", "hash", "instance"],
            "properties": {
                "record": schema_ref("HistoryRecord"),
                "hash": {"type": "string"},
                "instance": schema_ref("Instance"),
                "replayed": {"type": "boolean"},
            },
        },
        "HistoryPage": {
            "type": "object", "required": ["items"],
            "properties": {
                "items": {"type": "array", "items": {"type": "object", "properties": {
                    "record": schema_ref("HistoryRecord"),
                    "hash": {"type": "string"},
                }}},
                "next": {"type": "integer"},
            },
        },
        "Statez": {"type": "object", "description": "Store, commits, queue, instances, timers, version, uptime"},
        "Debug": {"type": "object", "description": "Counts by machine, revision and state; recent transitions and errors"},
        "OpenApi": {"type": "object", "description": "An OpenAPI 3.1 document"},
    });
    // Kept apart: one `json!` with every schema passes the macro recursion limit.
    if let Value::Object(map) = &mut schemas {
        map.extend(erasure_schemas().as_object().cloned().unwrap_or_default());
        map.extend(delivery_schemas().as_object().cloned().unwrap_or_default());
    }
    schemas
}

/// The erasure request and the `erasure` member of an erasure record.
fn erasure_schemas() -> Value {
    json!({
        "Erase": {
            "type": "object", "additionalProperties": false,
            "properties": {
                "fields": {
                    "type": "array", "maxItems": 256,
                    "items": {"type": "string", "minLength": 1, "maxLength": 1024},
                    "description": "Dotted data paths (address.zip) erased in the data and in event payloads; absent or empty: all data and payloads",
                },
                "reason": {"type": "string", "maxLength": 1024, "description": "Why; kept in the erasure record"},
                "actor": {"type": "string", "description": "Ignored when the server has --auth-file (the token's name is recorded)"},
            },
        },
        "ErasureList": {
            "type": "object", "required": ["records"],
            "description": "Erasure records only: what was erased and the records redacted",
            "properties": {
                "fields": {"type": "array", "items": {"type": "string"}},
                "reason": {"type": "string"},
                "records": {"type": "array", "items": {
                    "type": "object", "required": ["version", "originalHash", "redactedHash"],
                    "properties": {
                        "version": {"type": "integer"},
                        "originalHash": {"type": "string"},
                        "redactedHash": {"type": "string"},
                    },
                }},
            },
        },
    })
}

/// The push-delivery listing and the redrive request and answer.
fn delivery_schemas() -> Value {
    json!({
        "DeliveryList": {
            "type": "object", "required": ["cursors", "deadLetters"],
            "properties": {
                "cursors": {"type": "array", "items": {
                    "type": "object", "required": ["target", "position", "leaseNode", "leaseUntilMs"],
                    "properties": {
                        "target": {"type": "string", "description": "namespace/machine/name"},
                        "position": {"type": "integer", "description": "Every matching record at or below this commit position is delivered or dead-lettered"},
                        "leaseNode": {"type": "string"},
                        "leaseUntilMs": {"type": "integer"},
                    },
                }},
                "deadLetters": {"type": "array", "items": schema_ref("DeadLetter")},
                "metadata": {"type": "object", "properties": {"continue": {"type": "string"}}},
            },
        },
        "DeadLetter": {
            "type": "object",
            "required": ["target", "position", "namespace", "instance", "version", "eventId", "attempts", "lastError", "failedMs"],
            "properties": {
                "target": {"type": "string"},
                "position": {"type": "integer", "description": "The record's commit position"},
                "namespace": {"type": "string"},
                "instance": {"type": "string"},
                "version": {"type": "integer"},
                "eventId": {"type": "string", "description": "The CloudEvent id the attempts carried (a redrive sends it again)"},
                "attempts": {"type": "integer"},
                "lastError": {"type": "string"},
                "failedMs": {"type": "integer"},
                "redrive": {
                    "type": "object", "required": ["requestedMs", "actor"],
                    "description": "Present while a redrive is pending",
                    "properties": {
                        "requestedMs": {"type": "integer"},
                        "actor": {"type": "string"},
                    },
                },
            },
        },
        "Redrive": {
            "type": "object", "additionalProperties": false, "required": ["target"],
            "description": "Exactly one of position and all: true",
            "properties": {
                "target": {"type": "string", "minLength": 1, "maxLength": 512, "description": "namespace/machine/name"},
                "position": {"type": "integer", "minimum": 0, "description": "The dead letter at this commit position"},
                "all": {"type": "boolean", "description": "Every dead letter of the target"},
                "actor": {"type": "string", "maxLength": 256, "description": "Ignored when the server has --auth-file (the token's name is recorded)"},
            },
        },
        "RedriveReport": {
            "type": "object", "required": ["target", "marked"],
            "properties": {
                "target": {"type": "string"},
                "position": {"type": "integer"},
                "marked": {"type": "integer", "description": "Dead letters marked for redrive"},
            },
        },
    })
}

/// The whole document.
pub fn document() -> Value {
    document_for(true)
}

/// The document as a server serves it: with `auth` off (no `--auth-file`) no operation requires
/// a token (`security: [{}]`) and none answers 401 or 403.
pub fn document_for(auth: bool) -> Value {
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for route in ROUTES {
        let mut op = operation(route);
        if !auth {
            op["security"] = json!([{}]);
            if let Some(responses) = op["responses"].as_object_mut() {
                responses.remove("401");
                responses.remove("403");
            }
        }
        paths
            .entry(route.path)
            .or_default()
            .insert(route.method.to_ascii_lowercase(), op);
    }
    let security = if auth {
        json!([{"bearer": []}])
    } else {
        json!([{}])
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "cnsm API (statemachine.cn/v1alpha1)",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "State machines as a service: definitions, instances, events (plain \
                JSON or CloudEvents 1.0), history and watch streams. Every error is \
                application/problem+json (RFC 9457). Without --auth-file the server answers \
                loopback only and needs no token; with it every /apis and /debug request needs \
                a bearer token whose roles cover the namespace (x-cnsm-role).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http", "scheme": "bearer",
                    "description": "A token from the server's --auth-file, with namespace-scoped roles reader < writer < admin",
                },
            },
            "headers": {
                "ETag": {"description": "The instance version, quoted: \"<version>\"", "schema": {"type": "string"}},
                "Location": {"description": "The path of the created resource", "schema": {"type": "string"}},
                "Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}},
                "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}},
            },
        },
        "security": security,
        "tags": [
            {"name": "statemachines"},
            {"name": "instances"},
            {"name": "operations"},
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_once_and_refs_resolve() {
        let document = document();
        let text = document.to_string();
        for route in ROUTES {
            let operation = &document["paths"][route.path][route.method.to_ascii_lowercase()];
            assert_eq!(operation["operationId"], route.operation_id, "{route:?}");
            for status in statuses(route) {
                assert!(
                    operation["responses"][status.to_string()].is_object(),
                    "{route:?} {status}"
                );
            }
        }
        let n_operations: usize = document["paths"]
            .as_object()
            .map(|paths| {
                paths
                    .values()
                    .map(|p| p.as_object().map_or(0, Map::len))
                    .sum()
            })
            .unwrap_or(0);
        assert_eq!(n_operations, ROUTES.len());
        let mut ids: Vec<&str> = ROUTES.iter().map(|r| r.operation_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), ROUTES.len(), "operation ids are unique");
        // Every $ref points at a component that exists.
        for piece in text.split("\"$ref\":\"#/components/").skip(1) {
            let target = piece.split('"').next().unwrap_or("");
            let (kind, name) = target.split_once('/').unwrap_or((target, ""));
            assert!(
                document["components"][kind][name].is_object(),
                "dangling $ref {target}"
            );
        }
    }
}
