//! The JSON bodies of the API, shared by the server and its clients (`cnsmctl --server`, tests),
//! so both sides agree on one definition of every shape.
//!
//! Instances and history records travel in their core serde form ([`Instance`],
//! [`StateChangeEvent`]): camelCase fields, hashes as hex, times as milliseconds since the Unix
//! epoch. Lists are `{"items": [...]}` as in Kubernetes.

use std::collections::BTreeMap;

use cnsm_core::admission::Problem;
use cnsm_core::record::Hash32;
use cnsm_core::resource::StateMachine;
use cnsm_core::{Instance, StateChangeEvent};
use cnsm_store::DefinitionRow;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The prefix of every resource path.
pub const API_PREFIX: &str = "/apis/statemachine.cn/v1alpha1";
/// The prefix of every problem `type` URI; the kind's slug follows (`.../stale-state`).
pub const PROBLEM_TYPE_BASE: &str = "https://statemachine.cn/problems/";
/// RFC 9457 problem details.
pub const CONTENT_TYPE_PROBLEM: &str = "application/problem+json";
/// A CloudEvent in structured mode.
pub const CONTENT_TYPE_CLOUDEVENTS: &str = "application/cloudevents+json";
/// Server-Sent Events (watch streams).
pub const CONTENT_TYPE_EVENT_STREAM: &str = "text/event-stream";
/// Most records one history page returns.
pub const HISTORY_PAGE_LEN_MAX: usize = 1_000;
/// History records per page when `limit` is not given.
pub const HISTORY_PAGE_LEN_DEFAULT: usize = 100;
/// Most instances one list page returns.
pub const LIST_PAGE_LEN_MAX: usize = 1_000;
/// Instances per page when `limit` is not given.
pub const LIST_PAGE_LEN_DEFAULT: usize = 500;
/// The actor recorded when a request names none (there is no authentication yet).
pub const ANONYMOUS_ACTOR: &str = "anonymous";

/// The path of a namespace's collection, e.g. `/apis/statemachine.cn/v1alpha1/namespaces/shop/instances`.
pub fn collection_path(namespace: &str, collection: &str) -> String {
    format!("{API_PREFIX}/namespaces/{namespace}/{collection}")
}

/// The path of one instance.
pub fn instance_path(namespace: &str, id: &str) -> String {
    format!("{API_PREFIX}/namespaces/{namespace}/instances/{id}")
}

/// The path of one machine.
pub fn machine_path(namespace: &str, name: &str) -> String {
    format!("{API_PREFIX}/namespaces/{namespace}/statemachines/{name}")
}

/// `POST .../instances`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateInstanceBody {
    /// Generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub machine: String,
    /// The initial data, a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Pin this revision instead of the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    /// Who creates it. Ignored on a server with `--auth-file`: the token's name is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

/// `POST .../instances/{id}/events` with a plain JSON body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventBody {
    /// The event name.
    pub event: String,
    /// Read by guards and assignments as `event`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub payload: Value,
    /// Who sends it. Ignored on a server with `--auth-file`: the token's name is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

/// The answer to an event: the committed record, its hash, the instance right after it, and
/// whether an idempotency key replayed an earlier result. Watch streams send the same shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransitionView {
    pub record: StateChangeEvent,
    pub hash: Hash32,
    pub instance: Instance,
    #[serde(default)]
    pub replayed: bool,
}

/// One history record with its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryItem {
    pub record: StateChangeEvent,
    pub hash: Hash32,
}

/// `GET .../history`: records in version order, and where the next page starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryPage {
    pub items: Vec<HistoryItem>,
    /// The `from` of the next page; absent when this page reached the latest record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// `GET .../instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceList {
    pub items: Vec<Instance>,
    #[serde(default)]
    pub metadata: ListMeta,
}

/// List metadata (Kubernetes' `ListMeta`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListMeta {
    /// Pass as `continue=` to get the next page; absent on the last page.
    #[serde(default, rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_token: Option<String>,
}

/// A push-delivery target's cursor as `GET /apis/statemachine.cn/v1alpha1/deliveries` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryCursorView {
    /// `namespace/machine/name`.
    pub target: String,
    /// Every matching record at or below this commit position is delivered or dead-lettered.
    pub position: u64,
    /// The node that holds (or last held) the target's lease, and until when (ms).
    pub lease_node: String,
    pub lease_until_ms: u64,
}

/// `GET /apis/statemachine.cn/v1alpha1/deliveries`: every target's cursor (one per target, on
/// every page) and a page of dead letters in (target, position) order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryList {
    pub cursors: Vec<DeliveryCursorView>,
    pub dead_letters: Vec<cnsm_store::DeadLetter>,
    /// `continue` names the next page of dead letters.
    #[serde(default)]
    pub metadata: ListMeta,
}

/// `POST /apis/statemachine.cn/v1alpha1/deliveries/redrive`: one dead letter (`position`) or
/// all of a target's (`all: true`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedriveBody {
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// Ignored when the server has `--auth-file` (the token's name is recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

/// The `continue` token of a dead-letter page: after this (target, position).
pub fn encode_dead_letter_continue(target: &str, position: u64) -> String {
    encode_continue(&position.to_string(), target)
}

/// Decodes [`encode_dead_letter_continue`]; `None` when it is not one this server made.
pub fn decode_dead_letter_continue(token: &str) -> Option<(String, u64)> {
    let (position, target) = decode_continue(token)?;
    Some((target, position.parse().ok()?))
}

/// An admission problem as it travels (a [`Problem`] with owned strings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProblemItem {
    /// `error` or `warning`.
    pub severity: String,
    /// A stable kind, e.g. `undefined-target`.
    pub code: String,
    /// Where in the resource, e.g. `spec.states[2].onEvent[0].target`.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    pub message: String,
}

impl From<&Problem> for ProblemItem {
    fn from(p: &Problem) -> ProblemItem {
        ProblemItem {
            severity: p.severity.as_str().to_owned(),
            code: p.code.to_owned(),
            path: p.path.clone(),
            line: p.line,
            column: p.column,
            message: p.message.clone(),
        }
    }
}

impl ProblemItem {
    /// The compiler-style line `cnsm_core::admission::render_problem` prints.
    pub fn render(&self, file: Option<&str>) -> String {
        let mut line = String::new();
        match (file, self.line, self.column) {
            (Some(file), Some(l), Some(c)) => line.push_str(&format!("{file}:{l}:{c}: ")),
            (Some(file), Some(l), None) => line.push_str(&format!("{file}:{l}: ")),
            (Some(file), None, _) => line.push_str(&format!("{file}: ")),
            (None, Some(l), Some(c)) => line.push_str(&format!("{l}:{c}: ")),
            (None, Some(l), None) => line.push_str(&format!("{l}: ")),
            (None, None, _) => {}
        }
        line.push_str(&format!(
            "{}[{}]: {}",
            self.severity, self.code, self.message
        ));
        if !self.path.is_empty() {
            line.push_str(&format!(" (at {})", self.path));
        }
        line
    }
}

/// The answer to `POST .../statemachines`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedView {
    pub namespace: String,
    pub name: String,
    pub revision: u32,
    pub hash: Hash32,
    /// False when the content equals the latest revision (nothing changed; status 200).
    pub created: bool,
    #[serde(default)]
    pub warnings: Vec<ProblemItem>,
}

/// The status a stored definition carries in its JSON view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DefinitionStatus {
    pub revision: u32,
    pub hash: Hash32,
    pub created_ms: u64,
}

/// The JSON view of a stored definition: the resource as applied plus a `status` with its
/// revision, content hash and creation time.
pub fn definition_view(row: &DefinitionRow) -> Value {
    let mut value = serde_json::to_value(&row.definition).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        let status = DefinitionStatus {
            revision: row.revision,
            hash: row.hash,
            created_ms: row.created_ms,
        };
        map.insert(
            "status".into(),
            serde_json::to_value(status).unwrap_or(Value::Null),
        );
    }
    value
}

/// Reads a definition view back (the inverse of [`definition_view`]).
pub fn definition_from_view(mut value: Value) -> Result<DefinitionRow, String> {
    let status = value
        .as_object_mut()
        .and_then(|m| m.remove("status"))
        .ok_or("the definition has no status")?;
    let status: DefinitionStatus =
        serde_json::from_value(status).map_err(|e| format!("bad definition status: {e}"))?;
    let definition: StateMachine =
        serde_json::from_value(value).map_err(|e| format!("bad definition: {e}"))?;
    Ok(DefinitionRow {
        namespace: definition.metadata.namespace.clone(),
        name: definition.metadata.name.clone(),
        revision: status.revision,
        hash: status.hash,
        definition,
        created_ms: status.created_ms,
    })
}

/// A problem+json body as a client reads it. Unknown members are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProblemDetails {
    #[serde(rename = "type")]
    pub problem_type: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The request path.
    pub instance: String,
    /// The `error.type` of DESIGN.md §4 (`TransitionFailure`, `StaleState`, ...).
    pub error_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Admission problems of a rejected definition.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<ProblemItem>,
}

/// Encodes a list position as an opaque `continue` token (hex of `namespace/id`).
pub fn encode_continue(namespace: &str, id: &str) -> String {
    let mut out = String::with_capacity(2 * (namespace.len() + id.len() + 1));
    for b in namespace.bytes().chain([b'/']).chain(id.bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Decodes a `continue` token; `None` when it is not one this server made.
pub fn decode_continue(token: &str) -> Option<(String, String)> {
    if !token.len().is_multiple_of(2) || token.len() > 1024 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let (namespace, id) = text.split_once('/')?;
    Some((namespace.to_owned(), id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let token = encode_continue("shop", "o-1:x");
        assert_eq!(
            decode_continue(&token),
            Some(("shop".into(), "o-1:x".into()))
        );
        for bad in ["abc", "zz", "", "6162"] {
            assert_eq!(decode_continue(bad), None, "{bad}");
        }
        let token = encode_dead_letter_continue("shop/orders/fulfil", 42);
        assert_eq!(
            decode_dead_letter_continue(&token),
            Some(("shop/orders/fulfil".into(), 42))
        );
        assert_eq!(
            decode_dead_letter_continue(&encode_continue("x", "a/b/c")),
            None
        );
    }
}
