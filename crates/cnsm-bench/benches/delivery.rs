//! Push delivery must not slow transitions: durable transitions/s of the runtime (embedded
//! store, every transition fsynced in its group commit) with no notify target, with a target
//! whose receiver accepts, with one whose receiver hangs (every attempt times out after 1 s),
//! and with one whose port is closed (every attempt is refused) — in the same run, the cases
//! interleaved over rounds so that drift on the machine hits them all alike. The deliverer
//! runs (HTTP transport, default settings) for every case with a target; the case with no
//! target starts no deliverer.
//!
//! Run: `cargo bench -p cnsm-bench --bench delivery` (`CNSM_BENCH_SECONDS`, default 5, per
//! case and round; `CNSM_BENCH_CLIENTS`, default 256; `CNSM_BENCH_ROUNDS`, default 2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cnsm_bench::report;
use cnsm_runtime::delivery::{Deliverer, DeliveryOptions};
use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeOptions};
use cnsm_server::delivery_transport::HttpTransport;
use cnsm_store::embedded::EmbeddedStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiver {
    None,
    Accepts,
    Hangs,
    Down,
}

impl Receiver {
    fn name(self) -> &'static str {
        match self {
            Receiver::None => "none",
            Receiver::Accepts => "accepting",
            Receiver::Hangs => "hanging",
            Receiver::Down => "down",
        }
    }
}

fn counter(url: Option<&str>) -> String {
    let notify = match url {
        Some(url) => format!("  notify:\n  - {{name: worker, url: '{url}', timeoutSeconds: 1}}\n"),
        None => String::new(),
    };
    format!(
        r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {{name: counter, namespace: bench}}
spec:
  initialState: counting
{notify}  states:
  - name: counting
    type: task
    timeoutSeconds: 86400
    onEvent:
    - event: inc
      target: counting
"#
    )
}

/// A loopback receiver: answers 204 at once, or never.
async fn receiver(hang: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request| async move {
                    if hang {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(204)
                            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

/// Durable transitions/s with `n_clients` clients for `seconds`, and the deliverer's counts.
async fn durable(case: Receiver, n_clients: usize, seconds: u64) -> (f64, String) {
    let url = match case {
        Receiver::None => None,
        Receiver::Accepts => Some(receiver(false).await),
        Receiver::Hangs => Some(receiver(true).await),
        Receiver::Down => {
            let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/hook", closed.local_addr().unwrap());
            drop(closed);
            Some(url)
        }
    };
    let dir = match std::env::var_os("CNSM_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    };
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let runtime = Runtime::open(store, RuntimeOptions::default()).unwrap();
    runtime
        .apply_yaml(&counter(url.as_deref()), None)
        .await
        .unwrap();
    let deliverer = url.is_some().then(|| {
        Deliverer::start(
            &runtime,
            DeliveryOptions::new(Arc::new(HttpTransport::new())),
        )
        .unwrap()
    });
    for i in 0..n_clients {
        runtime
            .create_instance(CreateInstance::new("bench", "counter").id(format!("c-{i}")))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..n_clients {
        let runtime = runtime.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("c-{c}");
            let mut n = 0u64;
            while Instant::now() < deadline {
                runtime
                    .send("bench", &id, EventRequest::new("inc"))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let detail = match runtime.delivery_status().and_then(|s| s.into_iter().next()) {
        Some(t) => format!(
            "; deliverer: {} delivered, {} attempts, {} failed, lag {}",
            t.delivered, t.attempts, t.failed_attempts, t.lag
        ),
        None => String::new(),
    };
    if let Some(deliverer) = deliverer {
        deliverer.stop();
    }
    runtime.shutdown();
    (rate, detail)
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let seconds = env("CNSM_BENCH_SECONDS", 5);
    let n_clients = env("CNSM_BENCH_CLIENTS", 256) as usize;
    let rounds = env("CNSM_BENCH_ROUNDS", 2).max(1);
    let io = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let cases = [
        Receiver::None,
        Receiver::Accepts,
        Receiver::Hangs,
        Receiver::Down,
    ];
    let mut best = [
        (0.0f64, String::new()),
        Default::default(),
        Default::default(),
        Default::default(),
    ];
    for _ in 0..rounds {
        for (i, case) in cases.iter().enumerate() {
            let (rate, detail) = io.block_on(durable(*case, n_clients, seconds));
            if rate > best[i].0 {
                best[i] = (rate, detail);
            }
        }
    }
    for (case, (rate, detail)) in cases.iter().zip(&best) {
        report(
            &format!("delivery.durable.{}", case.name()),
            *rate,
            "transitions/s",
            &format!(
                "(embedded store, {n_clients} clients, best of {rounds} x {seconds} s; receiver {}{detail})",
                case.name()
            ),
        );
    }
    let slowdown = |i: usize| 100.0 * (1.0 - best[i].0 / best[0].0.max(1.0));
    println!(
        "# slowdown against no target: accepting {:.1} %, hanging {:.1} %, down {:.1} %",
        slowdown(1),
        slowdown(2),
        slowdown(3)
    );
}
