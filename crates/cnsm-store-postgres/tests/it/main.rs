//! The integration tests of cnsm-store-postgres, in one binary: the store conformance suite on
//! PostgreSQL, two store handles ("nodes") racing, schema migrations, timer leases, push
//! delivery with a lease taken over between two nodes, and calls from inside tokio runtimes.
//!
//! They need `CNSM_TEST_POSTGRES_URL` (e.g. `postgres://postgres@127.0.0.1:5432/test`); without
//! it every test prints that it was skipped and passes. Each store lives in its own schema, so
//! the tests run in parallel.

mod conformance;
mod conformance_per_item;
mod copy;
mod delivery;
mod nodes;
mod race;
mod runtime;

use std::sync::atomic::{AtomicU64, Ordering};

use cnsm_store::Store;
use cnsm_store::conformance::Harness;
use cnsm_store_postgres::{PostgresOptions, PostgresStore};

/// The machine the runtime tests run: `add` counts in `counting`; `stop` waits a second, then
/// finishes (a timer that must fire exactly once).
pub const COUNTER: &str = r#"
apiVersion: statemachine.cn/v1alpha1
kind: StateMachine
metadata: {name: counter}
spec:
  initialState: counting
  states:
  - name: counting
    type: task
    timeoutSeconds: 3600
    onEvent:
    - {event: add, target: counting, assign: {n: "data.n + 1"}}
    - {event: stop, target: waiting}
  - {name: waiting, type: wait, timeoutSeconds: 1, transition: done}
  - {name: done, type: final}
"#;

/// The test database's URL, or `None` (after saying the test is skipped).
pub fn test_url() -> Option<String> {
    match std::env::var("CNSM_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: CNSM_TEST_POSTGRES_URL is not set");
            None
        }
    }
}

/// A schema name no other test (or test process) uses.
pub fn unique_schema() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "cnsm_t_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn options(schema: &str) -> PostgresOptions {
    PostgresOptions {
        schema: Some(schema.to_owned()),
        conns_max: 4,
        ..PostgresOptions::default()
    }
}

/// Drops a test schema (best effort: a failure leaves a schema behind, nothing else).
pub fn drop_schema(url: &str, schema: &str) {
    let Ok(store) = PostgresStore::open(url, options(schema)) else {
        return;
    };
    let _ = store.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
}

/// Runtimes over one fresh schema, as the nodes of one deployment (`node-0`, `node-1`, ...),
/// each with its own store handle; shut down, and the schema dropped, with it.
pub struct Nodes {
    pub url: String,
    pub schema: String,
    pub runtimes: Vec<cnsm_runtime::Runtime>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for runtime in &self.runtimes {
            runtime.shutdown();
        }
        self.runtimes.clear();
        drop_schema(&self.url, &self.schema);
    }
}

/// `n` nodes (see [`Nodes`]), their stores opened with
/// [`PostgresOptions::transaction_per_item`] when `per_item`; `None` without a test database.
pub fn nodes(n: usize, per_item: bool) -> Option<Nodes> {
    let url = test_url()?;
    let schema = unique_schema();
    let runtimes = (0..n)
        .map(|i| {
            let store = PostgresStore::open(
                &url,
                PostgresOptions {
                    transaction_per_item: per_item,
                    ..options(&schema)
                },
            )
            .expect("the store opens");
            cnsm_runtime::Runtime::open_shared(
                std::sync::Arc::new(store),
                cnsm_runtime::RuntimeOptions {
                    shared_store: true,
                    node_id: format!("node-{i}"),
                    timer_poll_ms: 50,
                    ..cnsm_runtime::RuntimeOptions::default()
                },
            )
            .expect("the runtime starts")
        })
        .collect();
    Some(Nodes {
        url,
        schema,
        runtimes,
    })
}

/// Stores in fresh schemas of the test database; `reopen` opens the same schema again.
pub struct PgHarness {
    url: String,
    schemas: Vec<String>,
    /// Open the stores with [`PostgresOptions::transaction_per_item`].
    per_item: bool,
}

impl PgHarness {
    /// `None` when no test database is configured.
    pub fn new() -> Option<PgHarness> {
        Some(PgHarness {
            url: test_url()?,
            schemas: Vec::new(),
            per_item: false,
        })
    }

    /// The same, committing each item in its own transaction.
    pub fn per_item() -> Option<PgHarness> {
        let mut harness = PgHarness::new()?;
        harness.per_item = true;
        Some(harness)
    }

    fn options(&self) -> PostgresOptions {
        PostgresOptions {
            transaction_per_item: self.per_item,
            ..options(self.current())
        }
    }

    fn current(&self) -> &str {
        self.schemas.last().expect("a store was opened")
    }
}

impl Drop for PgHarness {
    fn drop(&mut self) {
        for schema in &self.schemas {
            drop_schema(&self.url, schema);
        }
    }
}

impl Harness for PgHarness {
    fn open(&mut self) -> Box<dyn Store> {
        self.schemas.push(unique_schema());
        Box::new(PostgresStore::open(&self.url, self.options()).expect("the store opens"))
    }

    fn reopen(&mut self, store: Box<dyn Store>) -> Box<dyn Store> {
        drop(store);
        Box::new(PostgresStore::open(&self.url, self.options()).expect("the store reopens"))
    }

    fn tamper_record(
        &mut self,
        store: Box<dyn Store>,
        namespace: &str,
        id: &str,
        version: u64,
        byte_index: usize,
    ) -> Box<dyn Store> {
        let admin = PostgresStore::open(&self.url, options(self.current())).expect("opens");
        let position = byte_index + 1;
        let sql = format!(
            "UPDATE cnsm_records r SET bytes = overlay(r.bytes placing \
             set_byte(substring(r.bytes from {position} for 1), 0, \
                      get_byte(substring(r.bytes from {position} for 1), 0) # 255) \
             from {position} for 1) \
             FROM cnsm_instances i \
             WHERE i.uid = r.uid AND i.namespace = '{namespace}' AND i.id = '{id}' \
               AND r.version = {version}"
        );
        admin.batch_execute(&sql).expect("the record is edited");
        store
    }
}
