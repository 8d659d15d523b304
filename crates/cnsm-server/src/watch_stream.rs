//! Watch streams: committed transitions as Server-Sent Events.
//!
//! A [`Listener`] registered with the runtime publishes every committed record into a bounded
//! `tokio::sync::broadcast` channel (only while someone watches). Each stream filters it.
//!
//! - One instance (`GET .../instances/{id}?watch=true`): every event's `id` is the instance
//!   version. Without a resume point the stream opens with `event: instance` (the current
//!   instance); with `Last-Event-ID: <version>` (or `?resourceVersion=`) it first replays the
//!   history records after that version from the store. Then it goes on live. The stream
//!   subscribes *before* it reads the store and drops live records it has already sent, and it
//!   fills any gap (a lagging receiver included) from the store, so a client sees every version
//!   exactly once, in order.
//! - A collection (`GET .../instances?watch=true`, with the list filters): `id` is
//!   `<namespace>/<instance>@<version>`. It is not resumable; a client that falls more than the
//!   buffer behind gets `event: error` (resync: list again, then watch) and the stream ends.
//!
//! Streams send a keep-alive comment every 15 s and end when the server shuts down.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use cnsm_core::record::Hash32;
use cnsm_core::{Instance, StateChangeEvent, Status};
use cnsm_runtime::{CommitListener, Runtime};
use futures_util::stream;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, broadcast, watch};

use crate::ServerState;
use crate::health::Diagnostics;
use crate::problem::ApiError;
use crate::wire::HISTORY_PAGE_LEN_MAX;

/// One committed transition as the broadcast channel carries it.
#[derive(Debug)]
pub struct Committed {
    pub record: StateChangeEvent,
    pub hash: Hash32,
    pub instance: Instance,
}

/// The broadcast side of watch streams.
pub struct WatchHub {
    sender: broadcast::Sender<Arc<Committed>>,
    n_published: AtomicU64,
}

impl WatchHub {
    pub fn new(buffer_len: usize) -> WatchHub {
        let (sender, _) = broadcast::channel(buffer_len.max(1));
        WatchHub {
            sender,
            n_published: AtomicU64::new(0),
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.sender.subscribe()
    }

    /// Open watch streams.
    pub fn n_watchers(&self) -> usize {
        self.sender.receiver_count()
    }
}

/// Feeds the hub and the diagnostics from the committer thread; cheap when nobody watches.
pub struct Listener {
    pub hub: Arc<WatchHub>,
    pub diagnostics: Arc<Diagnostics>,
}

impl CommitListener for Listener {
    fn on_commit(&self, record: &StateChangeEvent, hash: Hash32, instance: &Instance) {
        self.diagnostics.record_transition(record);
        if self.hub.sender.receiver_count() > 0 {
            self.hub.n_published.fetch_add(1, Ordering::Relaxed);
            let _ = self.hub.sender.send(Arc::new(Committed {
                record: record.clone(),
                hash,
                instance: instance.clone(),
            }));
        }
    }

    fn on_batch(&self, n_items: usize, commit_duration: std::time::Duration) {
        self.diagnostics.record_batch(n_items, commit_duration);
    }

    fn wants_remote_commits(&self) -> bool {
        self.hub.sender.receiver_count() > 0
    }

    /// Another node's commit (shared store): watchers see it like a local one.
    fn on_remote_commit(&self, record: &StateChangeEvent, hash: Hash32, instance: &Instance) {
        if self.hub.sender.receiver_count() > 0 {
            self.hub.n_published.fetch_add(1, Ordering::Relaxed);
            let _ = self.hub.sender.send(Arc::new(Committed {
                record: record.clone(),
                hash,
                instance: instance.clone(),
            }));
        }
    }
}

/// What a collection watch keeps.
#[derive(Debug, Clone, Default)]
pub struct CollectionFilter {
    pub namespace: Option<String>,
    pub machine: Option<String>,
    pub state: Option<String>,
    pub status: Option<Status>,
    pub labels: Vec<(String, String)>,
}

impl CollectionFilter {
    fn matches(&self, instance: &Instance) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| &*instance.namespace == ns)
            && self
                .machine
                .as_deref()
                .is_none_or(|m| &*instance.machine == m)
            && self.state.as_deref().is_none_or(|s| &*instance.state == s)
            && self.status.is_none_or(|s| instance.status == s)
            && self
                .labels
                .iter()
                .all(|(k, v)| instance.labels.get(k).is_some_and(|have| have == v))
    }
}

fn transition_event(committed: &Committed, id: String) -> Event {
    let data = json!({
        "record": committed.record,
        "hash": committed.hash,
        "instance": committed.instance,
    });
    Event::default()
        .event("transition")
        .id(id)
        .data(data.to_string())
}

fn error_event(reason: &str, message: &str) -> Event {
    Event::default()
        .event("error")
        .data(json!({ "reason": reason, "message": message }).to_string())
}

fn watcher_permit(state: &ServerState) -> Result<OwnedSemaphorePermit, ApiError> {
    Arc::clone(&state.inner.watchers)
        .try_acquire_owned()
        .map_err(|_| ApiError::unavailable("too many open watch streams; retry later"))
}

fn sse_response(
    state: &ServerState,
    events: impl futures_util::Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> Response {
    Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(state.options().keep_alive_interval)
                .text("keep-alive"),
        )
        .into_response()
}

/// The stream state of a watch on one instance.
struct InstanceWatch {
    runtime: Runtime,
    namespace: String,
    id: String,
    receiver: broadcast::Receiver<Arc<Committed>>,
    stop: watch::Receiver<bool>,
    /// The last version sent.
    last_sent: u64,
    pending: VecDeque<Event>,
    done: bool,
    _permit: OwnedSemaphorePermit,
}

impl InstanceWatch {
    /// Queues history records after `last_sent` up to `until` (inclusive) from the store.
    async fn fill_from_store(&mut self, until: u64) {
        while self.last_sent < until {
            let from = self.last_sent + 1;
            let n = ((until - self.last_sent) as usize).min(HISTORY_PAGE_LEN_MAX);
            let page = match self
                .runtime
                .history(&self.namespace, &self.id, from, n)
                .await
            {
                Ok(page) => page,
                Err(_) => {
                    self.fail(
                        "unavailable",
                        "the history could not be read; resume with Last-Event-ID",
                    );
                    return;
                }
            };
            if page.is_empty() {
                return;
            }
            for entry in page {
                if entry.record.version != self.last_sent + 1 {
                    self.fail("gap", "the history has a gap; resume with Last-Event-ID");
                    return;
                }
                self.last_sent = entry.record.version;
                let data = json!({ "record": entry.record, "hash": entry.hash });
                self.pending.push_back(
                    Event::default()
                        .event("transition")
                        .id(self.last_sent.to_string())
                        .data(data.to_string()),
                );
            }
        }
    }

    fn fail(&mut self, reason: &str, message: &str) {
        self.pending.push_back(error_event(reason, message));
        self.done = true;
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, InstanceWatch)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            let received = tokio::select! {
                _ = self.stop.wait_for(|stopping| *stopping) => None,
                received = self.receiver.recv() => Some(received),
            };
            match received {
                None | Some(Err(broadcast::error::RecvError::Closed)) => self.done = true,
                Some(Ok(committed)) => {
                    let record = &committed.record;
                    if self.namespace != *record.namespace || self.id != *record.instance {
                        continue;
                    }
                    let version = record.version;
                    if version <= self.last_sent {
                        continue;
                    }
                    if version > self.last_sent + 1 {
                        self.fill_from_store(version - 1).await;
                        if self.done || self.last_sent + 1 != version {
                            continue;
                        }
                    }
                    self.last_sent = version;
                    self.pending
                        .push_back(transition_event(&committed, version.to_string()));
                }
                Some(Err(broadcast::error::RecvError::Lagged(_))) => {
                    // Catch up from the store; later live records are deduplicated.
                    match self.runtime.instance(&self.namespace, &self.id).await {
                        Ok(current) => self.fill_from_store(current.version).await,
                        Err(_) => self.fail(
                            "unavailable",
                            "the instance could not be read; resume with Last-Event-ID",
                        ),
                    }
                }
            }
        }
    }
}

/// `GET .../instances/{id}?watch=true`.
pub async fn watch_instance(
    state: ServerState,
    namespace: String,
    id: String,
    resume_from: Option<u64>,
) -> Result<Response, ApiError> {
    let permit = watcher_permit(&state)?;
    // Subscribe before reading the store, so nothing committed in between is missed.
    let receiver = state.inner.hub.subscribe();
    let runtime = state.runtime().clone();
    let current = runtime
        .instance(&namespace, &id)
        .await
        .map_err(|e| ApiError::from_runtime(e).at_instance(&namespace, &id))?;
    let mut watch = InstanceWatch {
        runtime,
        namespace,
        id,
        receiver,
        stop: state.stop_receiver(),
        last_sent: current.version,
        pending: VecDeque::new(),
        done: false,
        _permit: permit,
    };
    match resume_from {
        None => {
            let data = json!({ "instance": current });
            watch.pending.push_back(
                Event::default()
                    .event("instance")
                    .id(current.version.to_string())
                    .data(data.to_string()),
            );
        }
        Some(from) if from > current.version => {
            return Err(ApiError::invalid(format!(
                "cannot resume after version {from}: the instance is at version {}",
                current.version
            ))
            .at_instance(&watch.namespace, &watch.id));
        }
        Some(from) => {
            watch.last_sent = from;
            watch.fill_from_store(current.version).await;
        }
    }
    let events = stream::unfold(watch, InstanceWatch::next);
    Ok(sse_response(&state, events))
}

/// The stream state of a collection watch.
struct CollectionWatch {
    filter: CollectionFilter,
    receiver: broadcast::Receiver<Arc<Committed>>,
    stop: watch::Receiver<bool>,
    pending: Option<Event>,
    done: bool,
    _permit: OwnedSemaphorePermit,
}

impl CollectionWatch {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, CollectionWatch)> {
        loop {
            if let Some(event) = self.pending.take() {
                return Some((Ok(event), self));
            }
            if self.done {
                return None;
            }
            tokio::select! {
                _ = self.stop.wait_for(|stopping| *stopping) => {
                    self.done = true;
                }
                received = self.receiver.recv() => match received {
                    Ok(committed) if self.filter.matches(&committed.instance) => {
                        let record = &committed.record;
                        let id = format!("{}/{}@{}", record.namespace, record.instance, record.version);
                        self.pending = Some(transition_event(&committed, id));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        self.pending = Some(error_event(
                            "lagged",
                            &format!("the watch fell {n} transition(s) behind; list again, then watch again"),
                        ));
                        self.done = true;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        self.done = true;
                    }
                }
            }
        }
    }
}

/// `GET .../instances?watch=true` (and across namespaces).
pub async fn watch_collection(
    state: ServerState,
    filter: CollectionFilter,
) -> Result<Response, ApiError> {
    let permit = watcher_permit(&state)?;
    let watch = CollectionWatch {
        filter,
        receiver: state.inner.hub.subscribe(),
        stop: state.stop_receiver(),
        pending: None,
        done: false,
        _permit: permit,
    };
    let events = stream::unfold(watch, CollectionWatch::next);
    Ok(sse_response(&state, events))
}
