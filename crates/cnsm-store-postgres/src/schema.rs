//! Versioned schema migrations, embedded in the binary and applied on open inside one
//! transaction under an advisory lock (several nodes may start at once).

use cnsm_store::StoreError;
use tokio_postgres::Client;

use crate::pool::{db_error, describe};

/// Every migration, in order; migration `i` brings the schema to version `i + 1`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("initial", include_str!("../migrations/0001_initial.sql")),
    (
        "rollouts and commit log",
        include_str!("../migrations/0002_rollouts_and_commit_log.sql"),
    ),
    (
        "delivery cursors and dead letters",
        include_str!("../migrations/0003_delivery.sql"),
    ),
    (
        "dead-letter redrive",
        include_str!("../migrations/0004_dead_letter_redrive.sql"),
    ),
    (
        "set-based batch commit",
        include_str!("../migrations/0005_set_based_commit.sql"),
    ),
];

/// The schema version this binary writes; it refuses a database at a newer one.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// What the database's schema is at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// 0 when cnsm never ran on this database (schema).
    pub version: u32,
    /// The version this binary writes.
    pub supported: u32,
    /// Migrations applied, `(version, name, applied_ms)`.
    pub applied: Vec<(u32, String, u64)>,
}

impl SchemaStatus {
    /// True when the database needs migrations this binary has.
    pub fn is_behind(&self) -> bool {
        self.version < self.supported
    }
}

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS cnsm_schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_ms bigint NOT NULL
)";

/// Serializes migrators of one schema (the key is derived from the schema's name).
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('cnsm-migrate:' || coalesce($1::text, current_schema(), '')))";

/// Reads the schema's version without changing anything.
pub async fn status(client: &Client) -> Result<SchemaStatus, StoreError> {
    let exists = client
        .query_one("SELECT to_regclass('cnsm_schema_version') IS NOT NULL", &[])
        .await
        .map_err(db_error)?
        .get::<_, bool>(0);
    let mut applied = Vec::new();
    if exists {
        for row in client
            .query(
                "SELECT version, name, applied_ms FROM cnsm_schema_version ORDER BY version",
                &[],
            )
            .await
            .map_err(db_error)?
        {
            let version: i32 = row.get(0);
            let applied_ms: i64 = row.get(2);
            applied.push((version as u32, row.get::<_, String>(1), applied_ms as u64));
        }
    }
    Ok(SchemaStatus {
        version: applied.last().map(|a| a.0).unwrap_or(0),
        supported: SCHEMA_VERSION,
        applied,
    })
}

/// Applies the missing migrations in one transaction; returns the versions applied. Refuses a
/// schema newer than this binary with [`StoreError::FormatTooNew`].
///
/// `schema`, when given, is created first (under the same lock, so nodes starting at once do
/// not race on it); it must be the connection's search path.
pub async fn migrate(
    client: &mut Client,
    schema: Option<&str>,
    now_ms: u64,
) -> Result<Vec<u32>, StoreError> {
    let txn = client.transaction().await.map_err(db_error)?;
    txn.execute(LOCK, &[&schema]).await.map_err(db_error)?;
    if let Some(schema) = schema {
        txn.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await
            .map_err(db_error)?;
    }
    txn.batch_execute(VERSION_TABLE).await.map_err(db_error)?;
    let current: i32 = txn
        .query_one(
            "SELECT coalesce(max(version), 0) FROM cnsm_schema_version",
            &[],
        )
        .await
        .map_err(db_error)?
        .get(0);
    let current = current.max(0) as u32;
    if current > SCHEMA_VERSION {
        return Err(StoreError::FormatTooNew {
            found: current,
            supported: SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
    for (index, (name, sql)) in MIGRATIONS.iter().enumerate() {
        let version = index as u32 + 1;
        if version <= current {
            continue;
        }
        txn.batch_execute(sql).await.map_err(|e| {
            StoreError::Io(format!(
                "schema migration {version} ({name}) failed: {}",
                describe(&e)
            ))
        })?;
        txn.execute(
            "INSERT INTO cnsm_schema_version (version, name, applied_ms) VALUES ($1, $2, $3)",
            &[&(version as i32), name, &(now_ms as i64)],
        )
        .await
        .map_err(db_error)?;
        applied.push(version);
    }
    txn.commit().await.map_err(db_error)?;
    Ok(applied)
}
