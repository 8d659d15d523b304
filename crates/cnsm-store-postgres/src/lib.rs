//! The PostgreSQL backend of the cnsm [`Store`] trait, for several cnsm nodes sharing one
//! database.
//!
//! The trait is synchronous; this store owns a small tokio runtime on which every connection
//! lives, and waits on it from the calling thread (see [`pool`]). The schema is created and
//! upgraded by versioned migrations embedded in the binary ([`schema`]), applied on open under
//! an advisory lock. Each `commit` is one transaction in one round trip: the SQL function
//! `cnsm_commit_items` locks the rows of the batch's instances, decides each item under those
//! locks (compare-and-swap on the version, the previous-hash link, the idempotency key) and
//! writes the accepted ones with set-based statements (`cnsm_commit_batch`, which checks again
//! that every row is where it was locked); the unique (instance, version) key of the records
//! table backs it all, so two nodes racing on one instance never fork its chain. Records are
//! stored as their exact sealed bytes.
//!
//! ```no_run
//! use cnsm_store::Store;
//! use cnsm_store_postgres::{PostgresOptions, PostgresStore};
//! let store = PostgresStore::open("postgres://postgres@127.0.0.1:5432/cnsm", PostgresOptions::default())?;
//! assert!(store.list_definitions(None)?.is_empty() || true);
//! # Ok::<(), cnsm_store::StoreError>(())
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use cnsm_core::Instance;
use cnsm_core::Status;
use cnsm_core::engine::revision_hash;
use cnsm_core::record::{Hash32, SealedRecord, Timer, TimerKind};
use cnsm_core::resource::StateMachine;
use cnsm_store::{
    CommitItem, DefinitionRow, HeldKey, IdempotencyEntry, InstanceQuery, ItemOutcome, PAGE_LEN_MAX,
    PutDefinition, Refreshed, Store, StoreError, StoredInstance, TimerRef, VerifyReport,
};
use futures_util::future::try_join_all;
use tokio_postgres::Config;
use tokio_postgres::types::ToSql;

pub mod copy;
pub mod pool;
pub mod schema;

use pool::{Bridge, Pool, db_error, is_retryable};
pub use schema::{SCHEMA_VERSION, SchemaStatus};

/// The prefix of the channel commits are announced on; the channel is per schema, because
/// NOTIFY is database-wide. A payload is the committing handle's origin token, then
/// `uid:version` pairs, separated by spaces.
pub const COMMIT_CHANNEL_PREFIX: &str = "cnsm_commits_";

/// Largest batch one `commit` accepts.
pub const COMMIT_ITEMS_MAX: usize = 100_000;

/// How many times a batch is retried after a deadlock between nodes before it fails.
const DEADLOCK_RETRIES_MAX: u32 = 5;

/// Settings of a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections the store opens.
    pub conns_max: usize,
    /// Deadline to open a TCP connection and authenticate.
    pub connect_timeout_ms: u64,
    /// Deadline of each store operation (including waiting for a free connection); a database
    /// that does not answer makes the operation fail with [`StoreError::Io`], never hang.
    pub op_timeout_ms: u64,
    /// Server-side `statement_timeout` of every connection.
    pub statement_timeout_ms: u64,
    /// A schema to use (created if missing) instead of the URL's search path; lets several
    /// stores share one database (tests do this).
    pub schema: Option<String>,
    /// Apply missing migrations on open (else a database behind this binary is refused).
    pub migrate: bool,
    /// Commit each item of a batch in its own database transaction instead of one transaction
    /// per batch (default `false`). Different instances' transactions run concurrently on the
    /// pool's connections (the database's own group commit then serves them); one instance's
    /// items run in order. For comparisons with one-transaction-per-event systems: a batch that
    /// fails part way may have committed some of its items (see `docs/postgres.md`).
    pub transaction_per_item: bool,
}

impl Default for PostgresOptions {
    fn default() -> PostgresOptions {
        PostgresOptions {
            conns_max: 8,
            connect_timeout_ms: 3_000,
            op_timeout_ms: 10_000,
            statement_timeout_ms: 10_000,
            schema: None,
            migrate: true,
            transaction_per_item: false,
        }
    }
}

/// A [`Store`] on PostgreSQL.
pub struct PostgresStore {
    // Field order matters: the pool's connections drop before the runtime that drives them.
    pool: Pool,
    bridge: Bridge,
    config: Config,
    /// The NOTIFY channel of this schema.
    channel: String,
    /// Tags this handle's NOTIFY payloads, so its own commits are not fed back to it.
    origin: String,
    /// Set on drop: stops the commit feed's task.
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// [`PostgresOptions::transaction_per_item`].
    transaction_per_item: bool,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// True when `location` names a PostgreSQL database (a `postgres://` or `postgresql://` URL).
pub fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

/// Parses a connection URL (or key=value string) and applies the options' deadlines.
pub fn connection_config(url: &str, options: &PostgresOptions) -> Result<Config, StoreError> {
    let mut config: Config = url
        .parse()
        .map_err(|e| StoreError::Refused(format!("invalid PostgreSQL URL: {e}")))?;
    config.connect_timeout(Duration::from_millis(options.connect_timeout_ms));
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    config.application_name("cnsm");
    let mut server_options = config.get_options().unwrap_or("").to_owned();
    server_options.push_str(&format!(
        " -c statement_timeout={} -c lock_timeout={}",
        options.statement_timeout_ms, options.statement_timeout_ms
    ));
    if let Some(schema) = &options.schema {
        check_schema_name(schema)?;
        server_options.push_str(&format!(" -c search_path={schema}"));
    }
    config.options(server_options.trim());
    Ok(config)
}

fn check_schema_name(schema: &str) -> Result<(), StoreError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Refused(format!(
            "schema name '{schema}' must be 1 to 63 characters of a-z, 0-9 and '_', not starting with a digit"
        )))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const COMMIT_ITEM: &str = "SELECT o_committed, o_uid, o_actual FROM cnsm_commit_item(\
    $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)";
const COMMIT_ITEMS: &str = "SELECT o_committed, o_uid, o_actual FROM cnsm_commit_items($1, $2, \
    $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)";
const NOTIFY: &str = "SELECT pg_notify($1, $2)";
const INSTANCE_BY_KEY: &str =
    "SELECT uid, body FROM cnsm_instances WHERE namespace = $1 AND id = $2";
const INSTANCES_BY_KEYS: &str = "SELECT uid, body, namespace, id FROM cnsm_instances \
    WHERE (namespace, id) IN (SELECT * FROM unnest($1::text[], $2::text[]))";
/// The instances of the given keys; the body only where the caller's copy (uid, version) is
/// not the stored one.
const REFRESH_INSTANCES: &str = "SELECT i.uid, \
    CASE WHEN i.uid = u.uid AND i.version = u.version THEN NULL ELSE i.body END, \
    i.namespace, i.id \
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) u(namespace, id, uid, version) \
    JOIN cnsm_instances i ON i.namespace = u.namespace AND i.id = u.id";
const INSTANCE_BY_UID: &str = "SELECT uid, body, namespace, id FROM cnsm_instances WHERE uid = $1";
const HISTORY: &str = "SELECT r.version, r.hash, r.bytes FROM cnsm_records r \
    JOIN cnsm_instances i ON i.uid = r.uid \
    WHERE i.namespace = $1 AND i.id = $2 AND r.version >= $3 ORDER BY r.version LIMIT $4";
const IDEMPOTENCY: &str = "SELECT k.request_hash, k.version, k.expires_ms FROM cnsm_idempotency k \
    JOIN cnsm_instances i ON i.uid = k.uid WHERE i.namespace = $1 AND i.id = $2 AND k.key = $3";
const LIST_INSTANCES: &str = "SELECT uid, body FROM cnsm_instances \
    WHERE ($1::text IS NULL OR namespace = $1) \
      AND ($2::text IS NULL OR machine = $2) \
      AND ($3::text IS NULL OR state = $3) \
      AND ($4::smallint IS NULL OR status = $4) \
      AND labels @> $5::text::jsonb \
      AND ($6::text IS NULL OR (namespace, id) > ($6, $7::text)) \
    ORDER BY namespace, id LIMIT $8";
const CLAIM_TIMERS: &str = "UPDATE cnsm_instances SET lease_until_ms = $2, lease_node = $3 \
    WHERE uid IN (SELECT uid FROM cnsm_instances \
                   WHERE timer_due_ms <= $1 AND (lease_until_ms IS NULL OR lease_until_ms <= $1) \
                   ORDER BY timer_due_ms LIMIT $4 FOR UPDATE SKIP LOCKED) \
    RETURNING uid, timer_due_ms, timer_entry_seq, timer_kind";

impl PostgresStore {
    /// Connects, applies missing migrations (unless `options.migrate` is off), and checks the
    /// schema version.
    ///
    /// Errors: [`StoreError::FormatTooNew`] when the database was migrated by a newer cnsm;
    /// [`StoreError::Io`] when it cannot be reached in time; [`StoreError::Refused`] for a bad
    /// URL or a schema that needs migrating while `migrate` is off.
    pub fn open(url: &str, options: PostgresOptions) -> Result<PostgresStore, StoreError> {
        let config = connection_config(url, &options)?;
        let bridge = Bridge::new(Duration::from_millis(options.op_timeout_ms))?;
        let pool = Pool::new(
            config.clone(),
            options.conns_max,
            Duration::from_millis(options.op_timeout_ms),
        );
        let mut store = PostgresStore {
            pool,
            bridge,
            config,
            channel: String::new(),
            origin: origin_token(),
            closed: Default::default(),
            transaction_per_item: options.transaction_per_item,
        };
        let schema = options.schema.clone();
        let migrate = options.migrate;
        store.channel = store.bridge.run(async {
            let mut lease = store.pool.get().await?;
            let client = &mut lease.conn().client;
            if migrate {
                schema::migrate(client, schema.as_deref(), now_ms()).await?;
            }
            let status = schema::status(client).await?;
            if status.version > SCHEMA_VERSION {
                return Err(StoreError::FormatTooNew {
                    found: status.version,
                    supported: SCHEMA_VERSION,
                });
            }
            if status.is_behind() {
                return Err(StoreError::Refused(format!(
                    "the database schema is at version {}, this binary needs {}; run `cnsmctl store migrate`",
                    status.version, SCHEMA_VERSION
                )));
            }
            let row = client
                .query_one("SELECT current_schema()", &[])
                .await
                .map_err(db_error)?;
            let current: Option<String> = row.get(0);
            Ok(channel_of(current.as_deref().unwrap_or("")))
        })?;
        Ok(store)
    }

    /// The schema version of the database, read without changing anything.
    pub fn schema_status(url: &str, options: &PostgresOptions) -> Result<SchemaStatus, StoreError> {
        let store = PostgresStore::open(
            url,
            PostgresOptions {
                migrate: false,
                ..options.clone()
            },
        );
        match store {
            Ok(store) => store.bridge.run(async {
                let mut lease = store.pool.get().await?;
                schema::status(&lease.conn().client).await
            }),
            Err(StoreError::Refused(_)) | Err(StoreError::FormatTooNew { .. }) => {
                // Behind or ahead: read the status with a bare connection.
                let config = connection_config(url, options)?;
                let bridge = Bridge::new(Duration::from_millis(options.op_timeout_ms))?;
                let pool = Pool::new(config, 1, Duration::from_millis(options.op_timeout_ms));
                bridge.run(async {
                    let conn = pool.connect().await?;
                    schema::status(&conn.client).await
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Applies missing migrations; returns the versions applied (empty when up to date).
    pub fn migrate(url: &str, options: &PostgresOptions) -> Result<Vec<u32>, StoreError> {
        let config = connection_config(url, options)?;
        let bridge = Bridge::new(Duration::from_millis(options.op_timeout_ms))?;
        let pool = Pool::new(config, 1, Duration::from_millis(options.op_timeout_ms));
        let schema = options.schema.clone();
        bridge.run(async {
            let mut conn = pool.connect().await?;
            schema::migrate(&mut conn.client, schema.as_deref(), now_ms()).await
        })
    }

    /// The connection settings (for listeners that need their own connection).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs SQL statements as they are, in the store's schema (administration and tests).
    pub fn batch_execute(&self, sql: &str) -> Result<(), StoreError> {
        self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            lease
                .conn()
                .client
                .batch_execute(sql)
                .await
                .map_err(db_error)
        })
    }

    /// Checks that the database answers (for readiness probes).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            lease
                .conn()
                .client
                .simple_query("SELECT 1")
                .await
                .map_err(db_error)?;
            Ok(())
        })
    }

    /// Runs one read query with a pooled connection and its prepared statement.
    fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let result = self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            let conn = lease.conn();
            let statement = conn.statement(sql).await?;
            conn.client
                .query(&statement, params)
                .await
                .map_err(db_error)
        });
        if matches!(result, Err(StoreError::Io(_))) {
            self.pool.clear();
        }
        result
    }

    /// [`PostgresOptions::transaction_per_item`]: one transaction per item
    /// ([`Self::commit_alone`]); the instances' chains of items run concurrently (bounded by
    /// the pool), each chain in order.
    ///
    /// The commits are announced after the last one, outside the transactions: a transaction
    /// that NOTIFYs holds the database's notification lock from before its commit record is
    /// written until it is flushed, so announcing inside would serialize every one of these
    /// transactions behind the others' fsyncs (PostgreSQL's group commit could not batch them).
    async fn commit_per_item(
        &self,
        items: &[CommitItem],
        prev_hashes: &[Hash32],
        columns: &[ItemColumns],
    ) -> Result<Vec<ItemOutcome>, StoreError> {
        let mut chains: Vec<Vec<usize>> = Vec::new();
        let mut chain_of: std::collections::HashMap<(&str, &str), usize> =
            std::collections::HashMap::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let key = (&*item.instance.namespace, &*item.instance.id);
            let chain = *chain_of.entry(key).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[chain].push(index);
        }
        let runs = chains.iter().map(|chain| async move {
            let mut done = Vec::with_capacity(chain.len());
            for &index in chain {
                let (item, prev, c) = (&items[index], prev_hashes[index], &columns[index]);
                let outcome = retrying(|| self.commit_alone(item, prev, c)).await?;
                done.push((index, outcome));
            }
            Ok::<_, StoreError>(done)
        });
        let mut outcomes = vec![ItemOutcome::Conflict { actual: None }; items.len()];
        for (index, outcome) in try_join_all(runs).await?.into_iter().flatten() {
            outcomes[index] = outcome;
        }
        self.announce(items, &outcomes).await;
        Ok(outcomes)
    }

    /// One item in a transaction of its own, in one round trip: `BEGIN`, `cnsm_commit_item`
    /// (which decides and writes the item under its row lock) and `COMMIT`, pipelined; a
    /// failed call makes that `COMMIT` a rollback. `Ok(Err(e))` is a retryable database error.
    async fn commit_alone(
        &self,
        item: &CommitItem,
        prev: Hash32,
        c: &ItemColumns,
    ) -> Result<Result<ItemOutcome, tokio_postgres::Error>, StoreError> {
        let mut lease = self.pool.get().await?;
        let commit_item = lease.conn().statement(COMMIT_ITEM).await?;
        let key = item.idempotency.as_ref().map(|e| e.key.as_str());
        let (prev, hash) = (prev.0.as_slice(), item.record.hash.0.as_slice());
        let params = commit_item_params(item, c, &prev, &hash, &key);
        let rows = match in_one_transaction(&lease, &commit_item, &params).await {
            Ok(rows) => rows,
            Err(e) => return retryable_or(e),
        };
        let Some(row) = rows.first() else {
            return Err(StoreError::Corrupt(
                "cnsm_commit_item answered no row".into(),
            ));
        };
        let committed: bool = row.get(0);
        Ok(Ok(if committed {
            let uid: i64 = row.get(1);
            ItemOutcome::Committed { uid: uid as u64 }
        } else {
            let actual: Option<i64> = row.get(2);
            ItemOutcome::Conflict {
                actual: actual.map(|v| v as u64),
            }
        }))
    }

    /// Announces committed items on the commit channel, each NOTIFY in a transaction of its
    /// own (no write, so no flush under the notification lock). Best effort: the commits are
    /// durable already, and a watcher that misses a notice catches up from the store with the
    /// instance's next one (docs/postgres.md, "Watch across nodes").
    async fn announce(&self, items: &[CommitItem], outcomes: &[ItemOutcome]) {
        const PAIRS_PER_NOTICE: usize = 150;
        let pairs: Vec<String> = items
            .iter()
            .zip(outcomes)
            .filter_map(|(item, outcome)| match outcome {
                ItemOutcome::Committed { uid } => Some(format!("{uid}:{}", item.record.version)),
                ItemOutcome::Conflict { .. } => None,
            })
            .collect();
        if pairs.is_empty() {
            return;
        }
        let Ok(mut lease) = self.pool.get().await else {
            return;
        };
        let Ok(notify) = lease.conn().statement(NOTIFY).await else {
            return;
        };
        let notices: Vec<String> = pairs
            .chunks(PAIRS_PER_NOTICE)
            .map(|chunk| format!("{} {}", self.origin, chunk.join(" ")))
            .collect();
        let client = lease.client();
        let params: Vec<[&(dyn ToSql + Sync); 2]> = notices
            .iter()
            .map(|notice| [&self.channel as &(dyn ToSql + Sync), notice])
            .collect();
        let sends = params.iter().map(|p| client.query(&notify, p));
        // A failure here is the database going away; the next commit reports it.
        let _ = try_join_all(sends).await;
    }

    /// One attempt at committing a batch; `Ok(Err(e))` is a retryable database error.
    ///
    /// One round trip: `BEGIN`, one call of `cnsm_commit_items` and `COMMIT`, pipelined. The
    /// function locks the rows of every existing instance of the batch in one order (so two
    /// nodes committing overlapping batches wait for each other instead of deadlocking),
    /// decides each item under those locks (compare-and-swap on the version, the previous-hash
    /// link, the idempotency key) and writes the accepted ones with set-based statements
    /// (`cnsm_commit_batch`), announcing them on the commit channel. A failed call makes that
    /// `COMMIT` a rollback.
    async fn commit_once(
        &self,
        items: &[CommitItem],
        prev_hashes: &[Hash32],
        columns: &[ItemColumns],
    ) -> Result<Result<Vec<ItemOutcome>, tokio_postgres::Error>, StoreError> {
        let mut lease = self.pool.get().await?;
        let commit_items = lease.conn().statement(COMMIT_ITEMS).await?;
        let expected: Vec<Option<i64>> = columns.iter().map(|c| c.expected).collect();
        let prevs: Vec<&[u8]> = prev_hashes.iter().map(|h| &h.0[..]).collect();
        let namespaces: Vec<&str> = columns.iter().map(|c| &*c.namespace).collect();
        let ids: Vec<&str> = columns.iter().map(|c| &*c.id).collect();
        let versions: Vec<i64> = columns.iter().map(|c| c.version).collect();
        let hashes: Vec<&[u8]> = items.iter().map(|i| &i.record.hash.0[..]).collect();
        let bytes: Vec<&[u8]> = items.iter().map(|i| &i.record.bytes[..]).collect();
        let machines: Vec<&str> = columns.iter().map(|c| &*c.machine).collect();
        let states: Vec<&str> = columns.iter().map(|c| &*c.state).collect();
        let statuses: Vec<i16> = columns.iter().map(|c| c.status).collect();
        let labels: Vec<&str> = columns.iter().map(|c| &*c.labels).collect();
        let bodies: Vec<&[u8]> = columns.iter().map(|c| &c.body[..]).collect();
        let timer_dues: Vec<Option<i64>> = columns.iter().map(|c| c.timer_due).collect();
        let timer_seqs: Vec<Option<i64>> = columns.iter().map(|c| c.timer_seq).collect();
        let timer_kinds: Vec<Option<i16>> = columns.iter().map(|c| c.timer_kind).collect();
        let keys: Vec<Option<&str>> = items
            .iter()
            .map(|i| i.idempotency.as_ref().map(|e| e.key.as_str()))
            .collect();
        let key_hashes: Vec<Option<&[u8]>> =
            columns.iter().map(|c| c.key_hash.as_deref()).collect();
        let key_expires: Vec<Option<i64>> = columns.iter().map(|c| c.key_expires).collect();
        let nows: Vec<i64> = columns.iter().map(|c| c.now).collect();
        let params: [&(dyn ToSql + Sync); 21] = [
            &expected,
            &prevs,
            &namespaces,
            &ids,
            &versions,
            &hashes,
            &bytes,
            &machines,
            &states,
            &statuses,
            &labels,
            &bodies,
            &timer_dues,
            &timer_seqs,
            &timer_kinds,
            &keys,
            &key_hashes,
            &key_expires,
            &nows,
            &self.channel,
            &self.origin,
        ];
        let rows = match in_one_transaction(&lease, &commit_items, &params).await {
            Ok(rows) => rows,
            Err(e) => return retryable_or(e),
        };
        if rows.len() != items.len() {
            return Err(StoreError::Corrupt(format!(
                "cnsm_commit_items answered {} rows for {} items",
                rows.len(),
                items.len()
            )));
        }
        Ok(Ok(rows
            .iter()
            .map(|row| {
                if row.get::<_, bool>(0) {
                    ItemOutcome::Committed {
                        uid: row.get::<_, i64>(1) as u64,
                    }
                } else {
                    ItemOutcome::Conflict {
                        actual: row.get::<_, Option<i64>>(2).map(|v| v as u64),
                    }
                }
            })
            .collect()))
    }
}

impl PostgresStore {
    /// Records `from..` of an instance (at most `limit`) as stored, unchecked.
    fn history_rows(
        &self,
        namespace: &str,
        id: &str,
        from: i64,
        limit: i64,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        let rows = self.query(HISTORY, &[&namespace, &id, &from, &limit])?;
        rows.iter()
            .map(|row| {
                let version: i64 = row.get(0);
                let what = || format!("instance {namespace}/{id} record {version}");
                Ok(SealedRecord {
                    version: version as u64,
                    hash: hash_of(row.get::<_, &[u8]>(1), &what)?,
                    bytes: row.get(2),
                })
            })
            .collect()
    }

    /// One attempt at [`Store::erase`]: the erasure record through `cnsm_commit_item` (the
    /// compare-and-swap under the row lock), then each redacted record's bytes replaced where
    /// its stored hash is the one the erasure keeps, in one transaction.
    async fn erase_once(
        &self,
        redacted: &[SealedRecord],
        item: &CommitItem,
        prev: Hash32,
        c: &ItemColumns,
    ) -> Result<Result<ItemOutcome, tokio_postgres::Error>, StoreError> {
        let mut lease = self.pool.get().await?;
        let conn = lease.conn();
        let commit_item = conn.statement(COMMIT_ITEM).await?;
        let notify = conn.statement(NOTIFY).await?;
        let txn = match conn.client.transaction().await {
            Ok(txn) => txn,
            Err(e) => return Err(db_error(e)),
        };
        let no_key: Option<&str> = None;
        let (prev, hash) = (prev.0.as_slice(), item.record.hash.0.as_slice());
        let params = commit_item_params(item, c, &prev, &hash, &no_key);
        let row = match txn.query_one(&commit_item, &params).await {
            Ok(row) => row,
            Err(e) => return retryable_or(e),
        };
        let committed: bool = row.get(0);
        if !committed {
            let actual: Option<i64> = row.get(2);
            // Dropping the transaction rolls it back: nothing changed.
            return Ok(Ok(ItemOutcome::Conflict {
                actual: actual.map(|v| v as u64),
            }));
        }
        let uid: i64 = row.get(1);
        for sealed in redacted {
            let version = i64::try_from(sealed.version).unwrap_or(i64::MAX);
            let n = match txn
                .execute(
                    "UPDATE cnsm_records SET bytes = $3 WHERE uid = $1 AND version = $2 AND hash = $4",
                    &[&uid, &version, &sealed.bytes, &sealed.hash.0.as_slice()],
                )
                .await
            {
                Ok(n) => n,
                Err(e) => return retryable_or(e),
            };
            if n != 1 {
                return Err(StoreError::Refused(format!(
                    "erasure of {}/{} refused: record {} is not stored with the hash the erasure keeps",
                    c.namespace, c.id, sealed.version
                )));
            }
        }
        let notice = format!("{} {uid}:{}", self.origin, item.record.version);
        if let Err(e) = txn.query(&notify, &[&self.channel, &notice]).await {
            return retryable_or(e);
        }
        match txn.commit().await {
            Ok(()) => Ok(Ok(ItemOutcome::Committed { uid: uid as u64 })),
            Err(e) => retryable_or(e),
        }
    }
}

/// The NOTIFY channel of a schema: short and a plain identifier whatever the schema's name.
fn channel_of(schema: &str) -> String {
    let digest = Hash32::digest(b"cnsm/channel\0", schema.as_bytes());
    format!("{COMMIT_CHANNEL_PREFIX}{}", &digest.to_hex()[..16])
}

/// A token that tells this handle's NOTIFY payloads from other handles'.
fn origin_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("o{:016x}", hasher.finish())
}

/// Runs `attempt` until it answers, again after a retryable database error (a deadlock between
/// nodes, a serialization failure) with a growing pause, at most [`DEADLOCK_RETRIES_MAX`]
/// times; `attempt` answers `Ok(Err(e))` for a retryable error.
async fn retrying<T, F>(mut attempt: impl FnMut() -> F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<Result<T, tokio_postgres::Error>, StoreError>>,
{
    let mut retries = 0;
    loop {
        match attempt().await? {
            Ok(answer) => return Ok(answer),
            Err(_) if retries < DEADLOCK_RETRIES_MAX => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(1 << retries)).await;
            }
            Err(e) => return Err(db_error(e)),
        }
    }
}

/// `BEGIN`, one statement and `COMMIT`, pipelined in one round trip on the lease's connection;
/// a failed statement makes that `COMMIT` a rollback. The lease counts as in a transaction
/// until `COMMIT` came back, so a connection dropped in between (an error, a deadline) is
/// closed instead of going back to the pool.
async fn in_one_transaction(
    lease: &pool::Lease,
    statement: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    lease.set_in_transaction(true);
    let client = lease.client();
    let (begun, rows, committed) = futures_util::future::join3(
        client.batch_execute("BEGIN"),
        client.query(statement, params),
        client.batch_execute("COMMIT"),
    )
    .await;
    if committed.is_ok() {
        lease.set_in_transaction(false);
    }
    begun.and(rows).and_then(|rows| committed.map(|()| rows))
}

fn retryable_or<T>(
    error: tokio_postgres::Error,
) -> Result<Result<T, tokio_postgres::Error>, StoreError> {
    if is_retryable(&error) {
        Ok(Err(error))
    } else {
        Err(db_error(error))
    }
}

/// The parameters of `cnsm_commit_item`, in its order, for one item (`prev`: the previous
/// record's hash, `hash`: the record's, `key`: its idempotency key, if any).
fn commit_item_params<'a>(
    item: &'a CommitItem,
    c: &'a ItemColumns,
    prev: &'a &'a [u8],
    hash: &'a &'a [u8],
    key: &'a Option<&'a str>,
) -> [&'a (dyn ToSql + Sync); 19] {
    [
        &c.namespace,
        &c.id,
        &c.expected,
        prev,
        &c.version,
        hash,
        &item.record.bytes,
        &c.machine,
        &c.state,
        &c.status,
        &c.labels,
        &c.body,
        &c.timer_due,
        &c.timer_seq,
        &c.timer_kind,
        key,
        &c.key_hash,
        &c.key_expires,
        &c.now,
    ]
}

/// The SQL parameters of one item that need converting.
struct ItemColumns {
    namespace: String,
    id: String,
    expected: Option<i64>,
    version: i64,
    machine: String,
    state: String,
    status: i16,
    labels: String,
    body: Vec<u8>,
    timer_due: Option<i64>,
    timer_seq: Option<i64>,
    timer_kind: Option<i16>,
    key_hash: Option<Vec<u8>>,
    key_expires: Option<i64>,
    now: i64,
}

fn columns_of(item: &CommitItem) -> Result<ItemColumns, StoreError> {
    let instance = &item.instance;
    let timer = indexed_timer(instance);
    let entry: Option<&IdempotencyEntry> = item.idempotency.as_ref();
    Ok(ItemColumns {
        namespace: instance.namespace.to_string(),
        id: instance.id.to_string(),
        expected: item.expected_version.map(to_i64).transpose()?,
        version: to_i64(item.record.version)?,
        machine: instance.machine.to_string(),
        state: instance.state.to_string(),
        status: status_code(instance.status),
        labels: serde_json::to_string(&instance.labels)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode labels: {e}")))?,
        body: encode_instance(instance)?,
        timer_due: timer.map(|t| to_i64(t.due_ms)).transpose()?,
        timer_seq: timer.map(|t| to_i64(t.entry_seq)).transpose()?,
        timer_kind: timer.map(|t| kind_code(t.kind)),
        key_hash: entry.map(|e| e.request_hash.0.to_vec()),
        key_expires: entry.map(|e| to_i64(e.expires_ms)).transpose()?,
        now: to_i64(instance.updated_ms)?,
    })
}

fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Refused(format!("{value} does not fit PostgreSQL's bigint")))
}

fn status_code(status: Status) -> i16 {
    match status {
        Status::Active => 0,
        Status::Succeeded => 1,
        Status::Failed => 2,
        Status::Cancelled => 3,
    }
}

fn kind_code(kind: TimerKind) -> i16 {
    match kind {
        TimerKind::Timeout => 0,
        TimerKind::Wait => 1,
        TimerKind::Backoff => 2,
    }
}

fn kind_from_code(code: i16) -> Option<TimerKind> {
    Some(match code {
        0 => TimerKind::Timeout,
        1 => TimerKind::Wait,
        2 => TimerKind::Backoff,
        _ => return None,
    })
}

/// The timer the timer columns hold: none once the instance is final.
fn indexed_timer(instance: &Instance) -> Option<Timer> {
    if instance.status.is_final() {
        None
    } else {
        instance.timer
    }
}

fn encode_instance(instance: &Instance) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(instance)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode an instance row: {e}")))
}

fn decode_instance(bytes: &[u8], namespace: &str, id: &str) -> Result<Instance, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| {
        StoreError::Corrupt(format!(
            "instance {namespace}/{id}: row does not decode: {e}"
        ))
    })
}

fn hash_of(bytes: &[u8], what: &dyn Fn() -> String) -> Result<Hash32, StoreError> {
    <[u8; 32]>::try_from(bytes)
        .map(Hash32)
        .map_err(|_| StoreError::Corrupt(format!("{}: a hash is not 32 bytes", what())))
}

fn definition_row(row: &tokio_postgres::Row) -> Result<DefinitionRow, StoreError> {
    let namespace: String = row.get("namespace");
    let name: String = row.get("name");
    let revision: i32 = row.get("revision");
    let what = || format!("definition {namespace}/{name}@{revision}");
    let definition: StateMachine = serde_json::from_slice(row.get::<_, &[u8]>("body"))
        .map_err(|e| StoreError::Corrupt(format!("{}: row does not decode: {e}", what())))?;
    let created_ms: i64 = row.get("created_ms");
    Ok(DefinitionRow {
        hash: hash_of(row.get::<_, &[u8]>("hash"), &what)?,
        namespace,
        name,
        revision: revision as u32,
        definition,
        created_ms: created_ms as u64,
    })
}

/// A dead letter from a row of (target, position, body, redrive_requested_ms, redrive_actor).
fn dead_letter_of(row: &tokio_postgres::Row) -> Result<cnsm_store::DeadLetter, StoreError> {
    let target: &str = row.get(0);
    let position: i64 = row.get(1);
    let mut letter: cnsm_store::DeadLetter = serde_json::from_slice(row.get::<_, &[u8]>(2))
        .map_err(|e| {
            StoreError::Corrupt(format!(
                "dead letter {target} at position {position} does not decode: {e}"
            ))
        })?;
    letter.redrive = row
        .get::<_, Option<i64>>(3)
        .map(|requested_ms| cnsm_store::Redrive {
            requested_ms: requested_ms as u64,
            actor: row.get::<_, Option<String>>(4).unwrap_or_default(),
        });
    Ok(letter)
}

/// Refuses an empty or over-long delivery target name.
fn check_target_name(target: &str) -> Result<(), StoreError> {
    if target.is_empty() || target.len() > cnsm_store::DELIVERY_TARGET_CHARS_MAX {
        return Err(StoreError::Refused(format!(
            "a delivery target name must have 1 to {} bytes",
            cnsm_store::DELIVERY_TARGET_CHARS_MAX
        )));
    }
    Ok(())
}

fn timer_ref(row: &tokio_postgres::Row) -> Result<TimerRef, StoreError> {
    let uid: i64 = row.get(0);
    let due: i64 = row.get(1);
    let seq: i64 = row.get(2);
    let code: i16 = row.get(3);
    Ok(TimerRef {
        due_ms: due as u64,
        uid: uid as u64,
        entry_seq: seq as u64,
        kind: kind_from_code(code).ok_or_else(|| {
            StoreError::Corrupt(format!("timer of uid {uid}: unknown kind {code}"))
        })?,
    })
}

impl Store for PostgresStore {
    fn put_definition(
        &self,
        definition: &StateMachine,
        hash: Hash32,
        now_ms: u64,
    ) -> Result<PutDefinition, StoreError> {
        let namespace = definition.metadata.namespace.as_str();
        let name = definition.metadata.name.as_str();
        let body = serde_json::to_vec(definition)
            .map_err(|e| StoreError::Corrupt(format!("cannot encode a definition: {e}")))?;
        let created = to_i64(now_ms)?;
        self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            let txn = lease.conn().client.transaction().await.map_err(db_error)?;
            // Two nodes applying the same definition at once number revisions one at a time.
            txn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('cnsm-definition:' || $1 || '/' || $2))",
                &[&namespace, &name],
            )
            .await
            .map_err(db_error)?;
            let latest = txn
                .query_opt(
                    "SELECT revision, hash FROM cnsm_definitions WHERE namespace = $1 AND name = $2 \
                     ORDER BY revision DESC LIMIT 1",
                    &[&namespace, &name],
                )
                .await
                .map_err(db_error)?;
            let next = match latest {
                Some(row) => {
                    let revision: i32 = row.get(0);
                    if row.get::<_, &[u8]>(1) == hash.0.as_slice() {
                        return Ok(PutDefinition::Unchanged(revision as u32));
                    }
                    revision.checked_add(1).ok_or_else(|| {
                        StoreError::Refused(format!(
                            "definition {namespace}/{name} has run out of revision numbers"
                        ))
                    })?
                }
                None => 1,
            };
            txn.execute(
                "INSERT INTO cnsm_definitions (namespace, name, revision, hash, created_ms, body) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&namespace, &name, &next, &hash.0.as_slice(), &created, &body],
            )
            .await
            .map_err(db_error)?;
            txn.commit().await.map_err(db_error)?;
            Ok(PutDefinition::Created(next as u32))
        })
    }

    fn definition(
        &self,
        namespace: &str,
        name: &str,
        revision: Option<u32>,
    ) -> Result<Option<DefinitionRow>, StoreError> {
        let rows = match revision {
            Some(revision) => {
                let Ok(revision) = i32::try_from(revision) else {
                    return Ok(None);
                };
                self.query(
                    "SELECT * FROM cnsm_definitions WHERE namespace = $1 AND name = $2 AND revision = $3",
                    &[&namespace, &name, &revision],
                )?
            }
            None => self.query(
                "SELECT * FROM cnsm_definitions WHERE namespace = $1 AND name = $2 \
                 ORDER BY revision DESC LIMIT 1",
                &[&namespace, &name],
            )?,
        };
        rows.first().map(definition_row).transpose()
    }

    fn list_definitions(&self, namespace: Option<&str>) -> Result<Vec<DefinitionRow>, StoreError> {
        self.query(
            "SELECT DISTINCT ON (namespace, name) * FROM cnsm_definitions \
             WHERE ($1::text IS NULL OR namespace = $1) \
             ORDER BY namespace, name, revision DESC",
            &[&namespace],
        )?
        .iter()
        .map(definition_row)
        .collect()
    }

    fn delete_definition(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            let txn = lease.conn().client.transaction().await.map_err(db_error)?;
            txn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('cnsm-definition:' || $1 || '/' || $2))",
                &[&namespace, &name],
            )
            .await
            .map_err(db_error)?;
            let n_active: i64 = txn
                .query_one(
                    "SELECT count(*) FROM cnsm_instances \
                     WHERE namespace = $1 AND machine = $2 AND status = 0",
                    &[&namespace, &name],
                )
                .await
                .map_err(db_error)?
                .get(0);
            if n_active > 0 {
                return Err(StoreError::Refused(format!(
                    "definition {namespace}/{name} is used by {n_active} active instance(s); \
                     let them finish or cancel them first"
                )));
            }
            let n_deleted = txn
                .execute(
                    "DELETE FROM cnsm_definitions WHERE namespace = $1 AND name = $2",
                    &[&namespace, &name],
                )
                .await
                .map_err(db_error)?;
            txn.execute(
                "DELETE FROM cnsm_rollouts WHERE namespace = $1 AND name = $2",
                &[&namespace, &name],
            )
            .await
            .map_err(db_error)?;
            txn.commit().await.map_err(db_error)?;
            Ok(n_deleted > 0)
        })
    }

    fn commit(&self, items: &[CommitItem]) -> Result<Vec<ItemOutcome>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if items.len() > COMMIT_ITEMS_MAX {
            return Err(StoreError::Refused(format!(
                "a batch of {} items exceeds the limit of {COMMIT_ITEMS_MAX}",
                items.len()
            )));
        }
        let prev_hashes = items
            .iter()
            .enumerate()
            .map(|(index, item)| cnsm_store::embedded::check_item(index, item))
            .collect::<Result<Vec<_>, _>>()?;
        let columns = items
            .iter()
            .map(columns_of)
            .collect::<Result<Vec<_>, _>>()?;
        let result = if self.transaction_per_item {
            self.bridge
                .run(self.commit_per_item(items, &prev_hashes, &columns))
        } else {
            self.bridge
                .run(retrying(|| self.commit_once(items, &prev_hashes, &columns)))
        };
        if matches!(result, Err(StoreError::Io(_))) {
            self.pool.clear();
        }
        result
    }

    fn instance(&self, namespace: &str, id: &str) -> Result<Option<StoredInstance>, StoreError> {
        let rows = self.query(INSTANCE_BY_KEY, &[&namespace, &id])?;
        rows.first()
            .map(|row| {
                let uid: i64 = row.get(0);
                Ok(StoredInstance {
                    uid: uid as u64,
                    instance: decode_instance(row.get::<_, &[u8]>(1), namespace, id)?,
                })
            })
            .transpose()
    }

    fn instances(&self, keys: &[(&str, &str)]) -> Result<Vec<StoredInstance>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let namespaces: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.1).collect();
        let rows = self.query(INSTANCES_BY_KEYS, &[&namespaces, &ids])?;
        rows.iter()
            .map(|row| {
                let uid: i64 = row.get(0);
                let namespace: &str = row.get(2);
                let id: &str = row.get(3);
                Ok(StoredInstance {
                    uid: uid as u64,
                    instance: decode_instance(row.get::<_, &[u8]>(1), namespace, id)?,
                })
            })
            .collect()
    }

    fn refresh_instances(&self, keys: &[HeldKey<'_>]) -> Result<Vec<Refreshed>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let namespaces: Vec<&str> = keys.iter().map(|k| k.0).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.1).collect();
        let held = |f: fn((u64, u64)) -> u64| -> Vec<Option<i64>> {
            keys.iter()
                .map(|k| k.2.and_then(|h| i64::try_from(f(h)).ok()))
                .collect()
        };
        let (uids, versions) = (held(|h| h.0), held(|h| h.1));
        let rows = self.query(REFRESH_INSTANCES, &[&namespaces, &ids, &uids, &versions])?;
        rows.iter()
            .map(|row| {
                let uid: i64 = row.get(0);
                let namespace: &str = row.get(2);
                let id: &str = row.get(3);
                Ok(match row.get::<_, Option<&[u8]>>(1) {
                    None => Refreshed::Unchanged {
                        namespace: namespace.to_owned(),
                        id: id.to_owned(),
                    },
                    Some(body) => Refreshed::Changed(Box::new(StoredInstance {
                        uid: uid as u64,
                        instance: decode_instance(body, namespace, id)?,
                    })),
                })
            })
            .collect()
    }

    fn instance_by_uid(&self, uid: u64) -> Result<Option<StoredInstance>, StoreError> {
        let Ok(uid) = i64::try_from(uid) else {
            return Ok(None);
        };
        let rows = self.query(INSTANCE_BY_UID, &[&uid])?;
        rows.first()
            .map(|row| {
                let namespace: &str = row.get(2);
                let id: &str = row.get(3);
                Ok(StoredInstance {
                    uid: uid as u64,
                    instance: decode_instance(row.get::<_, &[u8]>(1), namespace, id)?,
                })
            })
            .transpose()
    }

    fn list_instances(&self, query: &InstanceQuery) -> Result<Vec<StoredInstance>, StoreError> {
        let labels: BTreeMap<&str, &str> = query
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let labels = serde_json::to_string(&labels)
            .map_err(|e| StoreError::Refused(format!("cannot encode the label filter: {e}")))?;
        let status = query.status.map(status_code);
        let (after_ns, after_id) = match &query.after {
            Some((ns, id)) => (Some(ns.as_str()), Some(id.as_str())),
            None => (None, None),
        };
        let limit = cnsm_store::page_len(query.limit) as i64;
        let rows = self.query(
            LIST_INSTANCES,
            &[
                &query.namespace.as_deref(),
                &query.machine.as_deref(),
                &query.state.as_deref(),
                &status,
                &labels,
                &after_ns,
                &after_id,
                &limit,
            ],
        )?;
        rows.iter()
            .map(|row| {
                let uid: i64 = row.get(0);
                let bytes: &[u8] = row.get(1);
                let instance: Instance = serde_json::from_slice(bytes).map_err(|e| {
                    StoreError::Corrupt(format!("instance uid {uid}: row does not decode: {e}"))
                })?;
                Ok(StoredInstance {
                    uid: uid as u64,
                    instance,
                })
            })
            .collect()
    }

    fn history(
        &self,
        namespace: &str,
        id: &str,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<SealedRecord>, StoreError> {
        let from = i64::try_from(from_version).unwrap_or(i64::MAX);
        let limit = cnsm_store::page_len(limit) as i64;
        let page = self.history_rows(namespace, id, from, limit)?;
        // Check on the way out what was checked on the way in; a redacted record must be
        // listed by a later erasure record of its chain.
        cnsm_store::check_history_page(namespace, id, &page, |after| {
            self.history_rows(
                namespace,
                id,
                i64::try_from(after + 1).unwrap_or(i64::MAX),
                PAGE_LEN_MAX as i64,
            )
        })?;
        Ok(page)
    }

    fn erase(
        &self,
        redacted: &[SealedRecord],
        erasure: &CommitItem,
    ) -> Result<ItemOutcome, StoreError> {
        let prev_hash = cnsm_store::embedded::check_item(0, erasure)?;
        cnsm_store::check_erase(redacted, erasure)?;
        let columns = columns_of(erasure)?;
        let result = self.bridge.run(retrying(|| {
            self.erase_once(redacted, erasure, prev_hash, &columns)
        }));
        if matches!(result, Err(StoreError::Io(_))) {
            self.pool.clear();
        }
        result
    }

    fn idempotency(
        &self,
        namespace: &str,
        id: &str,
        key: &str,
    ) -> Result<Option<IdempotencyEntry>, StoreError> {
        let rows = self.query(IDEMPOTENCY, &[&namespace, &id, &key])?;
        rows.first()
            .map(|row| {
                let version: i64 = row.get(1);
                let expires: i64 = row.get(2);
                Ok(IdempotencyEntry {
                    key: key.to_owned(),
                    request_hash: hash_of(row.get::<_, &[u8]>(0), &|| {
                        format!("idempotency key {key:?} of {namespace}/{id}")
                    })?,
                    version: version as u64,
                    expires_ms: expires as u64,
                })
            })
            .transpose()
    }

    fn purge_idempotency(&self, now_ms: u64) -> Result<u64, StoreError> {
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            lease
                .conn()
                .client
                .execute(
                    "DELETE FROM cnsm_idempotency WHERE expires_ms <= $1",
                    &[&now],
                )
                .await
                .map_err(db_error)
        })
    }

    fn pending_timers(&self, visit: &mut dyn FnMut(TimerRef)) -> Result<(), StoreError> {
        let rows = self.query(
            "SELECT uid, timer_due_ms, timer_entry_seq, timer_kind FROM cnsm_instances \
             WHERE timer_due_ms IS NOT NULL",
            &[],
        )?;
        for row in &rows {
            visit(timer_ref(row)?);
        }
        Ok(())
    }

    fn verify(&self) -> Result<VerifyReport, StoreError> {
        self.bridge.run(verify::verify_all(&self.pool))
    }

    fn purge_finished(
        &self,
        namespace: &str,
        machine: &str,
        ended_before_ms: u64,
        limit: usize,
    ) -> Result<u64, StoreError> {
        let before = i64::try_from(ended_before_ms).unwrap_or(i64::MAX);
        let limit = cnsm_store::page_len(limit) as i64;
        self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            let n = lease
                .conn()
                .client
                .execute(
                    "WITH doomed AS ( \
                         SELECT uid FROM cnsm_instances \
                          WHERE namespace = $1 AND machine = $2 AND status <> 0 \
                            AND (convert_from(body, 'UTF8')::jsonb->>'updatedMs')::bigint < $3 \
                          ORDER BY uid LIMIT $4 FOR UPDATE SKIP LOCKED), \
                     gone_records AS (DELETE FROM cnsm_records WHERE uid IN (SELECT uid FROM doomed)), \
                     gone_keys AS (DELETE FROM cnsm_idempotency WHERE uid IN (SELECT uid FROM doomed)) \
                     DELETE FROM cnsm_instances WHERE uid IN (SELECT uid FROM doomed)",
                    &[&namespace, &machine, &before, &limit],
                )
                .await
                .map_err(db_error)?;
            Ok(n)
        })
    }

    fn rollout(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<cnsm_core::rollout::Rollout>, StoreError> {
        let rows = self.query(
            "SELECT body FROM cnsm_rollouts WHERE namespace = $1 AND name = $2",
            &[&namespace, &name],
        )?;
        rows.first()
            .map(|row| {
                serde_json::from_slice(row.get::<_, &[u8]>(0)).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "rollout of {namespace}/{name} does not decode: {e}"
                    ))
                })
            })
            .transpose()
    }

    fn put_rollout(
        &self,
        namespace: &str,
        name: &str,
        rollout: Option<&cnsm_core::rollout::Rollout>,
    ) -> Result<(), StoreError> {
        let body = rollout
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| StoreError::Io(format!("cannot encode a rollout: {e}")))?;
        let revisions: Vec<i32> = rollout
            .map(|r| vec![r.stable as i32, r.canary as i32])
            .unwrap_or_default();
        self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            let txn = lease.conn().client.transaction().await.map_err(db_error)?;
            for revision in &revisions {
                let found = txn
                    .query_opt(
                        "SELECT 1 FROM cnsm_definitions \
                         WHERE namespace = $1 AND name = $2 AND revision = $3",
                        &[&namespace, &name, revision],
                    )
                    .await
                    .map_err(db_error)?;
                if found.is_none() {
                    return Err(StoreError::Refused(format!(
                        "statemachine {namespace}/{name} has no revision {revision}"
                    )));
                }
            }
            match &body {
                Some(body) => txn
                    .execute(
                        "INSERT INTO cnsm_rollouts (namespace, name, body) VALUES ($1, $2, $3) \
                         ON CONFLICT (namespace, name) DO UPDATE SET body = EXCLUDED.body",
                        &[&namespace, &name, body],
                    )
                    .await
                    .map_err(db_error)?,
                None => txn
                    .execute(
                        "DELETE FROM cnsm_rollouts WHERE namespace = $1 AND name = $2",
                        &[&namespace, &name],
                    )
                    .await
                    .map_err(db_error)?,
            };
            txn.commit().await.map_err(db_error)?;
            Ok(())
        })
    }

    fn claim_delivery(
        &self,
        target: &str,
        node: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<cnsm_store::DeliveryCursor>, StoreError> {
        check_target_name(target)?;
        let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let until = i64::try_from(now_ms.saturating_add(lease_ms)).unwrap_or(i64::MAX);
        // Compare-and-set in one statement: the row is taken over only when this node holds it
        // or its lease expired; otherwise nothing is returned.
        let rows = self.query(
            "INSERT INTO cnsm_delivery_cursors (target, position, lease_node, lease_until_ms) \
             VALUES ($1, 0, $2, $4) \
             ON CONFLICT (target) DO UPDATE \
             SET lease_node = EXCLUDED.lease_node, lease_until_ms = EXCLUDED.lease_until_ms \
             WHERE cnsm_delivery_cursors.lease_node = $2 \
                OR cnsm_delivery_cursors.lease_until_ms <= $3 \
             RETURNING position, lease_node, lease_until_ms",
            &[&target, &node, &now, &until],
        )?;
        Ok(rows.first().map(|row| cnsm_store::DeliveryCursor {
            position: row.get::<_, i64>(0) as u64,
            lease_node: row.get(1),
            lease_until_ms: row.get::<_, i64>(2) as u64,
        }))
    }

    fn put_delivery_cursor(
        &self,
        target: &str,
        node: &str,
        position: u64,
    ) -> Result<bool, StoreError> {
        check_target_name(target)?;
        let position = i64::try_from(position).unwrap_or(i64::MAX);
        let rows = self.query(
            "UPDATE cnsm_delivery_cursors SET position = $3 \
             WHERE target = $1 AND lease_node = $2 RETURNING 1",
            &[&target, &node, &position],
        )?;
        Ok(!rows.is_empty())
    }

    fn delivery_cursors(&self) -> Result<Vec<(String, cnsm_store::DeliveryCursor)>, StoreError> {
        let rows = self.query(
            "SELECT target, position, lease_node, lease_until_ms FROM cnsm_delivery_cursors \
             ORDER BY target",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|row| {
                (
                    row.get::<_, String>(0),
                    cnsm_store::DeliveryCursor {
                        position: row.get::<_, i64>(1) as u64,
                        lease_node: row.get(2),
                        lease_until_ms: row.get::<_, i64>(3) as u64,
                    },
                )
            })
            .collect())
    }

    fn put_dead_letter(&self, letter: &cnsm_store::DeadLetter) -> Result<(), StoreError> {
        check_target_name(&letter.target)?;
        let body = serde_json::to_vec(&cnsm_store::DeadLetter {
            redrive: None,
            ..letter.clone()
        })
        .map_err(|e| StoreError::Io(format!("cannot encode a dead letter: {e}")))?;
        let position = i64::try_from(letter.position).unwrap_or(i64::MAX);
        let requested_ms = letter
            .redrive
            .as_ref()
            .map(|r| i64::try_from(r.requested_ms).unwrap_or(i64::MAX));
        let actor = letter.redrive.as_ref().map(|r| r.actor.as_str());
        self.query(
            "INSERT INTO cnsm_dead_letters \
                (target, position, body, redrive_requested_ms, redrive_actor) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (target, position) DO UPDATE SET body = EXCLUDED.body, \
                redrive_requested_ms = EXCLUDED.redrive_requested_ms, \
                redrive_actor = EXCLUDED.redrive_actor",
            &[&letter.target, &position, &body, &requested_ms, &actor],
        )?;
        Ok(())
    }

    fn dead_letters(
        &self,
        target: Option<&str>,
        after: Option<(&str, u64)>,
        limit: usize,
    ) -> Result<Vec<cnsm_store::DeadLetter>, StoreError> {
        let limit = cnsm_store::page_len(limit) as i64;
        // ('', -1) sorts before every stored (target, position).
        let (after_target, after_position) = match after {
            Some((t, p)) => (t, i64::try_from(p).unwrap_or(i64::MAX)),
            None => ("", -1),
        };
        let rows = self.query(
            "SELECT target, position, body, redrive_requested_ms, redrive_actor \
             FROM cnsm_dead_letters \
             WHERE ($1::text IS NULL OR target = $1) AND (target, position) > ($2, $3) \
             ORDER BY target, position LIMIT $4",
            &[&target, &after_target, &after_position, &limit],
        )?;
        rows.iter().map(dead_letter_of).collect()
    }

    fn redrive_dead_letters(
        &self,
        target: &str,
        position: Option<u64>,
        redrive: &cnsm_store::Redrive,
    ) -> Result<u64, StoreError> {
        check_target_name(target)?;
        if redrive.actor.len() > cnsm_store::REDRIVE_ACTOR_CHARS_MAX {
            return Err(StoreError::Refused(format!(
                "a redrive actor must have at most {} bytes",
                cnsm_store::REDRIVE_ACTOR_CHARS_MAX
            )));
        }
        let position = position.map(|p| i64::try_from(p).unwrap_or(i64::MAX));
        let requested_ms = i64::try_from(redrive.requested_ms).unwrap_or(i64::MAX);
        let rows = self.query(
            "WITH marked AS (UPDATE cnsm_dead_letters \
                SET redrive_requested_ms = $3, redrive_actor = $4 \
                WHERE target = $1 AND ($2::bigint IS NULL OR position = $2) RETURNING 1) \
             SELECT count(*) FROM marked",
            &[&target, &position, &requested_ms, &redrive.actor],
        )?;
        Ok(rows.first().map_or(0, |row| row.get::<_, i64>(0) as u64))
    }

    fn redrive_requests(
        &self,
        target: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<cnsm_store::DeadLetter>, StoreError> {
        let limit = cnsm_store::page_len(limit) as i64;
        let after = after.map_or(-1, |p| i64::try_from(p).unwrap_or(i64::MAX));
        let rows = self.query(
            "SELECT target, position, body, redrive_requested_ms, redrive_actor \
             FROM cnsm_dead_letters \
             WHERE target = $1 AND position > $2 AND redrive_requested_ms IS NOT NULL \
             ORDER BY position LIMIT $3",
            &[&target, &after, &limit],
        )?;
        rows.iter().map(dead_letter_of).collect()
    }

    fn delete_dead_letter(&self, target: &str, position: u64) -> Result<bool, StoreError> {
        check_target_name(target)?;
        let position = i64::try_from(position).unwrap_or(i64::MAX);
        let rows = self.query(
            "DELETE FROM cnsm_dead_letters WHERE target = $1 AND position = $2 RETURNING 1",
            &[&target, &position],
        )?;
        Ok(!rows.is_empty())
    }

    fn records_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, SealedRecord)>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = cnsm_store::page_len(limit) as i64;
        // Sequence numbers become visible out of order across concurrent transactions; a
        // reader that must not skip a late one re-reads a short window behind its cursor
        // (the audit log's cursor tolerates gaps, as docs/postgres.md says).
        let rows = self.query(
            "SELECT seq, version, hash, bytes FROM cnsm_records WHERE seq > $1 \
             ORDER BY seq LIMIT $2",
            &[&after, &limit],
        )?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.get(0);
                let version: i64 = row.get(1);
                let hash = hash_of(row.get::<_, &[u8]>(2), &|| format!("record at seq {seq}"))?;
                Ok((
                    seq as u64,
                    SealedRecord {
                        version: version as u64,
                        bytes: row.get::<_, &[u8]>(3).to_vec(),
                        hash,
                    },
                ))
            })
            .collect()
    }

    fn import_instances(
        &self,
        definitions: &[DefinitionRow],
        items: &[cnsm_store::ImportItem],
        replace: bool,
    ) -> Result<cnsm_store::ImportReport, StoreError> {
        cnsm_store::check_import(definitions, items)?;
        self.import_from(definitions, &mut items.iter().cloned().map(Ok), replace)
    }

    fn import_stream(
        &self,
        definitions: &[DefinitionRow],
        items: &mut cnsm_store::ImportItems<'_>,
        replace: bool,
    ) -> Result<cnsm_store::ImportReport, StoreError> {
        cnsm_store::check_import_definitions(definitions)?;
        self.import_from(
            definitions,
            &mut cnsm_store::checked_import_items(items),
            replace,
        )
    }

    fn claim_due_timers(
        &self,
        now_ms: u64,
        lease_ms: u64,
        node: &str,
        limit: usize,
    ) -> Result<Vec<TimerRef>, StoreError> {
        let now = to_i64(now_ms)?;
        let until = to_i64(now_ms.saturating_add(lease_ms))?;
        let limit = cnsm_store::page_len(limit) as i64;
        let rows = self.query(CLAIM_TIMERS, &[&now, &until, &node, &limit])?;
        let mut timers = rows.iter().map(timer_ref).collect::<Result<Vec<_>, _>>()?;
        timers.sort();
        Ok(timers)
    }

    fn subscribe_foreign_commits(
        &self,
        on_commit: std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>,
    ) -> Result<bool, StoreError> {
        let feed = pool::CommitFeed {
            config: self.config.clone(),
            channel: self.channel.clone(),
            origin: self.origin.clone(),
            closed: std::sync::Arc::clone(&self.closed),
            on_commit,
        };
        self.bridge.spawn(feed.run());
        Ok(true)
    }
}

mod verify;

pub use verify::PROBLEMS_MAX;

/// Decodes a definition and checks its stored hash (used by `verify`).
pub(crate) fn check_definition_row(row: &DefinitionRow) -> Option<String> {
    if revision_hash(&row.definition) != row.hash {
        Some(format!(
            "definition {}/{}@{}: stored hash does not match its content",
            row.namespace, row.name, row.revision
        ))
    } else {
        None
    }
}

impl PostgresStore {
    /// An import in one transaction, items written as they arrive; any error drops the
    /// transaction (PostgreSQL rolls it back), so nothing is written.
    fn import_from(
        &self,
        definitions: &[DefinitionRow],
        items: &mut cnsm_store::ImportItems<'_>,
        replace: bool,
    ) -> Result<cnsm_store::ImportReport, StoreError> {
        self.bridge.run(async {
            let mut lease = self.pool.get().await?;
            let txn = lease.conn().client.transaction().await.map_err(db_error)?;
            let mut report = cnsm_store::ImportReport::default();
            for row in definitions {
                let (namespace, name) = (row.namespace.as_str(), row.name.as_str());
                let revision = row.revision as i32;
                let existing = txn
                    .query_opt(
                        "SELECT hash FROM cnsm_definitions \
                         WHERE namespace = $1 AND name = $2 AND revision = $3",
                        &[&namespace, &name, &revision],
                    )
                    .await
                    .map_err(db_error)?;
                match existing {
                    Some(found) if found.get::<_, &[u8]>(0) == row.hash.0.as_slice() => {}
                    Some(_) => {
                        return Err(StoreError::Refused(format!(
                            "definition {namespace}/{name}@{} exists here with another content hash",
                            row.revision
                        )));
                    }
                    None => {
                        let body = serde_json::to_vec(&row.definition).map_err(|e| {
                            StoreError::Corrupt(format!("cannot encode a definition: {e}"))
                        })?;
                        txn.execute(
                            "INSERT INTO cnsm_definitions \
                             (namespace, name, revision, hash, created_ms, body) \
                             VALUES ($1, $2, $3, $4, $5, $6)",
                            &[
                                &namespace,
                                &name,
                                &revision,
                                &row.hash.0.as_slice(),
                                &to_i64(row.created_ms)?,
                                &body,
                            ],
                        )
                        .await
                        .map_err(db_error)?;
                        report.n_definitions_created += 1;
                    }
                }
            }
            for item in items {
                let item = &item?;
                let instance = &item.instance;
                let (namespace, id) = (&*instance.namespace, &*instance.id);
                let pinned = txn
                    .query_opt(
                        "SELECT hash FROM cnsm_definitions \
                         WHERE namespace = $1 AND name = $2 AND revision = $3",
                        &[&namespace, &&*instance.machine, &(instance.revision as i32)],
                    )
                    .await
                    .map_err(db_error)?;
                match pinned {
                    Some(row) if row.get::<_, &[u8]>(0) == instance.revision_hash.0.as_slice() => {}
                    _ => {
                        return Err(StoreError::Refused(format!(
                            "instance {namespace}/{id} is pinned to {}/{} revision {} ({}), which neither the import nor this store has",
                            namespace,
                            instance.machine,
                            instance.revision,
                            instance.revision_hash.to_hex()
                        )));
                    }
                }
                let existing = txn
                    .query_opt(
                        "SELECT uid FROM cnsm_instances WHERE namespace = $1 AND id = $2 FOR UPDATE",
                        &[&namespace, &id],
                    )
                    .await
                    .map_err(db_error)?;
                if let Some(row) = existing {
                    if !replace {
                        return Err(StoreError::Refused(format!(
                            "instance {namespace}/{id} already exists (import with replace to overwrite it)"
                        )));
                    }
                    let uid: i64 = row.get(0);
                    for sql in [
                        "DELETE FROM cnsm_records WHERE uid = $1",
                        "DELETE FROM cnsm_idempotency WHERE uid = $1",
                        "DELETE FROM cnsm_instances WHERE uid = $1",
                    ] {
                        txn.execute(sql, &[&uid]).await.map_err(db_error)?;
                    }
                    report.n_replaced += 1;
                }
                let timer = indexed_timer(instance);
                let last = item.records.last().ok_or_else(|| {
                    StoreError::Refused(format!("instance {namespace}/{id} has no records"))
                })?;
                let labels = serde_json::to_string(&instance.labels)
                    .map_err(|e| StoreError::Corrupt(format!("cannot encode labels: {e}")))?;
                let uid: i64 = txn
                    .query_one(
                        "INSERT INTO cnsm_instances (namespace, id, machine, state, status, \
                         version, last_hash, labels, body, timer_due_ms, timer_entry_seq, \
                         timer_kind) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::jsonb, $9, $10, $11, $12) \
                         RETURNING uid",
                        &[
                            &namespace,
                            &id,
                            &&*instance.machine,
                            &&*instance.state,
                            &status_code(instance.status),
                            &to_i64(instance.version)?,
                            &last.hash.0.as_slice(),
                            &labels,
                            &encode_instance(instance)?,
                            &timer.map(|t| to_i64(t.due_ms)).transpose()?,
                            &timer.map(|t| to_i64(t.entry_seq)).transpose()?,
                            &timer.map(|t| kind_code(t.kind)),
                        ],
                    )
                    .await
                    .map_err(db_error)?
                    .get(0);
                for record in &item.records {
                    txn.execute(
                        "INSERT INTO cnsm_records (uid, version, hash, bytes) VALUES ($1, $2, $3, $4)",
                        &[
                            &uid,
                            &to_i64(record.version)?,
                            &record.hash.0.as_slice(),
                            &record.bytes,
                        ],
                    )
                    .await
                    .map_err(db_error)?;
                    report.n_records += 1;
                }
                for key in &item.idempotency {
                    txn.execute(
                        "INSERT INTO cnsm_idempotency (uid, key, request_hash, version, expires_ms) \
                         VALUES ($1, $2, $3, $4, $5)",
                        &[
                            &uid,
                            &key.key,
                            &key.request_hash.0.as_slice(),
                            &to_i64(key.version)?,
                            &to_i64(key.expires_ms)?,
                        ],
                    )
                    .await
                    .map_err(db_error)?;
                }
                if timer.is_some() {
                    report.n_timers += 1;
                }
                report.n_instances += 1;
            }
            txn.commit().await.map_err(db_error)?;
            Ok(report)
        })
    }
}
