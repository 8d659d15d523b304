//! The HTTP API of cnsm: Kubernetes-style routes over a [`Runtime`], events as JSON or
//! CloudEvents 1.0, watch streams (Server-Sent Events), health and debug endpoints.
//!
//! Code map:
//! - [`wire`]: the JSON bodies, shared with clients.
//! - [`problem`]: every error as an RFC 9457 problem with a stable `type` URI.
//! - `definitions`, `instances`, `events`: the resource routes; `events` turns a plain JSON body,
//!   a structured or a binary CloudEvent into one [`cnsm_runtime::EventRequest`].
//! - `watch`: the [`cnsm_runtime::CommitListener`] that feeds a broadcast channel, and the SSE
//!   streams (resumable per instance with `Last-Event-ID`).
//! - `health`: `/health/*` and `/debug/statemachine`, with the ring buffers of recent
//!   transitions and errors.
//! - [`routes`]: the one route table (method, path, handler, access, documented bodies and
//!   statuses) that both [`router`] and [`openapi::document`] are built from.
//! - [`auth`]: bearer tokens with namespace-scoped roles (`--auth-file`): 401 and 403.
//! - [`openapi`]: the OpenAPI 3.1 document served at `/openapi.json`.
//! - [`client`]: a small HTTP/1.1 client for this API (used by `cnsmctl --server` and tests).
//! - [`tls`]: HTTPS with rustls (`--tls-cert`, `--tls-key`; `--ca-cert` on the client side).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use cnsm_runtime::{Runtime, RuntimeOptions};
//! use cnsm_server::{ServerOptions, serve, shutdown_signal};
//! use cnsm_store::embedded::EmbeddedStore;
//! let store = EmbeddedStore::open(std::path::Path::new("./cnsm-data"))?;
//! let runtime = Runtime::open(store, RuntimeOptions::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! serve(listener, runtime, ServerOptions::default(), shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! The server sets no global state (no tracing subscriber, no metrics provider).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use cnsm_runtime::Runtime;
use tokio::sync::{Semaphore, watch};

mod admin;
pub mod auth;
pub mod client;
mod controls;
mod definitions;
pub mod deliveries;
pub mod delivery_transport;
mod events;
mod health;
mod instances;
pub mod migrations;
pub mod openapi;
mod params;
pub mod problem;
pub mod routes;
pub mod snapshots;
pub mod tls;
mod watch_stream;
pub mod wire;

use crate::auth::AuthConfig;
use crate::health::Diagnostics;
use crate::problem::{ApiError, PendingProblem, ProblemKind};
use crate::watch_stream::WatchHub;

/// Limits and settings of a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Allow a listener on a non-loopback address without authentication.
    pub insecure: bool,
    /// Largest request body; larger ones get 413.
    pub body_bytes_max: usize,
    /// A request that has not answered by then gets 503 (watch streams are not limited).
    pub request_timeout: Duration,
    /// Requests served at once (health endpoints excepted); more get 503 with `Retry-After`.
    pub requests_in_flight_max: usize,
    /// Open watch streams at once; more get 503.
    pub watchers_max: usize,
    /// Committed transitions buffered for watchers; a watcher that falls further behind is
    /// told to resync.
    pub watch_buffer_len: usize,
    /// Interval of SSE keep-alive comments.
    pub keep_alive_interval: Duration,
    /// Reported by `/health/statez`.
    pub store_kind: String,
    /// Most instances `/health/statez` and `/debug/statemachine` count.
    pub scan_instances_max: usize,
    /// Bearer tokens with namespace-scoped roles (`--auth-file`); `None`: everyone is
    /// `anonymous` with every right, and only loopback addresses are served.
    pub auth: Option<Arc<AuthConfig>>,
    /// Serve HTTPS with this configuration (`--tls-cert`, `--tls-key`; see
    /// [`tls::server_config`]); `None`: plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// What `GET /metrics` answers (Prometheus text); `None`: metrics are off.
    pub metrics: Option<MetricsText>,
}

/// The exposition format `/metrics` answers in (content negotiation on `Accept`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsFormat {
    /// The Prometheus text format 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics 1.0 text, with exemplars (trace ids) on `cnsm.transition.duration` buckets.
    OpenMetrics,
}

impl MetricsFormat {
    /// OpenMetrics when the `Accept` header lists `application/openmetrics-text` (with a
    /// non-zero `q`), else Prometheus text.
    pub fn negotiate(accept: Option<&str>) -> MetricsFormat {
        let wants = accept.is_some_and(|accept| {
            accept.split(',').any(|item| {
                let mut parts = item.split(';').map(str::trim);
                let media = parts.next().unwrap_or_default();
                media.eq_ignore_ascii_case("application/openmetrics-text")
                    && parts.all(|p| {
                        p.strip_prefix("q=")
                            .and_then(|q| q.parse::<f32>().ok())
                            .is_none_or(|q| q > 0.0)
                    })
            })
        });
        if wants {
            MetricsFormat::OpenMetrics
        } else {
            MetricsFormat::Prometheus
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            MetricsFormat::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            MetricsFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
        }
    }
}

/// Renders the metrics in the asked format (the binary wires the exporter).
#[derive(Clone)]
pub struct MetricsText(pub Arc<dyn Fn(MetricsFormat) -> String + Send + Sync>);

impl std::fmt::Debug for MetricsText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsText")
    }
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions {
            insecure: false,
            body_bytes_max: 1 << 20,
            request_timeout: Duration::from_secs(30),
            requests_in_flight_max: 1024,
            watchers_max: 1024,
            watch_buffer_len: 4096,
            keep_alive_interval: Duration::from_secs(15),
            store_kind: "embedded".into(),
            scan_instances_max: 100_000,
            auth: None,
            tls: None,
            metrics: None,
        }
    }
}

/// Why a server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The address is not loopback and neither authentication nor `--insecure` was given.
    #[error(
        "refusing to listen on {0}: it is not a loopback address and the API has no authentication. \
         Give bearer tokens with --auth-file, or pass --insecure to serve this address without \
         authentication (anyone who can reach it can change every instance), or listen on 127.0.0.1"
    )]
    NotLoopback(SocketAddr),
    /// Accepting or serving connections failed.
    #[error("server I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Refuses a non-loopback address unless the API has authentication or `insecure` is set.
pub fn check_listen_address(
    address: SocketAddr,
    authenticated: bool,
    insecure: bool,
) -> Result<(), ServeError> {
    if address.ip().is_loopback() || authenticated || insecure {
        Ok(())
    } else {
        Err(ServeError::NotLoopback(address))
    }
}

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ServerState {
    inner: Arc<Inner>,
}

struct Inner {
    runtime: Runtime,
    options: ServerOptions,
    hub: Arc<WatchHub>,
    diagnostics: Arc<Diagnostics>,
    in_flight: Arc<Semaphore>,
    watchers: Arc<Semaphore>,
    stop_sender: watch::Sender<bool>,
    started: Instant,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").finish_non_exhaustive()
    }
}

impl ServerState {
    /// Builds the shared state and subscribes its commit listener (watch streams, recent
    /// transitions, last commit time) to `runtime`.
    pub fn new(runtime: Runtime, options: ServerOptions) -> ServerState {
        let diagnostics = Arc::new(Diagnostics::default());
        let hub = Arc::new(WatchHub::new(options.watch_buffer_len));
        runtime.subscribe(Arc::new(watch_stream::Listener {
            hub: Arc::clone(&hub),
            diagnostics: Arc::clone(&diagnostics),
        }));
        let (stop_sender, _) = watch::channel(false);
        ServerState {
            inner: Arc::new(Inner {
                in_flight: Arc::new(Semaphore::new(options.requests_in_flight_max)),
                watchers: Arc::new(Semaphore::new(options.watchers_max)),
                runtime,
                options,
                hub,
                diagnostics,
                stop_sender,
                started: Instant::now(),
            }),
        }
    }

    /// Ends every open watch stream (graceful shutdown starts with this, since a stream would
    /// otherwise keep its connection open forever).
    pub fn begin_shutdown(&self) {
        self.inner.stop_sender.send_replace(true);
    }

    pub(crate) fn runtime(&self) -> &Runtime {
        &self.inner.runtime
    }

    pub(crate) fn options(&self) -> &ServerOptions {
        &self.inner.options
    }

    pub(crate) fn stop_receiver(&self) -> watch::Receiver<bool> {
        self.inner.stop_sender.subscribe()
    }
}

/// The whole API as an axum router, built from the route table ([`routes::ROUTES`]), the
/// same table `/openapi.json` is generated from.
pub fn router(state: ServerState) -> Router {
    let body_limit = state.options().body_bytes_max;
    let mut router = Router::new();
    for route in routes::ROUTES {
        let method_router = (route.handler)().route_layer(middleware::from_fn_with_state(
            route.access,
            auth::authorize,
        ));
        router = router.route(route.path, method_router);
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), limits))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            finish_problems,
        ))
        .with_state(state)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!("no route for {}", request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        ProblemKind::MethodNotAllowed,
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// When the request times out (a request extension set by the limits middleware).
#[derive(Debug, Clone, Copy)]
pub struct RequestDeadline(pub Instant);

/// Bounded concurrency and the request timeout. Health endpoints bypass both so that probes
/// answer under load.
async fn limits(State(state): State<ServerState>, request: Request, next: Next) -> Response {
    if request.uri().path().starts_with("/health/") {
        return next.run(request).await;
    }
    let Ok(_permit) = Arc::clone(&state.inner.in_flight).try_acquire_owned() else {
        return axum::response::IntoResponse::into_response(ApiError::unavailable(
            "too many requests in flight; retry later",
        ));
    };
    let timeout = state.options().request_timeout;
    // The deadline is checked against the clock on every wake-up, not only by the timer wheel
    // (which ticks in milliseconds), so a request still pending past it is answered 503 at once.
    let deadline = tokio::time::Instant::now() + timeout;
    // Handlers that queue work (events) hand the deadline to the runtime, which refuses an
    // event still queued past it and counts the attempt as error.type Timeout.
    let mut request = request;
    request
        .extensions_mut()
        .insert(RequestDeadline(deadline.into_std()));
    let run = next.run(request);
    let sleep = tokio::time::sleep_until(deadline);
    tokio::pin!(run, sleep);
    let answered = std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(response) = run.as_mut().poll(cx) {
            return std::task::Poll::Ready(Some(response));
        }
        if tokio::time::Instant::now() >= deadline || sleep.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Pending
    })
    .await;
    match answered {
        Some(response) => response,
        None => axum::response::IntoResponse::into_response(ApiError::new(
            ProblemKind::Timeout,
            format!(
                "the request did not complete within {} s; its outcome is unknown \
                 (retry with the same Idempotency-Key)",
                timeout.as_secs_f64()
            ),
        )),
    }
}

/// Renders every problem: adds the request path as `instance`, writes the body, and records
/// the error for `/debug/statemachine`.
async fn finish_problems(
    State(state): State<ServerState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    let mut response = next.run(request).await;
    let Some(PendingProblem(problem)) = response.extensions_mut().remove::<PendingProblem>() else {
        return response;
    };
    let mut body = problem.body();
    body.insert("instance".into(), path.clone().into());
    state
        .inner
        .diagnostics
        .record_error(method.as_str(), &path, &problem);
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    response.headers_mut().insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(bytes.len() as u64),
    );
    *response.body_mut() = Body::from(bytes);
    response
}

/// Serves the API on `listener` until `shutdown` completes, then drains: stops accepting,
/// ends watch streams, waits for in-flight requests, and shuts the runtime down (flushing the
/// committer) before returning.
///
/// With `options.tls` every connection must complete a TLS handshake (HTTPS only).
///
/// Refuses a non-loopback listener unless `options.auth` or `options.insecure`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    runtime: Runtime,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    check_listen_address(
        listener.local_addr()?,
        options.auth.is_some(),
        options.insecure,
    )?;
    let tls = options.tls.clone();
    let state = ServerState::new(runtime.clone(), options);
    let served = match tls {
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config)?;
            serve_on(listener, state, shutdown).await
        }
        None => serve_on(listener, state, shutdown).await,
    };
    // Every acknowledged request has been answered; stop the committer after what is queued.
    let stopped = tokio::task::spawn_blocking(move || runtime.shutdown()).await;
    served?;
    stopped.map_err(|e| ServeError::Io(std::io::Error::other(e.to_string())))?;
    Ok(())
}

/// Serves until `shutdown`, then ends watch streams and waits for in-flight requests.
async fn serve_on<L>(
    listener: L,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let app = router(state.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            state.begin_shutdown();
        })
        .await
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = interrupt => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    interrupt.await;
}

#[cfg(test)]
mod tests {
    use super::MetricsFormat;

    #[test]
    fn metrics_format_follows_accept() {
        let check = |accept: Option<&str>, expected: MetricsFormat| {
            assert_eq!(MetricsFormat::negotiate(accept), expected, "{accept:?}");
        };
        check(None, MetricsFormat::Prometheus);
        check(Some("text/plain"), MetricsFormat::Prometheus);
        check(Some("*/*"), MetricsFormat::Prometheus);
        check(
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            MetricsFormat::OpenMetrics,
        );
        check(
            Some("text/plain;q=0.5, Application/OpenMetrics-Text;q=0.9"),
            MetricsFormat::OpenMetrics,
        );
        check(
            Some("application/openmetrics-text;q=0, text/plain"),
            MetricsFormat::Prometheus,
        );
    }
}
