//! The one route table: [`ROUTES`] lists every route with its handler, the access it needs,
//! and what it takes and answers. `router()` builds the axum router from it and `openapi()`
//! builds the OpenAPI document from it, so the two cannot drift apart.

use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, delete, get, post};

use crate::ServerState;
use crate::auth::{Access, Role};
use crate::problem::ProblemKind;
use crate::{
    admin, controls, definitions, deliveries, health, instances, migrations, openapi, snapshots,
};

/// One route: a method on a path template.
pub struct Route {
    /// `GET`, `POST` or `DELETE`.
    pub method: &'static str,
    /// The axum (and OpenAPI) path template, e.g. `.../namespaces/{ns}/instances/{id}`.
    pub path: &'static str,
    /// The OpenAPI `operationId`.
    pub operation_id: &'static str,
    /// One line for people.
    pub summary: &'static str,
    /// The role it needs when authentication is on.
    pub access: Access,
    /// Query parameters (documented in `openapi.rs`).
    pub query: &'static [&'static str],
    /// Request headers it reads (documented in `openapi.rs`).
    pub headers: &'static [&'static str],
    /// The request body, by component name.
    pub body: Option<&'static str>,
    /// Success statuses and the component name of their body.
    pub ok: &'static [(u16, &'static str)],
    /// The problems it can answer with (401 and 403 are implied by `access`).
    pub errors: &'static [ProblemKind],
    /// The axum handler for this method.
    pub handler: fn() -> MethodRouter<ServerState>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

use ProblemKind as P;

const LIST_QUERY: &[&str] = &[
    "watch",
    "machine",
    "state",
    "status",
    "labelSelector",
    "limit",
    "continue",
];
const EVENT_HEADERS: &[&str] = &[
    "If-Match",
    "Idempotency-Key",
    "traceparent",
    "tracestate",
    "ce-specversion",
    "ce-id",
    "ce-source",
    "ce-type",
    "ce-traceparent",
    "ce-tracestate",
];

const CONTROL_ERRORS: &[ProblemKind] = &[
    P::Invalid,
    P::NotFound,
    P::TransitionFailure,
    P::PayloadTooLarge,
    P::UnsupportedMediaType,
    P::Unavailable,
];

/// Every route of the API.
pub static ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/snapshot",
        operation_id: "exportSnapshot",
        summary: "The unsigned snapshot payload (deterministic CBOR) of a namespace's instances; docs/snapshots.md",
        access: Access::Namespace(Role::Admin),
        query: &["instance", "labelSelector"],
        headers: &[],
        body: None,
        ok: &[(200, "SnapshotPayload")],
        errors: &[P::Invalid, P::NotFound, P::Unavailable],
        handler: || get(snapshots::export),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/snapshot",
        operation_id: "importSnapshot",
        summary: "Import a snapshot payload (verified again, all or nothing); 409 if an instance exists unless replace=true",
        access: Access::Namespace(Role::Admin),
        query: &["replace"],
        headers: &[],
        body: Some("SnapshotPayload"),
        ok: &[(200, "ImportReport")],
        errors: &[
            P::Invalid,
            P::Conflict,
            P::PayloadTooLarge,
            P::UnsupportedMediaType,
            P::Unavailable,
        ],
        handler: || {
            post(snapshots::import).layer(DefaultBodyLimit::max(snapshots::SNAPSHOT_BYTES_MAX))
        },
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/statemachines",
        operation_id: "listAllStateMachines",
        summary: "The latest revision of every machine in every namespace",
        access: Access::AllNamespaces(Role::Reader),
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "DefinitionList")],
        errors: &[P::Unavailable],
        handler: || get(definitions::list_all),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/instances",
        operation_id: "listAllInstances",
        summary: "Instances in every namespace (filters, pages), or a watch stream with watch=true",
        access: Access::AllNamespaces(Role::Reader),
        query: LIST_QUERY,
        headers: &[],
        body: None,
        ok: &[(200, "InstanceList")],
        errors: &[P::Invalid, P::Unavailable],
        handler: || get(instances::list_all),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/statemachines",
        operation_id: "listStateMachines",
        summary: "The latest revision of every machine in a namespace",
        access: Access::Namespace(Role::Reader),
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "DefinitionList")],
        errors: &[P::Invalid, P::Unavailable],
        handler: || get(definitions::list),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/statemachines",
        operation_id: "applyStateMachine",
        summary: "Apply a definition (JSON or YAML): 201 for a new revision, 200 when unchanged",
        access: Access::Namespace(Role::Admin),
        query: &[],
        headers: &[],
        body: Some("StateMachine"),
        ok: &[(201, "Applied"), (200, "Applied")],
        errors: &[
            P::Invalid,
            P::PayloadTooLarge,
            P::UnsupportedMediaType,
            P::Unavailable,
        ],
        handler: || post(definitions::apply),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/statemachines/{name}",
        operation_id: "getStateMachine",
        summary: "One machine: its latest revision, or ?revision=N",
        access: Access::Namespace(Role::Reader),
        query: &["revision"],
        headers: &[],
        body: None,
        ok: &[(200, "Definition")],
        errors: &[P::Invalid, P::NotFound, P::Unavailable],
        handler: || get(definitions::get_one),
    },
    Route {
        method: "DELETE",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/statemachines/{name}",
        operation_id: "deleteStateMachine",
        summary: "Delete every revision of a machine (409 while it has active instances)",
        access: Access::Namespace(Role::Admin),
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "Deleted")],
        errors: &[P::Invalid, P::NotFound, P::Conflict, P::Unavailable],
        handler: || delete(definitions::delete),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/statemachines/{name}/rollout",
        operation_id: "getRollout",
        summary: "A machine's canary rollout (stable, canary, weight) and active instances per revision",
        access: Access::Namespace(Role::Reader),
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "Rollout")],
        errors: &[P::Invalid, P::NotFound, P::Unavailable],
        handler: || get(migrations::rollout_status),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/statemachines/{name}/rollout",
        operation_id: "changeRollout",
        summary: "Set a canary weight for a revision, promote it, or abort back to the stable revision",
        access: Access::Namespace(Role::Admin),
        query: &[],
        headers: &[],
        body: Some("RolloutChange"),
        ok: &[(200, "Rollout")],
        errors: &[
            P::Invalid,
            P::NotFound,
            P::Conflict,
            P::PayloadTooLarge,
            P::UnsupportedMediaType,
            P::Unavailable,
        ],
        handler: || post(migrations::change_rollout),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/statemachines/{name}/migrations",
        operation_id: "migrateInstances",
        summary: "Run or plan (dryRun) a StateMigrationPolicy between two revisions; per-instance report",
        access: Access::Namespace(Role::Admin),
        query: &[],
        headers: &[],
        body: Some("Migration"),
        ok: &[(200, "MigrationReport")],
        errors: &[
            P::Invalid,
            P::NotFound,
            P::PayloadTooLarge,
            P::UnsupportedMediaType,
            P::Unavailable,
        ],
        handler: || post(migrations::run),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances",
        operation_id: "listInstances",
        summary: "Instances in a namespace (filters, pages), or a watch stream with watch=true",
        access: Access::Namespace(Role::Reader),
        query: LIST_QUERY,
        headers: &[],
        body: None,
        ok: &[(200, "InstanceList")],
        errors: &[P::Invalid, P::Unavailable],
        handler: || get(instances::list),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances",
        operation_id: "createInstance",
        summary: "Create an instance of a machine (201, ETag \"0\", Location)",
        access: Access::Namespace(Role::Writer),
        query: &[],
        headers: &[],
        body: Some("CreateInstance"),
        ok: &[(201, "Instance")],
        errors: &[
            P::Invalid,
            P::NotFound,
            P::Conflict,
            P::PayloadTooLarge,
            P::UnsupportedMediaType,
            P::Unavailable,
        ],
        handler: || post(instances::create),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}",
        operation_id: "getInstance",
        summary: "One instance with ETag: \"<version>\", or its watch stream with watch=true",
        access: Access::Namespace(Role::Reader),
        query: &["watch", "resourceVersion"],
        headers: &["Last-Event-ID"],
        body: None,
        ok: &[(200, "Instance")],
        errors: &[P::Invalid, P::NotFound, P::Unavailable],
        handler: || get(instances::get_one),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/events",
        operation_id: "sendEvent",
        summary: "Send an event (plain JSON or a CloudEvent); If-Match makes it a compare-and-swap",
        access: Access::Namespace(Role::Writer),
        query: &[],
        headers: EVENT_HEADERS,
        body: Some("Event"),
        ok: &[(200, "Transition")],
        errors: &[
            P::Invalid,
            P::NotFound,
            P::Conflict,
            P::RaceCondition,
            P::StaleState,
            P::TransitionFailure,
            P::PayloadTooLarge,
            P::UnsupportedMediaType,
            P::Unavailable,
        ],
        handler: || post(instances::send_event),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/cancel",
        operation_id: "cancelInstance",
        summary: "Operator control: end the instance cancelled (its compensations run first)",
        access: Access::Namespace(Role::Writer),
        query: &[],
        headers: &[],
        body: Some("Control"),
        ok: &[(200, "Transition")],
        errors: CONTROL_ERRORS,
        handler: || post(controls::cancel),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/suspend",
        operation_id: "suspendInstance",
        summary: "Operator control: refuse events and hold the timer until resume",
        access: Access::Namespace(Role::Writer),
        query: &[],
        headers: &[],
        body: Some("Control"),
        ok: &[(200, "Transition")],
        errors: CONTROL_ERRORS,
        handler: || post(controls::suspend),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/resume",
        operation_id: "resumeInstance",
        summary: "Operator control: accept events again; an overdue timer fires right after",
        access: Access::Namespace(Role::Writer),
        query: &[],
        headers: &[],
        body: Some("Control"),
        ok: &[(200, "Transition")],
        errors: CONTROL_ERRORS,
        handler: || post(controls::resume),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/redrive",
        operation_id: "redriveInstance",
        summary: "Operator control: a failed instance re-enters the state where it failed",
        access: Access::Namespace(Role::Writer),
        query: &[],
        headers: &[],
        body: Some("Control"),
        ok: &[(200, "Transition")],
        errors: CONTROL_ERRORS,
        handler: || post(controls::redrive),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/erase",
        operation_id: "eraseInstance",
        summary: "Erase personal data from an instance's data and history (all, or the given fields); the hash chain stays verifiable",
        access: Access::Namespace(Role::Writer),
        query: &[],
        headers: &[],
        body: Some("Erase"),
        ok: &[(200, "Transition")],
        errors: &[
            P::Invalid,
            P::NotFound,
            P::Conflict,
            P::RaceCondition,
            P::PayloadTooLarge,
            P::UnsupportedMediaType,
            P::Unavailable,
        ],
        handler: || post(controls::erase),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/namespaces/{ns}/instances/{id}/history",
        operation_id: "getHistory",
        summary: "A page of an instance's hash-chained history records",
        access: Access::Namespace(Role::Reader),
        query: &["from", "limit"],
        headers: &[],
        body: None,
        ok: &[(200, "HistoryPage")],
        errors: &[P::Invalid, P::NotFound, P::Unavailable],
        handler: || get(instances::history),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/backup",
        operation_id: "backupStore",
        summary: "A consistent, verified point-in-time copy of the whole store, streamed as a store file",
        access: Access::AllNamespaces(Role::Admin),
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "Backup")],
        errors: &[P::Conflict, P::Unavailable],
        handler: || post(admin::backup),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/audit",
        operation_id: "exportAudit",
        summary: "The ECS audit line of every committed transition (ND-JSON), regenerated from the history in commit order",
        access: Access::AllNamespaces(Role::Admin),
        query: &["since"],
        headers: &[],
        body: None,
        ok: &[(200, "AuditLines")],
        errors: &[P::Invalid, P::Unavailable],
        handler: || get(admin::audit),
    },
    Route {
        method: "GET",
        path: "/apis/statemachine.cn/v1alpha1/deliveries",
        operation_id: "listDeliveries",
        summary: "Push delivery: every notify target's cursor and lease, and a page of dead letters (with any pending redrive)",
        access: Access::AllNamespaces(Role::Admin),
        query: &["target", "limit", "continue"],
        headers: &[],
        body: None,
        ok: &[(200, "DeliveryList")],
        errors: &[P::Invalid, P::Unavailable],
        handler: || get(deliveries::list),
    },
    Route {
        method: "POST",
        path: "/apis/statemachine.cn/v1alpha1/deliveries/redrive",
        operation_id: "redriveDeadLetters",
        summary: "Mark one dead letter (position) or all of a target's (all: true) for redrive: sent again with the same CloudEvent id, removed once delivered",
        access: Access::AllNamespaces(Role::Admin),
        query: &[],
        headers: &[],
        body: Some("Redrive"),
        ok: &[(200, "RedriveReport")],
        errors: &[
            P::Invalid,
            P::NotFound,
            P::Conflict,
            P::PayloadTooLarge,
            P::UnsupportedMediaType,
            P::Unavailable,
        ],
        handler: || post(deliveries::redrive),
    },
    Route {
        method: "GET",
        path: "/health/livez",
        operation_id: "livez",
        summary: "The process answers",
        access: Access::Open,
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "Text")],
        errors: &[],
        handler: || get(health::livez),
    },
    Route {
        method: "GET",
        path: "/health/readyz",
        operation_id: "readyz",
        summary: "The store is readable and the committer and timers run",
        access: Access::Open,
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "Text")],
        errors: &[P::Unavailable],
        handler: || get(health::readyz),
    },
    Route {
        method: "GET",
        path: "/health/statez",
        operation_id: "statez",
        summary: "Store, commits, queue, instances, timers, version, uptime (JSON or ?format=text)",
        access: Access::Open,
        query: &["format"],
        headers: &[],
        body: None,
        ok: &[(200, "Statez")],
        errors: &[P::Invalid],
        handler: || get(health::statez),
    },
    Route {
        method: "GET",
        path: "/debug/statemachine",
        operation_id: "debugStateMachines",
        summary: "Instance counts by machine, revision and state; recent transitions and errors",
        access: Access::AllNamespaces(Role::Admin),
        query: &["format"],
        headers: &[],
        body: None,
        ok: &[(200, "Debug")],
        errors: &[P::Invalid, P::Unavailable],
        handler: || get(health::debug),
    },
    Route {
        method: "GET",
        path: "/metrics",
        operation_id: "metrics",
        summary: "The cnsm.* metrics as Prometheus text, or OpenMetrics text with exemplars when Accept asks for application/openmetrics-text",
        access: Access::AllNamespaces(Role::Reader),
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "Metrics")],
        errors: &[],
        handler: || get(health::metrics),
    },
    Route {
        method: "GET",
        path: "/openapi.json",
        operation_id: "openapi",
        summary: "This OpenAPI 3.1 document",
        access: Access::Open,
        query: &[],
        headers: &[],
        body: None,
        ok: &[(200, "OpenApi")],
        errors: &[],
        handler: || get(openapi::serve_document),
    },
];

/// The route of a method and path template.
pub fn find(method: &str, path: &str) -> Option<&'static Route> {
    ROUTES
        .iter()
        .find(|r| r.method.eq_ignore_ascii_case(method) && r.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::API_PREFIX;

    #[test]
    fn the_table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for route in ROUTES {
            assert!(seen.insert((route.method, route.path)), "{route:?} twice");
            assert!(
                ["GET", "POST", "DELETE"].contains(&route.method),
                "{route:?}"
            );
            let namespaced = route.path.contains("/namespaces/{ns}/");
            // A namespace role needs the namespace in the path, and a namespaced path is never
            // open or checked against "*" only.
            assert_eq!(
                matches!(route.access, Access::Namespace(_)),
                namespaced,
                "{route:?}"
            );
            if route.path.starts_with("/apis/") {
                assert!(route.path.starts_with(API_PREFIX), "{route:?}");
                assert_ne!(route.access, Access::Open, "{route:?}");
            }
            if route.path.starts_with("/debug/") {
                assert_eq!(
                    route.access,
                    Access::AllNamespaces(Role::Admin),
                    "{route:?}"
                );
            }
            if route.method != "GET" {
                assert!(
                    matches!(
                        route.access,
                        Access::Namespace(Role::Writer | Role::Admin)
                            | Access::AllNamespaces(Role::Admin)
                    ),
                    "{route:?}: a change needs writer or admin"
                );
            }
            assert_eq!(
                find(route.method, route.path).map(|r| r.operation_id),
                Some(route.operation_id)
            );
        }
    }
}
