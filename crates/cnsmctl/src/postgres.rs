//! `--store postgres://...`: the PostgreSQL store for local commands and `serve`, and the
//! `store migrate` / `store status` commands that manage its schema.

use std::sync::Arc;

use cnsm_runtime::RuntimeOptions;
use cnsm_store::Store;
use cnsm_store_postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};

use crate::error::{CliError, EXIT_OK};
use crate::output::Out;

/// The store options of cnsmctl: the defaults, which bound every wait (connect 3 s, each
/// operation 10 s), so a database that is down makes requests fail with 503 and never hang.
pub fn store_options() -> PostgresOptions {
    let defaults = PostgresOptions::default();
    PostgresOptions {
        // `CNSM_PG_TRANSACTION_PER_EVENT=1`: one database transaction per event, the instances'
        // transactions concurrent on the pool (for comparisons; see docs/postgres.md).
        transaction_per_item: std::env::var("CNSM_PG_TRANSACTION_PER_EVENT")
            .is_ok_and(|v| v == "1" || v == "true"),
        // `CNSM_PG_CONNS_MAX`: the pool's size.
        conns_max: std::env::var("CNSM_PG_CONNS_MAX")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(defaults.conns_max),
        ..defaults
    }
}

/// Checks that `url` is a PostgreSQL URL (the only `--store` cnsm knows besides --data-dir).
pub fn check_url(url: &str) -> Result<(), CliError> {
    if cnsm_store_postgres::is_postgres_url(url) {
        Ok(())
    } else {
        Err(CliError::invalid(format!(
            "--store '{}' is not a PostgreSQL URL (postgres://USER@HOST:PORT/DB); the embedded store is chosen with --data-dir",
            redact(url)
        )))
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Opens the store; with `migrate`, applies missing schema migrations first (read-only
/// commands pass false and are refused, with a hint, by a schema that needs them).
pub fn open(url: &str, migrate: bool) -> Result<Arc<dyn Store>, CliError> {
    check_url(url)?;
    let options = PostgresOptions {
        migrate,
        ..store_options()
    };
    let store = PostgresStore::open(url, options).map_err(|e| {
        // A schema that needs migrating makes the store unusable here, like a newer one.
        let mut error = match e {
            cnsm_store::StoreError::Refused(message) => CliError::unavailable(message),
            other => CliError::from(other),
        };
        error.message = format!(
            "cannot open the store at {}: {}",
            redact(url),
            error.message
        );
        error
    })?;
    Ok(Arc::new(store))
}

/// Runtime options of a node on the shared store. `CNSM_BATCH_LEN_MAX` caps the events one
/// database transaction carries (1: a transaction per event, for comparisons).
pub fn runtime_options(node_id: String, timers: bool) -> RuntimeOptions {
    let defaults = RuntimeOptions::default();
    let batch_len_max = std::env::var("CNSM_BATCH_LEN_MAX")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(defaults.batch_len_max);
    RuntimeOptions {
        shared_store: true,
        node_id,
        timers,
        batch_len_max,
        ..defaults
    }
}

/// `store migrate`: applies the missing schema migrations.
pub fn migrate(url: &str, out: &mut Out) -> Result<u8, CliError> {
    check_url(url)?;
    let applied = PostgresStore::migrate(url, &store_options())?;
    if applied.is_empty() {
        out.line(format_args!(
            "schema of {} is up to date (version {SCHEMA_VERSION})",
            redact(url)
        ));
    } else {
        let list: Vec<String> = applied.iter().map(u32::to_string).collect();
        out.line(format_args!(
            "schema of {} migrated to version {SCHEMA_VERSION} (applied {})",
            redact(url),
            list.join(", ")
        ));
    }
    Ok(EXIT_OK)
}

/// `store status`: the schema version and the migrations applied. Exit 1 when the schema is
/// behind this binary, 5 when it is newer.
pub fn status(url: &str, out: &mut Out) -> Result<u8, CliError> {
    check_url(url)?;
    let status = PostgresStore::schema_status(url, &store_options())?;
    out.line(format_args!(
        "schema version {} (this binary writes {})",
        status.version, status.supported
    ));
    for (version, name, applied_ms) in &status.applied {
        out.line(format_args!(
            "  {version} {name} applied at {}",
            crate::output::rfc3339_ms(*applied_ms)
        ));
    }
    if status.version > status.supported {
        return Err(CliError::from(cnsm_store::StoreError::FormatTooNew {
            found: status.version,
            supported: status.supported,
        }));
    }
    if status.is_behind() {
        eprintln!(
            "error: Invalid: the schema needs migrating; run `cnsmctl --store URL store migrate`"
        );
        return Ok(crate::error::EXIT_INVALID);
    }
    Ok(EXIT_OK)
}

/// `migrate-store --from DIR --to URL`: copies the embedded store into PostgreSQL, verified.
pub fn migrate_store(args: &crate::cli::MigrateStoreArgs, out: &mut Out) -> Result<u8, CliError> {
    check_url(&args.to)?;
    if !args.from.is_dir() {
        return Err(CliError::unavailable(format!(
            "no store at {}",
            args.from.display()
        )));
    }
    let source = cnsm_store::embedded::EmbeddedStore::open(&args.from).map_err(|e| {
        let mut error = CliError::from(e);
        error.message = format!(
            "cannot open the store in {}: {}",
            args.from.display(),
            error.message
        );
        error
    })?;
    let target = open(&args.to, true)?;
    let report = cnsm_store_postgres::copy::copy_store(&source, &*target, &mut |n| {
        if n % 1000 == 0 {
            eprintln!("cnsm: {n} instances copied");
        }
    })
    .map_err(|e| match e {
        cnsm_store::StoreError::Refused(message) => CliError::new("Conflict", message),
        other => CliError::from(other),
    })?;
    out.line(format_args!(
        "copied {} definition(s) ({} revision(s)), {} instance(s), {} record(s), {} timer(s), {} idempotency key(s) from {} to {}",
        report.n_definitions,
        report.n_revisions,
        report.n_instances,
        report.n_records,
        report.n_timers,
        report.n_idempotency_keys,
        args.from.display(),
        redact(&args.to)
    ));
    out.line("OK: the copy holds every instance and history byte for byte, and verifies");
    Ok(EXIT_OK)
}
