//! Three `cnsmctl serve` nodes on loopback over one PostgreSQL schema: concurrent clients fire
//! events at shared instances through every node, one node is SIGKILLed mid-storm and
//! restarted; afterwards every acknowledged event is in history exactly once, every chain
//! verifies, versions have no gaps, every timer that fell due fired exactly once, and a watch
//! on one node saw commits made through another.
//!
//! Needs `CNSM_TEST_POSTGRES_URL`; without it the test says it was skipped and passes.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cnsm_core::record::{Hash32, verify_chain};
use cnsm_server::client::Client;
use cnsm_store::Store;
use cnsm_store_postgres::{PostgresOptions, PostgresStore};
use serde_json::json;

use super::server::ServerChild;

const PREFIX: &str = "/apis/statemachine.cn/v1alpha1/namespaces";

/// `tick` loops; `stop` enters a 1 s wait whose timer leads to `done`.
const MACHINE: &str = "apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata:
  name: storm
spec:
  initialState: open
  states:
  - name: open
    type: task
    timeoutSeconds: 86400
    onEvent:
    - event: tick
      target: open
    - event: stop
      target: waiting
  - name: waiting
    type: wait
    timeoutSeconds: 1
    transition: done
  - name: done
    type: final
";

const N_INSTANCES: usize = 8;

/// A node: `cnsmctl --store URL serve` on a loopback port (stderr discarded: nobody reads it).
fn start_node(store_url: &str) -> ServerChild {
    ServerChild::spawn(
        &["--store", store_url],
        &["--listen", "127.0.0.1:0"],
        &[],
        Stdio::null(),
    )
}

struct Schema {
    url: String,
    options: PostgresOptions,
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(store) = PostgresStore::open(&self.url, self.options.clone()) {
            let schema = self.options.schema.clone().unwrap_or_default();
            let _ = store.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    }
}

/// Acknowledged versions per instance, from every client.
type Acks = Arc<std::sync::Mutex<BTreeMap<String, Vec<u64>>>>;

/// Sends `tick`s through `client` to every instance in turn until `stop` is set or the node
/// stops answering.
async fn storm(client: Client, stop: Arc<AtomicBool>, acks: Acks, n_unavailable: Arc<AtomicU64>) {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("s-{}", i % N_INSTANCES);
        i += 1;
        let sent = client
            .post_json(
                &format!("{PREFIX}/load/instances/{id}/events"),
                &json!({"event": "tick"}),
                &[],
            )
            .await;
        match sent {
            Ok(r) if r.status == 200 => {
                let version = r.json()["record"]["version"].as_u64().expect("version");
                acks.lock().unwrap().entry(id).or_default().push(version);
            }
            // Contention beyond the retry bound, or the database was slow: not acknowledged.
            Ok(r) if r.status == 503 => {
                n_unavailable.fetch_add(1, Ordering::Relaxed);
                assert!(r.header("retry-after").is_some(), "503 without Retry-After");
            }
            Ok(r) => panic!("unexpected answer {}: {}", r.status, r.text()),
            // The node was killed.
            Err(_) => break,
        }
    }
}

#[test]
fn three_nodes_survive_a_sigkill_mid_storm() {
    let Ok(base) = std::env::var("CNSM_TEST_POSTGRES_URL") else {
        eprintln!("skipped: CNSM_TEST_POSTGRES_URL is not set");
        return;
    };
    let schema_name = format!(
        "cnsm_nodes_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let schema = Schema {
        url: base.clone(),
        options: PostgresOptions {
            schema: Some(schema_name.clone()),
            ..PostgresOptions::default()
        },
    };
    PostgresStore::migrate(&schema.url, &schema.options).expect("create the schema");
    let separator = if base.contains('?') { '&' } else { '?' };
    let store_url = format!("{base}{separator}options=-c%20search_path%3D{schema_name}");

    let mut nodes: Vec<ServerChild> = (0..3).map(|_| start_node(&store_url)).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients: Vec<Client> = nodes.iter().map(|n| Client::new(&n.url).unwrap()).collect();
    let acks: Acks = Arc::default();
    let n_unavailable = Arc::new(AtomicU64::new(0));

    let watched = runtime.block_on(async {
        let r = clients[0]
            .request(
                "POST",
                &format!("{PREFIX}/load/statemachines"),
                &[("content-type", "application/yaml")],
                MACHINE.as_bytes().to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        for i in 0..N_INSTANCES {
            // Created through different nodes.
            let r = clients[i % 3]
                .post_json(
                    &format!("{PREFIX}/load/instances"),
                    &json!({"id": format!("s-{i}"), "machine": "storm"}),
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{}", r.text());
        }

        // A watch on node 2 must see transitions committed through nodes 0 and 1.
        let mut watch = match clients[2]
            .stream(&format!("{PREFIX}/load/instances?watch=true"), &[])
            .await
            .expect("watch")
        {
            Ok(stream) => stream,
            Err(response) => panic!("watch refused: {} {}", response.status, response.text()),
        };
        let watch_task = tokio::spawn(async move {
            let mut seen = 0u64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while seen < 5 {
                match tokio::time::timeout_at(deadline, watch.next_event()).await {
                    Ok(Ok(Some(event))) if event.data.contains("tick") => seen += 1,
                    Ok(Ok(Some(_))) => {}
                    _ => break,
                }
            }
            seen
        });

        // The storm: two clients per node.
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for client in clients.iter().take(2).chain(clients.iter().take(2)) {
            tasks.push(tokio::spawn(storm(
                client.clone(),
                Arc::clone(&stop),
                Arc::clone(&acks),
                Arc::clone(&n_unavailable),
            )));
        }
        // Node 1's clients run until node 1 is killed (a refused connection ends them).
        for _ in 0..2 {
            tokio::spawn(storm(
                clients[1].clone(),
                Arc::new(AtomicBool::new(false)),
                Arc::clone(&acks),
                Arc::clone(&n_unavailable),
            ));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        watch_task.await.unwrap()
    });

    // SIGKILL node 1 mid-storm (its clients stop at the refused connection), then restart it.
    nodes[1].kill();
    std::thread::sleep(Duration::from_millis(300));
    nodes[1] = start_node(&store_url);
    let restarted = Client::new(&nodes[1].url).unwrap();
    runtime.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(storm(
            restarted.clone(),
            Arc::clone(&stop),
            Arc::clone(&acks),
            Arc::clone(&n_unavailable),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        task.await.unwrap();
    });
    // Everything still running stops now (the runtime drop ends the storm tasks mid-request:
    // those requests are not acknowledged).
    drop(runtime);

    // Every instance enters its 1 s wait through some node; the timer fires on some node.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let clients: Vec<Client> = nodes.iter().map(|n| Client::new(&n.url).unwrap()).collect();
    runtime.block_on(async {
        for i in 0..N_INSTANCES {
            let r = clients[i % 3]
                .post_json(
                    &format!("{PREFIX}/load/instances/s-{i}/events"),
                    &json!({"event": "stop"}),
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..N_INSTANCES {
            loop {
                let r = clients[(i + 1) % 3]
                    .get(&format!("{PREFIX}/load/instances/s-{i}"))
                    .await
                    .unwrap();
                if r.json()["state"] == "done" {
                    break;
                }
                assert!(Instant::now() < deadline, "s-{i} never left its wait");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Let every node poll for timers a few more times: none may fire again.
        tokio::time::sleep(Duration::from_millis(1_000)).await;
    });

    let store = PostgresStore::open(&base, schema.options.clone()).expect("open the store");
    let acks = acks.lock().unwrap().clone();
    let n_acked: usize = acks.values().map(Vec::len).sum();
    assert!(n_acked > 20, "too few events were acknowledged: {n_acked}");
    for i in 0..N_INSTANCES {
        let id = format!("s-{i}");
        let history = store.history("load", &id, 0, 0).unwrap();
        verify_chain("load", &id, 0, Hash32::ZERO, &history).expect("the chain verifies");
        let versions: Vec<u64> = history.iter().map(|r| r.version).collect();
        assert_eq!(
            versions,
            (0..history.len() as u64).collect::<Vec<_>>(),
            "{id}: gaps"
        );
        let records: Vec<_> = history.iter().map(|r| r.open().unwrap()).collect();
        let acked: BTreeSet<u64> = acks.get(&id).into_iter().flatten().copied().collect();
        assert_eq!(
            acked.len(),
            acks.get(&id).map_or(0, Vec::len),
            "{id}: one version acknowledged twice"
        );
        for version in &acked {
            let record = &records[*version as usize];
            assert_eq!(record.event.as_deref(), Some("tick"), "{id} v{version}");
        }
        let n_timer_records = records
            .iter()
            .filter(|r| &*r.actor == cnsm_core::engine::ACTOR_TIMER)
            .count();
        assert_eq!(
            n_timer_records, 1,
            "{id}: the wait's timer fired exactly once"
        );
        assert_eq!(&*records.last().unwrap().to, "done");
    }
    let report = store.verify().unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(
        watched >= 5,
        "the watch on node 2 saw {watched} transitions committed through other nodes"
    );
    eprintln!(
        "three nodes: {n_acked} events acknowledged, {} answered 503",
        n_unavailable.load(Ordering::Relaxed)
    );
}

/// A TCP proxy to the database that can be cut (every connection closed, the port refused)
/// and restored, to make the database unreachable without touching it.
struct Proxy {
    port: u16,
    upstream: std::net::SocketAddr,
    state: Arc<std::sync::Mutex<ProxyState>>,
}

#[derive(Default)]
struct ProxyState {
    up: bool,
    generation: u64,
    streams: Vec<std::net::TcpStream>,
}

impl Proxy {
    fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            upstream,
            state: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let generation = {
            let mut state = self.state.lock().unwrap();
            state.up = true;
            state.generation += 1;
            state.generation
        };
        let state = Arc::clone(&self.state);
        let upstream = self.upstream;
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            loop {
                if state.lock().unwrap().generation != generation {
                    return; // cut: the listener closes
                }
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = std::net::TcpStream::connect(upstream) else {
                            continue;
                        };
                        let mut state = state.lock().unwrap();
                        state.streams.push(client.try_clone().unwrap());
                        state.streams.push(server.try_clone().unwrap());
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
    }

    fn cut(&self) {
        let mut state = self.state.lock().unwrap();
        state.up = false;
        state.generation += 1;
        for stream in state.streams.drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        // The old listener thread notices the new generation within 10 ms and closes.
        std::thread::sleep(Duration::from_millis(50));
        let listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        self.serve(listener);
    }
}

/// With the database unreachable the node is not ready and requests get 503 with
/// `Retry-After` quickly (no hang); when the database comes back the node recovers by itself,
/// and nothing acknowledged was lost.
#[test]
fn unreachable_database_makes_the_node_unready_then_it_recovers() {
    let Ok(base) = std::env::var("CNSM_TEST_POSTGRES_URL") else {
        eprintln!("skipped: CNSM_TEST_POSTGRES_URL is not set");
        return;
    };
    let config: tokio_postgres_url::Url = base.parse().expect("a URL");
    let Some(upstream) = config.socket_addr() else {
        eprintln!("skipped: the test database is not on a TCP address");
        return;
    };
    let schema_name = format!("cnsm_ready_{}", std::process::id());
    let schema = Schema {
        url: base.clone(),
        options: PostgresOptions {
            schema: Some(schema_name.clone()),
            ..PostgresOptions::default()
        },
    };
    PostgresStore::migrate(&schema.url, &schema.options).expect("create the schema");
    let proxy = Proxy::start(upstream);
    let store_url = config.with_port(proxy.port, &schema_name);
    let node = start_node(&store_url);
    let client = Client::new(&node.url).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let ready = client.get("/health/readyz").await.unwrap();
        assert_eq!(ready.status, 200, "{}", ready.text());
        let r = client
            .request(
                "POST",
                &format!("{PREFIX}/load/statemachines"),
                &[("content-type", "application/yaml")],
                MACHINE.as_bytes().to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        let r = client
            .post_json(
                &format!("{PREFIX}/load/instances"),
                &json!({"id": "r-1", "machine": "storm"}),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());

        proxy.cut();
        let started = Instant::now();
        let not_ready = client.get("/health/readyz").await.unwrap();
        assert_eq!(not_ready.status, 503, "{}", not_ready.text());
        assert!(not_ready.header("retry-after").is_some());
        let refused = client
            .post_json(
                &format!("{PREFIX}/load/instances/r-1/events"),
                &json!({"event": "tick"}),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert!(refused.header("retry-after").is_some());
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "answers came within the deadlines"
        );

        proxy.restore();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client.get("/health/readyz").await.unwrap();
            if ready.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "the node did not recover");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let r = client
            .post_json(
                &format!("{PREFIX}/load/instances/r-1/events"),
                &json!({"event": "tick"}),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["record"]["version"],
            1,
            "the refused event did not commit"
        );
    });
}

/// Just enough URL handling for the test: host, port and the rest of a postgres:// URL.
mod tokio_postgres_url {
    pub struct Url {
        before_host: String,
        host: String,
        port: u16,
        after_port: String,
    }

    impl std::str::FromStr for Url {
        type Err = String;

        fn from_str(url: &str) -> Result<Url, String> {
            let scheme_end = url.find("://").ok_or("no scheme")? + 3;
            let authority_start = url[scheme_end..]
                .find('@')
                .map_or(scheme_end, |at| scheme_end + at + 1);
            let authority_end = url[authority_start..]
                .find(['/', '?'])
                .map_or(url.len(), |i| authority_start + i);
            let authority = &url[authority_start..authority_end];
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| "bad port")?),
                None => (authority, 5432),
            };
            Ok(Url {
                before_host: url[..authority_start].to_owned(),
                host: host.to_owned(),
                port,
                after_port: url[authority_end..].to_owned(),
            })
        }
    }

    impl Url {
        pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
            use std::net::ToSocketAddrs;
            (self.host.as_str(), self.port)
                .to_socket_addrs()
                .ok()?
                .next()
        }

        /// The URL on another port of 127.0.0.1, in `schema`.
        pub fn with_port(&self, port: u16, schema: &str) -> String {
            let separator = if self.after_port.contains('?') {
                '&'
            } else {
                '?'
            };
            format!(
                "{}127.0.0.1:{port}{}{separator}options=-c%20search_path%3D{schema}",
                self.before_host, self.after_port
            )
        }
    }
}
