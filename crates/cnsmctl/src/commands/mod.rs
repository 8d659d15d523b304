//! Runs a parsed command: checks its input, connects to an [`Api`], prints the result.
//!
//! Every command checks its own input (JSON arguments, label syntax, files) *before* it opens the
//! store, so a malformed request never takes the store's lock, fires a timer or changes anything.

pub mod audit;
mod definitions;
pub mod deliveries;
mod instances;
mod migrate;
mod serve;
pub mod snapshot;

use std::io::Read;
use std::path::PathBuf;

use serde_json::Value;

use crate::api::{Access, Connection};
use crate::cli::{
    Command, CreateCommand, DeleteCommand, DescribeCommand, GetCommand, StoreCommand,
};
use crate::error::{CliError, EXIT_INVALID, EXIT_OK};
use crate::local::Local;
use crate::output::Out;
use crate::remote::Remote;
use cnsm_runtime::Control;

pub use definitions::{applied_line, apply_source};
pub use instances::{created_line, transition_line};

/// The data directory when none is given.
pub const DEFAULT_DATA_DIR: &str = "./cnsm-data";

/// Global settings every command sees.
#[derive(Debug, Clone)]
pub struct Context {
    pub data_dir: PathBuf,
    /// True when `--data-dir` was given on the command line (not from the environment).
    pub data_dir_on_command_line: bool,
    pub namespace: String,
    /// True when `-n` was given on the command line: `apply` then refuses a file naming another
    /// namespace (kubectl's rule).
    pub namespace_on_command_line: bool,
    /// `--server URL`: commands go through that server's HTTP API instead of the store.
    pub server: Option<String>,
    /// `--store URL`: a PostgreSQL store instead of the embedded one in `data_dir`.
    pub store: Option<String>,
    /// `--token`: the bearer token sent to `--server`.
    pub token: Option<String>,
    /// `--ca-cert FILE`: the certificates trusted for an `https://` `--server`.
    pub ca_cert: Option<PathBuf>,
    /// `--flags FILE`: the flagd flag file.
    pub flags_file: Option<PathBuf>,
    /// The evaluator over `--flags` (loaded by `main`), for local commands and `serve`.
    pub flags: Option<std::sync::Arc<dyn cnsm_runtime::FlagEvaluator>>,
}

impl Context {
    /// The API this invocation talks to: the server of `--server`, else the embedded store.
    pub fn connect(&self, access: Access) -> Result<Connection, CliError> {
        match &self.server {
            Some(url) => Ok(Connection::Remote(Remote::new(
                url,
                self.token.as_deref(),
                self.ca_cert.as_deref(),
            )?)),
            None => match &self.store {
                Some(url) => {
                    Local::open_postgres(url, access, self.flags.clone()).map(Connection::Local)
                }
                None => Local::open_with_flags(&self.data_dir, access, self.flags.clone())
                    .map(Connection::Local),
            },
        }
    }

    /// [`Context::connect`] for `snapshot export|import`: a local store is opened with a small
    /// page cache ([`Local::open_for_snapshot`]), so memory stays bounded.
    pub fn connect_for_snapshot(&self, access: Access) -> Result<Connection, CliError> {
        match (&self.server, &self.store) {
            (None, None) => Local::open_for_snapshot(&self.data_dir, access, self.flags.clone())
                .map(Connection::Local),
            _ => self.connect(access),
        }
    }

    /// The API for `store verify`, which must open even a damaged store.
    pub fn connect_for_verify(&self) -> Result<Connection, CliError> {
        match &self.server {
            Some(url) => Ok(Connection::Remote(Remote::new(
                url,
                self.token.as_deref(),
                self.ca_cert.as_deref(),
            )?)),
            None => match &self.store {
                Some(url) => {
                    Local::open_postgres(url, Access::ReadOnly, None).map(Connection::Local)
                }
                None => Local::open_for_verify(&self.data_dir).map(Connection::Local),
            },
        }
    }
}

/// Runs one command and returns the process exit code. Errors are returned, not printed.
pub async fn run(context: &Context, command: Command, out: &mut Out) -> Result<u8, CliError> {
    match command {
        Command::Validate(args) => definitions::validate(&args, context.flags_file.as_deref(), out),
        Command::Apply(args) => definitions::apply(context, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Get(GetCommand::Machines(args)) => definitions::get(context, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Get(GetCommand::Instances(args)) => {
            instances::get(context, &args, out).await.map(|()| EXIT_OK)
        }
        Command::Describe(DescribeCommand::Machine(args)) => {
            definitions::describe(context, &args, out)
                .await
                .map(|()| EXIT_OK)
        }
        Command::Describe(DescribeCommand::Instance(args)) => {
            instances::describe(context, &args, out)
                .await
                .map(|()| EXIT_OK)
        }
        Command::Create(CreateCommand::Instance(args)) => instances::create(context, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Send(args) => instances::send(context, &args, out).await.map(|()| EXIT_OK),
        Command::Cancel(args) => instances::control(context, Control::Cancel, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Suspend(args) => instances::control(context, Control::Suspend, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Resume(args) => instances::control(context, Control::Resume, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Redrive(args) => instances::control(context, Control::Redrive, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Erase(args) => instances::erase(context, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::History(args) => instances::history(context, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Diff(args) => migrate::run_diff(context, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Migrate(command) => migrate::run_migrate(context, &command, out).await,
        Command::Rollout(command) => migrate::run_rollout(context, &command, out)
            .await
            .map(|()| EXIT_OK),
        Command::Graph(args) => definitions::graph(context, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Delete(DeleteCommand::Machine(args)) => definitions::delete(context, &args, out)
            .await
            .map(|()| EXIT_OK),
        Command::Store(StoreCommand::Verify) => store_verify(context, out).await,
        Command::Store(StoreCommand::Backup(args)) => store_backup(context, &args, out).await,
        Command::Store(StoreCommand::Restore(args)) => store_restore(context, &args, out),

        Command::Keys(snapshot::KeysCommand::Generate(args)) => snapshot::keys_generate(&args, out),
        Command::Snapshot(snapshot::SnapshotCommand::Export(args)) => {
            snapshot::export(context, &args, out).await
        }
        Command::Snapshot(snapshot::SnapshotCommand::Verify(args)) => snapshot::verify(&args, out),
        Command::Snapshot(snapshot::SnapshotCommand::Import(args)) => {
            snapshot::import(context, &args, out).await
        }
        Command::Store(StoreCommand::Migrate) => crate::postgres::migrate(store_url(context)?, out),
        Command::Store(StoreCommand::Status) => crate::postgres::status(store_url(context)?, out),
        Command::MigrateStore(args) => crate::postgres::migrate_store(&args, out),
        Command::Demo(_) => crate::demo::run(context, out).await.map(|()| EXIT_OK),
        Command::Serve(args) => serve::run(context, &args, out).await.map(|()| EXIT_OK),
        Command::Audit(command) => audit::run(context, &command, out).await.map(|()| EXIT_OK),
        Command::Deliveries(args) => deliveries::run(context, &args, out).await.map(|()| EXIT_OK),
    }
}

/// `store backup --out FILE`.
async fn store_backup(
    context: &Context,
    args: &crate::cli::BackupArgs,
    out: &mut Out,
) -> Result<u8, CliError> {
    use crate::api::Api;
    let api = context.connect(Access::ReadOnly)?;
    let report = api.backup(&args.out).await?;
    out.line(format_args!(
        "backup {}: {} bytes; verified {} definition revision(s), {} instance(s), {} record(s)",
        report.path.display(),
        report.bytes,
        report.verified.n_definitions,
        report.verified.n_instances,
        report.verified.n_records
    ));
    Ok(EXIT_OK)
}

/// `store restore FILE` into `--data-dir`.
fn store_restore(
    context: &Context,
    args: &crate::cli::RestoreArgs,
    out: &mut Out,
) -> Result<u8, CliError> {
    if context.server.is_some() {
        return Err(CliError::invalid(
            "store restore writes a local data directory and does not work with --server; \
             run it on the host of the new data directory, then start the server on it",
        ));
    }
    let report = cnsm_store::embedded::backup::restore(&args.backup, &context.data_dir)?;
    out.line(format_args!(
        "restored {} into {}: verified {} definition revision(s), {} instance(s), {} record(s)",
        args.backup.display(),
        context.data_dir.display(),
        report.verified.n_definitions,
        report.verified.n_instances,
        report.verified.n_records
    ));
    Ok(EXIT_OK)
}

/// The `--store` URL of `store migrate` / `store status`.
fn store_url(context: &Context) -> Result<&str, CliError> {
    context.store.as_deref().ok_or_else(|| {
        CliError::invalid("this command manages a PostgreSQL store: give --store postgres://...")
    })
}

/// `store verify`: exit 1 when anything is wrong.
async fn store_verify(context: &Context, out: &mut Out) -> Result<u8, CliError> {
    use crate::api::Api;
    let api = context.connect_for_verify()?;
    let report = api.verify_store().await?;
    out.line(format_args!(
        "store {}: {} definition revision(s), {} instance(s), {} record(s) checked",
        match &context.store {
            Some(url) => crate::postgres::redact(url),
            None => context.data_dir.display().to_string(),
        },
        report.n_definitions,
        report.n_instances,
        report.n_records
    ));
    if report.is_ok() {
        out.line("OK: every hash chain, instance and index verified");
        return Ok(EXIT_OK);
    }
    for problem in &report.problems {
        out.line(format_args!("problem: {problem}"));
    }
    eprintln!(
        "error: Invalid: {} problem(s) found in the store",
        report.problems.len()
    );
    Ok(EXIT_INVALID)
}

/// The most a definition file may hold; admission refuses larger ones with a clear problem, so
/// reading stops one byte past it instead of loading an arbitrarily large file.
const SOURCE_READ_MAX: u64 = cnsm_core::admission::SOURCE_BYTES_MAX as u64 + 1;

/// Reads a file argument (`-` is stdin). Returns the display name and the text.
pub fn read_source(path: &str) -> Result<(String, String), CliError> {
    let mut bytes = Vec::new();
    let (name, result) = if path == "-" {
        (
            "<stdin>".to_owned(),
            std::io::stdin()
                .lock()
                .take(SOURCE_READ_MAX)
                .read_to_end(&mut bytes),
        )
    } else {
        let result =
            std::fs::File::open(path).and_then(|f| f.take(SOURCE_READ_MAX).read_to_end(&mut bytes));
        (path.to_owned(), result)
    };
    result.map_err(|e| CliError::invalid(format!("cannot read {name}: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        CliError::invalid(format!(
            "{name} is not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    Ok((name, text))
}

/// Parses a JSON flag value; the error names the flag and the position.
pub fn parse_json(flag: &str, text: &str) -> Result<Value, CliError> {
    serde_json::from_str(text)
        .map_err(|e| CliError::invalid(format!("{flag} is not valid JSON: {e}")))
}

/// Parses `key=value` pairs; each argument may hold several, comma-separated.
pub fn parse_labels(flag: &str, args: &[String]) -> Result<Vec<(String, String)>, CliError> {
    let mut out = Vec::new();
    for arg in args {
        for pair in arg.split(',').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    out.push((key.trim().to_owned(), value.trim().to_owned()));
                }
                _ => {
                    return Err(CliError::invalid(format!(
                        "{flag} '{pair}' must be key=value"
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// kubectl's message for an empty list, on stderr so that stdout stays parseable.
pub fn no_resources(namespace: Option<&str>) {
    match namespace {
        Some(ns) => eprintln!("No resources found in {ns} namespace."),
        None => eprintln!("No resources found"),
    }
}
