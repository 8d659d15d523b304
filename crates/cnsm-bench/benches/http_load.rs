//! The HTTP API under load (issue 3): `cnsmctl serve` runs as a separate process on loopback,
//! this process generates the load over keep-alive HTTP/1.1 connections; every answer is a
//! durable acknowledgement (after the group commit's fsync).
//!
//! 1. Closed loop: C connections each sending `POST .../instances/{id}/events {"event":"inc"}`
//!    as fast as answered, round-robin over 1,000 instances, 10 s per C.
//! 2. Open loop at half the best closed-loop rate: every connection sends on a fixed schedule
//!    and latency is measured from the scheduled send time (no coordinated omission). A pacer
//!    thread keeps the schedule with the operating system's timers (requests go out about
//!    0.2 ms after their time, reported as `sent ... after the schedule`); until 2026-11-28 each
//!    connection slept on tokio's 1 ms timer, which added about 0.5-1 ms to every latency.
//!
//! Run: `cargo build --release -p cnsmctl && cargo bench -p cnsm-bench --bench http_load`
//! (`CNSMCTL` names another binary; `CNSM_BENCH_DIR` picks the data directory's parent;
//! `CNSM_HTTP_SECS` changes the 10 s per phase; `CNSM_BENCH_STORE=postgres://...` serves a
//! PostgreSQL store instead of the embedded one, and `CNSM_BATCH_LEN_MAX` is passed on to the
//! server: 1 makes one database transaction per event).
//!
//! `CNSM_BENCH_LATENCY_CSV=FILE` writes each open-loop request's schedule and latency to
//! `FILE.open_half.csv`.
//!
//! `CNSM_BENCH_TARGET_URL` alone loads a `cnsmctl serve` already running there (to read its
//! `/metrics` afterwards) instead of starting one.
//!
//! Peers, same generator: `CNSM_BENCH_TARGET=restate` or `dbos` with `CNSM_BENCH_TARGET_URL`
//! (`http://127.0.0.1:PORT`) drives an already running peer instead of starting `cnsmctl serve`
//! (bench/restate/run.sh and bench/dbos/run.sh start them): the same 1,000 instances created
//! first, the same event body, connections, phases and percentiles; the lines are named
//! `restate.*` / `dbos.*` instead of `http.*`. `CNSM_BENCH_TARGET_PIDS` (comma-separated) names
//! the peer's processes for the CPU split. `CNSM_BENCH_OPEN_RATE` sets the open loop's rate
//! (bench/run.sh passes half of cnsm's best closed-loop rate, so both are measured at the same
//! rate); when the target's own best rate is below it, a second open loop runs at half the
//! target's own best (on fewer than 256 connections if the phase holds fewer than 256
//! requests). An open loop stops sending 5 s after its scheduled end even if requests are
//! still unsent (counted as `unsent`), so a target that cannot keep up does not stall the run.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cnsm_bench::{percentile, report};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const COUNTER: &str = r#"{
  "apiVersion": "statemachine.cn/v1alpha1",
  "kind": "StateMachine",
  "metadata": {"name": "counter", "namespace": "bench"},
  "spec": {
    "initialState": "counting",
    "states": [{
      "name": "counting",
      "type": "task",
      "timeoutSeconds": 86400,
      "onEvent": [{"event": "inc", "target": "counting", "assign": {"n": "data.n + 1"}}]
    }]
  }
}"#;

const INSTANCES: usize = 1_000;
const BASE: &str = "/apis/statemachine.cn/v1alpha1/namespaces/bench";
const EVENT_BODY: &[u8] = br#"{"event":"inc"}"#;

/// What the load goes to: cnsm (started here) or an already running peer.
#[derive(Clone, Copy, PartialEq)]
enum Target {
    Cnsm,
    /// Restate's ingress: `POST /Counter/{id}/create`, `POST /Counter/{id}/event`.
    Restate,
    /// The DBOS app of bench/dbos: `POST /instances/{id}`, `POST /instances/{id}/events`.
    Dbos,
}

impl Target {
    fn from_env() -> Target {
        match std::env::var("CNSM_BENCH_TARGET").as_deref() {
            Err(_) | Ok("") | Ok("cnsm") => Target::Cnsm,
            Ok("restate") => Target::Restate,
            Ok("dbos") => Target::Dbos,
            Ok(other) => panic!("CNSM_BENCH_TARGET={other:?}: expected cnsm, restate or dbos"),
        }
    }

    /// The prefix of the `bench NAME: VALUE` lines.
    fn prefix(self) -> &'static str {
        match self {
            Target::Cnsm => "http",
            Target::Restate => "restate",
            Target::Dbos => "dbos",
        }
    }

    fn create_path(self, id: &str) -> String {
        match self {
            Target::Cnsm => format!("{BASE}/instances"),
            Target::Restate => format!("/Counter/{id}/create"),
            Target::Dbos => format!("/instances/{id}"),
        }
    }

    fn event_path(self, id: &str) -> String {
        match self {
            Target::Cnsm => format!("{BASE}/instances/{id}/events"),
            Target::Restate => format!("/Counter/{id}/event"),
            Target::Dbos => format!("/instances/{id}/events"),
        }
    }
}

/// The server process; killed (by its pid) when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(data_dir: &std::path::Path) -> Server {
        let mut command = Command::new(cnsm_bench::cnsmctl_path());
        match std::env::var("CNSM_BENCH_STORE") {
            Ok(url) if !url.is_empty() => command.args(["--store", &url]),
            _ => command.arg("--data-dir").arg(data_dir),
        };
        let mut child = command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("CNSM_SERVER")
            .env_remove("CNSM_LISTEN")
            .env_remove("CNSM_AUTH_FILE")
            .env_remove("CNSM_TLS_CERT")
            .env_remove("CNSM_TLS_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cnsmctl serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read the address line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while reader.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> Sender {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

/// One event on a keep-alive connection; the status code (0 when the connection failed).
async fn send_inc(sender: &mut Sender, addr: &str, path: &str) -> u16 {
    send_post(sender, addr, path, Bytes::from_static(EVENT_BODY)).await
}

/// One JSON POST on a keep-alive connection; the status code (0 when the connection failed).
async fn send_post(sender: &mut Sender, addr: &str, path: &str, body: Bytes) -> u16 {
    if sender.ready().await.is_err() {
        *sender = connect(addr).await;
    }
    let request = hyper::Request::post(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("request");
    match sender.send_request(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.into_body().collect().await;
            status
        }
        Err(_) => 0,
    }
}

#[derive(Default)]
struct Outcome {
    latencies: Vec<Duration>,
    /// Open loop only: when each answered request was scheduled, from the phase's start (in
    /// the order of `latencies`, before it is sorted).
    scheduled: Vec<Duration>,
    ok: u64,
    not_ok: u64,
    /// Open loop only: requests still unsent when the phase was cut off.
    unsent: u64,
    /// Open loop only: how long after its scheduled time each request was sent (the pacer's
    /// precision, plus any wait for the connection's previous answer).
    send_lateness: Vec<Duration>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.latencies.extend(other.latencies);
        self.scheduled.extend(other.scheduled);
        self.ok += other.ok;
        self.not_ok += other.not_ok;
        self.unsent += other.unsent;
        self.send_lateness.extend(other.send_lateness);
    }
}

fn event_paths(target: Target, ids: &[String]) -> Arc<Vec<String>> {
    Arc::new(ids.iter().map(|id| target.event_path(id)).collect())
}

/// C connections, each sending as soon as it is answered, for `secs`.
async fn closed_loop(
    addr: &str,
    paths: Arc<Vec<String>>,
    c: usize,
    secs: Duration,
) -> (Outcome, Duration) {
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::with_capacity(c);
    for _ in 0..c {
        senders.push(connect(addr).await);
    }
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(c);
    for mut sender in senders {
        let (next, stop, paths, addr) =
            (next.clone(), stop.clone(), paths.clone(), addr.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize % paths.len();
                let t = Instant::now();
                let status = send_inc(&mut sender, &addr, &paths[i]).await;
                if (200..300).contains(&status) {
                    out.latencies.push(t.elapsed());
                    out.ok += 1;
                } else {
                    out.not_ok += 1;
                }
            }
            out
        }));
    }
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Outcome::default();
    for task in tasks {
        all.merge(task.await.expect("client task"));
    }
    (all, started.elapsed())
}

/// The open loop's pacer wakes at most this often.
const PACER_TICK: Duration = Duration::from_micros(250);

/// `c` connections sending at `rate` events/s in total on a fixed schedule; latency from the
/// scheduled send time.
///
/// The schedule is kept by a pacer thread that sleeps until a send's time (the operating
/// system's high-resolution timers: tens of microseconds late), at most every [`PACER_TICK`],
/// and then releases every connection's request that is due. Sleeping in each connection's
/// task instead (`tokio::time`) rounds every deadline up to the runtime's 1 ms timer tick,
/// which added 0.5 ms on average to every latency measured from the schedule, and charged it
/// to the target. A connection still waiting
/// for its previous answer sends as soon as it has it, and its latency still counts from the
/// schedule (no coordinated omission).
async fn open_loop(
    addr: &str,
    paths: Arc<Vec<String>>,
    c: usize,
    rate: f64,
    secs: Duration,
) -> (Outcome, Duration) {
    let period = Duration::from_secs_f64(c as f64 / rate);
    let per_conn = (secs.as_secs_f64() / period.as_secs_f64()).floor() as u64;
    let mut senders = Vec::with_capacity(c);
    for _ in 0..c {
        senders.push(connect(addr).await);
    }
    let start = Instant::now() + Duration::from_millis(50);
    // A target that cannot keep up would otherwise keep this phase going for as long as its
    // backlog takes: stop sending 5 s after the scheduled end.
    let cutoff = start + secs + Duration::from_secs(5);
    // Connection k's n-th request is due at start + period * (n + k / c): in time order, all
    // connections' n-th requests come before any (n + 1)-th.
    let due = move |k: usize, n: u64| start + period.mul_f64(n as f64 + k as f64 / c as f64);
    let releases: Arc<Vec<tokio::sync::Semaphore>> =
        Arc::new((0..c).map(|_| tokio::sync::Semaphore::new(0)).collect());
    // How many requests each connection was released when the cut-off stopped the pacer (all of
    // them otherwise).
    let released: Arc<Vec<AtomicU64>> =
        Arc::new((0..c).map(|_| AtomicU64::new(per_conn)).collect());
    let pacer = {
        let (releases, released) = (Arc::clone(&releases), Arc::clone(&released));
        std::thread::Builder::new()
            .name("open-loop-pacer".into())
            .spawn(move || {
                // Sleeps at least PACER_TICK between wake-ups and then releases every request
                // due by then: one wake-up per request at 12,000/s cost the load generator a
                // sixth of a core, taken from the target on a small machine.
                let mut next_wake = start;
                for n in 0..per_conn {
                    for (k, release) in releases.iter().enumerate() {
                        let at = due(k, n);
                        let mut now = Instant::now();
                        if at > now {
                            let wake = at.max(next_wake);
                            std::thread::sleep(wake - now);
                            now = Instant::now();
                            next_wake = now + PACER_TICK;
                        }
                        if now >= cutoff {
                            // Connections before k had n + 1 requests released, the rest n; one
                            // more permit wakes each to find that it is done.
                            for (j, release) in releases.iter().enumerate() {
                                let n_released = if j < k { n + 1 } else { n };
                                released[j].store(n_released, Ordering::SeqCst);
                                release.add_permits(1);
                            }
                            return;
                        }
                        release.add_permits(1);
                    }
                }
            })
            .expect("pacer thread")
    };
    let mut tasks = Vec::with_capacity(c);
    for (k, mut sender) in senders.into_iter().enumerate() {
        let (paths, addr) = (paths.clone(), addr.to_owned());
        let (releases, released) = (Arc::clone(&releases), Arc::clone(&released));
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            for n in 0..per_conn {
                releases[k]
                    .acquire()
                    .await
                    .expect("the pacer never closes its semaphores")
                    .forget();
                if n >= released[k].load(Ordering::SeqCst) {
                    // The phase was cut off before this one was due.
                    out.unsent = per_conn - n;
                    break;
                }
                let scheduled = due(k, n);
                out.send_lateness.push(scheduled.elapsed());
                let i = (n as usize * c + k) % paths.len();
                let status = send_inc(&mut sender, &addr, &paths[i]).await;
                if (200..300).contains(&status) {
                    out.latencies.push(scheduled.elapsed());
                    out.scheduled.push(scheduled - start);
                    out.ok += 1;
                } else {
                    out.not_ok += 1;
                }
            }
            out
        }));
    }
    let mut all = Outcome::default();
    for task in tasks {
        all.merge(task.await.expect("client task"));
    }
    pacer.join().expect("pacer thread");
    (all, start.elapsed())
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat` (100 Hz ticks).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3, utime field 14, stime field 15.
    let tick = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(14) + tick(15)) / 100.0
}

/// CPU cores used by the server's processes and by this load generator since `start`.
struct CpuSplit {
    server_pids: Vec<String>,
    server: f64,
    client: f64,
    at: Instant,
}

impl CpuSplit {
    fn start(server_pids: &[u32]) -> CpuSplit {
        let server_pids: Vec<String> = server_pids.iter().map(u32::to_string).collect();
        CpuSplit {
            server: server_pids.iter().map(|pid| cpu_secs(pid)).sum(),
            client: cpu_secs("self"),
            at: Instant::now(),
            server_pids,
        }
    }

    fn detail(&self) -> String {
        let wall = self.at.elapsed().as_secs_f64();
        let client = (cpu_secs("self") - self.client) / wall;
        if self.server_pids.is_empty() {
            return format!("server not measured, load generator {client:.2} cores");
        }
        let server: f64 = self.server_pids.iter().map(|pid| cpu_secs(pid)).sum();
        format!(
            "server {:.2} cores, load generator {client:.2} cores",
            (server - self.server) / wall
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// cnsm gets the counter machine; every target gets the same `INSTANCES` instances, each with
/// state `counting` and n = 0. Returns their ids.
async fn setup(target: Target, addr: &str) -> Vec<String> {
    let ids: Vec<String> = (0..INSTANCES).map(|i| format!("c-{i}")).collect();
    if target == Target::Cnsm {
        let client = cnsm_server::client::Client::new(&format!("http://{addr}")).expect("client");
        let applied = client
            .request(
                "POST",
                &format!("{BASE}/statemachines"),
                &[("content-type", "application/json")],
                COUNTER.as_bytes().to_vec(),
            )
            .await
            .expect("apply");
        assert!(
            applied.status / 100 == 2,
            "apply: {} {}",
            applied.status,
            applied.text()
        );
        for id in &ids {
            let body = serde_json::json!({"id": id, "machine": "counter", "data": {"n": 0}});
            let created = client
                .post_json(&target.create_path(id), &body, &[])
                .await
                .expect("create");
            assert_eq!(created.status, 201, "create {id}: {}", created.text());
        }
        return ids;
    }
    // Peers: 16 connections create the instances (not measured).
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for k in 0..16 {
        let (ids, addr) = (ids.clone(), addr.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&addr).await;
            for id in ids.iter().skip(k).step_by(16) {
                let path = target.create_path(id);
                let status = send_post(&mut sender, &addr, &path, Bytes::from_static(b"{}")).await;
                assert!(
                    (200..300).contains(&status),
                    "create: POST http://{addr}{path} answered {status}"
                );
            }
        }));
    }
    for task in tasks {
        task.await.expect("create task");
    }
    Arc::try_unwrap(ids).expect("create tasks done")
}

/// Where the load goes: the `bench` line prefix, the address, one event path per instance, the
/// server's pids for the CPU split, and the length of a phase.
struct Load {
    prefix: &'static str,
    addr: String,
    paths: Arc<Vec<String>>,
    pids: Vec<u32>,
    secs: Duration,
}

/// `CNSM_BENCH_LATENCY_CSV=FILE`: the open loop's requests as `scheduled_ms,latency_ms` rows in
/// `FILE.{name}.csv` (sorted by schedule), to see whether the slow ones come together.
fn write_latency_csv(path: &std::path::Path, name: &str, out: &Outcome) {
    let mut rows: Vec<(Duration, Duration)> = out
        .scheduled
        .iter()
        .copied()
        .zip(out.latencies.iter().copied())
        .collect();
    rows.sort();
    let mut text = String::from("scheduled_ms,latency_ms\n");
    for (at, latency) in rows {
        text.push_str(&format!("{:.3},{:.3}\n", ms(at), ms(latency)));
    }
    let mut file = path.as_os_str().to_owned();
    file.push(format!(".{name}.csv"));
    std::fs::write(&file, text).expect("write the latency CSV");
}

/// The open loop at `rate`, reported as `{prefix}.{name}.p50|p99`.
async fn open_phase(load: &Load, name: &str, how: &str, rate: f64) {
    let (prefix, secs) = (load.prefix, load.secs);
    // 256 connections, fewer when the phase holds fewer requests (a slow target's low rate).
    let c = 256.min(((rate * secs.as_secs_f64()).floor() as usize).max(1));
    let cpu = CpuSplit::start(&load.pids);
    let (mut out, elapsed) = open_loop(&load.addr, load.paths.clone(), c, rate, secs).await;
    let cpu = cpu.detail();
    let achieved = out.ok as f64 / elapsed.as_secs_f64();
    if let Some(path) = std::env::var_os("CNSM_BENCH_LATENCY_CSV") {
        write_latency_csv(std::path::Path::new(&path), name, &out);
    }
    let p50 = percentile(&mut out.latencies, 0.5);
    let p99 = percentile(&mut out.latencies, 0.99);
    let max = out.latencies.last().copied().unwrap_or_default();
    let late_p50 = percentile(&mut out.send_lateness, 0.5);
    let late_p99 = percentile(&mut out.send_lateness, 0.99);
    report(
        &format!("{prefix}.{name}.p50"),
        ms(p50),
        "ms",
        &format!(
            "(open loop, {rate:.0} events/s scheduled ({how}) on {c} connections, {achieved:.0}/s answered 2xx; latency from the scheduled send; 2xx {}, non-2xx {}, unsent {})",
            out.ok, out.not_ok, out.unsent
        ),
    );
    report(
        &format!("{prefix}.{name}.p99"),
        ms(p99),
        "ms",
        &format!(
            "(max {:.2} ms; sent {:.3} / {:.3} ms after the schedule at p50 / p99; {cpu})",
            ms(max),
            ms(late_p50),
            ms(late_p99)
        ),
    );
}

async fn run(target: Target, addr: String, pids: Vec<u32>, secs: Duration) {
    let prefix = target.prefix();
    let ids = setup(target, &addr).await;
    let paths = event_paths(target, &ids);

    // Warm-up: 1 s at 256 connections, not reported.
    let _ = closed_loop(&addr, paths.clone(), 256, Duration::from_secs(1)).await;

    let mut best = 0.0f64;
    for c in [256usize, 1_024] {
        let cpu = CpuSplit::start(&pids);
        let (mut out, elapsed) = closed_loop(&addr, paths.clone(), c, secs).await;
        let cpu = cpu.detail();
        let rate = out.ok as f64 / elapsed.as_secs_f64();
        best = best.max(rate);
        let p50 = percentile(&mut out.latencies, 0.5);
        let p99 = percentile(&mut out.latencies, 0.99);
        report(
            &format!("{prefix}.closed_c{c}.events_per_s"),
            rate,
            "events/s",
            &format!(
                "({c} keep-alive connections, {INSTANCES} instances, {:.1} s; p50 {:.2} ms, p99 {:.2} ms; 2xx {}, non-2xx {})",
                elapsed.as_secs_f64(),
                ms(p50),
                ms(p99),
                out.ok,
                out.not_ok
            ),
        );
        report(
            &format!("{prefix}.closed_c{c}.p50"),
            ms(p50),
            "ms",
            &format!("({cpu})"),
        );
        report(&format!("{prefix}.closed_c{c}.p99"), ms(p99), "ms", "");
    }
    report(
        &format!("{prefix}.events_per_s"),
        best,
        "events/s",
        "(best closed-loop rate)",
    );

    let given = std::env::var("CNSM_BENCH_OPEN_RATE").ok().map(|s| {
        s.parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or_else(|| panic!("CNSM_BENCH_OPEN_RATE={s:?}: expected events/s > 0"))
    });
    let load = Load {
        prefix,
        addr,
        paths,
        pids,
        secs,
    };
    match given {
        None => {
            open_phase(
                &load,
                "open_half",
                "half the best closed-loop rate",
                best / 2.0,
            )
            .await
        }
        Some(rate) => {
            let how = "CNSM_BENCH_OPEN_RATE, half of cnsm's best closed-loop rate";
            open_phase(&load, "open_half", how, rate).await;
            if best < rate {
                let how = "half this target's own best closed-loop rate";
                open_phase(&load, "open_own_half", how, best / 2.0).await;
            }
        }
    }
}

fn main() {
    let secs = Duration::from_secs_f64(
        std::env::var("CNSM_HTTP_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10.0),
    );
    let target = Target::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // A cnsm server already running (to read its /metrics after the load) is named the same way.
    if target != Target::Cnsm || std::env::var_os("CNSM_BENCH_TARGET_URL").is_some() {
        let url = std::env::var("CNSM_BENCH_TARGET_URL")
            .expect("CNSM_BENCH_TARGET_URL (http://HOST:PORT) names the peer to load");
        let addr = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("CNSM_BENCH_TARGET_URL={url:?}: expected http://HOST:PORT"))
            .trim_end_matches('/')
            .to_owned();
        let pids: Vec<u32> = std::env::var("CNSM_BENCH_TARGET_PIDS")
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                p.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("CNSM_BENCH_TARGET_PIDS: {p:?} is not a pid"))
            })
            .collect();
        println!("# target {} at {addr}, pids {pids:?}", target.prefix());
        runtime.block_on(run(target, addr, pids, secs));
        return;
    }
    let dir = match std::env::var_os("CNSM_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("bench dir"),
        None => tempfile::tempdir().expect("temp dir"),
    };
    let server = Server::start(&dir.path().join("data"));
    println!(
        "# cnsmctl serve pid {} on {}",
        server.child.id(),
        server.addr
    );
    runtime.block_on(run(
        target,
        server.addr.clone(),
        vec![server.child.id()],
        secs,
    ));
    drop(server);
}
