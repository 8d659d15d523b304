//! A child process for crash tests: commits transitions under concurrent load until killed.
//!
//! Usage: `cnsm-crash-child DATA_DIR ACK_FILE N_INSTANCES N_CLIENTS`. Every acknowledged
//! transition is appended to ACK_FILE as `id version` *after* the runtime answered, so the parent
//! can check that everything acknowledged survived a SIGKILL.

use std::io::Write;
use std::sync::{Arc, Mutex};

use cnsm_runtime::{CreateInstance, EventRequest, Runtime, RuntimeError, RuntimeOptions};
use cnsm_store::embedded::EmbeddedStore;

const MACHINE: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: counter, namespace: crash}
spec:
  initialState: counting
  states:
  - name: counting
    type: task
    timeoutSeconds: 86400
    onEvent:
    - event: inc
      target: counting
      assign: {n: "data.n + 1"}
    - event: stop
      target: done
  - {name: done, type: final}
"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: cnsm-crash-child DATA_DIR ACK_FILE N_INSTANCES N_CLIENTS");
        std::process::exit(2);
    }
    let n_instances: usize = args[3].parse().unwrap_or(16);
    let n_clients: usize = args[4].parse().unwrap_or(32);
    let ack = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args[2])
        .unwrap_or_else(|e| {
            eprintln!("cannot open {}: {e}", args[2]);
            std::process::exit(1);
        });
    let ack = Arc::new(Mutex::new(ack));
    let store = EmbeddedStore::open(std::path::Path::new(&args[1])).unwrap_or_else(|e| {
        eprintln!("cannot open store: {e}");
        std::process::exit(1);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("tokio: {e}");
            std::process::exit(1);
        });
    rt.block_on(async move {
        let runtime = Runtime::open(store, RuntimeOptions::default()).unwrap_or_else(|e| {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        });
        runtime.apply_yaml(MACHINE, None).await.unwrap_or_else(|e| {
            eprintln!("apply: {e}");
            std::process::exit(1);
        });
        for i in 0..n_instances {
            let id = format!("c-{i}");
            let mut data = serde_json::Map::new();
            data.insert("n".into(), 0.into());
            match runtime
                .create_instance(CreateInstance::new("crash", "counter").id(&id).data(data))
                .await
            {
                Ok(instance) => write_ack(&ack, &id, instance.version),
                Err(RuntimeError::Conflict(_)) => {}
                Err(e) => {
                    eprintln!("create: {e}");
                    std::process::exit(1);
                }
            }
        }
        println!("ready");
        let mut tasks = Vec::new();
        for client in 0..n_clients {
            let runtime = runtime.clone();
            let ack = Arc::clone(&ack);
            tasks.push(tokio::spawn(async move {
                let mut i = client;
                loop {
                    let id = format!("c-{}", i % n_instances);
                    i += 7;
                    if let Ok(outcome) = runtime.send("crash", &id, EventRequest::new("inc")).await
                    {
                        write_ack(&ack, &id, outcome.record.version);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// One `write` per line, so a kill never leaves half a line behind a complete one.
fn write_ack(ack: &Mutex<std::fs::File>, id: &str, version: u64) {
    if let Ok(mut f) = ack.lock() {
        let _ = f.write_all(format!("{id} {version}\n").as_bytes());
    }
}
