//! Health and debug endpoints: `/health/livez`, `/health/readyz`, `/health/statez`,
//! `/debug/statemachine`, and the [`Diagnostics`] they report (ring buffers of the last
//! transitions and errors, fed by the commit listener and the problem middleware).
//!
//! `statez` and `debug` answer JSON, or text for people with `?format=text`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use cnsm_core::{StateChangeEvent, Status};
use cnsm_store::{InstanceQuery, PAGE_LEN_MAX, Store};
use serde::Serialize;
use serde_json::{Value, json};

use crate::ServerState;
use crate::params::{self, QueryPairs};
use crate::problem::ApiError;

/// How many transitions and errors `/debug/statemachine` keeps.
pub const RING_LEN: usize = 50;

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A recent transition.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransitionNote {
    pub time_ms: u64,
    pub namespace: String,
    pub instance: String,
    pub machine: String,
    pub revision: u32,
    pub version: u64,
    pub from: Option<String>,
    pub to: String,
    pub event: Option<String>,
    pub actor: String,
}

/// A recent error answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorNote {
    pub time_ms: u64,
    pub error_type: String,
    pub status: u16,
    pub method: String,
    pub path: String,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

/// What the server has seen, for the debug endpoints.
#[derive(Debug, Default)]
pub struct Diagnostics {
    transitions: Mutex<VecDeque<TransitionNote>>,
    errors: Mutex<VecDeque<ErrorNote>>,
    last_commit_ms: AtomicU64,
    last_commit_duration_us: AtomicU64,
    n_batches: AtomicU64,
    n_records: AtomicU64,
    n_errors: AtomicU64,
}

fn push_bounded<T>(ring: &Mutex<VecDeque<T>>, item: T) {
    if let Ok(mut ring) = ring.lock() {
        if ring.len() == RING_LEN {
            ring.pop_front();
        }
        ring.push_back(item);
    }
}

impl Diagnostics {
    pub fn record_transition(&self, record: &StateChangeEvent) {
        push_bounded(
            &self.transitions,
            TransitionNote {
                time_ms: record.time_ms,
                namespace: record.namespace.to_string(),
                instance: record.instance.to_string(),
                machine: record.machine.to_string(),
                revision: record.revision,
                version: record.version,
                from: record.from.as_ref().map(|s| s.to_string()),
                to: record.to.to_string(),
                event: record.event.as_ref().map(|s| s.to_string()),
                actor: record.actor.to_string(),
            },
        );
    }

    pub fn record_batch(&self, n_items: usize, commit_duration: Duration) {
        self.last_commit_ms.store(now_ms(), Ordering::Relaxed);
        self.last_commit_duration_us
            .store(commit_duration.as_micros() as u64, Ordering::Relaxed);
        self.n_batches.fetch_add(1, Ordering::Relaxed);
        self.n_records.fetch_add(n_items as u64, Ordering::Relaxed);
    }

    pub fn record_error(&self, method: &str, path: &str, problem: &ApiError) {
        self.n_errors.fetch_add(1, Ordering::Relaxed);
        let text = |key: &str| {
            problem
                .extensions
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        push_bounded(
            &self.errors,
            ErrorNote {
                time_ms: now_ms(),
                error_type: problem.kind.error_type().to_owned(),
                status: problem.kind.status().as_u16(),
                method: method.to_owned(),
                path: path.to_owned(),
                detail: problem.detail.clone(),
                namespace: text("namespace"),
                instance_id: text("instanceId"),
                state: text("state"),
                event: text("event"),
            },
        );
    }

    fn recent_transitions(&self) -> Vec<TransitionNote> {
        self.transitions
            .lock()
            .map(|r| r.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    fn recent_errors(&self) -> Vec<ErrorNote> {
        self.errors
            .lock()
            .map(|r| r.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

/// `2026-11-27T06:36:00.123Z`.
fn rfc3339_ms(time_ms: u64) -> String {
    let seconds = time_ms / 1000;
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        time_ms % 1000
    )
}

fn text_response(status: StatusCode, text: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

fn wants_text(query: QueryPairs) -> Result<bool, ApiError> {
    let query = params::query(query)?;
    match params::param(&query, "format") {
        None | Some("") | Some("json") => Ok(false),
        Some("text") => Ok(true),
        Some(other) => Err(ApiError::invalid(format!(
            "query parameter 'format' must be json or text, got '{other}'"
        ))),
    }
}

/// `/health/livez`: the process answers.
/// `GET /metrics`: the `cnsm.*` metrics as Prometheus text, or as OpenMetrics text (with
/// exemplars) when the client's `Accept` asks for `application/openmetrics-text`.
pub async fn metrics(State(state): State<ServerState>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = crate::MetricsFormat::negotiate(accept);
    let text = match &state.options().metrics {
        Some(render) => {
            let render = Arc::clone(&render.0);
            tokio::task::spawn_blocking(move || render(format))
                .await
                .unwrap_or_default()
        }
        None if format == crate::MetricsFormat::OpenMetrics => {
            "# metrics are off in this server\n# EOF\n".to_owned()
        }
        None => "# metrics are off in this server\n".to_owned(),
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, format.content_type())],
        text,
    )
        .into_response()
}

pub async fn livez() -> Response {
    text_response(StatusCode::OK, "ok\n".into())
}

/// Whether the store can be read and the committer answers (its timer index included).
async fn check_ready(state: &ServerState) -> Result<usize, ApiError> {
    let runtime = state.runtime();
    runtime
        .store()
        .list_definitions(Some("cnsm-readyz-probe"))
        .map_err(|_| ApiError::unavailable("the store cannot be read"))?;
    match tokio::time::timeout(Duration::from_secs(2), runtime.pending_timers()).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(_)) => Err(ApiError::unavailable("the committer is not running")),
        Err(_) => Err(ApiError::unavailable(
            "the committer did not answer within 2 s",
        )),
    }
}

/// `/health/readyz`: 200 when the store is readable and the committer and timers run, else 503.
pub async fn readyz(State(state): State<ServerState>) -> Result<Response, ApiError> {
    check_ready(&state).await?;
    Ok(text_response(StatusCode::OK, "ok\n".into()))
}

/// Counts instances with `query` up to `max`; returns (count, capped).
fn count_instances(
    store: &dyn Store,
    mut query: InstanceQuery,
    max: usize,
) -> Option<(usize, bool)> {
    let mut n = 0;
    loop {
        query.limit = PAGE_LEN_MAX.min(max - n + 1);
        let page = store.list_instances(&query).ok()?;
        let full = page.len() == query.limit;
        n += page.len();
        if n > max {
            return Some((max, true));
        }
        match page.last() {
            Some(last) if full => {
                query.after = Some((
                    last.instance.namespace.to_string(),
                    last.instance.id.to_string(),
                ))
            }
            _ => return Some((n, false)),
        }
    }
}

/// What statez reads from the store: active instances (count, capped) and stored timers
/// (count, next due). Scans, so it runs on a blocking thread.
struct StoreCounts {
    active: Option<(usize, bool)>,
    n_timers: Option<u64>,
    next_due_ms: Option<u64>,
}

fn store_counts(store: &dyn Store, max: usize) -> StoreCounts {
    let active = count_instances(
        store,
        InstanceQuery {
            status: Some(Status::Active),
            ..InstanceQuery::default()
        },
        max,
    );
    let mut n_timers = 0u64;
    let mut next_due_ms: Option<u64> = None;
    let readable = store
        .pending_timers(&mut |t| {
            n_timers += 1;
            next_due_ms = Some(next_due_ms.map_or(t.due_ms, |d| d.min(t.due_ms)));
        })
        .is_ok();
    StoreCounts {
        active,
        n_timers: readable.then_some(n_timers),
        next_due_ms,
    }
}

/// The flag provider's health for statez: `null` without an evaluator; a flag file that failed
/// to load shows `status: error` with the message (the last good flags stay in use).
fn flags_health(runtime: &cnsm_runtime::Runtime) -> Value {
    match runtime.flags() {
        None => Value::Null,
        Some(flags) => {
            let error = flags.provider_error();
            json!({
                "provider": flags.provider_name(),
                "status": if error.is_some() { "error" } else { "ok" },
                "error": error,
            })
        }
    }
}

/// Gate status per flag key (`ACTIVE`, `STABLE`, `DISABLED`, `DEGRADED`) for the debug page.
fn flag_gates(runtime: &cnsm_runtime::Runtime) -> BTreeMap<String, String> {
    runtime
        .flags()
        .map(|f| f.gate_statuses())
        .unwrap_or_default()
}

/// `/health/statez`: store, commits, queue, instances, timers, version, uptime.
pub async fn statez(
    State(state): State<ServerState>,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let text = wants_text(query)?;
    let ready = check_ready(&state).await;
    let diagnostics = &state.inner.diagnostics;
    let options = state.options();
    let store = Arc::clone(state.runtime().store());
    let max = options.scan_instances_max;
    let counts = tokio::task::spawn_blocking(move || store_counts(&*store, max))
        .await
        .map_err(|_| ApiError::unavailable("the store could not be read"))?;
    let StoreCounts {
        active,
        n_timers,
        next_due_ms,
    } = counts;
    let last_commit_ms = diagnostics.last_commit_ms.load(Ordering::Relaxed);
    let uptime = state.inner.started.elapsed();
    let in_flight = options.requests_in_flight_max - state.inner.in_flight.available_permits();
    let value = json!({
        "status": if ready.is_ok() { "ok" } else { "unavailable" },
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": uptime.as_secs(),
        "store": {
            "kind": options.store_kind,
            "status": if ready.is_ok() { "ok" } else { "unavailable" },
        },
        "commits": {
            "lastCommitMs": (last_commit_ms > 0).then_some(last_commit_ms),
            "lastCommitDurationUs": (last_commit_ms > 0)
                .then(|| diagnostics.last_commit_duration_us.load(Ordering::Relaxed)),
            "batches": diagnostics.n_batches.load(Ordering::Relaxed),
            "records": diagnostics.n_records.load(Ordering::Relaxed),
        },
        "queue": {
            "commitQueueDepth": state.runtime().queue_depth(),
            "requestsInFlight": in_flight,
            "requestsInFlightMax": options.requests_in_flight_max,
            "watchers": state.inner.hub.n_watchers(),
        },
        "instances": {
            "active": active.map(|(n, _)| n),
            "activeCapped": active.is_some_and(|(_, capped)| capped),
        },
        "timers": {
            "pending": ready.as_ref().ok(),
            "stored": n_timers,
            "nextDueMs": next_due_ms,
        },
        "errors": diagnostics.n_errors.load(Ordering::Relaxed),
        "flags": flags_health(state.runtime()),
    });
    let status = if ready.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !text {
        return Ok((status, Json(value)).into_response());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "status:            {}",
        value["status"].as_str().unwrap_or("?")
    );
    let _ = writeln!(out, "version:           {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "uptime:            {} s", uptime.as_secs());
    let _ = writeln!(
        out,
        "store:             {} ({})",
        options.store_kind,
        value["store"]["status"].as_str().unwrap_or("?")
    );
    let last = if last_commit_ms > 0 {
        format!(
            "{} ({} µs)",
            rfc3339_ms(last_commit_ms),
            diagnostics.last_commit_duration_us.load(Ordering::Relaxed)
        )
    } else {
        "none since start".into()
    };
    let _ = writeln!(out, "last commit:       {last}");
    let _ = writeln!(
        out,
        "commits:           {} batch(es), {} record(s)",
        diagnostics.n_batches.load(Ordering::Relaxed),
        diagnostics.n_records.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "requests:          {in_flight} in flight (max {}), {} watcher(s)",
        options.requests_in_flight_max,
        state.inner.hub.n_watchers()
    );
    let active_text = match active {
        Some((n, true)) => format!("{n}+"),
        Some((n, false)) => n.to_string(),
        None => "unknown".into(),
    };
    let _ = writeln!(out, "instances active:  {active_text}");
    let next = next_due_ms.map_or_else(|| "none".to_owned(), rfc3339_ms);
    let pending = ready
        .as_ref()
        .map_or_else(|_| "unknown".to_owned(), usize::to_string);
    let _ = writeln!(out, "timers pending:    {pending} (next due {next})");
    let _ = writeln!(
        out,
        "errors answered:   {}",
        diagnostics.n_errors.load(Ordering::Relaxed)
    );
    let flags = &value["flags"];
    if !flags.is_null() {
        let _ = writeln!(
            out,
            "flags:             {} ({}{})",
            flags["provider"].as_str().unwrap_or("?"),
            flags["status"].as_str().unwrap_or("?"),
            flags["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    Ok(text_response(status, out))
}

/// Instance counts of one machine revision.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct RevisionCounts {
    total: usize,
    by_state: BTreeMap<String, usize>,
    by_status: BTreeMap<String, usize>,
}

/// Instance counts per (namespace, machine) and revision.
type MachineCounts = BTreeMap<(String, String), BTreeMap<u32, RevisionCounts>>;

/// Scans up to `max` instances; returns the counts, how many were scanned, and whether the
/// scan stopped at `max`.
fn machine_counts(store: &dyn Store, max: usize) -> Result<(MachineCounts, usize, bool), ApiError> {
    let unreadable = |_| ApiError::unavailable("the store cannot be read");
    let mut machines = MachineCounts::new();
    for row in store.list_definitions(None).map_err(unreadable)? {
        machines.entry((row.namespace, row.name)).or_default();
    }
    let mut query = InstanceQuery::default();
    let mut n_scanned = 0;
    loop {
        query.limit = PAGE_LEN_MAX.min(max - n_scanned).max(1);
        let page = store.list_instances(&query).map_err(unreadable)?;
        let full = page.len() == query.limit;
        n_scanned += page.len();
        for stored in &page {
            let i = &stored.instance;
            let counts = machines
                .entry((i.namespace.to_string(), i.machine.to_string()))
                .or_default()
                .entry(i.revision)
                .or_default();
            counts.total += 1;
            *counts.by_state.entry(i.state.to_string()).or_default() += 1;
            *counts
                .by_status
                .entry(i.status.as_str().to_owned())
                .or_default() += 1;
        }
        match page.last() {
            Some(last) if full && n_scanned < max => {
                query.after = Some((
                    last.instance.namespace.to_string(),
                    last.instance.id.to_string(),
                ))
            }
            Some(_) if full => return Ok((machines, n_scanned, true)),
            _ => return Ok((machines, n_scanned, false)),
        }
    }
}

/// `/debug/statemachine`: per machine and revision, instance counts by state; the last 50
/// transitions and the last 50 errors.
pub async fn debug(
    State(state): State<ServerState>,
    query: QueryPairs,
) -> Result<Response, ApiError> {
    let text = wants_text(query)?;
    let store = Arc::clone(state.runtime().store());
    let max = state.options().scan_instances_max;
    let (machines, n_scanned, capped) =
        tokio::task::spawn_blocking(move || machine_counts(&*store, max))
            .await
            .map_err(|_| ApiError::unavailable("the store could not be read"))??;
    let transitions = state.inner.diagnostics.recent_transitions();
    let errors = state.inner.diagnostics.recent_errors();
    if !text {
        let machines: Vec<Value> = machines
            .iter()
            .map(|((ns, name), revisions)| {
                let revisions: Vec<Value> = revisions
                    .iter()
                    .map(|(revision, counts)| {
                        json!({
                            "revision": revision,
                            "instances": counts.total,
                            "byState": counts.by_state,
                            "byStatus": counts.by_status,
                        })
                    })
                    .collect();
                json!({ "namespace": ns, "name": name, "revisions": revisions })
            })
            .collect();
        return Ok(Json(json!({
            "machines": machines,
            "instancesScanned": n_scanned,
            "instancesCapped": capped,
            "recentTransitions": transitions,
            "recentErrors": errors,
            "flagGates": flag_gates(state.runtime()),
            "delivery": state.runtime().delivery_status().unwrap_or_default(),
        }))
        .into_response());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machines ({} instance(s) scanned{}):",
        n_scanned,
        if capped { ", capped" } else { "" }
    );
    for ((ns, name), revisions) in &machines {
        let _ = writeln!(out, "  {ns}/{name}");
        if revisions.is_empty() {
            let _ = writeln!(out, "    no instances");
        }
        for (revision, counts) in revisions {
            let states: Vec<String> = counts
                .by_state
                .iter()
                .map(|(s, n)| format!("{s}={n}"))
                .collect();
            let _ = writeln!(
                out,
                "    revision {revision}: {} instance(s): {}",
                counts.total,
                states.join(", ")
            );
        }
    }
    let _ = writeln!(out, "Last transitions (newest first):");
    if transitions.is_empty() {
        let _ = writeln!(out, "  none since start");
    }
    for t in &transitions {
        let _ = writeln!(
            out,
            "  {} {}/{} v{} {} -> {} on {} by {}",
            rfc3339_ms(t.time_ms),
            t.namespace,
            t.instance,
            t.version,
            t.from.as_deref().unwrap_or("-"),
            t.to,
            t.event.as_deref().unwrap_or("-"),
            t.actor
        );
    }
    let gates = flag_gates(state.runtime());
    if !gates.is_empty() {
        let _ = writeln!(out, "Flag gates (status of each flag's last evaluation):");
        for (key, status) in &gates {
            let _ = writeln!(out, "  {key}: {status}");
        }
    }
    if let Some(targets) = state.runtime().delivery_status() {
        let _ = writeln!(out, "Delivery (notify targets):");
        if targets.is_empty() {
            let _ = writeln!(out, "  no notify targets");
        }
        for t in &targets {
            let _ = writeln!(
                out,
                "  {} -> {}: {} cursor {} lag {} pending {} in flight {} delivered {} attempts {} failed {} dead letters {}{}{}",
                t.target,
                t.url,
                if t.held {
                    "held"
                } else {
                    "held by another node"
                },
                t.cursor,
                t.lag,
                t.pending,
                t.in_flight,
                t.delivered,
                t.attempts,
                t.failed_attempts,
                t.dead_letters,
                t.last_error
                    .as_deref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default(),
                t.degraded
                    .as_deref()
                    .map(|d| format!("; DEGRADED: {d}"))
                    .unwrap_or_default(),
            );
        }
    }
    let _ = writeln!(out, "Last errors (newest first):");
    if errors.is_empty() {
        let _ = writeln!(out, "  none since start");
    }
    for e in &errors {
        let at: Vec<&str> = [e.state.as_deref(), e.event.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        let at = if at.is_empty() {
            String::new()
        } else {
            format!(" [{}]", at.join(" / "))
        };
        let _ = writeln!(
            out,
            "  {} {} {} {} {}{at}: {}",
            rfc3339_ms(e.time_ms),
            e.status,
            e.error_type,
            e.method,
            e.path,
            e.detail
        );
    }
    Ok(text_response(StatusCode::OK, out))
}
