//! `cnsmctl`: the kubectl-like command line of cnsm.
//!
//! Code map:
//! - [`cli`]: every command, flag and help text (clap derive).
//! - [`commands`]: runs a command: checks its input, connects to an [`api::Api`], prints.
//! - [`api`]: the trait every command goes through, and [`api::Connection`] (local or remote).
//! - [`local`]: the `Api` over an in-process runtime and the embedded store (`--data-dir`).
//! - [`remote`]: the `Api` over the HTTP API of a `cnsmctl serve` (`--server URL`).
//! - [`output`]: tables, times, and the JSON views scripts rely on.
//! - [`error`]: the error type and the exit codes (documented in `--help` and `docs/cli.md`).
//! - [`demo`]: the guided tour (`cnsmctl demo`).
//!
//! Exit codes: 0 ok, 1 invalid input, 2 usage, 3 not found, 4 rejected or conflict, 5 store
//! (or server) unavailable. Errors are one line on stderr: `error: <ErrorType>: <message>`.
//! The same holds in client mode: a problem+json answer maps back through its `errorType`.

mod api;
mod cli;
mod commands;
mod demo;
mod error;
mod local;
mod openmetrics;
mod output;
mod postgres;
mod remote;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc instead of the system allocator: under the server's load glibc's malloc and free
/// were a fifth of its CPU (BENCHMARKS.md, run of 2026-11-28 02:13).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use crate::cli::{Cli, Command};
use crate::commands::{Context, DEFAULT_DATA_DIR};
use crate::error::{EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE};
use crate::output::Out;

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (m, cli)));
    let (matches, cli) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // Usage errors exit with 2; `--help` and `--version` are not errors.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    let on_command_line = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let context = Context {
        data_dir: cli
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        data_dir_on_command_line: on_command_line("data_dir"),
        namespace: cli.namespace.clone(),
        namespace_on_command_line: on_command_line("namespace"),
        server: cli.server.clone(),
        store: cli.store.clone(),
        token: cli.token.clone(),
        ca_cert: cli.ca_cert.clone(),
        flags_file: cli.flags.clone(),
        flags: None,
    };
    // The server uses every core; a command is one thread waiting on a store or a server.
    let mut builder = match cli.command {
        Command::Serve(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: Unavailable: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    let mut context = context;
    // A flag file is loaded once, before anything runs; a bad one is refused up front.
    if let (Some(path), None) = (&context.flags_file, &context.server) {
        match runtime.block_on(cnsm_flags::Flags::from_file(path)) {
            Ok(flags) => context.flags = Some(std::sync::Arc::new(flags)),
            Err(e) => {
                eprintln!("error: Invalid: --flags: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let mut out = Out::new();
    // Every store handle is dropped (and its runtime shut down) inside `run`, before we exit.
    let result = runtime.block_on(commands::run(&context, cli.command, &mut out));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            for line in &error.diagnostics {
                eprintln!("{line}");
            }
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
